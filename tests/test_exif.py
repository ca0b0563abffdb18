"""Queries and personal adds are decoded upright: the EXIF Orientation tag that phones write is applied."""

from __future__ import annotations

import numpy as np
from PIL import Image

from index_build import uploads


def test_an_orientation_6_image_is_decoded_as_the_browser_shows_it(tmp_path):
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, :40] = (255, 0, 0)  # stored: red left half, blue right half
    pixels[:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(pixels).save(tmp_path / "phone.png", exif=exif)
    out = np.asarray(uploads.decode_image(str(tmp_path / "phone.png")))
    assert out.shape == (80, 40, 3)  # upright: taller than wide
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[-1, -1]) == (0, 0, 255)  # red on top, blue below
    plain = tmp_path / "plain.png"
    Image.fromarray(pixels).save(plain)
    assert np.array_equal(np.asarray(uploads.decode_image(str(plain))), pixels)  # no tag: unchanged
