"""Index-build throughput: the real pipeline on JPEG patches vs the model's raw forward pass.

Goal: embedding a folder of real JPEG patches (``index_build``'s reader ->
embedder path: DataLoader workers decode, preprocess and thumbnail, the model embeds) runs at
>= 0.9x the model's raw forward throughput at the same batch size, i.e. decoding and resizing
do not starve the model.

Both are measured in one run, alternating (pipeline, raw, pipeline, raw, ...), median taken.
The raw forward embeds already-preprocessed tensors of the same images with the same
``Embedder.embed_pixels`` call.

Usage::

    python benchmarks/bench_index_build.py                           # 256 lc25000 gallery patches, batch 32
    python benchmarks/bench_index_build.py --limit 512 --batch-size 32 --num-workers 1 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from index_build.data import load_image_dataset  # noqa: E402
from index_build.index import default_num_workers, embed_dataset  # noqa: E402
from index_build.models import load_model  # noqa: E402

logger = logging.getLogger(__name__)
DEFAULT_FOLDER = ROOT.parent / "shared" / "data" / "lc25000_lung" / "gallery"


def pipeline_seconds(dataset, embedder, batch_size: int, num_workers: int) -> float:
    """Seconds for ``index_build.index.embed_dataset`` over the whole dataset (fresh work dir)."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        xb, _ = embed_dataset(dataset, embedder, Path(tmp) / "work", batch_size, num_workers, progress=False)
        elapsed = time.perf_counter() - start
    if len(xb) != len(dataset):
        raise RuntimeError(f"embedded {len(xb)} of {len(dataset)} images")
    return elapsed


def raw_seconds(batches: list[torch.Tensor], embedder) -> float:
    """Seconds for ``embed_pixels`` over preprocessed batches (model only)."""
    start = time.perf_counter()
    for pixels in batches:
        embedder.embed_pixels(pixels)
    return time.perf_counter() - start


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER, help="image folder (class_name/*.jpg)")
    parser.add_argument("--limit", type=int, default=256, help="images used (first N rows)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: cores - 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the main process")
    parser.add_argument("--model", default="default")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"image folder not found: {args.folder}")
    if min(args.limit, args.batch_size, args.repeats) < 1:
        parser.error("--limit, --batch-size and --repeats must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    embedder = load_model(args.model, device="cpu")
    dataset = load_image_dataset(str(args.folder))
    dataset = dataset.select(range(min(args.limit, len(dataset))))
    workers = default_num_workers() if args.num_workers is None else args.num_workers
    pixels = embedder.preprocess([dataset[i]["image"] for i in range(len(dataset))])
    batches = list(torch.split(pixels, args.batch_size))
    embedder.embed_pixels(batches[0])  # warm-up
    pipe, raw = [], []
    for i in range(args.repeats):
        pipe.append(pipeline_seconds(dataset, embedder, args.batch_size, workers))
        raw.append(raw_seconds(batches, embedder))
        logger.info("repeat %d: pipeline %.1f s, raw forward %.1f s", i + 1, pipe[-1], raw[-1])
    n = len(dataset)
    pipe_rate, raw_rate = n / statistics.median(pipe), n / statistics.median(raw)
    print(
        f"{n} JPEG patches from {args.folder}, model {args.model} ({embedder.dim}-d), batch {args.batch_size}, "
        f"{workers} DataLoader worker(s), {args.threads} torch threads, median of {args.repeats}"
    )
    print("| path | images/s |\n|---|---|")
    print(f"| raw forward (preprocessed tensors, embed_pixels) | {raw_rate:.1f} |")
    print(f"| index_build pipeline (decode, preprocess, thumbnail, embed) | {pipe_rate:.1f} |")
    print(f"| **ratio pipeline / raw** | **{pipe_rate / raw_rate:.3f}** (target >= 0.9) |")


if __name__ == "__main__":
    main()
