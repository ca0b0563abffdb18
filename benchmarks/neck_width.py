"""Cost of the neck width C for the default EfficientNet-Lite0 backbone, and the paper's model.

Prints, per configuration: parameters (backbone / neck / head), size of the saved
``model.safetensors``, GFLOP per 224x224 image (2 x MAC, ``FlopCounterMode``) and CPU
throughput at batch 8, all measured side by side in one run (interleaved repeats, median).

    .venv/bin/python benchmarks/neck_width.py [--widths 64 128 256] [--repeats 5] [--paper]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configuration_lgffem import LgffemConfig  # noqa: E402
from modeling_lgffem import LgffemModel  # noqa: E402


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def gflops(model: LgffemModel, size: int) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--paper", action="store_true", help="also time the paper's convnextv2_base C=512 L=3")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    configs = {
        f"lite0 C={c} L={args.layers}": LgffemConfig(neck_channels=c, neck_layers=args.layers) for c in args.widths
    }
    if args.paper:
        configs["paper convnextv2_base C=512 L=3"] = LgffemConfig(
            backbone="convnextv2_base",
            out_indices=(0, 1, 2, 3),
            neck_channels=512,
            neck_layers=3,
            image_mean=(0.485, 0.456, 0.406),
            image_std=(0.229, 0.224, 0.225),
        )
    models = {name: LgffemModel(cfg) for name, cfg in configs.items()}
    x = torch.randn(args.batch, 3, 224, 224)
    rows = {}
    for name, model in models.items():
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            size_mb = (Path(tmp) / "model.safetensors").stat().st_size / 1e6
        with torch.inference_mode():
            model(x)  # warm-up
        rows[name] = {
            "params": (count(model.backbone), count(model.neck), count(model.head)),
            "size_mb": size_mb,
            "gflop": gflops(model, 224),
            "times": [],
        }
    for _ in range(args.repeats):  # interleaved, so load on the machine hits every model alike
        for name, model in models.items():
            with torch.inference_mode():
                start = time.perf_counter()
                model(x)
                rows[name]["times"].append(time.perf_counter() - start)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, 224x224, "
        f"median of {args.repeats}"
    )
    header = "| model | dim | backbone params | neck params | head params | model.safetensors | GFLOP/img | img/s |"
    print(header)
    print("|" + "---|" * 8)
    for name, row in rows.items():
        b, n, h = row["params"]
        ips = args.batch / statistics.median(row["times"])
        dim = 4 * configs[name].neck_channels
        print(f"| {name} | {dim} | {b:,} | {n:,} | {h:,} | {row['size_mb']:.1f} MB | {row['gflop']:.2f} | {ips:.1f} |")


if __name__ == "__main__":
    main()
