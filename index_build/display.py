"""Pictures of a query for people: the tile grid drawn on the query, and what the model saw.

Pure functions of images and tiles (no model, no index), shared by the app and scripts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from index_build.query import Tile

if TYPE_CHECKING:
    import torch

__all__ = ["draw_tile_grid", "short_source", "tensor_to_images"]


def tensor_to_images(pixel_values: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> list[Image.Image]:
    """Undo the processor's normalisation: N x 3 x S x S tensor -> what the model saw, as RGB images."""
    array = pixel_values.detach().to("cpu").float().numpy()
    array = array * np.asarray(std, np.float32)[:, None, None] + np.asarray(mean, np.float32)[:, None, None]
    array = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return [Image.fromarray(a) for a in array]


_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def draw_tile_grid(image: Image.Image, tiles: Sequence[Tile], max_side: int = 1024) -> Image.Image:
    """The working image with every tile outlined and numbered (single-tile queries: unchanged)."""
    scale = min(1.0, max_side / max(image.size))
    canvas = image.resize((round(image.width * scale), round(image.height * scale))) if scale < 1.0 else image.copy()
    if len(tiles) == 1:
        return canvas
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(12, round(min(canvas.size) / 40)))
    for tile in tiles:
        colour = _COLOURS[(tile.row + tile.col) % len(_COLOURS)]
        box = [round(v * scale) for v in tile.box]
        draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline=colour, width=2)
        text = str(tile.number)
        left, top, right, bottom = draw.textbbox((box[0] + 4, box[1] + 3), text, font=font)
        draw.rectangle([left - 2, top - 2, right + 2, bottom + 2], fill=colour)
        draw.text((box[0] + 4, box[1] + 3), text, fill=(255, 255, 255), font=font)
    return canvas


def short_source(source: str, keep: int = 2) -> str:
    """The last ``keep`` path components of a file source (Hub and other sources unchanged)."""
    parts = source.replace("\\", "/").split("/")
    return source if len(parts) <= keep else "…/" + "/".join(parts[-keep:])
