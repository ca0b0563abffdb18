"""Training images/s against inference images/s of the same model, side by side in one run.

Three measurements on the same images, in one process, interleaved in this order:

- **inference**: ``Embedder.embed_images`` (decode, resize, normalise, backbone, neck, head);
- **train, plain**: ``python -m train``'s loop with ``--feature-cache off`` (the backbone runs
  on every step, DataLoader workers decode and augment);
- **train, cached**: the default ``--feature-cache auto``; epoch 1 fills the cache (backbone
  over each drawn (image, flip/rotation) pair), later epochs mostly reuse it.

Every training figure is training images / wall time of the epoch, backbone-cache filling,
data loading, forward, backward and optimiser steps included (the ``images_per_s`` column of
``metrics.csv``).

    python benchmarks/bench_train.py --images 256 --epochs 4
    python benchmarks/bench_train.py --data ../shared/data/lc25000_lung/gallery --images 320
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from image_processing_lgffem import LgffemImageProcessor  # noqa: E402
from index_build.models import Embedder, untrained_model  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.trainer import train  # noqa: E402


def synthetic(n: int, size: int = 224, seed: int = 0):
    import datasets

    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    labels = [f"c{i % 4}" for i in range(n)]
    return datasets.Dataset.from_dict({"image": images, "label": labels}).cast_column("image", datasets.Image())


def real(folder: str, n: int):
    from index_build.data import load_image_dataset

    ds = load_image_dataset(folder)
    rows = np.random.default_rng(0).permutation(len(ds))[:n]
    return ds.select(sorted(int(r) for r in rows))


def inference_rate(ds, batch_size: int) -> float:
    model = untrained_model()
    embedder = Embedder(model=model, processor=LgffemImageProcessor.from_config(model.config))
    start = time.perf_counter()  # decoding is counted, as in the trainer
    embedder.embed_images([ds[i]["image"] for i in range(len(ds))], batch_size=batch_size)
    return len(ds) / (time.perf_counter() - start)


def train_rates(ds, cache: str, epochs: int, batch_size: int, workers: int) -> list[float]:
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            dataset="bench",
            output_dir=out,
            epochs=epochs,
            batch_size=batch_size,
            feature_cache=cache,
            num_workers=workers,
            progress=False,
            distill_weight=1.0,
        )
        result = train(cfg, train_dataset=ds)
    return [row["images_per_s"] for row in result.history if "images_per_s" in row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="image folder (default: synthetic 224 px images)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the cached run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = real(args.data, args.images) if args.data else synthetic(args.images)
    infer = inference_rate(ds, args.batch_size)
    plain = train_rates(ds, "off", 1, args.batch_size, args.workers)
    cached = train_rates(ds, "auto", args.epochs, args.batch_size, args.workers)
    infer_after = inference_rate(ds, args.batch_size)
    inference = (infer + infer_after) / 2
    rows = [("inference (mean of before/after)", inference, "")]
    rows.append(("train, plain (backbone every step)", plain[0], ""))
    for e, rate in enumerate(cached, 1):
        rows.append((f"train, cached, epoch {e}", rate, "fills the cache" if e == 1 else ""))
    total_cached = len(cached) / sum(1 / r for r in cached)
    rows.append((f"train, cached, {len(cached)} epochs overall", total_cached, ""))
    print(f"{len(ds)} images, batch {args.batch_size}, {torch.get_num_threads()} threads, cpu count {os.cpu_count()}")
    print(f"inference before {infer:.2f} img/s, after {infer_after:.2f} img/s\n")
    print("| run | images/s | × inference | note |")
    print("|---|---|---|---|")
    for name, rate, note in rows:
        print(f"| {name} | {rate:.2f} | {rate / inference:.2f} | {note} |")


if __name__ == "__main__":
    main()
