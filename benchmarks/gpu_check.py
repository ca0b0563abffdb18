"""A ready GPU check: embedding throughput, a short bf16 training run, and the app's search latency.

Run on a CUDA machine (at most about 5 minutes)::

    python benchmarks/gpu_check.py                 # exits 1 without CUDA or when a check fails

It prints one Markdown table:

- embedding images/s at batch 64, fp32 and bf16 (autocast), of the default model and of the
  paper configuration (``convnextv2_base``, C = 512, L = 3, random weights);
- 100 training steps under ``accelerate`` (bf16) on synthetic class-coloured images: the neck
  and head of the default architecture with Sub-center ArcFace, as ``python -m train`` trains
  them; the loss must stay finite and its last 10 steps must average below its first 10; steps/s;
- the p50 of 50 calls of the app's search function (:meth:`app.SearchApp.search`: decode, embed,
  search, captions) with the model on the device, against a 100,000-vector flat index.

Every measurement takes the device as an argument, so the CPU can run the same code at tiny sizes
(``--device cpu --dry-run``: batch 2, 6 steps, 500 vectors, 5 queries, a 64 px model); the
tests do that. ``--device cpu`` without ``--dry-run`` is refused: the check is for GPUs.
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configuration_lgffem import LgffemConfig  # noqa: E402
from image_processing_lgffem import LgffemImageProcessor  # noqa: E402
from modeling_lgffem import LgffemModel  # noqa: E402

PAPER = dict(
    backbone="convnextv2_base",
    out_indices=(0, 1, 2, 3),
    neck_channels=512,
    neck_layers=3,
    image_mean=(0.485, 0.456, 0.406),
    image_std=(0.229, 0.224, 0.225),
)
TINY = dict(neck_channels=16, neck_layers=1, image_size=64)


@dataclass
class Sizes:
    """How much each check does (:meth:`full` on a GPU, :meth:`dry` for the CPU tests)."""

    batch: int
    embed_iters: int
    train_steps: int
    train_batch: int
    index_size: int
    queries: int
    tiny: bool  # 64 px models with a 16-channel neck (random weights) instead of the real ones

    @classmethod
    def full(cls) -> Sizes:
        return cls(
            batch=64, embed_iters=10, train_steps=100, train_batch=32, index_size=100_000, queries=50, tiny=False
        )

    @classmethod
    def dry(cls) -> Sizes:
        return cls(batch=2, embed_iters=2, train_steps=6, train_batch=4, index_size=500, queries=5, tiny=True)


@dataclass
class Row:
    """One line of the table: a measured value and whether its check passed."""

    check: str
    value: float
    unit: str
    passed: bool
    note: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_architecture(sizes: Sizes) -> LgffemModel:
    """The default model (trained weights), or a tiny random one for dry runs."""
    if sizes.tiny:
        torch.manual_seed(0)
        return LgffemModel(LgffemConfig(**TINY)).eval()
    from index_build.models import default_model

    return default_model()


def paper_architecture(sizes: Sizes) -> LgffemModel:
    """The paper configuration with random weights (tiny backbone input for dry runs)."""
    config = LgffemConfig(**{**PAPER, **(TINY if sizes.tiny else {})})
    torch.manual_seed(0)
    return LgffemModel(config).eval()


@torch.inference_mode()
def embedding_throughput(model: LgffemModel, device: torch.device, bf16: bool, batch: int, iters: int) -> float:
    """Images/s of ``model`` embedding random ``batch``-image batches on ``device`` (one warm-up batch)."""
    model = model.to(device)
    size = model.config.image_size
    x = torch.randn(batch, 3, size, size, device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            model(x, normalize=True).embeddings.float()

    step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return batch * iters / (time.perf_counter() - start)


def loss_decreased(losses: Sequence[float], window: int = 10) -> bool:
    """All losses finite, and the mean of the last ``window`` below the mean of the first ``window``."""
    if len(losses) < 2 or not all(math.isfinite(v) for v in losses):
        return False
    w = max(1, min(window, len(losses) // 2))
    return statistics.fmean(losses[-w:]) < statistics.fmean(losses[:w])


def synthetic_batches(classes: int, per_class: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-coloured noisy images (normalised pixels) and their labels: an easy, learnable task."""
    rng = np.random.default_rng(seed)
    colours = rng.uniform(-1.5, 1.5, (classes, 3, 1, 1)).astype(np.float32)
    labels = np.repeat(np.arange(classes), per_class)
    x = colours[labels] + rng.normal(0, 0.5, (len(labels), 3, size, size)).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(labels)


def training_run(
    model: LgffemModel, device: torch.device, steps: int, batch: int, bf16: bool = True
) -> tuple[list[float], float]:
    """``steps`` optimiser steps under ``accelerate``: frozen backbone, neck + head + Sub-center ArcFace.

    Returns:
        ``(losses, steps_per_s)``.
    """
    from accelerate import Accelerator
    from pytorch_metric_learning.losses import SubCenterArcFaceLoss

    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=device.type == "cpu")
    classes = 8
    x, y = synthetic_batches(classes, max(1, 4 * batch // classes), model.config.image_size)
    model.train()
    model.backbone.eval()  # frozen, as in python -m train: no batch-norm statistics updates
    model.backbone.requires_grad_(False)
    loss_fn = SubCenterArcFaceLoss(num_classes=classes, embedding_size=model.config.embedding_dim)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    loss_optimizer = torch.optim.AdamW(loss_fn.parameters(), lr=1e-2)
    model, loss_fn, optimizer, loss_optimizer = accelerator.prepare(model, loss_fn, optimizer, loss_optimizer)
    rng = np.random.default_rng(0)
    losses = []
    start = None
    for step in range(steps + 1):  # step 0 is a warm-up, not timed
        if step == 1:
            _sync(accelerator.device)
            start = time.perf_counter()
        pick = torch.from_numpy(rng.choice(len(x), batch, replace=False))
        xb, yb = x[pick].to(accelerator.device), y[pick].to(accelerator.device)
        with accelerator.autocast():
            embeddings = model(xb, normalize=False).embeddings
        loss = loss_fn(embeddings.float(), yb)
        optimizer.zero_grad()
        loss_optimizer.zero_grad()
        accelerator.backward(loss)
        optimizer.step()
        loss_optimizer.step()
        if step:
            losses.append(float(loss.detach()))
    _sync(accelerator.device)
    rate = steps / (time.perf_counter() - start)
    model.eval()
    return losses, rate


def search_latency(embedder, n_index: int, queries: int, workdir: Path, seed: int = 0) -> float:
    """p50 ms of :meth:`app.SearchApp.search` against an ``n_index``-vector flat index (``queries`` calls)."""
    import pyarrow as pa
    from PIL import Image

    from app import SearchApp
    from index_build.patch_index import write_index
    from index_build.storage import metadata_table

    rng = np.random.default_rng(seed)
    xb = rng.standard_normal((n_index, embedder.dim), dtype=np.float32)
    thumb = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 100, 150)).save(thumb, format="JPEG")
    labels = np.array(["a", "b", "c", "d"])[rng.integers(0, 4, n_index)]
    thumbnails = pa.array([thumb.getvalue()] * n_index, pa.binary())
    metadata = metadata_table(np.arange(n_index), labels, [f"row{i}" for i in range(n_index)], thumbnails)
    write_index(workdir / "index", xb, metadata, embedder, "flat")
    app = SearchApp.create(index=str(workdir / "index"), data_dir=workdir / "data", embedder=embedder)
    paths, side = [], embedder.config.image_size  # one patch of the model's input size: no tiling
    for q in range(queries):
        path = workdir / f"query{q}.png"
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    app.search(paths[0], 10)  # warm-up
    times = []
    for path in paths:
        start = time.perf_counter()
        out = app.search(path, 10)
        times.append((time.perf_counter() - start) * 1000)
        if len(out.gallery) != 10:
            raise RuntimeError(f"search returned {len(out.gallery)} results, expected 10")
    return statistics.median(times)


def make_embedder(model: LgffemModel, device: torch.device):
    """``model`` on ``device`` as an :class:`index_build.models.Embedder` (what the app searches with)."""
    from index_build.models import Embedder

    processor = LgffemImageProcessor.from_config(model.config)
    return Embedder(model.to(device), processor, model_id="gpu-check", device=device)


def run_checks(device: torch.device, sizes: Sizes, log: Callable[[str], None] = print) -> list[Row]:
    """Every check on ``device``; a check that raises becomes a failed row with the error as note."""
    rows: list[Row] = []

    def attempt(name: str, unit: str, fn: Callable[[], tuple[float, bool, str]]) -> None:
        log(f"running: {name}")
        try:
            value, passed, note = fn()
        except Exception as err:  # noqa: BLE001 - a failing check is reported, the others still run
            rows.append(Row(name, float("nan"), unit, False, f"error: {type(err).__name__}: {err}"[:120]))
            return
        rows.append(Row(name, value, unit, passed, note))

    models = {"default model": default_architecture, "paper convnextv2_base (random)": paper_architecture}
    for label, factory in models.items():
        model = factory(sizes)
        for bf16 in (False, True):
            precision = "bf16" if bf16 else "fp32"

            def throughput(model=model, bf16=bf16) -> tuple[float, bool, str]:
                rate = embedding_throughput(model, device, bf16, sizes.batch, sizes.embed_iters)
                return rate, rate > 0 and math.isfinite(rate), f"batch {sizes.batch}"

            attempt(f"embed {label} {precision}", "images/s", throughput)
        del model

    def train() -> tuple[float, bool, str]:
        losses, rate = training_run(default_architecture(sizes), device, sizes.train_steps, sizes.train_batch)
        w = max(1, min(10, len(losses) // 2))
        note = f"loss {statistics.fmean(losses[:w]):.3f} -> {statistics.fmean(losses[-w:]):.3f}"
        return rate, loss_decreased(losses), note

    attempt(f"train {sizes.train_steps} steps bf16 (accelerate)", "steps/s", train)

    def search() -> tuple[float, bool, str]:
        embedder = make_embedder(default_architecture(sizes), device)
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            p50 = search_latency(embedder, sizes.index_size, sizes.queries, Path(tmp))
        return p50, math.isfinite(p50), f"p50 of {sizes.queries}, {sizes.index_size:,} vectors"

    attempt("app search (model on device)", "ms", search)
    return rows


def format_table(rows: Sequence[Row], device_name: str) -> str:
    lines = [f"device: {device_name}", "", "| check | value | unit | pass | note |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.check} | {row.value:,.2f} | {row.unit} | {'yes' if row.passed else 'NO'} | {row.note} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --dry-run only)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes and a 64 px model (tests the logic)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: CUDA is not available; this check needs a GPU", file=sys.stderr)
        return 1
    if device.type != "cuda" and not args.dry_run:
        print(f"error: --device {args.device} is only for --dry-run; the check is for CUDA", file=sys.stderr)
        return 2
    sizes = Sizes.dry() if args.dry_run else Sizes.full()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    start = time.perf_counter()
    rows = run_checks(device, sizes, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_table(rows, name))
    print(f"\n{sum(r.passed for r in rows)}/{len(rows)} checks passed in {time.perf_counter() - start:.0f} s")
    return 0 if all(row.passed for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
