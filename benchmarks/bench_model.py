"""FLOPs and CPU throughput of LGFFEM: backbone alone vs whole model, reference vs optimised path.

Goal: whole-model GFLOP/s >= 0.9x backbone-only GFLOP/s (CPU, batch 8, paper
configuration, same weights). Every variant is timed interleaved with the others in one run
(round-robin over repetitions, median taken), so a busy shared machine slows all of them alike.

Variants:
    reference      the neck written straight from the specification (``tests/reference_lgffem.py``)
    fast           the default code path, NCHW (contiguous) tensors
    channels_last  the default code path with model and input in ``torch.channels_last``
    compile        ``torch.compile`` of the channels_last model (optional, slow to compile)

Usage::

    python benchmarks/bench_model.py                       # paper + default config, batch 8
    python benchmarks/bench_model.py --configs default --batch 8 --iters 5 --variants reference channels_last
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import reference_lgffem  # noqa: E402  (the neck written straight from the specification)

from configuration_lgffem import LgffemConfig  # noqa: E402
from modeling_lgffem import LgffemModel  # noqa: E402

logger = logging.getLogger(__name__)

CONFIGS = {
    "paper": dict(backbone="convnextv2_base", out_indices=(0, 1, 2, 3), neck_channels=512, neck_layers=3),
    "default": dict(),
}
VARIANTS = ("reference", "fast", "channels_last", "compile")


def build_model(name: str, seed: int = 0) -> LgffemModel:
    """A seeded model of a named configuration (random backbone: speed does not depend on weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LgffemModel(LgffemConfig(**CONFIGS[name])).eval()


def count_gflop(fn: Callable[[], object]) -> float:
    """GFLOP (2 x multiply-accumulate, as counted by ``FlopCounterMode``) of one call."""
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        fn()
    return counter.get_total_flops() / 1e9


class Variant:
    """One way of running a model: memory format, reference switch, optional compile."""

    def __init__(self, name: str, model: LgffemModel, x: torch.Tensor) -> None:
        self.name = name
        self.reference = name == "reference"
        cl = name in ("channels_last", "compile")
        self.model = copy.deepcopy(model).to(memory_format=torch.channels_last) if cl else model
        self.x = x.contiguous(memory_format=torch.channels_last) if cl else x.contiguous()
        self.whole: Callable[[torch.Tensor], object] = self.model
        if self.reference:
            self.whole = lambda x: reference_lgffem.embed(self.model, x)
        self.backbone: Callable[[torch.Tensor], object] = self.model.backbone
        if name == "compile":
            self.whole = torch.compile(self.model)
            self.backbone = torch.compile(self.model.backbone)

    def run(self, part: str) -> float:
        """Seconds for one forward pass of ``part`` ("whole" or "backbone")."""
        fn = self.whole if part == "whole" else self.backbone
        with torch.inference_mode():
            start = time.perf_counter()
            fn(self.x)
            return time.perf_counter() - start


def bench_config(name: str, variants: list[str], batch: int, iters: int, warmup: int) -> list[dict]:
    """Median seconds per batch for every variant, backbone and whole model, interleaved."""
    model = build_model(name)
    size = model.config.image_size
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    gflop_whole = count_gflop(lambda: model(x[:1]))
    gflop_backbone = count_gflop(lambda: model.backbone(x[:1]))
    runs = [Variant(v, model, x) for v in variants]
    times: dict[tuple[str, str], list[float]] = {(v.name, p): [] for v in runs for p in ("backbone", "whole")}
    for v in runs:  # warm-up (and compilation)
        for _ in range(warmup):
            v.run("backbone"), v.run("whole")
    for i in range(iters):
        for v in runs:
            for part in ("backbone", "whole"):
                times[(v.name, part)].append(v.run(part))
        logger.info("%s: iteration %d/%d done", name, i + 1, iters)
    rows = []
    for v in runs:
        tb = statistics.median(times[(v.name, "backbone")])
        tw = statistics.median(times[(v.name, "whole")])
        rate_b = gflop_backbone * batch / tb
        rate_w = gflop_whole * batch / tw
        rows.append(
            dict(
                config=name,
                variant=v.name,
                gflop_backbone=gflop_backbone,
                gflop_whole=gflop_whole,
                img_s_backbone=batch / tb,
                img_s_whole=batch / tw,
                gflops_backbone=rate_b,
                gflops_whole=rate_w,
                ratio=rate_w / rate_b,
            )
        )
    return rows


def check_outputs(name: str) -> float:
    """Max relative difference (max |a-b| / max |a|) between reference and optimised embeddings."""
    model = build_model(name)
    size = model.config.image_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = reference_lgffem.embed(model, x)
        fast = model.to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last), normalize=False
        ).embeddings
    return float((ref - fast).abs().max() / ref.abs().max())


def format_table(rows: list[dict]) -> str:
    """Markdown table of the benchmark rows."""
    head = (
        "| config | variant | GFLOP backbone | GFLOP whole | img/s backbone | img/s whole "
        "| GFLOP/s backbone | GFLOP/s whole | whole/backbone GFLOP/s |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['variant']} | {r['gflop_backbone']:.2f} | {r['gflop_whole']:.2f} "
            f"| {r['img_s_backbone']:.2f} | {r['img_s_whole']:.2f} | {r['gflops_backbone']:.1f} "
            f"| {r['gflops_whole']:.1f} | {r['ratio']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["paper", "default"])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["reference", "fast", "channels_last"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5, help="timed repetitions per variant (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--check", action="store_true", help="also print reference-vs-optimised output error")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.iters < 1 or args.warmup < 0:
        parser.error("--batch and --iters must be >= 1, --warmup >= 0")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.configs:
        rows += bench_config(name, args.variants, args.batch, args.iters, args.warmup)
    print(
        f"batch {args.batch}, {args.iters} timed iterations (median), {args.threads} threads, torch {torch.__version__}"
    )
    print(format_table(rows))
    if len(args.configs) > 1:
        for variant in args.variants:
            by = {r["config"]: r for r in rows if r["variant"] == variant}
            if "paper" in by and "default" in by:
                print(
                    f"{variant}: default model {by['default']['img_s_whole']:.1f} img/s vs paper model "
                    f"{by['paper']['img_s_whole']:.2f} img/s "
                    f"({by['default']['img_s_whole'] / by['paper']['img_s_whole']:.1f}x)"
                )
    if args.check:
        for name in args.configs:
            print(f"{name}: max relative difference reference vs optimised: {check_outputs(name):.2e}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
