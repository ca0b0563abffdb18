"""Whole-slide images: open, read regions at the right pyramid level, find tissue, tile at a physical resolution.

Every format OpenSlide reads (Aperio SVS, Hamamatsu NDPI/VMS/VMU, Leica SCN, MIRAX MRXS, Philips
and generic tiled TIFF, Sakura SVSLIDE, Ventana BIF, DICOM) is opened with ``openslide``; plain
PNG/JPEG/TIFF images that OpenSlide does not recognise are opened with PIL, up to ``max_pixels``.

**DICOM rule.** A DICOM whole-slide image is a *series*: several ``.dcm`` files (pyramid levels,
label, overview) sharing a Series Instance UID. OpenSlide 4 (libdicom) opens the whole series
from any of its files, with the MPP from the DICOM pixel spacing. :func:`find_slides` lists each
series once: by its folder when the folder holds that one series and no other slide, else by its
first file (sorted). :func:`open_slide` opens such a folder as well as any file of the series.

Reading never decodes level 0 whole: :meth:`Slide.read_region` picks the pyramid level whose
downsample is the largest one not coarser than the output needs
(``get_best_level_for_downsample``), reads the box at that level in blocks of at most
:data:`READ_BLOCK` pixels a side and resizes each block into the output, so memory stays bounded
by the output size whatever the slide size.

**MPP rule.** A slide's level-0 resolution (µm per pixel) is its ``openslide.mpp-x`` property
(Aperio ``MPP``, TIFF ``XResolution`` with ``ResolutionUnit`` centimetre, and the vendor fields
OpenSlide maps to it); for images opened with PIL, the TIFF resolution tags (centimetre or inch).
A value outside :data:`MPP_RANGE` is not a microscope resolution (a PNG's 72 dpi) and is ignored.
When a slide has none, ``mpp_source`` (``--mpp-source``) is used; without it, tiling raises a
:class:`SlideError` that says so.

**Tissue rule** (:mod:`index_build.tissue`): the mask is computed on a thumbnail of at most
``max_side`` pixels a side (HSV saturation >= 15/255 and brightness >= 40/255), cleaned (holes
filled, specks dropped); a tile is indexed when at least ``min_tissue`` of its mask pixels are tissue.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from PIL import Image

from index_build.tissue import MIN_TISSUE_FRACTION, clean_mask, tissue_mask

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MPP",
    "MPP_RANGE",
    "SLIDES_DIR",
    "SLIDES_FILE",
    "SLIDE_EXTENSIONS",
    "dicom_series",
    "Slide",
    "SlideCatalog",
    "SlideError",
    "SlideTile",
    "find_slides",
    "upgraded_slides",
    "is_slide_file",
    "load_slide_catalog",
    "open_slide",
    "read_tile",
    "slide_key",
    "slide_tissue_mask",
    "tile_size0",
    "tile_slide",
]

# Suffixes of the formats OpenSlide 4 reads, plus plain images (opened with PIL when OpenSlide does not).
OPENSLIDE_EXTENSIONS = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm"}
)
PLAIN_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg"})
DICOM_EXTENSIONS = frozenset({".dcm"})
SLIDE_EXTENSIONS: frozenset[str] = OPENSLIDE_EXTENSIONS | PLAIN_EXTENSIONS
DEFAULT_MPP = 0.5  # µm/px of the indexed tiles (Kimia Path24C, NCT-CRC-HE)
DEFAULT_MAX_PIXELS = 16384 * 16384  # a plain (non-pyramidal) image is decoded whole: at most this many pixels
MPP_RANGE = (0.05, 50.0)  # plausible µm/px of a microscope image; other resolution tags are ignored
READ_BLOCK = 4096  # a region is read at its level in blocks of at most this many pixels a side
THUMBNAIL_SIDE = 1024  # stored slide thumbnails
MASK_SIDE = 2048  # resolution of the tissue mask
SLIDES_FILE = "slides.json"  # next to index.faiss in a slide index
SLIDES_DIR = "slides"  # per-slide thumbnail and mask PNGs


class SlideError(ValueError):
    """A slide cannot be used: unreadable, too large for a plain image, or without a resolution (MPP)."""


def _series_uid(path: Path) -> Optional[str]:
    """The Series Instance UID of a DICOM file (as OpenSlide reads it); ``None`` when OpenSlide cannot open it."""
    import openslide

    try:
        with openslide.OpenSlide(str(path)) as handle:
            return handle.properties.get("dicom.SeriesInstanceUID") or str(path)
    except (openslide.OpenSlideError, OSError):
        return None


def dicom_series(folder: Union[str, Path], names: Optional[list[str]] = None) -> list[list[Path]]:
    """The DICOM series of the ``.dcm`` files directly in ``folder``: lists of files sharing a Series
    Instance UID, each sorted, in the order of their first file. A file OpenSlide cannot open is a
    series of its own (opening it then says why)."""
    folder = Path(folder)
    if names is None:
        names = [p.name for p in folder.iterdir() if p.is_file()]
    groups: dict[str, list[Path]] = {}
    for name in sorted(n for n in names if Path(n).suffix.lower() in DICOM_EXTENSIONS):
        path = folder / name
        groups.setdefault(_series_uid(path) or str(path), []).append(path)
    return sorted(groups.values(), key=lambda files: files[0])


def is_slide_file(path: Union[str, Path]) -> bool:
    """Whether ``path`` has a suffix of :data:`SLIDE_EXTENSIONS` (case-insensitive)."""
    return Path(path).suffix.lower() in SLIDE_EXTENSIONS


def _plausible_mpp(value: Any) -> Optional[float]:
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        return None
    return mpp if math.isfinite(mpp) and MPP_RANGE[0] <= mpp <= MPP_RANGE[1] else None


def _pil_mpp(image: Image.Image) -> Optional[float]:
    """µm/px from TIFF resolution tags (unit 2 = inch, 3 = centimetre); ``None`` for other images."""
    tags = getattr(image, "tag_v2", None)
    if tags is None:
        return None
    resolution, unit = tags.get(282), tags.get(296, 2)
    try:
        per_unit = float(resolution)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if per_unit <= 0 or unit not in (2, 3):
        return None
    return _plausible_mpp((25400.0 if unit == 2 else 10000.0) / per_unit)


class Slide:
    """An open slide (OpenSlide) or large plain image (PIL); a context manager.

    Attributes:
        path: the file.
        width, height: level-0 size in pixels.
        mpp: µm per level-0 pixel (the slide's own, else ``mpp_source``; ``None`` when neither).
        mpp_from: ``"slide"``, ``"mpp_source"`` or ``None``.
        level_count, level_downsamples: the pyramid (one level for a plain image).
        last_level: the level the last :meth:`read_region` read from.
        backend: ``"openslide"`` or ``"pil"``.
    """

    def __init__(self, path: Path, handle: Any, backend: str, mpp: Optional[float], mpp_from: Optional[str]) -> None:
        self.path = path
        self._handle = handle
        self.backend = backend
        self.mpp = mpp
        self.mpp_from = mpp_from
        if backend == "openslide":
            self.width, self.height = (int(v) for v in handle.dimensions)
            self.level_count = int(handle.level_count)
            self.level_downsamples = tuple(float(d) for d in handle.level_downsamples)
            self.level_dimensions = tuple(tuple(int(v) for v in d) for d in handle.level_dimensions)
        else:
            self.width, self.height = handle.size
            self.level_count = 1
            self.level_downsamples = (1.0,)
            self.level_dimensions = ((self.width, self.height),)
        self.last_level: Optional[int] = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Slide({self.path.name!r}, {self.width}x{self.height}, mpp={self.mpp}, levels={self.level_count}, "
            f"{self.backend})"
        )

    @property
    def properties(self) -> dict[str, str]:
        """The slide's properties (OpenSlide) or an empty dict."""
        return dict(self._handle.properties) if self.backend == "openslide" else {}

    def best_level(self, downsample: float) -> int:
        """The level to read for a wanted downsample: the coarsest one not coarser than ``downsample``."""
        if self.backend == "openslide":
            return int(self._handle.get_best_level_for_downsample(max(1.0, downsample)))
        return 0

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> Image.Image:
        """RGB pixels of a level-``level`` box of size ``w x h`` whose top-left is level-0 ``(x, y)``."""
        if self.backend == "openslide":
            rgba = self._handle.read_region((x, y), level, (w, h))
            rgb = Image.new("RGB", rgba.size, (255, 255, 255))  # transparent (outside the scan) is glass
            rgb.paste(rgba, mask=rgba.getchannel("A"))
            return rgb
        box = (x, y, x + w, y + h)
        return self._handle.crop(box).convert("RGB")  # PIL pads outside the image with black: fixed below

    def read_region(self, x: int, y: int, w0: int, h0: int, out_w: int, out_h: int) -> Image.Image:
        """The level-0 box ``(x, y, w0, h0)`` as an ``out_w x out_h`` RGB image.

        Read at :meth:`best_level` for the downsample ``min(w0 / out_w, h0 / out_h)`` (never
        level 0 unless the output needs it), in blocks of at most :data:`READ_BLOCK` pixels, each
        resized into its part of the output. Parts outside the slide are white (blank glass).
        """
        if w0 < 1 or h0 < 1 or out_w < 1 or out_h < 1:
            raise ValueError(f"region and output sizes must be positive, got {w0}x{h0} -> {out_w}x{out_h}")
        level = self.best_level(min(w0 / out_w, h0 / out_h))
        self.last_level = level
        ds = self.level_downsamples[level]
        lw, lh = max(1, round(w0 / ds)), max(1, round(h0 / ds))
        out = Image.new("RGB", (out_w, out_h), (255, 255, 255))
        sx, sy = out_w / lw, out_h / lh  # output pixels per level pixel
        for by in range(0, lh, READ_BLOCK):
            for bx in range(0, lw, READ_BLOCK):
                bw, bh = min(READ_BLOCK, lw - bx), min(READ_BLOCK, lh - by)
                ox0, oy0 = round(bx * sx), round(by * sy)
                ox1, oy1 = round((bx + bw) * sx), round((by + bh) * sy)
                if ox1 <= ox0 or oy1 <= oy0:
                    continue
                block = self._read_block(level, x + round(bx * ds), y + round(by * ds), bw, bh)
                out.paste(block.resize((ox1 - ox0, oy1 - oy0), Image.Resampling.BILINEAR), (ox0, oy0))
        return out

    def _read_block(self, level: int, x: int, y: int, w: int, h: int) -> Image.Image:
        block = self._read_level(level, x, y, w, h)
        if self.backend == "pil" and (x < 0 or y < 0 or x + w > self.width or y + h > self.height):
            inside = Image.new("RGB", (w, h), (255, 255, 255))
            left, top = max(0, -x), max(0, -y)
            right, bottom = min(w, self.width - x), min(h, self.height - y)
            if right > left and bottom > top:
                inside.paste(block.crop((left, top, right, bottom)), (left, top))
            block = inside
        return block

    def thumbnail(self, max_side: int = THUMBNAIL_SIDE) -> Image.Image:
        """The whole slide as RGB with its longer side ``max_side`` (smaller slides: their own size).

        Its scale (level-0 pixels per thumbnail pixel) is ``self.width / thumb.width``.
        """
        scale = max(1.0, max(self.width, self.height) / max_side)
        tw, th = max(1, round(self.width / scale)), max(1, round(self.height / scale))
        return self.read_region(0, 0, self.width, self.height, tw, th)

    def close(self) -> None:
        """Release the file."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def open_slide(
    path: Union[str, Path], mpp_source: Optional[float] = None, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS
) -> Slide:
    """Open a slide (any OpenSlide format) or a plain large image (PIL).

    Args:
        path: the file, or a folder holding one DICOM series (see the DICOM rule above).
        mpp_source: µm/px at level 0 to use when the file records none.
        max_pixels: largest plain (non-pyramidal) image accepted, in pixels (``None``: no limit);
            a plain image is decoded whole when first read.

    Raises:
        SlideError: the file is missing, unreadable, a plain image over ``max_pixels``, or
            ``mpp_source`` is not a positive number.
    """
    import openslide

    path = Path(path)
    target = path
    if path.is_dir():
        series = dicom_series(path)
        if len(series) != 1:
            found = f"{len(series)} DICOM series" if series else "no DICOM (.dcm) files"
            raise SlideError(f"{path} is a folder with {found}; a folder slide is one DICOM series")
        target = series[0][0]
    elif not path.is_file():
        raise SlideError(f"slide not found: {path}")
    if mpp_source is not None and not (isinstance(mpp_source, (int, float)) and mpp_source > 0):
        raise SlideError(f"--mpp-source must be a positive number of µm per pixel, got {mpp_source!r}")
    try:
        kind = openslide.OpenSlide.detect_format(str(target))
    except openslide.OpenSlideError:
        kind = None
    if kind is None and target.suffix.lower() in DICOM_EXTENSIONS:
        raise SlideError(f"cannot read slide {path}: not a DICOM whole-slide image OpenSlide reads")
    if kind is not None:
        try:
            handle = openslide.OpenSlide(str(target))
        except (openslide.OpenSlideError, OSError) as err:
            raise SlideError(f"cannot read slide {path} ({kind}): {err}") from err
        own = _plausible_mpp(handle.properties.get(openslide.PROPERTY_NAME_MPP_X))
        backend = "openslide"
    else:
        if path.suffix.lower() not in SLIDE_EXTENSIONS:
            raise SlideError(f"{path} is not a slide or image ({', '.join(sorted(SLIDE_EXTENSIONS))})")
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # the size is checked below, before decoding
        try:
            handle = Image.open(path)
        except (OSError, ValueError, SyntaxError) as err:
            raise SlideError(f"cannot read image {path}: {err}") from err
        finally:
            Image.MAX_IMAGE_PIXELS = previous
        pixels = handle.size[0] * handle.size[1]
        if max_pixels is not None and pixels > max_pixels:
            handle.close()
            raise SlideError(
                f"{path} is a plain {handle.size[0]}x{handle.size[1]} image ({pixels:,} pixels), over the "
                f"limit of {max_pixels:,} pixels for images without a pyramid; convert it to a tiled "
                "pyramidal TIFF (e.g. vips tiffsave --tile --pyramid) or raise the limit"
            )
        own = _pil_mpp(handle)
        backend = "pil"
    if own is not None:
        return Slide(path, handle, backend, own, "slide")
    return Slide(path, handle, backend, mpp_source, "mpp_source" if mpp_source is not None else None)


def slide_tissue_mask(slide: Slide, max_side: int = MASK_SIDE) -> tuple[np.ndarray, float]:
    """The cleaned tissue mask of a low-resolution view and its scale (level-0 px per mask px)."""
    thumb = slide.thumbnail(max_side)
    return clean_mask(tissue_mask(thumb)), slide.width / thumb.width


@dataclass(frozen=True)
class SlideTile:
    """A tile of a slide: level-0 top-left ``(x, y)``, level-0 side ``size0``, tissue fraction (0-1)."""

    x: int
    y: int
    size0: int
    tissue: float


def tile_size0(slide: Slide, mpp: float = DEFAULT_MPP, tile_size: int = 224) -> int:
    """Level-0 side of a tile of ``tile_size`` pixels at ``mpp`` µm/px.

    Raises:
        SlideError: the slide has no MPP (give ``mpp_source`` / ``--mpp-source``).
    """
    if slide.mpp is None:
        raise SlideError(
            f"{slide.path} records no resolution (openslide.mpp-x / TIFF resolution tags), so it cannot be tiled "
            f"at {mpp} µm/px; give its µm per pixel at level 0 with --mpp-source (e.g. --mpp-source 0.25 for 40x, "
            "0.5 for 20x)"
        )
    if mpp <= 0 or tile_size < 1:
        raise ValueError(f"mpp and tile_size must be positive, got {mpp}, {tile_size}")
    return max(1, round(tile_size * mpp / slide.mpp))


def tile_slide(
    slide: Slide,
    mpp: float = DEFAULT_MPP,
    tile_size: int = 224,
    min_tissue: float = MIN_TISSUE_FRACTION,
    region: Optional[tuple[int, int, int, int]] = None,
    mask: Optional[tuple[np.ndarray, float]] = None,
) -> tuple[list[SlideTile], list[SlideTile]]:
    """Tile a slide (or a level-0 region of it) on a grid of ``tile_size`` px at ``mpp`` µm/px.

    Only whole tiles inside the slide (and the region) are made; a tile whose share of tissue
    pixels in the cleaned low-resolution mask (:func:`slide_tissue_mask`) is at least
    ``min_tissue`` is a tissue tile, the others are background.

    Args:
        slide: the open slide (its MPP is needed).
        mpp: target µm per pixel of the tiles.
        tile_size: tile side in pixels at ``mpp``.
        min_tissue: least tissue share of a tissue tile.
        region: level-0 ``(x, y, w, h)``; default the whole slide. The grid starts at its top-left.
        mask: a precomputed ``slide_tissue_mask(slide)``.

    Returns:
        ``(tissue_tiles, background_tiles)``, each in row-major order.

    Raises:
        SlideError: the slide has no MPP.
    """
    size0 = tile_size0(slide, mpp, tile_size)
    rx, ry, rw, rh = region if region is not None else (0, 0, slide.width, slide.height)
    x0, y0 = max(0, int(rx)), max(0, int(ry))
    x1, y1 = min(slide.width, int(rx + rw)), min(slide.height, int(ry + rh))
    tissue_map, scale = mask if mask is not None else slide_tissue_mask(slide)
    mh, mw = tissue_map.shape
    # integral image: the tissue share of any box in O(1)
    integral = np.pad(tissue_map.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    tissue: list[SlideTile] = []
    background: list[SlideTile] = []
    for y in range(y0, y1 - size0 + 1, size0):
        for x in range(x0, x1 - size0 + 1, size0):
            mx0, my0 = min(mw - 1, int(x / scale)), min(mh - 1, int(y / scale))
            mx1 = min(mw, max(mx0 + 1, round((x + size0) / scale)))
            my1 = min(mh, max(my0 + 1, round((y + size0) / scale)))
            count = integral[my1, mx1] - integral[my0, mx1] - integral[my1, mx0] + integral[my0, mx0]
            share = float(count) / ((mx1 - mx0) * (my1 - my0))
            (tissue if share >= min_tissue else background).append(SlideTile(x, y, size0, share))
    return tissue, background


def read_tile(slide: Slide, tile: SlideTile, tile_size: int) -> Image.Image:
    """The tile as a ``tile_size`` x ``tile_size`` RGB image."""
    return slide.read_region(tile.x, tile.y, tile.size0, tile.size0, tile_size, tile_size)


def find_slides(root: Union[str, Path]) -> list[Path]:
    """The slides under ``root`` (recursively, sorted, relative to ``root``).

    A MIRAX slide's companion folder (``name/`` next to ``name.mrxs``) is not searched: its
    ``.dat`` files are not slides. The ``.dcm`` files of a folder are grouped by DICOM series
    (:func:`dicom_series`): a series is one slide, named by its folder when that folder (not
    ``root`` itself) holds only that series, else by its first file.
    """
    root = Path(root)
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        mirax = {Path(name).stem for name in files if name.lower().endswith(".mrxs")}
        dirs[:] = sorted(d for d in dirs if d not in mirax and not d.startswith("."))
        others = [name for name in files if is_slide_file(name) and Path(name).suffix.lower() not in DICOM_EXTENSIONS]
        found.extend((here / name).relative_to(root) for name in others)
        series = dicom_series(here, files) if any(Path(n).suffix.lower() in DICOM_EXTENSIONS for n in files) else []
        if len(series) == 1 and not others and here != root:
            found.append(here.relative_to(root))
        else:
            found.extend(group[0].relative_to(root) for group in series)
    return sorted(found)


def slide_key(slide: str) -> str:
    """File stem of a slide's stored thumbnail and mask: SHA-1 of its relative path."""
    return hashlib.sha1(slide.encode()).hexdigest()


def upgraded_slides(slides: Any) -> dict[str, dict]:
    """``slides.json``'s slide entries with each slide's level-0 µm/px under ``level0_mpp``.

    Indexes written before the key was renamed stored it as ``mpp``, the name ``slides.json`` also
    used at its top level for the tiles' µm/px (now ``tile_mpp``)."""
    out = {}
    for name, entry in dict(slides).items():
        if isinstance(entry, dict) and "level0_mpp" not in entry and "mpp" in entry:
            entry = {**entry, "level0_mpp": entry["mpp"]}
            del entry["mpp"]
        out[name] = entry  # anything else exactly as stored (the renaming hides nothing)
    return out


class SlideCatalog:
    """What a slide index stores about its slides (``slides.json`` and ``slides/*.png``).

    The catalog is untrusted input: slide names must be relative paths inside the slides folder
    (no absolute path, no ``..``) and the stored PNGs must lie inside the index folder.

    Attributes:
        index_dir: the index directory.
        slides: relative slide path -> ``{"width", "height", "level0_mpp", "thumb_scale", "label", ...}``
            (indexes written before the key was named ``level0_mpp`` called it ``mpp``: read as such).
        root: the name the slides folder had when the index was built (a hint, never read from;
            older indexes stored the builder's absolute path here).
        mpp, tile_size: the tiling of the index (``slides.json``'s ``tile_mpp``; ``mpp`` in older indexes).

    Raises:
        IndexLoadError: a slide name that is not a relative path inside the slides folder.
    """

    def __init__(self, index_dir: Path, data: dict) -> None:
        from index_build.storage import IndexLoadError

        self.index_dir = Path(index_dir)
        self.slides: dict[str, dict] = upgraded_slides(data.get("slides", {}))
        for name in self.slides:
            if not _relative_inside(name):
                raise IndexLoadError(
                    f"corrupt {SLIDES_FILE} in {self.index_dir.name}: slide {name[:80]!r} is not a relative path "
                    "inside the slides folder"
                )
        self.root: Optional[str] = data.get("root")
        self.mpp: Optional[float] = data.get("tile_mpp", data.get("mpp"))
        self.tile_size: Optional[int] = data.get("tile_size")

    def _png(self, slide: str, kind: str) -> Image.Image:
        from index_build.storage import contained_path

        if slide not in self.slides:
            raise KeyError(f"{slide!r} is not a slide of the index {self.index_dir.name}")
        path = contained_path(self.index_dir, f"{SLIDES_DIR}/{slide_key(slide)}.{kind}.png", "thumbnail")
        with Image.open(path) as image:
            image.load()
            return image

    def thumbnail(self, slide: str) -> Image.Image:
        """The stored RGB thumbnail of a slide."""
        return self._png(slide, "thumb").convert("RGB")

    def mask(self, slide: str) -> Image.Image:
        """The stored tissue mask (mode ``"L"``, 255 = tissue), the size of the thumbnail."""
        return self._png(slide, "mask").convert("L")

    def scale(self, slide: str) -> float:
        """Level-0 pixels per thumbnail (and mask) pixel."""
        return float(self.slides[slide]["thumb_scale"])

    def source_path(self, slide: str, slides_root: Optional[Union[str, Path]] = None) -> Optional[Path]:
        """The slide file under the folder the operator named (``--slides-root``), when it is there.

        Nothing in the index names where slides are read from: without ``slides_root`` there is no
        source (``None``), and a name that resolves outside ``slides_root`` (through a link) is ``None`` too.
        """
        if slides_root is None or slide not in self.slides or not _relative_inside(slide):
            return None
        root = Path(slides_root).resolve()
        path = (root / slide).resolve()
        if not path.is_relative_to(root) or not (path.is_file() or path.is_dir()):  # a folder: a DICOM series
            return None
        return path


def _relative_inside(name: Any) -> bool:
    """Whether ``name`` is a non-empty relative path without ``..`` (nor backslashes or NUL)."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        return False
    path = Path(name)
    return not path.is_absolute() and ".." not in path.parts


def load_slide_catalog(index_dir: Union[str, Path]) -> Optional[SlideCatalog]:
    """The slide catalog of an index directory; ``None`` when it is not a slide index.

    Raises:
        SlideError: ``slides.json`` is not JSON or has no ``slides`` object.
        IndexLoadError: ``slides.json`` (or the slides folder) links outside the index folder, or
            names a slide outside the slides folder.
    """
    from index_build.storage import check_contained

    index_dir = Path(index_dir)
    path = index_dir / SLIDES_FILE
    if not path.is_file() and not path.is_symlink():
        return None
    check_contained(index_dir, (SLIDES_DIR,))
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SlideError(f"corrupt {SLIDES_FILE} in {index_dir.name}: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("slides"), dict):
        raise SlideError(f"corrupt {SLIDES_FILE} in {index_dir.name}: no 'slides' object")
    return SlideCatalog(index_dir, data)
