"""Plain helpers shared by test modules (not fixtures; those are in conftest.py): a seeded tiny
embedder, a folder of class-coloured patches, and what the browser tests need to start Chromium."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import torch
from PIL import Image

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package (`make chromium`); Playwright drives it
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def make_embedder(neck_channels: int = 16, seed: int = 0, global_weight: float = 0.0):
    """A tiny random LGFFEM (C = ``neck_channels``, L = 1, 64 px input) seeded by ``seed``, as an Embedder."""
    from index_build.models import Embedder
    from modeling_lgffem import LgffemConfig, LgffemImageProcessor, LgffemModel

    config = LgffemConfig(neck_channels=neck_channels, neck_layers=1, image_size=64, global_weight=global_weight)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LgffemModel(config).eval()
    return Embedder(model=model, processor=LgffemImageProcessor.from_config(config), model_id=f"tiny-{seed}")


def write_folder(root: Path, per_class: int = 4, size: int = 48) -> Path:
    """Class-coloured noisy patches: class_name/i.png (one class as JPEG)."""
    rng = np.random.default_rng(0)
    for label, colour in COLOURS.items():
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            noise = rng.integers(-30, 30, (size, size, 3))
            array = np.clip(np.asarray(colour) + noise, 0, 255).astype(np.uint8)
            ext = "jpg" if label == "blue" else "png"
            Image.fromarray(array).save(root / label / f"{label}_{i}.{ext}")
    return root


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
