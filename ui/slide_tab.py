"""The app's "Whole slide" tab: upload a slide, pick a region, search its tiles, see where matches come from and why.

:class:`SlidePage` holds the handlers (plain methods, tested without a browser) and
:meth:`SlidePage.build` lays the tab out inside the app's ``gr.Blocks``. The page keeps no slide
in memory between events: each event re-opens the uploaded file (cheap with OpenSlide) from the
per-session :class:`SlideSession` kept in a ``gr.State``.

- **Upload** (:meth:`SlidePage.load`): any format of :data:`index_build.slides.SLIDE_EXTENSIONS`
  (a DICOM WSI as a single ``.dcm`` file or a ``.zip`` of its series' ``.dcm`` files), at most
  ``max_slide_mb`` MB (a zip: unpacked); the thumbnail is shown with the tissue outline
  (:mod:`index_build.tissue` rule on a low-resolution view) and a first region centred on the tissue.
- **Region** (:meth:`SlidePage.pick`): a click centres a square region of N tiles a side, or two
  clicks give the corners of a box.
- **Search** (:meth:`SlidePage.search`): the region is tiled at the index's resolution
  (``slides.json`` of a slide index, else :data:`index_build.slides.DEFAULT_MPP`) and the model
  input; background tiles are skipped; every tissue tile is searched in every gallery and merged
  as the Search tab does, by the query core (:func:`index_build.search_core.run_query`, through
  :meth:`index_build.galleries.Galleries.search`).
  The tile vote map outlines each tile in the colour of the label it voted for.
- **A result** (:meth:`SlidePage.explain`): where it comes from (slide and level-0 place marked on
  the slide's stored thumbnail, a full-resolution view read from the slide when this server has it)
  and why it matches (:mod:`index_build.heatmap` over the query region).
- **Slide-level search** (:meth:`SlidePage.rank_slides`): :func:`index_build.slide_search.search_slide`
  over the served index when it is a slide index.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Union

import gradio as gr
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from index_build.display import ResponseFiles, code_text, escape_text, short_source
from index_build.metrics import majority_votes
from index_build.query import Hit, Tile
from index_build.search_core import Query, check_k
from index_build.slides import (
    DEFAULT_MPP,
    SLIDE_EXTENSIONS,
    SlideCatalog,
    SlideError,
    SlideTile,
    load_slide_catalog,
    open_slide,
    read_tile,
    slide_tissue_mask,
    tile_size0,
    tile_slide,
)
from index_build.storage import IndexLoadError
from index_build.tissue import MIN_TISSUE_FRACTION
from index_build.uploads import InputError

if TYPE_CHECKING:
    from index_build.galleries import Galleries

logger = logging.getLogger(__name__)

DEFAULT_MAX_SLIDE_MB = 2048
UPLOAD_EXTENSIONS = SLIDE_EXTENSIONS | {".zip"}  # a zip: the .dcm files of a DICOM WSI series
MAX_REGION_TILES = 64  # tiles searched per region (8 x 8)
DEFAULT_REGION_TILES = 3  # side of a clicked region, in tiles
THUMB_SIDE = 1024  # the thumbnail shown (and clicked on)
VIEW_SIDE = 768  # longer side of the vote map and the heat map
HEATMAP_TILES = 16  # a larger region is shrunk for its heat map so that it costs at most this many model passes
CLICK_MODES = ("centre a region", "draw a box (two clicks)")
SLIDE_TABLE_HEADERS = ["rank", "slide", "score", "label", "matched mosaic tiles"]
RESULT_HEADERS = ["rank", "label", "similarity", "tile", "gallery", "source", "slide", "x", "y", "size0"]
SKIPPED_COLOUR = (150, 150, 150)
REGION_COLOUR = (0, 90, 255)
MARK_COLOUR = (255, 0, 0)
# Label colours (Kelly's / Sasha Trubetskoy's distinct colours), by the label's rank in the galleries' labels.
LABEL_COLOURS = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (0, 128, 128),
    (170, 110, 40),
    (128, 0, 0),
    (0, 0, 128),
    (128, 128, 0),
    (255, 225, 25),
)
_SLIDE_SOURCE = re.compile(r"^(?P<slide>.+)@(?P<x>-?\d+),(?P<y>-?\d+)$")

__all__ = [
    "CLICK_MODES",
    "DEFAULT_MAX_SLIDE_MB",
    "MAX_REGION_TILES",
    "SlidePage",
    "SlideSession",
    "max_slide_mb_default",
    "slide_place",
]


def max_slide_mb_default() -> int:
    """The slide upload limit in MB: ``$LGFFEM_MAX_SLIDE_MB``, else :data:`DEFAULT_MAX_SLIDE_MB`."""
    try:
        return int(os.environ.get("LGFFEM_MAX_SLIDE_MB") or DEFAULT_MAX_SLIDE_MB)
    except ValueError:
        logger.warning("LGFFEM_MAX_SLIDE_MB is not a whole number: using %d", DEFAULT_MAX_SLIDE_MB)
        return DEFAULT_MAX_SLIDE_MB


@dataclass(frozen=True)
class Place:
    """Where an indexed patch comes from on a slide: relative slide path and level-0 box."""

    slide: str
    x: int
    y: int
    size0: Optional[int]


def _file_names_only(text: str, file: Any) -> str:
    """``text`` with the uploaded file's folder (as given and resolved) removed: a visitor sees the file's
    name, never where the server keeps it (Gradio's ``/tmp/gradio/<hash>/``)."""
    if not file:
        return text
    path = Path(str(file))
    for folder in sorted({str(path.parent), str(path.resolve().parent)}, key=len, reverse=True):
        if folder not in ("", "."):
            text = text.replace(folder.rstrip(os.sep) + os.sep, "")
    return text


def slide_place(source: str, catalog: Optional[SlideCatalog], tile_size: int) -> Optional[Place]:
    """The slide place of a slide-index source ``"<slide>@<x>,<y>"`` (``None``: not from a slide).

    The level-0 side of the tile is the index's tile at the index's MPP in the slide's own MPP
    (``None`` when the catalog does not know the slide).
    """
    match = _SLIDE_SOURCE.match(str(source))
    if match is None:
        return None
    slide = match["slide"]
    size0 = None
    if catalog is not None and slide in catalog.slides:
        slide_mpp = catalog.slides[slide].get("level0_mpp")
        if slide_mpp:
            size0 = max(1, round((catalog.tile_size or tile_size) * (catalog.mpp or DEFAULT_MPP) / float(slide_mpp)))
    return Place(slide, int(match["x"]), int(match["y"]), size0)


@dataclass
class SlideSession:
    """One visitor's uploaded slide and what was done with it (kept in a ``gr.State``)."""

    path: str
    name: str
    width: int
    height: int
    mpp: float  # µm/px at level 0 (the file's, or the one given on the page)
    mpp_from: str  # "slide" or "page"
    scale: float  # level-0 px per thumbnail px
    thumb: str  # the thumbnail with the tissue outline (PNG)
    mask: str  # the tissue mask (.npy) and its scale
    mask_scale: float
    size0: int  # level-0 side of one tile
    region: tuple[int, int, int, int]  # level-0 x, y, w, h
    corner: Optional[tuple[int, int]] = None  # first corner of a box being drawn (level 0)
    tiles: list[tuple[int, int, int, bool, str]] = field(default_factory=list)  # x, y, size0, tissue, vote
    hits: list[dict] = field(default_factory=list)  # the merged hits of the last search
    searched: Optional[tuple[int, int, int, int]] = None  # the region of the last search


class SearchView(NamedTuple):
    """What a region search returns, in the order of the tab's output components."""

    vote_map: Optional[str]
    results: list[tuple[str, str]]
    summary: str
    table: list[list[Any]]
    session: Optional[SlideSession]


class ExplainView(NamedTuple):
    """What selecting a result returns: where it comes from (picture, text), its full view, the heat map."""

    where: Optional[str]
    where_text: str
    view: Optional[str]
    heat: Optional[str]


class SlidePage:
    """The "Whole slide" tab of an app serving ``galleries``.

    Args:
        galleries: the galleries (and model) the Search tab searches.
        embed: preprocessed pixels -> embeddings (the app's, possibly under ``spaces.GPU``).
        max_slide_mb: largest upload accepted, in MB.
        responses: where response pictures are written (fresh files per response).
    """

    def __init__(
        self,
        galleries: Galleries,
        embed: Optional[Callable[[Any], np.ndarray]] = None,
        max_slide_mb: Optional[int] = None,
        responses: Optional[ResponseFiles] = None,
        slides_root: Optional[Union[str, Path]] = None,
    ) -> None:
        self.galleries = galleries
        # The only folder full-resolution views are read from (``--slides-root``); never a path of the index.
        self.slides_root: Optional[Path] = Path(slides_root).resolve() if slides_root is not None else None
        self.embedder = galleries.embedder
        self.embed = embed or self.embedder.embed_pixels
        self.max_slide_mb = int(max_slide_mb if max_slide_mb is not None else max_slide_mb_default())
        self.responses = responses or ResponseFiles()
        self._work = Path(tempfile.mkdtemp(prefix="lgffem-slides-"))
        self.catalog: Optional[SlideCatalog] = None
        main_path = getattr(galleries.main, "path", None)
        if main_path is not None:
            try:
                self.catalog = load_slide_catalog(main_path)
            except (SlideError, IndexLoadError) as err:
                logger.warning("slide catalog of %s unreadable: %s", main_path, err)
        self._places: Optional[dict[str, list]] = None  # the main gallery's slide columns, when it has them
        extra = getattr(galleries.main, "extra_columns", [])
        if {"slide", "x", "y", "size0"} <= set(extra):
            self._places = {name: galleries.main.column(name) for name in ("slide", "x", "y", "size0")}
        self.input_size = int(self.embedder.processor.image_size)
        self.tile_size = int(self.catalog.tile_size) if self.catalog and self.catalog.tile_size else self.input_size
        self.mpp = float(self.catalog.mpp) if self.catalog and self.catalog.mpp else DEFAULT_MPP
        self.last_timings: dict[str, float] = {}  # seconds per stage of the latest region search (see search)

    # ---- helpers ---------------------------------------------------------------------------

    def label_colour(self, label: str) -> tuple[int, int, int]:
        """The colour of a label on the vote map (stable: by its rank among the galleries' labels)."""
        labels = self.galleries.labels()
        rank = labels.index(label) if label in labels else len(labels) + sum(map(ord, label))
        return LABEL_COLOURS[rank % len(LABEL_COLOURS)]

    def _check_file(self, file: Any) -> Path:
        if file is None or (isinstance(file, str) and not file.strip()):
            raise SlideError("No slide yet: upload a slide (SVS, NDPI, MRXS, tiled TIFF, ...) or a large image.")
        path = Path(getattr(file, "name", None) or getattr(file, "path", None) or str(file))
        if not path.is_file():
            raise SlideError(f"{path.name}: the upload is missing on the server; upload it again")
        if path.suffix.lower() not in UPLOAD_EXTENSIONS:
            accepted = ", ".join(sorted(UPLOAD_EXTENSIONS))
            raise SlideError(f"{path.name}: not a slide or image file; accepted: {accepted}")
        size = path.stat().st_size
        if size > self.max_slide_mb * 2**20:
            raise SlideError(
                f"{path.name}: file of {size / 2**20:,.0f} MB; this server accepts slides up to "
                f"{self.max_slide_mb:,} MB (option --max-slide-mb / LGFFEM_MAX_SLIDE_MB)"
            )
        return self._unzip_dicom(path) if path.suffix.lower() == ".zip" else path

    def _unzip_dicom(self, path: Path) -> Path:
        """The ``.dcm`` members of a zip (a DICOM WSI series), unpacked flat into a folder named after the zip.

        Only the members' file names are used (no folders, so nothing is written outside the folder);
        the unpacked size is checked against ``max_slide_mb`` before anything is written.
        """
        try:
            with zipfile.ZipFile(path) as archive:
                members = [m for m in archive.infolist() if not m.is_dir() and m.filename.lower().endswith(".dcm")]
                names = [Path(m.filename.replace("\\", "/")).name for m in members]
                if not members:
                    raise SlideError(f"{path.name}: the zip holds no DICOM (.dcm) files; zip the series' folder")
                if len(set(names)) != len(names):
                    raise SlideError(f"{path.name}: the zip holds two .dcm files of the same name; zip one series")
                total = sum(m.file_size for m in members)
                if total > self.max_slide_mb * 2**20:
                    raise SlideError(
                        f"{path.name}: {total / 2**20:,.0f} MB of DICOM files unpacked; this server accepts slides up "
                        f"to {self.max_slide_mb:,} MB (option --max-slide-mb / LGFFEM_MAX_SLIDE_MB)"
                    )
                folder = Path(tempfile.mkdtemp(prefix="dicom-", dir=self._work)) / path.stem
                folder.mkdir()
                for member, name in zip(members, names):
                    with archive.open(member) as src, open(folder / name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        except (zipfile.BadZipFile, OSError) as err:
            raise SlideError(f"{path.name}: not a readable zip ({err})") from err
        return folder

    def _region_around(self, session: SlideSession, cx: float, cy: float, tiles: int) -> tuple[int, int, int, int]:
        side = max(1, int(tiles)) * session.size0
        side_w, side_h = min(side, session.width), min(side, session.height)
        return self._snap(session, cx - side_w / 2, cy - side_h / 2, side_w, side_h)

    @staticmethod
    def _snap(session: SlideSession, x: float, y: float, w: int, h: int) -> tuple[int, int, int, int]:
        """A region inside the slide whose top-left is on the tile grid from (0, 0), as a slide index is tiled,
        so that a region's tiles are the very tiles a slide index holds of the same slide."""
        s0 = session.size0
        x = min(max(0, round(x / s0) * s0), (session.width - w) // s0 * s0)
        y = min(max(0, round(y / s0) * s0), (session.height - h) // s0 * s0)
        return int(x), int(y), int(w), int(h)

    def _thumb_with_region(self, session: SlideSession, note: Optional[str] = None) -> Image.Image:
        with Image.open(session.thumb) as thumb:
            canvas = thumb.convert("RGB")
        draw = ImageDraw.Draw(canvas)
        x, y, w, h = session.region
        s = session.scale
        draw.rectangle([x / s, y / s, (x + w) / s - 1, (y + h) / s - 1], outline=REGION_COLOUR, width=3)
        if session.corner is not None:
            cx, cy = session.corner[0] / s, session.corner[1] / s
            draw.line([cx - 8, cy, cx + 8, cy], fill=MARK_COLOUR, width=2)
            draw.line([cx, cy - 8, cx, cy + 8], fill=MARK_COLOUR, width=2)
        return canvas

    def _region_text(self, session: SlideSession) -> str:
        x, y, w, h = session.region
        um = self.mpp * self.tile_size
        return (
            f"Region: level-0 x={x:,}, y={y:,}, {w:,}×{h:,} px ({w * session.mpp:,.0f}×{h * session.mpp:,.0f} µm, "
            f"about {max(1, w // session.size0)}×{max(1, h // session.size0)} tiles of {self.tile_size} px at "
            f"{self.mpp:g} µm/px = {um:g} µm)."
        )

    # ---- upload ----------------------------------------------------------------------------

    def load(
        self, file: Any, mpp_text: Optional[float] = None, region_tiles: float = DEFAULT_REGION_TILES
    ) -> tuple[Optional[Image.Image], str, Optional[SlideSession]]:
        """Upload handler: check and open the file, draw its tissue outline, pick a first region.

        Args:
            file: the uploaded file's path.
            mpp_text: µm per pixel of the upload when the file records none (``0``/empty: from the file).
            region_tiles: side of the first region, in tiles.

        Returns:
            ``(thumbnail, status, session)``; on bad input ``(None, "⚠️ message", None)``.
        """
        try:
            return self._load(file, mpp_text, region_tiles)
        except SlideError as err:
            logger.info("rejected slide: %s", err)
            return None, f"⚠️ {_file_names_only(str(err), file)}", None
        except Exception as err:  # an unexpected decoder failure: a message, not a traceback
            logger.exception("slide upload failed")
            text = _file_names_only(f"{type(err).__name__}: {err}", file)
            return None, f"⚠️ could not read this file as a slide or image ({text})", None

    def _load(self, file: Any, mpp_text: Optional[float], region_tiles: float) -> tuple[Image.Image, str, SlideSession]:
        path = self._check_file(file)
        given = float(mpp_text) if mpp_text not in (None, "") and float(mpp_text or 0) > 0 else None
        with open_slide(path, mpp_source=given) as slide:
            if slide.mpp is None:
                raise SlideError(
                    f"{path.name} records no resolution (µm per pixel): enter it in the "
                    "'µm per pixel of the upload' box (e.g. 0.25 for 40x, 0.5 for 20x) and press Enter: the file "
                    "is read again with it"
                )
            thumb = slide.thumbnail(THUMB_SIDE)
            mask, mask_scale = slide_tissue_mask(slide)
            size0 = tile_size0(slide, self.mpp, self.tile_size)
            mpp, mpp_from, width, height = float(slide.mpp), slide.mpp_from or "slide", slide.width, slide.height
        if size0 > min(width, height):
            raise SlideError(
                f"{path.name} is {width}×{height} px at {mpp:g} µm/px: smaller than one {self.tile_size} px "
                f"tile at {self.mpp:g} µm/px; search it in the Search tab instead"
            )
        folder = Path(tempfile.mkdtemp(prefix="slide-", dir=self._work))
        outline = draw_outline(thumb, mask)
        outline.save(folder / "thumb.png")
        np.save(folder / "mask.npy", mask)
        session = SlideSession(
            path=str(path),
            name=path.name,
            width=width,
            height=height,
            mpp=mpp,
            mpp_from="slide" if mpp_from == "slide" else "page",
            scale=width / thumb.width,
            thumb=str(folder / "thumb.png"),
            mask=str(folder / "mask.npy"),
            mask_scale=mask_scale,
            size0=size0,
            region=(0, 0, size0, size0),
        )
        ys, xs = np.nonzero(mask)
        cx, cy = (xs.mean() * mask_scale, ys.mean() * mask_scale) if len(xs) else (width / 2, height / 2)
        session.region = self._region_around(session, cx, cy, int(region_tiles))
        tissue_share = float(mask.mean()) if mask.size else 0.0
        status = (
            f"**{path.name}**: {width:,}×{height:,} px at level 0, {mpp:g} µm/px "
            f"({'from the file' if session.mpp_from == 'slide' else 'as entered'}); tissue (outlined in green) covers "
            f"{100 * tissue_share:.0f}% of it.  \n"
            "Click the thumbnail to move the region (blue), then **Search region**.  \n" + self._region_text(session)
        )
        logger.info("slide %s: %dx%d, mpp %.3f, tile %d px at level 0", path.name, width, height, mpp, size0)
        return self._thumb_with_region(session), status, session

    # ---- region ----------------------------------------------------------------------------

    def pick(
        self,
        session: Optional[SlideSession],
        mode: str,
        region_tiles: float,
        point: Optional[tuple[float, float]],
    ) -> tuple[Optional[Image.Image], str, Optional[SlideSession]]:
        """Thumbnail click handler: centre a region there, or set one corner of a box.

        Args:
            session: the current slide.
            mode: one of :data:`CLICK_MODES`.
            region_tiles: side of a centred region, in tiles.
            point: the click, in thumbnail pixels.
        """
        if session is None:
            return None, "⚠️ No slide yet: upload a slide first.", None
        if point is None:
            return self._thumb_with_region(session), self._region_text(session), session
        x0, y0 = point[0] * session.scale, point[1] * session.scale
        x0, y0 = min(max(0.0, x0), session.width - 1), min(max(0.0, y0), session.height - 1)
        if mode != CLICK_MODES[1]:
            session = replace(session, region=self._region_around(session, x0, y0, int(region_tiles)), corner=None)
            return self._thumb_with_region(session), self._region_text(session), session
        if session.corner is None:
            session = replace(session, corner=(int(x0), int(y0)))
            return self._thumb_with_region(session), "First corner set: click the opposite corner of the box.", session
        (ax, ay), s0 = session.corner, session.size0
        left, top, right, bottom = min(ax, x0), min(ay, y0), max(ax, x0), max(ay, y0)
        w, h = max(s0, right - left), max(s0, bottom - top)
        count = math.floor(w / s0) * math.floor(h / s0)
        if count > MAX_REGION_TILES:
            session = replace(session, corner=None)
            return (
                self._thumb_with_region(session),
                f"⚠️ That box holds {count} tiles; a region is searched up to {MAX_REGION_TILES} tiles "
                f"({int(math.sqrt(MAX_REGION_TILES))}×{int(math.sqrt(MAX_REGION_TILES))}). Draw a smaller box.",
                session,
            )
        w, h = int(min(w, session.width)), int(min(h, session.height))
        session = replace(session, region=self._snap(session, left, top, w, h), corner=None)
        return self._thumb_with_region(session), self._region_text(session), session

    def select_point(
        self, session: Optional[SlideSession], mode: str, region_tiles: float, evt: gr.SelectData
    ) -> tuple[Optional[str], str, Optional[SlideSession]]:
        """``gr.Image.select`` wrapper of :meth:`pick` (the click's pixel is ``evt.index``)."""
        point = tuple(evt.index) if evt is not None and evt.index is not None else None
        picture, text, session = self.pick(session, mode, region_tiles, point)
        return self.responses.writer()(picture), text, session

    # ---- search ----------------------------------------------------------------------------

    def search(
        self, session: Optional[SlideSession], k: float = 8, progress: Optional[gr.Progress] = None
    ) -> SearchView:
        """Search handler: tile the region, skip background, search every tissue tile, merge, draw the vote map."""
        try:
            return self._search(session, k, progress)
        except (SlideError, InputError) as err:
            logger.info("region search refused: %s", err)
            return SearchView(None, [], f"⚠️ {err}", [], session)

    def _search(self, session: Optional[SlideSession], k: float, progress: Optional[gr.Progress]) -> SearchView:
        if session is None:
            raise SlideError("No slide yet: upload a slide first, then pick a region.")
        k = check_k(k)
        started = time.perf_counter()
        mask = (np.load(session.mask), session.mask_scale)
        with open_slide(session.path, mpp_source=session.mpp if session.mpp_from == "page" else None) as slide:
            tissue, skipped = tile_slide(slide, self.mpp, self.tile_size, MIN_TISSUE_FRACTION, session.region, mask)
            if len(tissue) + len(skipped) > MAX_REGION_TILES:
                raise SlideError(
                    f"the region holds {len(tissue) + len(skipped)} tiles; the limit is {MAX_REGION_TILES}: pick a "
                    "smaller region"
                )
            if not tissue:
                raise SlideError(
                    f"no tissue in this region ({len(skipped)} background tile{'s' if len(skipped) != 1 else ''} "
                    "skipped): click on the tissue outlined in green"
                )
            steps = progress.tqdm(tissue, desc="reading tiles") if progress is not None else tissue
            crops = [read_tile(slide, tile, self.tile_size) for tile in steps]
            x, y, w, h = session.region
            ratio = self.tile_size / session.size0
            query = slide.read_region(x, y, w, h, max(1, round(w * ratio)), max(1, round(h * ratio)))
        read = time.perf_counter() - started

        def report(done: int, total: int) -> None:
            progress((done, total), desc=f"searching {total} tiles", unit="tiles")

        found = self.galleries.search(
            region_query(query, session.region, ratio, tissue, skipped, crops),
            k,
            embed=self.embed,
            progress=report if progress is not None else None,
        )
        drawing = time.perf_counter()
        hits = found.hits
        tile_votes = [vote or "" for vote in found.tile_votes()[: len(tissue)]]

        folder = Path(tempfile.mkdtemp(prefix="search-", dir=self._work))
        query_path = folder / "region.png"
        query.save(query_path)
        session = replace(
            session,
            tiles=[(t.x, t.y, t.size0, True, v) for t, v in zip(tissue, tile_votes)]
            + [(t.x, t.y, t.size0, False, "") for t in skipped],
            hits=[self._hit_record(hit) for hit in hits],
            searched=session.region,
        )
        session.hits = [{**record, "region_image": str(query_path)} for record in session.hits]
        to_file = self.responses.writer()
        vote_map = self.draw_vote_map(query, session, tissue, skipped, tile_votes)
        drawn = time.perf_counter()
        results = [(to_file(hit.thumbnail or _blank(self.input_size)), self._caption(hit)) for hit in hits]
        table = [
            [rank, r["label"], f"{r['score']:.3f}", r["tile"], r["gallery"], r["source"]]
            + ([r["slide"], r["x"], r["y"], r["size0"]] if r["slide"] else ["", "", "", ""])
            for rank, r in enumerate(session.hits, 1)
        ]
        votes = found.votes
        verdict = found.verdict  # the one decision of index_build.verdict, made by the query core
        if not hits or verdict is None:
            headline = "### No results\nThe galleries are empty.  \n"
        else:
            headline = verdict.text() + "  \n"
        summary = (
            headline
            + (
                f"Tile votes: {', '.join(f'{escape_text(lab)}: {n}' for lab, n in votes)}.  \n"
                if verdict and verdict.close_tiles
                else ""
            )
            + f"Region of {session.name}: {len(tissue)} tissue tile{'s' if len(tissue) != 1 else ''} searched, "
            f"{len(skipped)} background tile{'s' if len(skipped) != 1 else ''} skipped (tiles of "
            f"{self.tile_size} px at {self.mpp:g} µm/px; tissue rule: at least {MIN_TISSUE_FRACTION:.0%} tissue). "
            "Each tile votes for the "
            f"majority label of its own {k} results; the k best patches over all tiles are shown. "
            "**Click a result** to see where it comes from and why it matches."
        )
        view = SearchView(to_file(vote_map), results, summary, table, session)
        # The core's stages; a region's "decode" is reading its tiles from the slide.
        self.last_timings = {
            **found.timings,
            "decode": read,
            "draw": drawn - drawing,
            "export": time.perf_counter() - drawn,
        }
        logger.info(
            "region search: %d tissue tiles, %d skipped, k=%d (%s)",
            len(tissue),
            len(skipped),
            k,
            ", ".join(f"{stage} {1000 * s:.0f} ms" for stage, s in self.last_timings.items()),
        )
        return view

    def place(self, hit: Hit) -> Optional[Place]:
        """Where a hit comes from on a slide: the slide index's ``slide, x, y, size0`` columns, else its
        ``"<slide>@<x>,<y>"`` source (:func:`slide_place`); ``None`` for patches not from a slide."""
        if hit.gallery != "index":
            return None
        if self._places is not None:
            slide = self._places["slide"][hit.id]
            if slide is None:
                return None
            size0 = self._places["size0"][hit.id]
            x, y = self._places["x"][hit.id], self._places["y"][hit.id]
            return Place(str(slide), int(x), int(y), int(size0) if size0 is not None else None)
        return slide_place(hit.source, self.catalog, self.tile_size)

    def _hit_record(self, hit: Hit) -> dict:
        place = self.place(hit)
        return {
            "gallery": hit.gallery,
            "id": hit.id,
            "score": hit.score,
            "label": hit.label,
            "source": hit.source,
            "tile": hit.tile,
            "slide": place.slide if place else None,
            "x": place.x if place else None,
            "y": place.y if place else None,
            "size0": place.size0 if place else None,
        }

    def _caption(self, hit: Hit) -> str:
        place = self.place(hit)
        where = f"{Path(place.slide).name} @ x={place.x:,}, y={place.y:,}" if place else short_source(hit.source)
        return f"{hit.label} · sim {hit.score:.3f} · tile {hit.tile} · {where}"

    def draw_vote_map(
        self,
        query: Image.Image,
        session: SlideSession,
        tissue: list[SlideTile],
        skipped: list[SlideTile],
        votes: list[str],
    ) -> Image.Image:
        """The region with every tissue tile outlined in the colour of its vote (numbered) and every
        skipped background tile crossed in grey, with a legend underneath."""
        x0, y0, w, h = session.region
        scale = min(1.0, VIEW_SIDE / max(query.size)) * query.width / w  # display px per level-0 px
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        picture = query.resize(size, Image.Resampling.BILINEAR) if size != query.size else query.copy()
        draw = ImageDraw.Draw(picture)
        font = ImageFont.load_default(size=max(12, min(size) // 28))
        for tile in skipped:
            box = _box(tile, x0, y0, scale)
            draw.rectangle(box, outline=SKIPPED_COLOUR, width=1)
            draw.line(box, fill=SKIPPED_COLOUR, width=1)
            draw.line([box[0], box[3], box[2], box[1]], fill=SKIPPED_COLOUR, width=1)
        for number, (tile, vote) in enumerate(zip(tissue, votes), 1):
            colour = self.label_colour(vote)
            box = _box(tile, x0, y0, scale)
            inset = [box[0] + 2, box[1] + 2, box[2] - 2, box[3] - 2]
            draw.rectangle(inset, outline=colour, width=4)
            left, top, right, bottom = draw.textbbox((inset[0] + 5, inset[1] + 4), str(number), font=font)
            draw.rectangle([left - 2, top - 2, right + 2, bottom + 2], fill=colour)
            draw.text((inset[0] + 5, inset[1] + 4), str(number), fill=(255, 255, 255), font=font)
        counts = majority_votes(votes) if votes else []
        entries = [(self.label_colour(lab), f"{lab}: {n} tile{'s' if n != 1 else ''}") for lab, n in counts]
        entries.append((SKIPPED_COLOUR, f"background, skipped: {len(skipped)}"))
        return with_legend(picture, entries, font)

    # ---- a result: where and why -----------------------------------------------------------

    def explain(self, session: Optional[SlideSession], index: Optional[int]) -> ExplainView:
        """Result-click handler: where the ``index``-th result comes from, its full view, and the heat map."""
        if session is None or not session.hits:
            return ExplainView(None, "⚠️ Search a region first, then click a result.", None, None)
        if index is None or not 0 <= int(index) < len(session.hits):
            return ExplainView(None, f"⚠️ No result number {index}.", None, None)
        record = session.hits[int(index)]
        to_file = self.responses.writer()
        where, text, view = self._where(record)
        try:
            heat = self.heat_map(session, record)
        except (OSError, ValueError) as err:
            logger.warning("heat map failed: %s", err)
            heat = None
            text += f"  \n⚠️ no heat map: {err}"
        return ExplainView(to_file(where), text, to_file(view), to_file(heat))

    def select_result(self, session: Optional[SlideSession], evt: gr.SelectData) -> ExplainView:
        """``gr.Gallery.select`` wrapper of :meth:`explain`."""
        return self.explain(session, evt.index if evt is not None else None)

    def _where(self, record: dict) -> tuple[Optional[Image.Image], str, Optional[Image.Image]]:
        gallery = self._gallery(record["gallery"])
        stored = gallery.thumbnail(record["id"]) if gallery is not None else None
        label = escape_text(record["label"])
        rank_text = f"**{label}**, similarity {record['score']:.3f} (from query tile {record['tile']})"
        slide = record["slide"]
        if slide is None:
            where = "your personal gallery" if record["gallery"] == "personal" else "the gallery"
            source = code_text(record["source"])
            # the source patch itself: there is no slide to mark it on
            text = f"{rank_text}: patch `{source}` of {where} (not from a slide; its stored patch is shown)."
            return stored, text, stored
        x, y, size0 = record["x"], record["y"], record["size0"]
        text = f"{rank_text}: slide `{code_text(slide)}`, level-0 x={x:,}, y={y:,}"
        text += f", {size0:,} px a side" if size0 else ""
        picture = None
        thumbnail = None
        if self.catalog is not None and slide in self.catalog.slides:
            try:
                thumbnail = self.catalog.thumbnail(slide)
            except (OSError, IndexLoadError) as err:
                logger.warning("stored thumbnail of %s unreadable: %s", slide, err)
        if thumbnail is not None:
            picture = mark_place(thumbnail, self.catalog.scale(slide), x, y, size0 or 1)
            text += " (marked in red on the slide's stored thumbnail)."
        else:
            text += " (this index stores no thumbnail of that slide)."
        view = stored
        source = self.catalog.source_path(slide, self.slides_root) if self.catalog is not None else None
        if source is not None and size0:
            try:
                with open_slide(source) as opened:
                    view = full_view(opened, x, y, size0)
                text += "  \nFull-resolution view read from the slide on this server (the tile outlined, with context)."
            except SlideError:
                text += "  \nThe slide could not be read on this server: the stored thumbnail is shown."
        else:
            text += "  \nThe slide file is not on this server: the stored thumbnail is shown."
        return picture, text, view

    def _gallery(self, name: str) -> Any:
        return self.galleries.personal if name == "personal" else self.galleries.main

    def descriptor(self, record: dict) -> np.ndarray:
        """The stored descriptor of a result (its thumbnail embedded again when the index cannot give it back)."""
        gallery = self._gallery(record["gallery"])
        try:
            return np.asarray(gallery.index.reconstruct(int(record["id"])), dtype=np.float32)
        except RuntimeError:  # a compressed index type keeps no exact vector
            thumb = gallery.thumbnail(record["id"])
            if thumb is None:
                raise ValueError("this index keeps neither the result's vector nor its thumbnail") from None
            return self.embed(self.embedder.preprocess([thumb]))[0]

    def heat_map(self, session: SlideSession, record: dict) -> Image.Image:
        """The heat map of a result over the searched region, with the tile it came from outlined."""
        from index_build.heatmap import overlay_heatmap, similarity_map  # torch: imported on first use

        with Image.open(record["region_image"]) as image:
            query = image.convert("RGB")
        heat = similarity_map(self.embedder, query, self.descriptor(record), max_tiles=HEATMAP_TILES)
        x0, y0, w, _ = session.searched or session.region
        ratio = query.width / w
        tx, ty, size0, _, _ = session.tiles[record["tile"] - 1]  # tissue tiles come first, in search order
        box = tuple(round(v * ratio) for v in (tx - x0, ty - y0, tx + size0 - x0, ty + size0 - y0))
        title = f"query region vs result {record['label']} ({record['score']:.3f}); white: tile {record['tile']}"
        return overlay_heatmap(query, heat, max_side=VIEW_SIDE, title=title, boxes=[box])

    # ---- slide-level search ----------------------------------------------------------------

    def rank_slides(
        self, session: Optional[SlideSession], progress: Optional[gr.Progress] = None
    ) -> tuple[list[list[Any]], str]:
        """Slide-level search handler: rank the slides of the served index against the whole uploaded slide."""
        if session is None:
            return [], "⚠️ No slide yet: upload a slide first."
        if self.catalog is None:
            return [], (
                "⚠️ The served index is not a slide index, so there are no slides to rank. Slide-level search "
                "needs an index built from a folder of slides (`python -m index_build SLIDES_DIR --out DIR`) "
                "served with `python app.py --index DIR`."
            )
        from index_build.slide_search import search_slide

        if progress is not None:
            progress(0.1, desc="building the mosaic and searching it")
        try:
            hits = search_slide(
                self.galleries.main,
                lambda images: self.embed(self.embedder.preprocess(images)),
                session.path,
                mpp_source=session.mpp if session.mpp_from == "page" else None,
            )
        except SlideError as err:
            return [], f"⚠️ {err}"
        # similarities with 3 decimals, as everywhere on the page (a number column would show 1.0 as "1")
        rows = [[rank, h.slide, f"{h.score:.3f}", h.label or "", h.matched_tiles] for rank, h in enumerate(hits, 1)]
        text = (
            f"{len(hits)} slide{'s' if len(hits) != 1 else ''} ranked against the whole of {session.name}: "
            "a mosaic of representative tissue tiles "
            "is searched and each slide scores the median over the mosaic of its best similarity. "
            "The ranking is the table *Slide ranking* at the end of this tab."
        )
        return rows, text

    # ---- layout ------------------------------------------------------------------------------

    def build(self) -> None:
        """Lay the tab out and wire its events (call inside the app's ``gr.Blocks``)."""
        from index_build.heatmap import HOW_TO_READ

        extensions = sorted(UPLOAD_EXTENSIONS)
        um = self.mpp * self.tile_size
        with gr.Tab("Whole slide", elem_id="slide-tab"):
            gr.Markdown(
                f"Upload a whole-slide image ({', '.join(e.lstrip('.') for e in extensions)}; up to "
                f"{self.max_slide_mb:,} MB) or a large image. Click the thumbnail to pick a region: its tissue is cut "
                f"into tiles of {self.tile_size} px at {self.mpp:g} µm/px ({um:g} µm), as the index was, and each tile "
                "is searched; background tiles are skipped."
            )
            session = gr.State(None)
            with gr.Row():
                with gr.Column(scale=1, min_width=300):
                    upload = gr.File(
                        label="Slide or large image", file_types=extensions, type="filepath", elem_id="slide-file"
                    )
                    mpp = gr.Number(
                        label="µm per pixel of the upload (0: from the file)", value=0, minimum=0, elem_id="slide-mpp"
                    )
                    mode = gr.Radio(list(CLICK_MODES), value=CLICK_MODES[0], label="A click on the thumbnail")
                    region_tiles = gr.Slider(
                        1, int(math.sqrt(MAX_REGION_TILES)), value=DEFAULT_REGION_TILES, step=1,
                        label=f"Region side, in tiles of {um:g} µm", elem_id="slide-region-tiles",
                    )  # fmt: skip
                    k = gr.Slider(1, 50, value=8, step=1, label="k (results per tile and in all)")
                    search_button = gr.Button("Search region", variant="primary", elem_id="slide-search-button")
                    rank_button = gr.Button("Rank the slides of the index", elem_id="slide-rank-button")
                    # under its button, so that the ranking's progress and outcome show where the user clicked
                    slides_text = gr.Markdown(elem_id="slide-rank-text")
                    status = gr.Markdown(elem_id="slide-status")
                with gr.Column(scale=2):
                    thumb = gr.Image(
                        label="Slide (tissue outlined in green, region in blue): click to pick a region",
                        type="filepath", interactive=False, height=520, elem_id="slide-thumb",
                    )  # fmt: skip
            summary = gr.Markdown(elem_id="slide-summary")
            with gr.Row():
                vote_map = gr.Image(
                    label="Tile vote map", type="filepath", interactive=False, height=480, elem_id="slide-votes"
                )
                results = gr.Gallery(
                    label="Most similar patches: click one", columns=4, height=480, fit_columns=False,
                    elem_id="slide-results",
                )  # fmt: skip
            where_text = gr.Markdown(elem_id="slide-where-text")
            with gr.Row():
                where = gr.Image(
                    label="Where it comes from", type="filepath", interactive=False, height=420, elem_id="slide-where"
                )
                view = gr.Image(
                    label="The match (full resolution when the slide is here)", type="filepath",
                    interactive=False, height=420, elem_id="slide-view",
                )  # fmt: skip
                heat = gr.Image(
                    label="Why it matches: heat map on the query region", type="filepath", interactive=False,
                    height=420, elem_id="slide-heat",
                )  # fmt: skip
            gr.Markdown(f"**Reading the heat map.** {HOW_TO_READ}")
            with gr.Accordion("Result details", open=False):
                table = gr.Dataframe(headers=RESULT_HEADERS, interactive=False, elem_id="slide-table")
            gr.Markdown("### Slide ranking", elem_id="slide-rank-heading")
            slides_table = gr.Dataframe(headers=SLIDE_TABLE_HEADERS, interactive=False, elem_id="slide-rank-table")

        def on_upload(file, mpp_value, tiles):
            picture, text, state = self.load(file, mpp_value, tiles)
            return self.responses.writer()(picture), text, state

        def on_mpp(file, mpp_value, tiles):
            """A resolution typed after the upload applies to the uploaded file at once (no re-upload)."""
            if not file:
                return gr.update(), gr.update(), gr.update()
            return on_upload(file, mpp_value, tiles)

        upload.change(on_upload, inputs=[upload, mpp, region_tiles], outputs=[thumb, status, session])
        mpp.submit(on_mpp, inputs=[upload, mpp, region_tiles], outputs=[thumb, status, session], api_name=False)
        thumb.select(self.select_point, inputs=[session, mode, region_tiles], outputs=[thumb, status, session])

        def on_search(state, k_value, progress=gr.Progress()):  # noqa: B008 (Gradio's way to ask for a bar)
            return self.search(state, k_value, progress)

        search_button.click(
            on_search,
            inputs=[session, k],
            outputs=[vote_map, results, summary, table, session],
            api_name="search_region",
        )
        results.select(self.select_result, inputs=[session], outputs=[where, where_text, view, heat])

        def on_rank(state, progress=gr.Progress()):  # noqa: B008
            return self.rank_slides(state, progress)

        rank_button.click(on_rank, inputs=[session], outputs=[slides_table, slides_text], api_name="rank_slides")


# --------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------


def region_query(
    picture: Image.Image,
    region: tuple[int, int, int, int],
    ratio: float,
    tissue: list[SlideTile],
    skipped: list[SlideTile],
    crops: list[Image.Image],
) -> Query:
    """The query core's region: the tissue tiles (numbered 1.. in order, with their crops), then the
    background ones (no crop: skipped), boxed in ``picture`` (the region read at ``ratio`` px per level-0 px)."""
    x0, y0 = region[0], region[1]
    tiles = []
    for n, t in enumerate([*tissue, *skipped], start=1):
        left, top = round((t.x - x0) * ratio), round((t.y - y0) * ratio)
        side = round(t.size0 * ratio)
        tiles.append(Tile(n, 0, 0, (left, top, left + side, top + side)))
    return Query.region(picture, tiles, [*crops, *([None] * len(skipped))])


def _blank(size: int) -> Image.Image:
    return Image.new("RGB", (size, size), (235, 235, 235))


def _box(tile: SlideTile, x0: int, y0: int, scale: float) -> list[int]:
    return [
        round((tile.x - x0) * scale),
        round((tile.y - y0) * scale),
        round((tile.x + tile.size0 - x0) * scale) - 1,
        round((tile.y + tile.size0 - y0) * scale) - 1,
    ]


def draw_outline(thumb: Image.Image, mask: np.ndarray, colour: tuple[int, int, int] = (0, 200, 0)) -> Image.Image:
    """The thumbnail with the boundary of the tissue mask (any resolution) drawn on it."""
    inside = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(thumb.size, Image.Resampling.NEAREST)) > 0
    edge = np.zeros_like(inside)
    edge[:-1] |= inside[:-1] != inside[1:]
    edge[:, :-1] |= inside[:, :-1] != inside[:, 1:]
    thick = edge.copy()
    thick[1:] |= edge[:-1]
    thick[:, 1:] |= edge[:, :-1]
    pixels = np.asarray(thumb.convert("RGB")).copy()
    pixels[thick] = colour
    return Image.fromarray(pixels)


def mark_place(thumb: Image.Image, scale: float, x: int, y: int, size0: int) -> Image.Image:
    """A slide thumbnail with a level-0 box marked: a red frame, and cross-hairs so that a tiny box shows."""
    canvas = thumb.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    left, top = x / scale, y / scale
    right, bottom = (x + size0) / scale, (y + size0) / scale
    cx, cy = (left + right) / 2, (top + bottom) / 2
    gap = max(6.0, (right - left) / 2 + 4)
    for a, b in (((0, cy), (cx - gap, cy)), ((cx + gap, cy), (canvas.width, cy))):
        draw.line([a, b], fill=MARK_COLOUR, width=1)
    for a, b in (((cx, 0), (cx, cy - gap)), ((cx, cy + gap), (cx, canvas.height))):
        draw.line([a, b], fill=MARK_COLOUR, width=1)
    frame = [left - 2, top - 2, max(right, left + 1) + 2, max(bottom, top + 1) + 2]
    draw.rectangle(frame, outline=MARK_COLOUR, width=3)
    return canvas


def full_view(slide: Any, x: int, y: int, size0: int, context: float = 0.5, max_side: int = 1024) -> Image.Image:
    """The tile at full resolution with ``context`` tiles of surroundings on each side, the tile outlined."""
    margin = round(context * size0)
    left, top = max(0, x - margin), max(0, y - margin)
    right, bottom = min(slide.width, x + size0 + margin), min(slide.height, y + size0 + margin)
    w0, h0 = max(1, right - left), max(1, bottom - top)
    factor = min(1.0, max_side / max(w0, h0))
    picture = slide.read_region(left, top, w0, h0, max(1, round(w0 * factor)), max(1, round(h0 * factor)))
    draw = ImageDraw.Draw(picture)
    draw.rectangle(
        [(x - left) * factor, (y - top) * factor, (x + size0 - left) * factor - 1, (y + size0 - top) * factor - 1],
        outline=MARK_COLOUR,
        width=3,
    )
    return picture


def with_legend(picture: Image.Image, entries: list[tuple[tuple[int, int, int], str]], font: Any) -> Image.Image:
    """``picture`` with a legend (colour swatch + text per entry, wrapped in rows) underneath."""
    pad, swatch = 8, max(12, getattr(font, "size", 12))
    rows: list[list[tuple[tuple[int, int, int], str, int]]] = [[]]
    x = pad
    for colour, text in entries:
        width = swatch + 6 + round(font.getlength(text)) + 16
        if rows[-1] and x + width > picture.width:
            rows.append([])
            x = pad
        rows[-1].append((colour, text, x))
        x += width
    row_h = swatch + 8
    canvas = Image.new("RGB", (picture.width, picture.height + pad + row_h * len(rows)), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        top = picture.height + pad + r * row_h
        for colour, text, left in row:
            draw.rectangle([left, top, left + swatch, top + swatch], fill=colour, outline=(0, 0, 0))
            draw.text((left + swatch + 6, top + swatch / 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    return canvas
