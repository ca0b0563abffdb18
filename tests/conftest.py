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


# -- a 3-class folder of coloured patches and its flat index, shared by the index tests --------------
# A module may set ``FOLDER_PER_CLASS`` (default 4) to change how many patches per class ``folder`` writes.


@pytest.fixture(scope="module")
def embedder():
    """The tiny seeded embedder of :func:`helpers.make_embedder` (C = 16, 64 px, 64-d)."""
    import torch
    from helpers import make_embedder

    torch.set_num_threads(2)
    return make_embedder()


@pytest.fixture(scope="module")
def folder(request, tmp_path_factory) -> Path:
    """``red/``, ``green/``, ``blue/`` (JPEG) patches of 48 px: :func:`helpers.write_folder`."""
    from helpers import write_folder

    per_class = getattr(request.module, "FOLDER_PER_CLASS", 4)
    return write_folder(tmp_path_factory.mktemp("data") / "patches", per_class=per_class)


@pytest.fixture(scope="module")
def built_dir(tmp_path_factory, folder, embedder) -> Path:
    """The flat index of ``folder``, built once per module (tests that change it use ``index_dir``)."""
    from index_build.data import load_image_dataset
    from index_build.embedding import build_index

    out = tmp_path_factory.mktemp("built") / "idx"
    build_index(load_image_dataset(str(folder)), out, embedder, num_workers=0, progress=False, batch_size=4)
    return out


@pytest.fixture()
def index_dir(built_dir, tmp_path) -> Path:
    """A private copy of the built index in ``tmp_path / "idx"``."""
    import shutil

    return Path(shutil.copytree(built_dir, tmp_path / "idx"))
