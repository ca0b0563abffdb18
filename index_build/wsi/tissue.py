"""Which pixels of an H&E image are tissue, and which tiles hold enough of it to search or index.

The rule (:data:`TISSUE_RULE`) is deliberately simple, so that it can be stated in one sentence on
the page and in the README. H&E stains tissue pink to purple; blank glass is grey-white. The HSV
saturation ``(max - min) / max`` of the RGB channels separates the two: blank glass in all our data
(``crc_samples/BACK``, the glass around ``cmu_small_region.svs``) stays below 8 on a 0-255 scale,
while the palest tissue we hold (fat, mucin) reaches 15-60 on a good share of its pixels. A pixel
is tissue when its saturation is at least :data:`TISSUE_SATURATION` and it is not near-black
(scanner borders, where saturation is noise). A tile is tissue when at least
:data:`MIN_TISSUE_FRACTION` of its pixels are.

For slides the mask is computed once on a low-resolution view and cleaned (:func:`clean_mask`):
small holes inside tissue are filled and specks smaller than a few tiles' worth of pixels are
dropped, as CLAM and histolab do after their thresholding. A fixed threshold rather than Otsu's:
Otsu splits an image that is all tissue into pale and dark tissue, and queries usually are all
tissue.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

TISSUE_SATURATION = 15  # on 0-255: a pixel at least this saturated is stained (tissue)
MIN_VALUE = 40  # on 0-255: darker pixels (scanner borders, pen) are not tissue whatever their saturation
MIN_TISSUE_FRACTION = 0.2  # a tile is searched / indexed when at least this share of it is tissue

__all__ = [
    "MIN_TISSUE_FRACTION",
    "MIN_VALUE",
    "TISSUE_RULE",
    "TISSUE_SATURATION",
    "clean_mask",
    "is_tissue",
    "saturation",
    "tissue_fraction",
    "tissue_mask",
]


def tissue_rule(min_fraction: float = MIN_TISSUE_FRACTION) -> str:
    """The tissue rule in one sentence, with its numbers."""
    return (
        f"A pixel is tissue when its HSV saturation is at least {TISSUE_SATURATION}/255 (H&E stain; blank "
        f"glass stays below 8) and its brightness at least {MIN_VALUE}/255; a tile with less than "
        f"{min_fraction:.0%} tissue is blank glass and is skipped."
    )


TISSUE_RULE = tissue_rule()


def _rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if image.ndim != 3 or image.shape[2] < 3:
        raise ValueError(f"expected an H x W x 3 RGB array, got shape {image.shape}")
    return image[..., :3]


def saturation(image: Image.Image | np.ndarray) -> np.ndarray:
    """HSV saturation on a 0-255 scale (float32, H x W) of an RGB image or uint8 array."""
    rgb = _rgb_array(image).astype(np.float32)
    high = rgb.max(axis=2)
    low = rgb.min(axis=2)
    return np.where(high > 0, 255.0 * (high - low) / np.maximum(high, 1.0), 0.0).astype(np.float32)


def tissue_mask(image: Image.Image | np.ndarray) -> np.ndarray:
    """Boolean H x W mask of the tissue pixels of an RGB image, by :data:`TISSUE_RULE` (no cleaning)."""
    rgb = _rgb_array(image)
    high = rgb.max(axis=2)
    if rgb.dtype == np.uint8:
        # saturation >= S  <=>  255 * (high - low) >= S * high, in integers (no float division)
        spread = high.astype(np.int32) - rgb.min(axis=2)
        return (255 * spread >= TISSUE_SATURATION * high.astype(np.int32)) & (high >= MIN_VALUE)
    return (saturation(rgb) >= TISSUE_SATURATION) & (high >= MIN_VALUE)


def clean_mask(mask: np.ndarray, min_object: int = 64, max_hole: int = 256) -> np.ndarray:
    """Fill holes up to ``max_hole`` pixels and drop tissue specks smaller than ``min_object`` pixels.

    Meant for a low-resolution slide mask (a thumbnail pixel covers many tile pixels), where a lone
    stained pixel is dust or noise and a pale gap inside a fragment is still tissue.
    """
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    holes, count = ndimage.label(~mask)
    if count:
        sizes = np.bincount(holes.ravel())
        border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
        small = sizes <= max_hole
        small[0] = False
        small[border] = False  # background touching the edge is glass, not a hole
        mask = mask | small[holes]
    objects, count = ndimage.label(mask)
    if count:
        sizes = np.bincount(objects.ravel())
        keep = sizes >= min_object
        keep[0] = False
        mask = keep[objects]
    return mask


def tissue_fraction(image: Image.Image | np.ndarray) -> float:
    """Share of the tissue pixels of an image (0 to 1)."""
    mask = tissue_mask(image)
    return float(mask.mean()) if mask.size else 0.0


def is_tissue(image: Image.Image | np.ndarray, min_fraction: float = MIN_TISSUE_FRACTION) -> bool:
    """Whether a tile holds enough tissue to be searched or indexed."""
    return tissue_fraction(image) >= min_fraction
