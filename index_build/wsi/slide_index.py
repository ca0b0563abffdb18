"""A folder of slides as a source of tiles for the index build (``python -m index_build SLIDES --out DIR``).

:func:`load_slide_dataset` finds the slides of a folder, finds each one's tissue (thumbnail,
cleaned mask; see :mod:`index_build.slides`), tiles it at the target MPP and returns a
``datasets.Dataset`` with one row per tissue tile: ``label``, ``source`` (``"<slide>@<x>,<y>"``)
and the extra columns ``slide`` (path relative to the folder), ``x``, ``y``, ``size0`` (level-0
pixels) and ``mpp`` (µm per level-0 pixel of that slide). Its ``image`` is read from the slide
only when a row is fetched (in the DataLoader workers), so the build embeds slides of any size
with the memory of a few tiles, and the existing resumable, atomic build does the rest: the
extra columns become metadata columns, and :meth:`SlideSet.write_files` /
:meth:`SlideSet.catalog_writer` store the thumbnails, masks and ``slides.json`` with the index.

Labels come from ``--labels CSV`` (columns ``slide,label``; ``slide`` relative to the folder, or a
bare file name) or else from each slide's first sub-folder (``SLIDES/<label>/<slide>``).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from PIL import Image
from tqdm.auto import tqdm

from index_build.slides import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MPP,
    MASK_SIDE,
    OPENSLIDE_EXTENSIONS,
    SLIDES_DIR,
    SLIDES_FILE,
    THUMBNAIL_SIDE,
    SlideError,
    find_slides,
    open_slide,
    slide_key,
    tile_slide,
    upgraded_slides,
)
from index_build.storage import write_atomic
from index_build.tissue import MIN_TISSUE_FRACTION, TISSUE_RULE, clean_mask, tissue_mask

logger = logging.getLogger(__name__)

__all__ = ["SLIDE_COLUMNS", "SlideSet", "TileReader", "is_slide_folder", "load_slide_dataset", "read_labels_csv"]

SLIDE_COLUMNS = ("slide", "x", "y", "size0", "mpp")
_SLIDE_ONLY = OPENSLIDE_EXTENSIONS - {".tif", ".tiff"}  # suffixes that are never plain patches
_TIFF_CHECK = 20  # .tif files looked at to tell a folder of slides from a folder of TIFF patches
MIN_SLIDE_SIDE = 4096  # a pyramidal (tiled, several levels) TIFF, or one at least this large, is a slide


def is_slide_folder(root: Union[str, Path]) -> bool:
    """Whether a folder holds slides rather than patches.

    Yes when it holds a file of a slide-only format (``.svs``, ``.ndpi``, ``.mrxs``, ...) or a TIFF
    that OpenSlide opens with several pyramid levels or at least :data:`MIN_SLIDE_SIDE` px a side
    (the first :data:`_TIFF_CHECK` TIFFs are looked at). Plain PNG/JPEG folders are image folders
    (pass ``--slides`` to tile large ones).
    """
    import openslide

    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        return False
    tiffs = []
    for folder, _, files in os.walk(root):
        for name in files:
            suffix = os.path.splitext(name)[1].lower()
            if suffix in _SLIDE_ONLY:
                return True
            if suffix in (".tif", ".tiff") and len(tiffs) < _TIFF_CHECK:
                tiffs.append(Path(folder) / name)
    for path in tiffs:
        try:
            if openslide.OpenSlide.detect_format(str(path)) is None:
                continue
            with openslide.OpenSlide(str(path)) as slide:
                if slide.level_count > 1 or max(slide.dimensions) >= MIN_SLIDE_SIDE:
                    return True
        except (openslide.OpenSlideError, OSError):
            continue
    return False


def read_labels_csv(path: Union[str, Path]) -> dict[str, str]:
    """``slide -> label`` from a CSV with columns ``slide`` and ``label`` (header required).

    Raises:
        ValueError: no such columns, an empty label, or a slide listed twice with different labels.
    """
    path = Path(path)
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"slide", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{path} needs a header with columns 'slide' and 'label', got {reader.fieldnames}")
        labels: dict[str, str] = {}
        for line, row in enumerate(reader, start=2):
            slide, label = (row.get("slide") or "").strip(), (row.get("label") or "").strip()
            if not slide:
                continue
            if not label:
                raise ValueError(f"{path} line {line}: slide {slide!r} has an empty label")
            if labels.get(slide, label) != label:
                raise ValueError(f"{path}: slide {slide!r} has two labels ({labels[slide]!r}, {label!r})")
            labels[slide] = label
    return labels


def _label_of(slide: Path, csv_labels: Optional[dict[str, str]]) -> Optional[str]:
    if csv_labels is not None:
        return csv_labels.get(slide.as_posix(), csv_labels.get(slide.name))
    return slide.parts[0] if len(slide.parts) > 1 else None


class TileReader:
    """``datasets`` transform that adds the ``image`` of slide-tile rows, read from the slide on demand.

    Keeps a few slides open per process (rows come slide by slide); picklable, for DataLoader workers.
    """

    def __init__(self, root: str, tile_size: int, mpp_source: Optional[float], max_pixels: Optional[int]) -> None:
        self.root = root
        self.tile_size = tile_size
        self.mpp_source = mpp_source
        self.max_pixels = max_pixels
        self._open: OrderedDict = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_open"} | {"_open": OrderedDict()}

    def _slide(self, name: str):
        if self._pid != os.getpid():  # forked: handles of the parent are not ours
            self._open, self._pid = OrderedDict(), os.getpid()
        if name not in self._open:
            while len(self._open) >= 4:
                self._open.popitem(last=False)[1].close()
            self._open[name] = open_slide(Path(self.root) / name, self.mpp_source, self.max_pixels)
        self._open.move_to_end(name)
        return self._open[name]

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if not all(column in batch for column in ("slide", "x", "y", "size0")):
            return batch  # only label / source asked for
        import openslide

        size = self.tile_size
        images = []
        for name, x, y, size0 in zip(batch["slide"], batch["x"], batch["y"], batch["size0"]):
            try:
                images.append(self._slide(name).read_region(int(x), int(y), int(size0), int(size0), size, size))
            except openslide.OpenSlideError as err:  # a corrupt tile: unreadable like a bad image file
                raise SlideError(f"cannot read {name} at ({x}, {y}): {err}") from err
        batch["image"] = images
        return batch


@dataclass
class SlideSet:
    """The slides of a build: per-slide entries of ``slides.json`` and the tiling parameters."""

    root: Path
    mpp: float
    tile_size: int
    min_tissue: float
    slides: dict[str, dict] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)

    def catalog(self) -> dict[str, Any]:
        """The content of ``slides.json``."""
        return {
            "slides": self.slides,
            "root": Path(self.root).name,  # the folder's name only: no path of the builder's machine
            "tile_mpp": self.mpp,  # the tiles' µm/px (each slide's own level-0 µm/px: its "level0_mpp")
            "tile_size": self.tile_size,
            "min_tissue": self.min_tissue,
            "tissue_rule": TISSUE_RULE,
        }

    def catalog_writer(self, out_dir: Union[str, Path], append: bool = False) -> Callable[[Path], None]:
        """A writer of ``slides.json`` for the index commit; with ``append``, merged into the existing one."""
        out = Path(out_dir)

        def write(tmp: Path) -> None:
            data = self.catalog()
            if append and (out / SLIDES_FILE).is_file():
                old = json.loads((out / SLIDES_FILE).read_text())
                data["slides"] = {**upgraded_slides(old.get("slides", {})), **self.slides}
            tmp.write_text(json.dumps(data, indent=2) + "\n")

        return write


def _thumbnail_and_mask(slide, out: Optional[Path], name: str) -> tuple:
    """Tissue mask (cleaned, on a :data:`MASK_SIDE` view) and, when ``out`` is given, stored thumbnail + mask."""
    view = slide.thumbnail(MASK_SIDE)
    scale = slide.width / view.width
    mask = clean_mask(tissue_mask(view))
    thumb_scale = None
    if out is not None:
        thumb = view.copy()
        thumb.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BILINEAR)
        mask_image = Image.fromarray(mask.astype("uint8") * 255).resize(thumb.size, Image.Resampling.NEAREST)
        folder = out / SLIDES_DIR
        folder.mkdir(parents=True, exist_ok=True)
        key = slide_key(name)
        write_atomic(folder / f"{key}.thumb.png", lambda p: thumb.save(p, format="PNG"))
        write_atomic(folder / f"{key}.mask.png", lambda p: mask_image.save(p, format="PNG"))
        thumb_scale = slide.width / thumb.width
    return (mask, scale), thumb_scale


def load_slide_dataset(
    root: Union[str, Path],
    mpp: float = DEFAULT_MPP,
    tile_size: int = 224,
    min_tissue: float = MIN_TISSUE_FRACTION,
    labels_csv: Optional[Union[str, Path]] = None,
    mpp_source: Optional[float] = None,
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
    out_dir: Optional[Union[str, Path]] = None,
    strict: bool = False,
    progress: bool = True,
):
    """The tissue tiles of a folder of slides as a lazily-read ``datasets.Dataset``, and the :class:`SlideSet`.

    Args:
        root: the slides folder (searched recursively; see :func:`index_build.slides.find_slides`).
        mpp: µm per pixel of the tiles.
        tile_size: tile side in pixels (the model input).
        min_tissue: least tissue share of an indexed tile.
        labels_csv: ``slide,label`` CSV; default the first sub-folder of each slide.
        mpp_source: µm/px at level 0 of slides that record none.
        max_pixels: largest plain (non-pyramidal) image accepted.
        out_dir: when given, each slide's thumbnail and mask are written to ``out_dir/slides/``.
        strict: stop at the first unreadable slide (default: skip it, log it, list it in ``skipped``).
        progress: a progress bar over the slides.

    Returns:
        ``(dataset, slide_set)``; the dataset has columns ``label, source, slide, x, y, size0, mpp``
        and an ``image`` (PIL, ``tile_size`` px) computed when a row is read.

    Raises:
        SlideError: no slides, a slide without a label, slides without MPP and no ``mpp_source``
            (all of them named), no tissue tile at all, or an unreadable slide with ``strict``.
    """
    import datasets

    root = Path(os.path.expanduser(str(root))).resolve()
    files = find_slides(root)
    if out_dir is not None:  # an index written inside the slides folder: its thumbnails are not slides
        inside = Path(os.path.expanduser(str(out_dir))).resolve()
        files = [f for f in files if not (root / f).resolve().is_relative_to(inside)]
    if not files:
        raise SlideError(f"{root} holds no slides or images")
    csv_labels = read_labels_csv(labels_csv) if labels_csv is not None else None
    unlabelled = [f.as_posix() for f in files if _label_of(f, csv_labels) is None]
    if unlabelled:
        where = f"in {labels_csv}" if csv_labels is not None else "(no sub-folder named after their label)"
        raise SlideError(
            f"{len(unlabelled)} slides have no label {where}: {', '.join(unlabelled[:5])}; put each slide in a "
            "sub-folder named after its label, or pass --labels CSV with columns slide,label"
        )
    out = Path(out_dir) if out_dir is not None else None
    result = SlideSet(root, mpp, tile_size, min_tissue)
    rows: dict[str, list] = {name: [] for name in ("label", "source", *SLIDE_COLUMNS)}
    no_mpp: list[str] = []
    for rel in tqdm(files, unit="slide", desc="slides (tissue)", disable=not progress):
        name = rel.as_posix()
        label = _label_of(rel, csv_labels)
        try:
            with open_slide(root / rel, mpp_source, max_pixels) as slide:
                if slide.mpp is None:
                    no_mpp.append(name)
                    continue
                mask, thumb_scale = _thumbnail_and_mask(slide, out, name)
                tissue, background = tile_slide(slide, mpp, tile_size, min_tissue, mask=mask)
                entry = {
                    "width": slide.width,
                    "height": slide.height,
                    "level0_mpp": slide.mpp,
                    "mpp_from": slide.mpp_from,
                    "label": label,
                    "levels": slide.level_count,
                    "size0": tissue[0].size0 if tissue else None,
                    "tissue_tiles": len(tissue),
                    "background_tiles": len(background),
                }
                if thumb_scale is not None:
                    entry["thumb_scale"] = thumb_scale
                result.slides[name] = entry
                for tile in tissue:
                    rows["label"].append(label)
                    rows["source"].append(f"{name}@{tile.x},{tile.y}")
                    rows["slide"].append(name)
                    rows["x"].append(tile.x)
                    rows["y"].append(tile.y)
                    rows["size0"].append(tile.size0)
                    rows["mpp"].append(float(slide.mpp))
                logger.info("%s: %d tissue tiles, %d background tiles skipped", name, len(tissue), len(background))
        except SlideError as err:
            if strict:
                raise
            logger.warning("skipped unreadable slide %s: %s", name, err)
            result.skipped.append({"source": name, "reason": str(err)})
    if no_mpp:
        raise SlideError(
            f"{len(no_mpp)} slides record no resolution (openslide.mpp-x / TIFF resolution tags): "
            f"{', '.join(no_mpp[:5])}; give their µm per pixel at level 0 with --mpp-source (e.g. 0.25 for 40x, "
            "0.5 for 20x)"
        )
    if not rows["source"]:
        raise SlideError(f"no tissue tile in the {len(files)} slides of {root} (tissue rule: {TISSUE_RULE})")
    table = datasets.Dataset.from_dict(
        rows,
        features=datasets.Features(
            {
                "label": datasets.Value("string"),
                "source": datasets.Value("string"),
                "slide": datasets.Value("string"),
                "x": datasets.Value("int64"),
                "y": datasets.Value("int64"),
                "size0": datasets.Value("int64"),
                "mpp": datasets.Value("float64"),
            }
        ),
    )
    logger.info("%s: %d slides, %d tissue tiles at %s µm/px", root, len(result.slides), len(table), mpp)
    return table.with_transform(TileReader(str(root), tile_size, mpp_source, max_pixels)), result
