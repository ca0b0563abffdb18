"""The tissue rule: exact masks on synthetic pixels, and real tiles of ../shared/data."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from index_build.tissue import (
    MIN_TISSUE_FRACTION,
    TISSUE_RULE,
    clean_mask,
    is_tissue,
    saturation,
    tissue_fraction,
    tissue_mask,
)


def test_saturation_of_known_colours():
    pixels = np.array([[[255, 255, 255], [0, 0, 0], [200, 100, 150], [240, 236, 238]]], dtype=np.uint8)
    np.testing.assert_allclose(saturation(pixels)[0], [0.0, 0.0, 127.5, 255 * 4 / 240], rtol=1e-6)


def test_mask_needs_stain_and_brightness():
    pixels = np.array(
        [[[245, 243, 244], [230, 150, 200], [30, 10, 20], [120, 60, 140], [216, 208, 212]]], dtype=np.uint8
    )
    # glass, pink, near-black (saturated but dark), purple, grey-pink at exactly S = 255 * 8 / 216 < 15
    assert tissue_mask(pixels)[0].tolist() == [False, True, False, True, False]


def test_fraction_and_tile_rule():
    tile = np.full((10, 10, 3), 245, dtype=np.uint8)
    tile[:2] = (200, 100, 160)  # 20% stained
    assert tissue_fraction(tile) == pytest.approx(0.2)
    assert is_tissue(tile) is True
    tile[1] = 245
    assert tissue_fraction(tile) == pytest.approx(0.1)
    assert is_tissue(tile) is False
    assert is_tissue(tile, min_fraction=0.1) is True
    assert f"{MIN_TISSUE_FRACTION:.0%}" in TISSUE_RULE


def test_clean_mask_fills_holes_and_drops_specks():
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:12, 2:12] = True
    mask[5:7, 5:7] = False  # a 4-pixel hole inside the fragment
    mask[16, 16] = True  # a 1-pixel speck
    cleaned = clean_mask(mask, min_object=5, max_hole=4)
    expected = np.zeros((20, 20), dtype=bool)
    expected[2:12, 2:12] = True
    assert np.array_equal(cleaned, expected)
    # a hole bigger than max_hole stays; glass touching the border is never a hole
    assert clean_mask(mask, min_object=1, max_hole=3)[5:7, 5:7].sum() == 0
    half = np.zeros((6, 6), dtype=bool)
    half[:, :3] = True  # the glass half touches the border: 18 pixels, kept as glass
    assert np.array_equal(clean_mask(half, min_object=1, max_hole=100), half)
    ring = ~np.pad(np.zeros((4, 4), dtype=bool), 1)  # glass enclosed by tissue: a hole, filled
    assert clean_mask(ring, min_object=1, max_hole=16).sum() == 36


def test_real_tiles(shared_data):
    crc = shared_data / "crc_samples"
    background = [p for p in sorted((crc / "BACK").iterdir())]
    assert background, "crc_samples/BACK is empty"
    for path in background:
        assert not is_tissue(Image.open(path)), path.name
    for label in ("LYM", "MUS", "STR", "TUM", "ADI", "MUC"):
        for path in sorted((crc / label).iterdir()):
            assert is_tissue(Image.open(path)), path.name


def test_mask_of_uint8_pixels_matches_the_saturation_rule():
    """The integer test used for uint8 pixels gives the float rule's mask on every kind of pixel."""
    from index_build.tissue import MIN_VALUE, TISSUE_SATURATION, saturation, tissue_mask

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    pixels[0, :3] = [(255, 240, 240), (255, 241, 241), (40, 38, 37)]  # saturation 15.0 exactly, 14.0; value 40
    expected = (saturation(pixels) >= TISSUE_SATURATION) & (pixels.max(axis=2) >= MIN_VALUE)
    assert np.array_equal(tissue_mask(pixels), expected)
    assert tissue_mask(pixels)[0, :3].tolist() == [True, False, True]
