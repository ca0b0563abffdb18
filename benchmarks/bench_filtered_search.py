"""Filtered search latency: ``PatchIndex.search_embeddings(where=...)`` against unfiltered, at 10^6 vectors.

Rows get an ``organ`` column where one value covers 1% of the rows and another 50%; queries are
searched unfiltered, filtered to 1% and filtered to 50% (FAISS ID selector), interleaved, one query
at a time. Prints p50 / p90 latency, the ratio to unfiltered, and the mean number of results returned.

    .venv/bin/python benchmarks/bench_filtered_search.py --n 1000000 --dim 64 --queries 30
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index_build.faiss_index import make_faiss_index, set_search_params
from index_build.patch_index import PatchIndex


def build(n: int, dim: int, index_type: str, params: dict) -> PatchIndex:
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((n, dim), dtype=np.float32)
    faiss.normalize_L2(xb)
    index = make_faiss_index(xb, index_type, params)
    set_search_params(index, params)
    organ = np.where(np.arange(n) % 100 == 0, "rare", np.where(np.arange(n) % 2 == 1, "half", "other"))
    table = pa.table(
        {
            "id": pa.array(np.arange(n, dtype=np.int64)),
            "label": pa.array(np.full(n, "x")),
            "source": pa.array(np.full(n, "")),
            "thumbnail": pa.array([b""] * n, pa.binary()),
            "organ": pa.array(organ),
        }
    )
    return PatchIndex(Path("bench"), index, table, {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--types", nargs="+", default=["flat", "factory:IVF1024,Flat"])
    args = parser.parse_args()
    faiss.omp_set_num_threads(2)
    rng = np.random.default_rng(1)
    xq = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    print(f"n = {args.n:,}, d = {args.dim}, k = {args.k}, {args.queries} queries one at a time, 2 threads\n")
    print("| index | filter | rows kept | p50 ms | p90 ms | p50 / unfiltered | mean results |")
    print("|---|---|---|---|---|---|---|")
    for index_type in args.types:
        params = {"nprobe": 32} if index_type.startswith("factory:IVF") else {}
        start = time.perf_counter()
        index = build(args.n, args.dim, index_type, params)
        built = time.perf_counter() - start
        filters = {"none": None, "organ = rare (1%)": {"organ": "rare"}, "organ = half (50%)": {"organ": "half"}}
        times: dict[str, list[float]] = {name: [] for name in filters}
        found: dict[str, list[int]] = {name: [] for name in filters}
        for q in xq:  # interleaved: each query under every filter in turn
            for name, where in filters.items():
                t0 = time.perf_counter()
                _, ids = index.search_embeddings(q[None], args.k, where=where)
                times[name].append(time.perf_counter() - t0)
                found[name].append(int((ids >= 0).sum()))
        base = float(np.median(times["none"]))
        for name, where in filters.items():
            kept = 1.0 if where is None else float(index.where_mask(where).mean())
            p50, p90 = float(np.median(times[name])), float(np.percentile(times[name], 90))
            label = f"{index_type}{' ' + str(params) if params else ''} (built in {built:.0f} s)"
            print(
                f"| {label} | {name} | {kept:.1%} | {1000 * p50:.1f} | {1000 * p90:.1f} | {p50 / base:.2f} | "
                f"{np.mean(found[name]):.1f} |"
            )


if __name__ == "__main__":
    main()
