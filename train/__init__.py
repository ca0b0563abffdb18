"""Retraining LGFFEM from a `datasets` dataset with Sub-center ArcFace (``python -m train``),
and publishing models and indexes to the Hugging Face Hub (``python -m train.publish``).

Attributes are imported lazily so that ``python -m train.publish`` does not load torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainConfig", "TrainResult", "parse_args", "train"]


def __getattr__(name: str) -> Any:
    if name in ("TrainConfig", "parse_args"):
        from train import config

        return getattr(config, name)
    if name in ("TrainResult", "train"):
        from train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'train' has no attribute {name!r}")
