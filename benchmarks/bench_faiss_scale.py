"""Search at scale: exact ``IndexFlatIP`` vs approximate FAISS indexes on 1M clustered vectors.

Goal: at N = 1,000,000 vectors of the default model's dimension (512), the
approximate index reaches recall@10 >= 0.95 of exact search, at >= 10x lower search latency and
<= 1/8 of the exact index's memory; build time printed.

The vectors are synthetic but shaped like real embeddings (see :func:`clustered_vectors`):
a few thousand clusters of Zipf-distributed sizes on the unit sphere, each spread along its own
low-dimensional subspace with a decaying spectrum plus a little isotropic noise, L2-normalised.
Queries come from the same distribution and are not in the database.

Two recall figures are printed: ``recall@10`` = mean overlap of the approximate and the exact
top-10 (the strict reading of the target), and FAISS's ``1-recall@10`` = fraction of queries whose
exact nearest neighbour is in the approximate top-10.

Every approximate candidate is trained and filled exactly as ``index_build`` does it
(:func:`index_build.index.make_faiss_index`), so the chosen parameters are the ones users get
with ``--index-type ivfpq``.

Usage::

    python benchmarks/bench_faiss_scale.py                      # N = 1,000,000 (several minutes)
    python benchmarks/bench_faiss_scale.py --n 200000 --nprobe 8 16 32
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index_build.faiss_index import make_faiss_index, search_knob, set_search_params  # noqa: E402

logger = logging.getLogger(__name__)


def clustered_vectors(
    n: int,
    d: int = 512,
    clusters: int = 2000,
    rank: int = 48,
    spread: float = 0.8,
    noise: float = 0.15,
    seed: int = 0,
    centers_seed: int = 1234,
) -> np.ndarray:
    """``n x d`` float32 L2-normalised vectors clustered like image embeddings.

    Cluster ``c`` has a random unit centre ``mu_c`` and a random orthonormal basis ``U_c``
    (``d x rank``, Gaussian, so orthonormal up to O(1/sqrt(d))); a member is
    ``mu_c + spread * U_c (lambda * z) + noise * e / sqrt(d)`` with
    ``z, e ~ N(0, 1)`` and ``lambda_i ~ i^-0.5`` normalised to unit norm (an anisotropic,
    power-law spectrum, as in real embeddings), then L2-normalised. Cluster sizes follow a Zipf
    law (exponent 1), as class sizes of real collections do. ``centers_seed`` fixes the
    clusters, ``seed`` the members: database and queries share clusters, not members.
    """
    crng = np.random.default_rng(centers_seed)
    mu = crng.standard_normal((clusters, d)).astype(np.float32)
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    # Random Gaussian bases are orthonormal up to O(1/sqrt(d)) in 512 dimensions (no QR needed).
    bases = crng.standard_normal((clusters, d, rank), dtype=np.float32) / np.float32(np.sqrt(d))
    lam = np.arange(1, rank + 1, dtype=np.float32) ** -0.5
    lam /= np.linalg.norm(lam)
    weights = 1.0 / np.arange(1, clusters + 1)
    weights /= weights.sum()
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, weights)
    order = rng.permutation(n)  # members of one cluster land at random rows
    out = np.empty((n, d), dtype=np.float32)
    start = 0
    for c in np.flatnonzero(counts):
        m = int(counts[c])
        z = rng.standard_normal((m, rank), dtype=np.float32) * lam
        x = mu[c] + spread * (z @ bases[c].T)
        x += (noise / np.sqrt(d)) * rng.standard_normal((m, d), dtype=np.float32)
        out[order[start : start + m]] = x
        start += m
    faiss.normalize_L2(out)
    return out


def recall_at_k(exact_ids: np.ndarray, approx_ids: np.ndarray, k: int) -> float:
    """Mean fraction of each query's exact top-k found in its approximate top-k."""
    hits = [len(set(e[:k]) & set(a[:k])) for e, a in zip(exact_ids, approx_ids)]
    return float(np.mean(hits) / k)


def nn_recall_at_k(exact_ids: np.ndarray, approx_ids: np.ndarray, k: int) -> float:
    """FAISS's "1-recall@k": fraction of queries whose exact nearest neighbour is in the approximate top-k."""
    return float(np.mean([e[0] in set(a[:k]) for e, a in zip(exact_ids, approx_ids)]))


def index_bytes(index: faiss.Index) -> int:
    """Serialized size of an index (what ``index.faiss`` takes on disk and, roughly, in RAM)."""
    return int(faiss.serialize_index(index).size)


def time_search(index: faiss.Index, xq: np.ndarray, k: int, single: int, repeats: int) -> tuple[float, float]:
    """(batch ms per query, single-query ms p50): one batched search of all ``xq``, and
    ``single`` queries searched one at a time; medians over ``repeats``."""
    batch = []
    for _ in range(repeats):
        start = time.perf_counter()
        index.search(xq, k)
        batch.append((time.perf_counter() - start) * 1e3 / len(xq))
    singles = []
    for i in range(min(single, len(xq))):
        q = xq[i : i + 1]
        start = time.perf_counter()
        index.search(q, k)
        singles.append((time.perf_counter() - start) * 1e3)
    return statistics.median(batch), statistics.median(singles)


def run(args: argparse.Namespace) -> list[dict]:
    faiss.omp_set_num_threads(args.threads)
    t0 = time.perf_counter()
    xb = clustered_vectors(args.n, args.dim, args.clusters, args.rank, args.spread, args.noise, seed=0)
    xq = clustered_vectors(args.nq, args.dim, args.clusters, args.rank, args.spread, args.noise, seed=1)
    logger.info("generated %d + %d vectors in %.1f s", args.n, args.nq, time.perf_counter() - t0)

    rows = []
    t0 = time.perf_counter()
    flat, _ = make_faiss_index(xb, "flat")
    build_flat = time.perf_counter() - t0
    exact_d, exact_i = flat.search(xq, args.k)
    nn1 = float(np.median(exact_d[:, 0]))
    nn10 = float(np.median(exact_d[:, -1]))
    logger.info("exact: median cosine of the 1st / %dth neighbour %.3f / %.3f", args.k, nn1, nn10)
    flat_batch, flat_single = time_search(flat, xq, args.k, args.single_flat, args.repeats)
    flat_bytes = index_bytes(flat)
    rows.append(
        dict(
            index="flat",
            param="",
            recall=1.0,
            nn_recall=1.0,
            batch_ms=flat_batch,
            single_ms=flat_single,
            bytes=flat_bytes,
            build_s=build_flat,
        )
    )
    del flat

    for spec in args.index:
        t0 = time.perf_counter()
        index, used = make_faiss_index(xb, spec, seed=0)
        build = time.perf_counter() - t0
        size = index_bytes(index)
        logger.info("%s %s built in %.1f s, %.1f MB", spec, used, build, size / 1e6)
        knob = search_knob(index)  # the index object says which parameter it has
        values = {"ef_search": args.ef_search, "nprobe": args.nprobe}.get(knob, [None])
        for value in values:
            if knob is not None:
                set_search_params(index, {knob: value})
            _, approx_i = index.search(xq, args.k)
            recall = recall_at_k(exact_i, approx_i, args.k)
            nn_recall = nn_recall_at_k(exact_i, approx_i, args.k)
            batch_ms, single_ms = time_search(index, xq, args.k, args.single, args.repeats)
            desc = spec if spec.startswith("factory:") else f"{spec} {json.dumps(used, sort_keys=True)}"
            rows.append(
                dict(
                    index=desc,
                    param=f"{knob}={value}" if knob else "-",
                    recall=recall,
                    nn_recall=nn_recall,
                    batch_ms=batch_ms,
                    single_ms=single_ms,
                    bytes=size,
                    build_s=build,
                )
            )
            logger.info("%s %s=%s recall@%d %.4f", spec, knob, value, args.k, recall)
        del index
    for r in rows:
        r["speedup_batch"] = flat_batch / r["batch_ms"]
        r["speedup_single"] = flat_single / r["single_ms"]
        r["memory_ratio"] = r["bytes"] / flat_bytes
    return rows


def format_table(rows: list[dict], k: int) -> str:
    lines = [
        f"| index | search param | recall@{k} | 1-recall@{k} | ms/query (batch) | ms/query (single) "
        "| speed-up batch / single "
        "| memory MB | memory / exact | build s |",
        "|" + "---|" * 10,
    ]
    for r in rows:
        lines.append(
            f"| {r['index']} | {r['param']} | {r['recall']:.4f} | {r['nn_recall']:.4f} | {r['batch_ms']:.3f} "
            f"| {r['single_ms']:.2f} "
            f"| {r['speedup_batch']:.1f}x / {r['speedup_single']:.1f}x | {r['bytes'] / 1e6:.1f} "
            f"| 1/{1 / r['memory_ratio']:.1f} | {r['build_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="database vectors")
    parser.add_argument("--nq", type=int, default=1000, help="queries")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--rank", type=int, default=48, help="dimension of each cluster's subspace")
    parser.add_argument("--spread", type=float, default=0.8)
    parser.add_argument("--noise", type=float, default=0.15)
    parser.add_argument(
        "--index",
        nargs="+",
        default=["ivfpq"],
        help="approximate index types as index_build takes them: ivfpq, hnsw, factory:<string>",
    )
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--ef-search", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--single", type=int, default=200, help="single-query searches timed per approximate setting")
    parser.add_argument("--single-flat", type=int, default=20, help="single-query searches timed on the exact index")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if min(args.n, args.nq, args.k, args.single, args.single_flat, args.repeats) < 1:
        parser.error("sizes and counts must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = run(args)
    print(
        f"N={args.n:,} d={args.dim} queries={args.nq} k={args.k} threads={args.threads} faiss {faiss.__version__}; "
        f"clusters={args.clusters} rank={args.rank} spread={args.spread} noise={args.noise}"
    )
    print(format_table(rows, args.k))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
