"""End-to-end query latency: decode -> preprocess -> embed -> search -> thumbnails.

Goal: default model on the CPU, one 224x224 query against a 100,000-patch index:
p50 below 150 ms, with the share of each stage printed.

The index is written by ``index_build``'s own writer (:func:`index_build.index.write_index`)
from synthetic unit vectors with real metadata: labels, sources and JPEG thumbnails of real
patches (cycled) when ``../shared/data`` is present, synthetic ones otherwise. The query is a
real 224x224 JPEG patch (its bytes are decoded in every repetition).

Usage::

    python benchmarks/bench_query_latency.py                     # 100,000 patches, flat (exact) index
    python benchmarks/bench_query_latency.py --n 20000 --repeats 20 --index-type ivfpq
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from index_build.index import METADATA_SCHEMA, PatchIndex, make_thumbnail, write_index  # noqa: E402
from index_build.models import load_model  # noqa: E402

logger = logging.getLogger(__name__)
SHARED = ROOT.parent / "shared" / "data" / "lc25000_lung"
STAGES = ("decode", "preprocess", "embed", "search", "thumbnails")


def sample_patches(count: int) -> list[tuple[bytes, str, str]]:
    """``count`` (JPEG bytes, label, source) of real gallery patches, or synthetic ones without the data."""
    files = sorted((SHARED / "gallery").glob("*/*.jpg"))[:count] if SHARED.is_dir() else []
    if files:
        return [(f.read_bytes(), f.parent.name, str(f)) for f in files]
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        out.append((buf.getvalue(), f"class{i % 3}", f"synthetic:{i}"))
    return out


def query_bytes() -> bytes:
    """A real 224x224 query patch (JPEG bytes), or a synthetic one."""
    files = sorted((SHARED / "query").glob("*/*.jpg")) if SHARED.is_dir() else []
    return files[0].read_bytes() if files else sample_patches(1)[0][0]


def build_synthetic_index(path: Path, embedder, n: int, index_type: str, patches: int) -> PatchIndex:
    """An ``n``-vector index of random unit vectors with real-looking metadata (thumbnails cycled)."""
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((n, embedder.dim), dtype=np.float32)
    real = sample_patches(patches)
    thumbs = [make_thumbnail(Image.open(io.BytesIO(data))) for data, _, _ in real]
    metadata = pa.table(
        {
            "id": pa.array(np.arange(n, dtype=np.int64)),
            "label": pa.array([real[i % len(real)][1] for i in range(n)], pa.string()),
            "source": pa.array([f"{real[i % len(real)][2]}#{i}" for i in range(n)], pa.string()),
            "thumbnail": pa.array([thumbs[i % len(thumbs)] for i in range(n)], pa.binary()),
        },
        schema=METADATA_SCHEMA,
    )
    write_index(path, xb, metadata, embedder, index_type)
    return PatchIndex.load(path, embedder)


def one_query(index: PatchIndex, data: bytes, k: int) -> dict[str, float]:
    """Seconds per stage for one query given as encoded image bytes."""
    t = [time.perf_counter()]
    image = Image.open(io.BytesIO(data))
    image.load()
    t.append(time.perf_counter())
    pixels = index.embedder.preprocess([image])
    t.append(time.perf_counter())
    xq = index.embedder.embed_pixels(pixels)
    t.append(time.perf_counter())
    scores, ids = index.search_embeddings(xq, k)
    t.append(time.perf_counter())
    result = index._result(scores[0], ids[0])  # labels, sources, votes and decoded thumbnails
    t.append(time.perf_counter())
    if len(result.thumbnails) != k:
        raise RuntimeError(f"expected {k} results, got {len(result.thumbnails)}")
    return {stage: t[i + 1] - t[i] for i, stage in enumerate(STAGES)}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="patches in the index")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=50, help="timed queries")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--index-type", default="flat", help="flat (exact), ivfpq, hnsw or factory:<string>")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--patches", type=int, default=64, help="distinct real thumbnails cycled in the metadata")
    parser.add_argument("--channels-last", action="store_true", help="convert the model to channels_last first")
    args = parser.parse_args(argv)
    if min(args.n, args.k, args.repeats, args.patches) < 1 or args.warmup < 0:
        parser.error("--n, --k, --repeats, --patches must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    embedder = load_model("default", device="cpu")
    if args.channels_last:
        embedder.model.to(memory_format=torch.channels_last)
    data = query_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        index = build_synthetic_index(Path(tmp) / "idx", embedder, args.n, args.index_type, args.patches)
        logger.info(
            "built a %s index of %d patches in %.1f s", args.index_type, len(index), time.perf_counter() - start
        )
        for _ in range(args.warmup):
            one_query(index, data, args.k)
        runs = [one_query(index, data, args.k) for _ in range(args.repeats)]
    totals = sorted(sum(r.values()) * 1e3 for r in runs)
    medians = {s: statistics.median(r[s] for r in runs) * 1e3 for s in STAGES}
    p50, p95 = statistics.median(totals), totals[min(len(totals) - 1, int(round(0.95 * (len(totals) - 1))))]
    print(
        f"default model ({embedder.dim}-d), {args.index_type} index of {args.n:,} patches, k={args.k}, "
        f"{args.repeats} queries, {args.threads} threads, 224x224 JPEG query"
    )
    print("| stage | p50 ms | share of p50 sum |\n|---|---|---|")
    total_median = sum(medians.values())
    for s in STAGES:
        print(f"| {s} | {medians[s]:.1f} | {100 * medians[s] / total_median:.1f}% |")
    print(f"| **end to end** | **p50 {p50:.1f}** (p95 {p95:.1f}) | target < 150 ms |")


if __name__ == "__main__":
    main()
