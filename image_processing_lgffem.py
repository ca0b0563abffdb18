"""Image processor of LGFFEM: any image (PIL or array, any mode) -> normalised pixel values.

Hub remote code beside ``configuration_lgffem.py`` and ``modeling_lgffem.py`` (numpy, Pillow
and public transformers API only), loaded with
``AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
from PIL import Image
from transformers import PretrainedConfig
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature


def to_rgb_uint8(image: Union[Image.Image, np.ndarray]) -> Image.Image:
    """Convert a PIL image or array (RGB, RGBA, grayscale, 16-bit, float) to an 8-bit RGB image.

    Transparent pixels are composited onto white (the glass of a slide); 16-bit data is scaled
    by 1/257; float arrays are read as values in [0, 1].
    """
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = np.moveaxis(array, 0, -1)  # channels-first
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise ValueError(f"image array must be H x W, H x W x 3 or H x W x 4, got shape {array.shape}")
        if array.dtype == np.uint8:
            pass
        elif array.dtype == np.uint16:
            array = (array.astype(np.uint32) // 257).astype(np.uint8)
        elif np.issubdtype(array.dtype, np.floating):
            array = np.clip(np.nan_to_num(array) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        elif array.dtype == bool:
            array = array.astype(np.uint8) * 255
        else:
            raise ValueError(f"unsupported image array dtype {array.dtype}")
        image = Image.fromarray(array)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or numpy array, got {type(image).__name__}")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.int64)
        scale = 257 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 1
        image = Image.fromarray(np.clip(array // scale, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
        image = Image.fromarray(np.clip(np.nan_to_num(array) * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


class LgffemImageProcessor(BaseImageProcessor):
    """Any image -> RGB -> resized to ``image_size`` (bilinear, antialiased) -> normalised.

    Args:
        image_size: output side in pixels (square).
        image_mean: per-channel mean subtracted after scaling to [0, 1].
        image_std: per-channel std divided after subtracting the mean.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        image_size: int = 224,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.image_size = int(image_size)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> LgffemImageProcessor:
        """The processor matching a model config (an ``LgffemConfig``: its image size, mean and std)."""
        return cls(image_size=config.image_size, image_mean=config.image_mean, image_std=config.image_std)

    def to_array(self, image: Union[Image.Image, np.ndarray]) -> np.ndarray:
        """One image -> 3 x S x S float32 array, normalised."""
        rgb = to_rgb_uint8(image)
        size = (self.image_size, self.image_size)
        if rgb.size != size:
            rgb = rgb.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)
        array = np.asarray(rgb, dtype=np.float32) * (1.0 / 255.0)
        array = (array - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return np.ascontiguousarray(array.transpose(2, 0, 1))

    def preprocess(
        self,
        images: Union[Image.Image, np.ndarray, Sequence[Union[Image.Image, np.ndarray]]],
        return_tensors: Optional[str] = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Images -> ``BatchFeature(pixel_values=N x 3 x S x S)``."""
        if isinstance(images, (Image.Image, np.ndarray)) and not (isinstance(images, np.ndarray) and images.ndim == 4):
            images = [images]
        arrays = [self.to_array(image) for image in images]
        if not arrays:
            raise ValueError("no images given")
        return BatchFeature(data={"pixel_values": np.stack(arrays)}, tensor_type=return_tensors)


LgffemImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["LgffemImageProcessor", "to_rgb_uint8"]
