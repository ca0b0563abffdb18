"""The "why it matches" heat map (index_build.heatmap): local descriptors agree with the model's own
descriptor, a two-tissue query lights up on the half that matches the result, and the overlay is drawn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from index_build.heatmap import colour_map, location_descriptors, overlay_heatmap, similarity_map

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def default():
    from index_build.models import load_model

    return load_model("default", device="cpu")


def lung_pairs(shared_data, count: int = 2) -> list[tuple[Image.Image, Image.Image]]:
    """``count`` (benign lung, squamous cell carcinoma) query patches, 224 x 224."""
    root = shared_data / "lc25000_lung" / "query"
    normal = sorted((root / "lung_n").glob("*.jpg"))[: 6 * count : 6]
    scc = sorted((root / "lung_scc").glob("*.jpg"))[: 6 * count : 6]
    return [(Image.open(a).convert("RGB"), Image.open(b).convert("RGB")) for a, b in zip(normal, scc)]


def test_window_over_the_whole_input_gives_the_embedding(default, shared_data):
    """Pooled over a window that covers every cell, the local descriptor is the image's descriptor."""
    image = lung_pairs(shared_data, 1)[0][0]
    pixels = default.preprocess([image])
    local = location_descriptors(default.model, pixels, window_px=2 * 224)
    assert local.shape == (1, default.dim, 56, 56)
    expected = default.embed_pixels(pixels)[0]
    np.testing.assert_allclose(local[0, :, 28, 28].numpy(), expected, atol=2e-4)
    np.testing.assert_allclose(local[0, :, 0, 55].numpy(), expected, atol=2e-4)  # every window holds every cell
    norms = location_descriptors(default.model, pixels).norm(dim=1)
    np.testing.assert_allclose(norms.numpy(), 1.0, atol=1e-5)


@pytest.mark.parametrize("layout", ["halves of one input", "two inputs side by side"])
def test_the_matching_half_is_hotter(default, shared_data, layout):
    """A query made of benign lung on the left and squamous cell carcinoma on the right: against the
    descriptor of either patch, the mean heat is higher on the half that shows it, for every pair."""
    margins = []
    for normal, scc in lung_pairs(shared_data):
        if layout == "halves of one input":  # one 224 px model input: the map must localise within it
            query = Image.new("RGB", (224, 224))
            query.paste(normal.crop((0, 0, 112, 224)), (0, 0))
            query.paste(scc.crop((112, 0, 224, 224)), (112, 0))
        else:  # 448 x 224: tiled into two model inputs and stitched
            query = Image.new("RGB", (448, 224))
            query.paste(normal, (0, 0))
            query.paste(scc, (224, 0))
        half = query.width // 2
        targets = default.embed_images([normal, scc])
        for target, side in zip(targets, (0, 1)):
            heat = similarity_map(default, query, target)
            assert heat.shape == (224, query.width) and heat.dtype == np.float32
            assert -1.0 <= heat.min() <= heat.max() <= 1.0
            left, right = float(heat[:, :half].mean()), float(heat[:, half:].mean())
            margins.append(left - right if side == 0 else right - left)
    assert all(m > 0 for m in margins), margins
    assert np.mean(margins) > 0.1, margins


def test_a_large_query_is_shrunk_to_max_tiles(default):
    calls = []
    original = default.preprocess

    def counting(images):
        calls.append(len(images))
        return original(images)

    default.preprocess = counting
    try:
        image = Image.new("RGB", (1400, 700), (200, 120, 170))
        heat = similarity_map(default, image, np.ones(default.dim), max_tiles=6)
    finally:
        del default.preprocess
    assert heat.shape == (700, 1400)
    assert sum(calls) == 6  # 7 x 4 tiles of 224 px at full size; shrunk to 669 x 334 px: 3 x 2 tiles


def test_colour_map_and_overlay():
    ends = colour_map(np.array([0.0, 1.0]))
    assert ends.dtype == np.uint8 and ends[0, 2] > ends[0, 0] and ends[1, 0] > ends[1, 2]  # blue low, red high
    image = Image.new("RGB", (300, 200), (255, 255, 255))
    heat = np.tile(np.linspace(0.2, 0.8, 300, dtype=np.float32), (200, 1))
    picture = overlay_heatmap(image, heat, alpha=1.0, title="t", boxes=[(0, 0, 100, 100)])
    assert picture.height > 200 and picture.width > 300  # title above, colour bar on the right
    pixels = np.asarray(picture)
    row = pixels[picture.height // 2]
    assert row[20, 2] > row[20, 0] and row[290, 0] > row[290, 2]  # left (low) blue, right (high) red
    with pytest.raises(ValueError, match="heat map is"):
        overlay_heatmap(image, heat[:, :10])
