"""Shared fixtures: tiny model configs, real tissue from ../shared/data (skipped when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LGFFEM_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only folder of real H&E test data; skips the test when it is absent."""
    if not (SHARED_DATA / "lc25000_lung").is_dir():
        pytest.skip(f"real tissue data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_config():
    """A small random-init LGFFEM (EfficientNet-Lite0 backbone, C=16, L=1, 64 px input)."""
    from modeling_lgffem import LgffemConfig

    return LgffemConfig(neck_channels=16, neck_layers=1, image_size=64)


@pytest.fixture(scope="session")
def tiny_embedder(tiny_config):
    """The tiny model (seeded) as an :class:`index_build.models.Embedder`."""
    import torch

    from index_build.models import Embedder
    from modeling_lgffem import LgffemImageProcessor, LgffemModel

    torch.manual_seed(0)
    model = LgffemModel(tiny_config)
    return Embedder(model=model, processor=LgffemImageProcessor.from_config(tiny_config), model_id="tiny")


@pytest.fixture()
def synthetic_images() -> list[np.ndarray]:
    """Four deterministic 8-bit RGB images of different sizes."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(s, s + 7, 3), dtype=np.uint8) for s in (40, 64, 100, 300)]
