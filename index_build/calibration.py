"""A "close match" threshold calibrated on the gallery itself.

A search always returns *some* nearest neighbours; the threshold says when the best of them is
too far to count as a match. It is measured at build time on the gallery alone, with no labels
and no queries, by this rule:

    For each gallery patch, take its cosine similarity to its k-th nearest *other* gallery patch
    (k = 10). The threshold is the 1st percentile of these values over the gallery (over a seeded
    sample of at most 20,000 patches for larger galleries).

Why the k-th and not the nearest neighbour: histology collections hold near-duplicate groups
(augmented copies, overlapping fields of one slide area; LC25000 has groups of 5-7 in our
splits), so a patch's nearest other patch is often a copy of itself, which a new query never
has. The k-th neighbour (k beyond a group's size) measures how close *different* fields of the
same kind of tissue are, which is what an honest query can expect. The 1st percentile leaves
out the rare outliers of the gallery itself.

A query whose best similarity falls below the threshold gets "no close match in this gallery":
it is farther from everything in the gallery than almost every gallery patch is from its 10th
neighbour. The similarity shown on the page is the same cosine similarity.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

CLOSE_MATCH_K = 10
CLOSE_MATCH_PERCENTILE = 1.0
CLOSE_MATCH_SAMPLE = 20_000
RULE = (
    "1st percentile, over the gallery, of each patch's cosine similarity to its 10th nearest other patch "
    "(seeded sample of at most 20,000 patches)"
)


def close_match_threshold(
    vectors: np.ndarray,
    k: int = CLOSE_MATCH_K,
    percentile: float = CLOSE_MATCH_PERCENTILE,
    max_sample: int = CLOSE_MATCH_SAMPLE,
    seed: int = 0,
) -> Optional[dict]:
    """Calibrate the close-match threshold of a gallery of L2-normalised vectors.

    Args:
        vectors: N x D float32 gallery vectors (unit norm; cosine = inner product).
        k: which neighbour (among the other patches) measures a patch's neighbourhood; capped
            at N - 1 for small galleries.
        percentile: the percentile (0-100) of those similarities that becomes the threshold.
        max_sample: at most this many gallery patches are measured (seeded sample).
        seed: seed of the sample.

    Returns:
        ``{"threshold", "k", "percentile", "sample", "median", "rule"}`` (floats rounded to 6
        digits), or ``None`` for a gallery of fewer than 2 patches.
    """
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(vectors)
    if n < 2:
        return None
    k = max(1, min(int(k), n - 1))
    rows = np.arange(n)
    if n > max_sample:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=max_sample, replace=False))
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    kth = np.empty(len(rows), dtype=np.float32)
    for start in range(0, len(rows), 4096):
        chunk = rows[start : start + 4096]
        scores, ids = index.search(vectors[chunk], k + 1)
        for j, row in enumerate(chunk):
            others = scores[j][ids[j] != row]  # the patch itself (wherever ties put it) is not a neighbour
            kth[start + j] = others[k - 1]
    return {
        "threshold": round(float(np.percentile(kth, percentile)), 6),
        "k": k,
        "percentile": float(percentile),
        "sample": int(len(rows)),
        "median": round(float(np.median(kth)), 6),
        "rule": RULE,
    }
