"""Why a result matches: a similarity heat map over the query, from LGFFEM's own multi-scale maps.

An LGFFEM descriptor is four GeM-pooled neck maps (strides 4, 8, 16, 32), each passed through
its head branch (``BatchNorm -> Linear -> L2-normalise -> Linear``) and concatenated. The heat
map asks the same question at every place of the query: pool each neck map by GeM over a small
window around the place instead of over the whole image (:data:`WINDOW_PX` input pixels at every
scale), send the pooled vectors through the same head branches, concatenate, and take the cosine
with the result's descriptor (:func:`location_descriptors`, :func:`similarity_map`). A place
whose local descriptor is close to the result's descriptor is a part of the query that looks
like the result. No gradients and no classifier are involved (this is not Grad-CAM): the map is
the retrieval similarity itself, computed locally. A model with a global branch (the pooled last
backbone stage appended to the descriptor) gets that branch pooled over the same window.

Queries larger than the model input are cut into input-size tiles on the same even grid as the
search (:func:`index_build.query.axis_starts`); each tile's map is computed at the model's input
resolution and the maps are stitched (averaged where tiles overlap). :func:`overlay_heatmap`
draws the map on the query with a colour bar in cosine units.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from index_build.query import axis_starts

if TYPE_CHECKING:
    from modeling_lgffem import LgffemModel

WINDOW_PX = 64  # input pixels each local descriptor pools over (a quarter of a 224 px input's side, 8 x 8 cells)
MAX_HEATMAP_TILES = 36  # a larger query is shrunk first so that its map costs at most this many model passes
HOW_TO_READ = (
    "Heat map: at each place of the query, the cosine similarity between the result's descriptor and a "
    f"descriptor pooled by LGFFEM over a {WINDOW_PX} px window around that place (its own neck maps at four "
    "scales, through its own head). Red: the parts of the query that look most like this result; blue: the "
    "least. The colour bar gives the cosine values; the colours span this map's own range, so compare maps by "
    "the numbers on their bars, not by their colours."
)

__all__ = [
    "HOW_TO_READ",
    "WINDOW_PX",
    "colour_map",
    "location_descriptors",
    "overlay_heatmap",
    "similarity_map",
]


# --------------------------------------------------------------------------------------
# Local descriptors and the similarity map
# --------------------------------------------------------------------------------------


def _local_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """The mean over the ``window`` x ``window`` neighbourhood of every cell (stride 1; edges: the cells there)."""
    if window <= 1:
        return x
    left = (window - 1) // 2
    pad = (left, window - 1 - left, left, window - 1 - left)
    total = F.avg_pool2d(F.pad(x, pad), window, stride=1)
    count = F.avg_pool2d(F.pad(torch.ones_like(x[:, :1]), pad), window, stride=1)  # share of real cells
    return total / count


def _local_gem(x: torch.Tensor, p: torch.Tensor, eps: float, window: int) -> torch.Tensor:
    """GeM over the ``window`` x ``window`` neighbourhood of every cell (stride 1; at the edges, the cells there)."""
    if window <= 1:
        return x.clamp(min=eps)
    return _local_mean(x.clamp(min=eps).pow(p), window).pow(1.0 / p)


@torch.inference_mode()
def location_descriptors(model: LgffemModel, pixel_values: torch.Tensor, window_px: int = WINDOW_PX) -> torch.Tensor:
    """Per-location LGFFEM descriptors on the stride-4 grid, L2-normalised.

    Each neck map is GeM-pooled over a window of ``window_px`` input pixels around every cell (at
    stride ``s``: ``window_px / s`` cells, at least one) and sent through its head branch exactly as the
    whole-image pooled vector is (``BatchNorm -> Linear -> L2-normalise -> Linear``); the four
    branch outputs are upsampled (bilinear) to the stride-4 grid and concatenated. When the model
    has a global branch (``config.global_weight > 0``), the last backbone stage average-pooled over
    the same window is L2-normalised, weighted and appended, as :meth:`LgffemModel.describe_features`
    does for the whole image.

    Args:
        model: an LGFFEM model (eval mode).
        pixel_values: ``N x 3 x H x W`` preprocessed images.
        window_px: side of the pooling window in input pixels.

    Returns:
        ``N x D x H/4 x W/4`` float32 descriptors (``D`` = the embedding dimension), unit length.
    """
    model.eval()
    device = next(model.parameters()).device
    features = model.backbone_features(pixel_values.to(device))
    maps = model.neck(features)
    size = maps[0].shape[-2:]
    parts = []
    for fmap, branch, stride in zip(maps, model.head.branches, (4, 8, 16, 32)):
        fmap = fmap.float()
        pooled = _local_gem(fmap, branch.pool.p, branch.pool.eps, max(1, round(window_px / stride)))
        n, c, h, w = pooled.shape
        flat = pooled.permute(0, 2, 3, 1).reshape(-1, c)
        out = branch.fc2(F.normalize(branch.fc1(branch.bn(flat)), dim=-1))
        out = out.reshape(n, h, w, -1).permute(0, 3, 1, 2)
        parts.append(F.interpolate(out, size=size, mode="bilinear", align_corners=False) if (h, w) != size else out)
    local = F.normalize(torch.cat(parts, dim=1), dim=1)
    if model.global_channels:  # the global branch: the last stage average-pooled over the same window
        last = features[-1].float()
        cells = max(1, round(window_px / 32))
        pooled = F.normalize(_local_mean(last, cells), dim=1)
        if pooled.shape[-2:] != size:
            pooled = F.interpolate(pooled, size=size, mode="bilinear", align_corners=False)
        local = torch.cat([local, model.config.global_weight * pooled], dim=1)
    return F.normalize(local, dim=1).float().cpu()


def similarity_map(
    embedder: Any,
    image: Image.Image,
    descriptor: np.ndarray,
    window_px: int = WINDOW_PX,
    max_tiles: int = MAX_HEATMAP_TILES,
) -> np.ndarray:
    """Cosine similarity of every pixel's local descriptor with ``descriptor``, at ``image``'s size.

    An image up to 1.5x the model input on its longer side is one model input (resized to it, as
    the search does); a larger one is cut into input-size tiles on the search's even grid (after
    shrinking it, if needed, to at most ``max_tiles`` tiles) and the tiles' maps are stitched.

    Args:
        embedder: the model (``model``, ``preprocess``, ``processor.image_size``).
        image: the query (RGB, any size).
        descriptor: the result's ``D`` descriptor (as stored in the index; normalised here).
        window_px: see :func:`location_descriptors`.
        max_tiles: most model passes for a large image.

    Returns:
        ``height x width`` float32 cosines in [-1, 1].
    """
    size = int(embedder.processor.image_size)
    target = np.asarray(descriptor, dtype=np.float32).reshape(-1)
    target = torch.from_numpy(target / max(float(np.linalg.norm(target)), 1e-12))
    width, height = image.size
    if max(width, height) <= 1.5 * size:
        heat = _heat(embedder, [image], target, window_px)[0]
        return _resize_map(heat, width, height)
    scale = 1.0
    while _passes(width * scale, height * scale, size) > max(1, max_tiles) and min(width, height) * scale > size:
        scale *= 0.9
    work = image
    if scale < 1.0:
        work = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.Resampling.BOX)
    tile_w, tile_h = min(size, work.width), min(size, work.height)
    starts = [(x, y) for y in axis_starts(work.height, tile_h) for x in axis_starts(work.width, tile_w)]
    boxes = [(x, y, x + tile_w, y + tile_h) for x, y in starts]
    total = np.zeros((work.height, work.width), np.float32)
    count = np.zeros_like(total)
    for start in range(0, len(boxes), 16):
        batch = boxes[start : start + 16]
        heats = _heat(embedder, [work.crop(box) for box in batch], target, window_px)
        for box, heat in zip(batch, heats):
            total[box[1] : box[3], box[0] : box[2]] += _resize_map(heat, box[2] - box[0], box[3] - box[1])
            count[box[1] : box[3], box[0] : box[2]] += 1.0
    stitched = total / np.maximum(count, 1.0)
    return stitched if work.size == image.size else _resize_map(stitched, width, height)


def _passes(width: float, height: float, size: int) -> int:
    """Model passes of the tiling of a ``width`` x ``height`` image (rounded) into ``size`` px tiles."""
    w, h = max(size, round(width)), max(size, round(height))
    return len(axis_starts(w, size)) * len(axis_starts(h, size))


def _heat(embedder: Any, crops: list[Image.Image], target: torch.Tensor, window_px: int) -> np.ndarray:
    """``N x h x w`` cosines of the crops' local descriptors with the unit vector ``target``."""
    local = location_descriptors(embedder.model, embedder.preprocess(crops), window_px)
    if local.shape[1] != target.numel():
        raise ValueError(f"the result's descriptor has {target.numel()} dimensions, the model gives {local.shape[1]}")
    return torch.einsum("nchw,c->nhw", local, target).numpy()


def _resize_map(heat: np.ndarray, width: int, height: int) -> np.ndarray:
    """A float map resized (bilinear) to ``width`` x ``height``."""
    if heat.shape == (height, width):
        return heat.astype(np.float32, copy=False)
    tensor = torch.from_numpy(np.ascontiguousarray(heat, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()


# --------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------

# Anchors of a blue -> cyan -> green -> yellow -> red map (low -> high similarity), interpolated linearly.
_ANCHORS = np.array(
    [
        (48, 18, 59),
        (70, 107, 227),
        (40, 187, 236),
        (50, 242, 152),
        (164, 252, 60),
        (237, 208, 58),
        (251, 128, 34),
        (210, 48, 5),
        (122, 4, 3),
    ],
    dtype=np.float32,
)


def colour_map(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> ``... x 3`` uint8 RGB colours (blue low, red high)."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0.0, 1.0) * (len(_ANCHORS) - 1)
    low = np.floor(v).astype(np.int64).clip(0, len(_ANCHORS) - 2)
    frac = (v - low)[..., None]
    return np.rint(_ANCHORS[low] * (1.0 - frac) + _ANCHORS[low + 1] * frac).astype(np.uint8)


def overlay_heatmap(
    image: Image.Image,
    heat: np.ndarray,
    alpha: float = 0.5,
    max_side: int = 768,
    title: Optional[str] = None,
    boxes: Sequence[tuple[int, int, int, int]] = (),
) -> Image.Image:
    """The query with the heat map blended over it and a colour bar (cosine values) on the right.

    Args:
        image: the query the map was computed for.
        heat: its :func:`similarity_map` (same size as ``image``).
        alpha: weight of the colours (0: the image only, 1: the colours only).
        max_side: the picture's longer side (without the bar) is at most this.
        title: a line written above the picture.
        boxes: ``(left, top, right, bottom)`` boxes in ``image`` pixels, outlined in white.
    """
    heat = np.asarray(heat, dtype=np.float32)
    if heat.shape != (image.height, image.width):
        raise ValueError(f"heat map is {heat.shape[1]}x{heat.shape[0]}, image is {image.width}x{image.height}")
    low, high = float(np.nanmin(heat)), float(np.nanmax(heat))
    span = max(high - low, 1e-6)
    scale = min(1.0, max_side / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    base = image.convert("RGB").resize(size, Image.Resampling.BILINEAR)
    colours = Image.fromarray(colour_map((_resize_map(heat, *size) - low) / span))
    blended = Image.blend(base, colours, float(alpha))

    font = ImageFont.load_default(size=max(12, size[1] // 30))
    bar_w, pad = max(16, size[1] // 25), 8
    label_w = round(font.getlength("-0.000")) + pad
    top = (font.size + 2 * pad) if title else pad
    canvas = Image.new("RGB", (size[0] + 2 * pad + bar_w + label_w + pad, size[1] + top + pad), (255, 255, 255))
    canvas.paste(blended, (pad, top))
    ramp = colour_map(np.linspace(1.0, 0.0, size[1])[:, None].repeat(bar_w, axis=1))
    bar_x = size[0] + 2 * pad
    canvas.paste(Image.fromarray(ramp), (bar_x, top))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([bar_x, top, bar_x + bar_w - 1, top + size[1] - 1], outline=(0, 0, 0))
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = top + round((1.0 - frac) * (size[1] - 1))
        draw.line([bar_x + bar_w, y, bar_x + bar_w + 4, y], fill=(0, 0, 0))
        anchor = "lt" if frac == 1.0 else ("lb" if frac == 0.0 else "lm")
        draw.text((bar_x + bar_w + 6, y), f"{low + frac * span:.3f}", fill=(0, 0, 0), font=font, anchor=anchor)
    for box in boxes:
        left, upper, right, lower = (pad + v * scale if i % 2 == 0 else top + v * scale for i, v in enumerate(box))
        draw.rectangle([left, upper, right - 1, lower - 1], outline=(255, 255, 255), width=3)
    if title:
        draw.text((pad, pad), title, fill=(0, 0, 0), font=font)
    return canvas
