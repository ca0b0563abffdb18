"""Synthetic whole-slide images for tests and benchmarks: pyramidal tiled TIFFs made of real H&E patches.

A slide is a grid of square cells (``cell`` level-0 pixels each, one patch per cell): the cells
inside a few random elliptic "fragments" hold patches of one class, the rest is blank glass (light
grey with a little noise, repeating every 8 rows so that zlib stores it in almost nothing). The
TIFF is written tile by tile with ``tifffile`` (memory stays bounded whatever the size), with
``levels`` pyramid levels (each half the previous one) as successive tiled directories and the MPP
in the resolution tags (pixels per centimetre), which OpenSlide reads as a generic tiled TIFF and
reports as ``openslide.mpp-x``.

    python benchmarks/synthetic_slides.py OUT_DIR --size 40000 --tissue 0.08   # one large slide
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image

GLASS = (236, 234, 238)  # blank glass: light grey, saturation ~4/255
TIFF_TILE = 256


def _fragments(rows: int, cols: int, tissue: float, rng: np.random.Generator, count: int = 3) -> np.ndarray:
    """A boolean ``rows x cols`` cell mask made of ``count`` ellipses covering about ``tissue`` of the grid."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    mask = np.zeros((rows, cols), bool)
    area = tissue * rows * cols / count
    for _ in range(count):
        aspect = rng.uniform(0.6, 1.6)
        ry = max(1.0, np.sqrt(area * aspect / np.pi))
        rx = max(1.0, np.sqrt(area / aspect / np.pi))
        cy = rng.uniform(ry, max(ry + 1, rows - ry))
        cx = rng.uniform(rx, max(rx + 1, cols - rx))
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return mask


def write_synthetic_slide(
    path: Union[str, Path],
    patches: Sequence[Union[str, Path, np.ndarray]],
    size: Union[int, tuple[int, int]] = 4096,
    cell: int = 224,
    tissue: float = 0.3,
    mpp: float = 0.5,
    levels: int = 3,
    seed: int = 0,
    layout: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Write a pyramidal tiled TIFF slide assembled from ``patches`` on blank glass.

    Args:
        path: the ``.tif`` to write.
        patches: images (files or ``H x W x 3`` uint8 arrays) of one class; each tissue cell gets
            a random one, resized to ``cell`` pixels.
        size: level-0 ``width`` (square) or ``(width, height)`` in pixels.
        cell: level-0 side of a cell; must be divisible by ``2 ** (levels - 1)``.
        tissue: share of the cells that hold tissue (about; ignored with ``layout``).
        mpp: µm per level-0 pixel, written as the TIFF resolution (pixels per centimetre).
        levels: pyramid levels.
        seed: random layout and patch choice.
        layout: an explicit ``rows x cols`` int array of patch numbers per cell (``-1`` = glass).

    Returns:
        The cell layout (``rows x cols`` ints: patch number, ``-1`` for glass); cell ``(r, c)``
        covers level-0 pixels ``[c * cell, (c + 1) * cell) x [r * cell, (r + 1) * cell)``.
    """
    import tifffile

    width, height = (size, size) if isinstance(size, int) else size
    if cell % (2 ** (levels - 1)):
        raise ValueError(f"cell {cell} must be divisible by 2 ** (levels - 1) = {2 ** (levels - 1)}")
    rng = np.random.default_rng(seed)
    rows, cols = -(-height // cell), -(-width // cell)
    if layout is None:
        layout = np.where(_fragments(rows, cols, tissue, rng), rng.integers(0, len(patches), (rows, cols)), -1)
    if layout.shape != (rows, cols):
        raise ValueError(f"layout must be {rows} x {cols}, got {layout.shape}")
    images = [
        np.asarray((Image.open(p) if not isinstance(p, np.ndarray) else Image.fromarray(p)).convert("RGB"))
        for p in patches
    ]
    # glass noise repeats every 8 rows: it looks like glass and compresses to almost nothing
    noise = np.tile(rng.integers(-3, 4, size=(8, TIFF_TILE, 3)), (TIFF_TILE // 8, 1, 1))

    def level_tiles(level: int) -> Iterator[np.ndarray]:
        factor = 2**level
        c = cell // factor
        lw, lh = -(-width // factor), -(-height // factor)
        resized = [np.asarray(Image.fromarray(im).resize((c, c), Image.Resampling.BILINEAR)) for im in images]
        glass = np.clip(np.array(GLASS)[None, None] + noise, 0, 255).astype(np.uint8)
        for ty in range(0, lh, TIFF_TILE):
            for tx in range(0, lw, TIFF_TILE):
                tile = glass.copy()
                for r in range(ty // c, min(rows, -(-(ty + TIFF_TILE) // c))):
                    for col in range(tx // c, min(cols, -(-(tx + TIFF_TILE) // c))):
                        k = layout[r, col]
                        if k < 0:
                            continue
                        y0, x0 = r * c - ty, col * c - tx
                        sy0, sx0 = max(0, -y0), max(0, -x0)
                        dy0, dx0 = max(0, y0), max(0, x0)
                        h = min(c - sy0, TIFF_TILE - dy0)
                        w = min(c - sx0, TIFF_TILE - dx0)
                        if h > 0 and w > 0:
                            tile[dy0 : dy0 + h, dx0 : dx0 + w] = resized[k][sy0 : sy0 + h, sx0 : sx0 + w]
                yield tile

    per_cm = 1e4 / mpp
    with tifffile.TiffWriter(path, bigtiff=width * height * 3 > 2**31) as tif:
        for level in range(levels):
            factor = 2**level
            tif.write(
                level_tiles(level),
                shape=(-(-height // factor), -(-width // factor), 3),
                dtype=np.uint8,
                tile=(TIFF_TILE, TIFF_TILE),
                photometric="rgb",
                compression="zlib",
                resolution=(per_cm / factor, per_cm / factor),
                resolutionunit="CENTIMETER",
                subfiletype=1 if level else 0,
                metadata=None,
            )
    return layout


def class_patches(folder: Union[str, Path]) -> list[Path]:
    """The image files of one class folder, sorted."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".tif"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output folder")
    default_patches = Path(__file__).resolve().parents[2] / "shared/data/lc25000_lung/gallery/lung_aca"
    parser.add_argument("--patches", type=Path, default=default_patches, help="folder of one class's patches")
    parser.add_argument("--size", type=int, default=40000, help="level-0 side in pixels")
    parser.add_argument("--tissue", type=float, default=0.08, help="share of tissue cells")
    parser.add_argument("--levels", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"synthetic_{args.size}.tif"
    layout = write_synthetic_slide(
        out, class_patches(args.patches), size=args.size, tissue=args.tissue, levels=args.levels, seed=args.seed
    )
    print(f"{out}: {args.size}x{args.size}, {int((layout >= 0).sum())} tissue cells of {layout.size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
