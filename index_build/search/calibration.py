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

from collections.abc import Callable, Sequence
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
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return close_match_threshold_chunked([len(vectors)], [lambda: vectors], k, percentile, max_sample, seed)


def close_match_threshold_chunked(
    sizes: Sequence[int],
    chunks: Sequence[Callable[[], np.ndarray]],
    k: int = CLOSE_MATCH_K,
    percentile: float = CLOSE_MATCH_PERCENTILE,
    max_sample: int = CLOSE_MATCH_SAMPLE,
    seed: int = 0,
) -> Optional[dict]:
    """:func:`close_match_threshold` of a gallery given as consecutive chunks, one in memory at a time.

    Args:
        sizes: the number of vectors of each chunk.
        chunks: one callable per chunk returning its ``size x D`` unit vectors (called twice each:
            once to read the sampled patches, once to search them).

    The same sample and the same neighbours as :func:`close_match_threshold` of the
    concatenated chunks (exact search, chunk by chunk, merged into a running top ``k + 1``).
    """
    import faiss

    n = int(sum(sizes))
    if n < 2:
        return None
    k = max(1, min(int(k), n - 1))
    rows = np.arange(n)
    if n > max_sample:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=max_sample, replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    queries = None
    for c, read in enumerate(chunks):
        mine = rows[(rows >= starts[c]) & (rows < starts[c + 1])]
        if len(mine):
            x = np.ascontiguousarray(read(), dtype=np.float32)
            if queries is None:
                queries = np.empty((len(rows), x.shape[1]), dtype=np.float32)
            queries[np.searchsorted(rows, mine)] = x[mine - starts[c]]
    top_d = np.full((len(rows), k + 1), -np.inf, dtype=np.float32)
    top_i = np.full((len(rows), k + 1), -1, dtype=np.int64)
    for c, read in enumerate(chunks):
        index = faiss.IndexFlatIP(queries.shape[1])
        index.add(np.ascontiguousarray(read(), dtype=np.float32))
        for start in range(0, len(rows), 4096):
            part = slice(start, start + 4096)
            scores, ids = index.search(queries[part], min(k + 1, index.ntotal))
            ids = np.where(ids >= 0, ids + starts[c], -1)
            cat_d = np.concatenate([top_d[part], scores], axis=1)
            cat_i = np.concatenate([top_i[part], ids], axis=1)
            order = np.argsort(-cat_d, axis=1, kind="stable")[:, : k + 1]
            top_d[part], top_i[part] = np.take_along_axis(cat_d, order, 1), np.take_along_axis(cat_i, order, 1)
    kth = np.empty(len(rows), dtype=np.float32)
    for j, row in enumerate(rows):
        others = top_d[j][top_i[j] != row]  # the patch itself (wherever ties put it) is not a neighbour
        kth[j] = others[k - 1]
    return {
        "threshold": round(float(np.percentile(kth, percentile)), 6),
        "k": k,
        "percentile": float(percentile),
        "sample": int(len(rows)),
        "median": round(float(np.median(kth)), 6),
        "rule": RULE,
    }
