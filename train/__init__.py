"""Retraining LGFFEM from a `datasets` dataset with Sub-center ArcFace (``python -m train``),
and publishing models and indexes to the Hugging Face Hub (``python -m train.publish``)."""

from train.config import TrainConfig, parse_args
from train.trainer import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "parse_args", "train"]
