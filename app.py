"""LGFFEM Search: drop a tissue image, see the most similar patches of a reference collection.

Gradio Blocks app in three parts: handlers (methods of :class:`SearchApp`), the layout
(:func:`build_demo`), and the event wiring at the end of :func:`build_demo`. Embedding and FAISS
search live in ``index_build``; this file decodes and checks uploads, cuts large queries into
tiles, merges the per-tile results and shows them.

Run ``python app.py --help`` for the options. Nothing heavy happens at import: the model and the
index are loaded by :meth:`SearchApp.create`, called from :func:`main` (or from tests).
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import math
import os
import re
import sys
import tempfile
import threading
import time
import types
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, NamedTuple, Optional, Sequence, Union

import gradio as gr
import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from index_build.metrics import majority_votes

if TYPE_CHECKING:
    import torch

    from index_build.index import PatchIndex, SearchResult
    from index_build.models import Embedder

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------
# Limits and rules shown in the UI
# --------------------------------------------------------------------------------------

MIN_SIDE = 32  # px: below this a patch holds too little tissue to search
MAX_PIXELS = 40_000_000  # decoded pixels per image (about 6300 x 6300): decompression-bomb guard
MAX_UPLOAD_BYTES = 100 * 2**20  # per file
WHOLE_IMAGE_FACTOR = 1.5  # images up to 1.5x the model input on their longer side are searched whole
MAX_TILES_PER_SIDE = 6  # larger images are shrunk so that their longer side holds at most 6 tiles
MAX_TILES = 36
DEFAULT_K = 8
MAX_K = 50
MAX_ADD_PATCHES = 500  # patches added to the personal gallery in one go (after tiling)
MAX_ZIP_MEMBERS = 2000
MAX_ZIP_BYTES = 500 * 2**20  # total uncompressed size of one zip
ANY_LABEL = "(any label)"
TILE_MODES = ("tile large images", "whole image")
LABEL_PATTERN = re.compile(r"^[\w][\w .,()+\-]{0,63}$")
DEFAULT_DATA_DIR = Path(os.path.expanduser("~/.cache/lgffem"))

# Starter gallery: tiles of scikit-image's bundled IHC image, labelled by a stain rule.
STARTER_TILE = 64
STARTER_STRIDE = 32
STARTER_DAB_OD = 0.06  # DAB optical density (after colour deconvolution) counted as stained
STARTER_WHITE = 215  # a pixel whose darkest channel is above this is bare glass
STARTER_RULE = (
    f"each {STARTER_TILE}×{STARTER_TILE} px tile (stride {STARTER_STRIDE} px) is `background` when at least 65% "
    f"of its pixels are bare glass (all channels > {STARTER_WHITE}); otherwise `DAB-positive` when at least 50% "
    f"of its pixels have a DAB optical density above {STARTER_DAB_OD} (colour deconvolution, "
    "`skimage.color.rgb2hed`), `haematoxylin-dominant` when at most 15% do; tiles in between are left out"
)

SINGLE_RULE = (
    "The image is searched whole (resized to the model input). Suggestion: the majority label of the "
    "k results; a tie goes to the label ranked first."
)


def tiling_rule(size: int) -> str:
    """The tiling and aggregation rule, as shown on the page, for a model input of ``size`` px."""
    whole = int(WHOLE_IMAGE_FACTOR * size)
    cap = MAX_TILES_PER_SIDE * size
    return (
        f"Images up to {whole} px on their longer side are searched whole. Larger ones are first shrunk, if "
        f"needed, so that the longer side is at most {cap} px, then cut into square {size} px tiles (smaller "
        "if the image is thinner) on an even grid that covers the whole image (neighbouring tiles overlap "
        f"slightly; at most {MAX_TILES} tiles). Each tile is searched for its own k nearest patches; the "
        "results are merged per gallery patch, keeping its best similarity and the tile that gave it, and the "
        "k best are shown with their tile number. Suggestion: each tile votes for the majority label of its "
        "own k results; the label with most tile votes wins (a tie goes to the label whose tile has the "
        "highest top-1 similarity)."
    )


class InputError(ValueError):
    """A user input the app cannot use; the message is shown on the page as is."""


class StartupError(RuntimeError):
    """The app cannot start (model, index or data directory problem); the message says why."""


# --------------------------------------------------------------------------------------
# Decoding, tiling and display helpers (pure functions, no model)
# --------------------------------------------------------------------------------------


def decode_image(source: Union[str, os.PathLike, IO[bytes]], name: Optional[str] = None) -> Image.Image:
    """Open an uploaded file safely and return it as an 8-bit RGB PIL image.

    Accepts anything Pillow reads (PNG, JPEG, TIFF incl. 16-bit and multi-page, BMP, WebP, ...);
    grayscale, RGBA (composited on white) and 16-bit data are converted like the model's processor.

    Args:
        source: a file path or a binary file object.
        name: how to call the file in messages (default: the path).

    Raises:
        InputError: not an image, corrupt or truncated, too many pixels, too small or too large a file.
    """
    from modeling_lgffem import to_rgb_uint8

    label = name or (os.path.basename(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else "image")
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise InputError(f"{label}: file not found")
        size = os.path.getsize(source)
        if size == 0:
            raise InputError(f"{label}: the file is empty")
        if size > MAX_UPLOAD_BYTES:
            raise InputError(f"{label}: file of {size / 2**20:.0f} MB; the limit is {MAX_UPLOAD_BYTES // 2**20} MB")
    too_big = (
        f"{label}: too many pixels for this app (decompression-bomb guard: at most "
        f"{MAX_PIXELS / 1e6:.0f} megapixels). Crop or downscale the region of interest first."
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise InputError(f"{too_big} This image is {width}×{height} = {width * height / 1e6:.1f} MP.")
                image.load()
                rgb = to_rgb_uint8(image)
                rgb = rgb.copy() if rgb is image else rgb
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise InputError(f"{too_big} ({err})") from err
    except UnidentifiedImageError as err:
        raise InputError(f"{label}: not an image file (format not recognised); upload PNG, JPEG or TIFF") from err
    except (OSError, SyntaxError, ValueError, EOFError, TypeError) as err:
        raise InputError(f"{label}: corrupt or truncated image ({err})") from err
    if min(rgb.size) < MIN_SIDE:
        raise InputError(
            f"{label}: image too small ({rgb.width}×{rgb.height} px); at least {MIN_SIDE} px on each side is needed"
        )
    return rgb


def axis_starts(length: int, tile: int) -> list[int]:
    """Start offsets of ``ceil(length / tile)`` windows of ``tile`` px spread evenly over ``length``.

    The first window starts at 0 and the last one ends at ``length``, so the windows cover the
    whole axis; neighbours overlap when ``length`` is not a multiple of ``tile``.
    """
    if tile <= 0:
        raise ValueError(f"tile must be positive, got {tile}")
    if length <= tile:
        return [0]
    count = min(math.ceil(length / tile), MAX_TILES)
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


@dataclass(frozen=True)
class Tile:
    """One query tile: 1-based number (row-major), grid position and box in the working image."""

    number: int
    row: int
    col: int
    box: tuple[int, int, int, int]  # left, upper, right, lower


def plan_tiles(width: int, height: int, size: int, tile_large: bool = True) -> tuple[float, list[Tile]]:
    """Decide how a ``width`` x ``height`` query is searched by a model with ``size`` px input.

    Returns:
        ``(scale, tiles)``: the factor the image is resized by first (1.0: unchanged) and the
        tiles, with boxes in the resized image. A single tile covering everything means the image
        is searched whole. The rule is :func:`tiling_rule`.
    """
    if not tile_large or max(width, height) <= WHOLE_IMAGE_FACTOR * size:
        return 1.0, [Tile(1, 0, 0, (0, 0, width, height))]
    # Shrink so the longer side holds at most MAX_TILES_PER_SIDE tiles, but never below MIN_SIDE.
    scale = min(1.0, max(MAX_TILES_PER_SIDE * size / max(width, height), MIN_SIDE / min(width, height)))
    w, h = (max(1, round(width * scale)), max(1, round(height * scale))) if scale < 1.0 else (width, height)
    tile = min(size, w, h)
    # A thin image has one row (or column) of tiles, so rows x cols never exceeds MAX_TILES.
    rows, cols = axis_starts(h, tile), axis_starts(w, tile)
    tiles = [
        Tile(r * len(cols) + c + 1, r, c, (x, y, x + tile, y + tile))
        for r, y in enumerate(rows)
        for c, x in enumerate(cols)
    ]
    return scale, tiles


def cut_tiles(
    image: Image.Image, size: int, tile_large: bool = True
) -> tuple[Image.Image, list[Tile], list[Image.Image]]:
    """Resize ``image`` by the plan of :func:`plan_tiles` and crop its tiles.

    Returns:
        ``(working_image, tiles, crops)``.
    """
    scale, tiles = plan_tiles(image.width, image.height, size, tile_large)
    work = image
    if scale < 1.0:
        work = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    crops = [work if t.box == (0, 0, work.width, work.height) else work.crop(t.box) for t in tiles]
    return work, tiles, crops


def tensor_to_images(pixel_values: "torch.Tensor", mean: Sequence[float], std: Sequence[float]) -> list[Image.Image]:
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


@dataclass
class Hit:
    """One gallery patch found for a query tile."""

    gallery: str  # "index" or "personal"
    id: int
    score: float
    label: str
    source: str
    thumbnail: Image.Image
    tile: int  # 1-based tile number


def merge_tiles(per_tile: Sequence[Sequence[Hit]], k: int) -> tuple[list[Hit], list[tuple[str, int]], str]:
    """Merge the per-tile hit lists (each sorted by score) by the rule of :func:`tiling_rule`.

    Returns:
        ``(hits, votes, unit)``: the ``k`` best distinct gallery patches, the vote counts (most
        first) and what a vote is (``"results"`` for one tile, ``"tiles"`` otherwise).
    """
    best: dict[tuple[str, int], Hit] = {}
    for hits in per_tile:
        for hit in hits:
            key = (hit.gallery, hit.id)
            if key not in best or hit.score > best[key].score:
                best[key] = hit
    merged = sorted(best.values(), key=lambda h: (-h.score, h.tile, h.gallery, h.id))[:k]
    if len(per_tile) == 1:
        return merged, majority_votes([h.label for h in merged]), "results"
    tile_votes = [(hits[0].score, majority_votes([h.label for h in hits])[0][0]) for hits in per_tile if hits]
    tile_votes.sort(key=lambda sv: -sv[0])
    return merged, majority_votes([label for _, label in tile_votes]), "tiles"


def gpu(fn: Callable) -> Callable:
    """Decorate ``fn`` with ``spaces.GPU`` when the ``spaces`` package (ZeroGPU Spaces) is importable."""
    try:
        import spaces
    except ImportError:
        return fn
    logger.info("spaces package found: %s runs under spaces.GPU", fn.__name__)
    return spaces.GPU(fn)


# --------------------------------------------------------------------------------------
# Starter gallery (offline default)
# --------------------------------------------------------------------------------------


def starter_tiles() -> tuple[list[Image.Image], list[str], list[str]]:
    """Tiles of ``skimage.data.immunohistochemistry()`` with labels by :data:`STARTER_RULE`.

    Returns:
        ``(images, labels, sources)``; sources name the array slice of each tile.
    """
    from skimage import data
    from skimage.color import rgb2hed

    ihc = data.immunohistochemistry()
    dab = rgb2hed(ihc)[..., 2] > STARTER_DAB_OD
    glass = ihc.min(axis=-1) > STARTER_WHITE
    images, labels, sources = [], [], []
    last = ihc.shape[0] - STARTER_TILE
    for y in range(0, last + 1, STARTER_STRIDE):
        for x in range(0, ihc.shape[1] - STARTER_TILE + 1, STARTER_STRIDE):
            window = np.s_[y : y + STARTER_TILE, x : x + STARTER_TILE]
            if glass[window].mean() >= 0.65:
                label = "background"
            elif dab[window].mean() >= 0.5:
                label = "DAB-positive"
            elif dab[window].mean() <= 0.15:
                label = "haematoxylin-dominant"
            else:
                continue
            images.append(Image.fromarray(ihc[window]))
            labels.append(label)
            sources.append(f"skimage.data.immunohistochemistry()[{y}:{y + STARTER_TILE}, {x}:{x + STARTER_TILE}]")
    return images, labels, sources


def images_dataset(images: Sequence[Image.Image], labels: Sequence[str], sources: Sequence[str]):
    """A ``datasets.Dataset`` with the columns ``build_index`` reads (image, label, source)."""
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.Value("string"), "source": datasets.Value("string")}
    )
    return datasets.Dataset.from_dict(
        {"image": list(images), "label": list(labels), "source": list(sources)}, features=features
    )


def model_key(embedder: "Embedder") -> str:
    """Folder name tying a cached index to the exact model (config hash and weights)."""
    return f"{embedder.config_hash}-{embedder.fingerprint}"


def ensure_starter_index(embedder: "Embedder", data_dir: Path) -> "PatchIndex":
    """Load the starter gallery for this model from ``data_dir``, building it on first use."""
    from index_build.index import PatchIndex, build_index

    path = data_dir / "starter" / model_key(embedder)
    if (path / "manifest.json").is_file():
        return PatchIndex.load(path, embedder)
    images, labels, sources = starter_tiles()
    logger.info("building the starter gallery (%d tiles of skimage's IHC image) in %s", len(images), path)
    return build_index(images_dataset(images, labels, sources), path, embedder, num_workers=0)


def write_starter_examples(folder: Path) -> list[str]:
    """Example queries cut from the starter image (written once): a DAB-rich crop, a stroma crop and
    the whole 512 px image (which is tiled). Returns their paths."""
    from skimage import data

    ihc = data.immunohistochemistry()
    crops = {
        "ihc_dab_epithelium_224.png": ihc[0:224, 0:224],
        "ihc_stroma_224.png": ihc[180:404, 288:512],
        "ihc_whole_512.png": ihc,
    }
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, array in crops.items():
        path = folder / name
        if not path.is_file():
            Image.fromarray(array).save(path)
        paths.append(str(path))
    return paths


def resolve_index_dir(spec: str, revision: Optional[str] = None) -> Path:
    """A local index directory for ``--index``: the folder itself, or a Hub dataset repo snapshot.

    Raises:
        StartupError: a path that does not exist, or a Hub repo that cannot be downloaded.
    """
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        return path
    if spec.startswith(("/", ".", "~")) or spec.count("/") > 1:
        raise StartupError(f"index directory not found: {spec}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=spec, repo_type="dataset", revision=revision))
    except Exception as err:  # noqa: BLE001 - any Hub/network error becomes one clear start-up message
        raise StartupError(
            f"could not get the index {spec!r} from the Hugging Face Hub ({type(err).__name__}: {err}). "
            "Give a local index directory, or check the repo id and the network (HF_HUB_OFFLINE)."
        ) from err


# --------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------


class SearchOutputs(NamedTuple):
    """What one search returns, in the order of the page's output components."""

    gallery: list[tuple[Image.Image, str]]
    votes: Optional[dict[str, float]]
    summary: str
    overview: Optional[Image.Image]
    tiles: list[tuple[Image.Image, str]]
    table: list[list[Any]]


class AddOutputs(NamedTuple):
    """What adding images returns: a status message and the label filter's new choices."""

    status: str
    label_filter: Any


TABLE_HEADERS = ["rank", "label", "similarity", "tile", "gallery", "source"]


class SearchApp:
    """The app's state (model, gallery index, personal gallery) and its event handlers.

    Args:
        embedder: the model that embeds queries.
        index: the gallery to search.
        data_dir: where the personal gallery (and the starter gallery) are kept.
        index_info: Markdown describing the gallery, shown at the top of the page.
        personal: the personal gallery, when it already exists.
    """

    def __init__(
        self,
        embedder: "Embedder",
        index: "PatchIndex",
        data_dir: Path,
        index_info: str,
        personal: Optional["PatchIndex"] = None,
    ) -> None:
        self.embedder = embedder
        self.index = index
        self._index_labels = frozenset(index.labels)  # the main gallery does not change while serving
        self.data_dir = Path(data_dir)
        self.index_info = index_info
        self.personal = personal
        self.examples: list[str] = []  # example query files shown under the upload box
        self._personal_lock = threading.RLock()
        self._embed = gpu(self._embed_pixels)
        self._add = gpu(self._add_patches)

    # ---- construction ------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        model: Optional[str] = None,
        index: Optional[str] = None,
        data_dir: Optional[Union[str, Path]] = None,
        device: Optional[str] = None,
        index_revision: Optional[str] = None,
        embedder: Optional["Embedder"] = None,
    ) -> "SearchApp":
        """Load the model and the gallery; build the starter gallery when no index is given.

        Args:
            model: ``None``/``"default"``, a local model folder or a Hub id (ignored when ``embedder`` is given).
            index: a local index folder or a Hub dataset repo id; ``None``: ``$LGFFEM_INDEX``, else the starter.
            data_dir: cache for the starter and personal galleries (default ``$LGFFEM_DATA_DIR`` or ~/.cache/lgffem).
            device: torch device; default CUDA when available.
            index_revision: Hub revision of the index repo.
            embedder: an already loaded model (tests).

        Raises:
            StartupError: the model or index cannot be loaded, or they do not match.
        """
        from index_build.index import IndexLoadError, PatchIndex
        from index_build.models import load_model

        data_dir = Path(data_dir or os.environ.get("LGFFEM_DATA_DIR") or DEFAULT_DATA_DIR).expanduser()
        index = index or os.environ.get("LGFFEM_INDEX") or None
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StartupError(f"cannot create the data directory {data_dir}: {err}") from err
        index_dir = resolve_index_dir(index, index_revision) if index is not None else None  # fail fast
        if embedder is None:
            try:
                embedder = load_model(model, device=device)
            except (OSError, ValueError) as err:
                raise StartupError(f"could not load the model {model or 'default'!r}: {err}") from err
        try:
            if index_dir is None:
                gallery = ensure_starter_index(embedder, data_dir)
                info = starter_info(len(gallery), Counter(gallery.row_labels), embedder.config.image_size)
            else:
                gallery = PatchIndex.load(index_dir, embedder)
                info = index_info(index, gallery)
        except IndexLoadError as err:
            name = index or "starter gallery"
            raise StartupError(f"the index {name!r} cannot be used with this model: {err}") from err
        personal_dir = data_dir / "personal" / model_key(embedder)
        personal = None
        if (personal_dir / "manifest.json").is_file():
            try:
                personal = PatchIndex.load(personal_dir, embedder)
            except IndexLoadError as err:
                raise StartupError(
                    f"your personal gallery at {personal_dir} is unreadable ({err}); move it away to start a new one"
                ) from err
            logger.info("personal gallery: %d patches from %s", len(personal), personal_dir)
        app = cls(embedder, gallery, data_dir, info, personal)
        if index_dir is None:
            app.examples = write_starter_examples(data_dir / "examples")
        return app

    @property
    def personal_dir(self) -> Path:
        """Where the personal gallery of this model lives."""
        return self.data_dir / "personal" / model_key(self.embedder)

    @property
    def input_size(self) -> int:
        return int(self.embedder.config.image_size)

    def label_choices(self) -> list[str]:
        """The label filter's choices: "(any label)" then every label of both galleries."""
        labels = set(self._index_labels)
        with self._personal_lock:
            if self.personal is not None:
                labels |= set(self.personal.labels)
        return [ANY_LABEL, *sorted(labels)]

    # ---- search ------------------------------------------------------------------------

    def _embed_pixels(self, pixel_values: "torch.Tensor") -> np.ndarray:
        return self.embedder.embed_pixels(pixel_values)

    def _search_gallery(
        self, name: str, gallery: "PatchIndex", labels: frozenset, xq: np.ndarray, k: int, label: Optional[str]
    ) -> list[list[Hit]]:
        if label is not None and label not in labels:
            return [[] for _ in range(len(xq))]
        results: list[SearchResult] = gallery.search(xq, k=min(k, len(gallery)), label=label)
        return [
            [
                Hit(name, int(i), float(s), str(lab), str(src), thumb, tile + 1)
                for i, s, lab, src, thumb in zip(r.ids, r.scores, r.labels, r.sources, r.thumbnails)
            ]
            for tile, r in enumerate(results)
        ]

    def search(
        self, image: Optional[str], k: float = DEFAULT_K, label: Optional[str] = None, tiling: str = TILE_MODES[0]
    ) -> SearchOutputs:
        """Search handler: decode, tile, embed, search both galleries, merge, caption.

        Args:
            image: path of the uploaded file (the app decodes it itself).
            k: number of results (1..50).
            label: only results with this label; ``None``, ``""`` or "(any label)": no filter.
            tiling: one of :data:`TILE_MODES`.

        Returns:
            A :class:`SearchOutputs`; on bad input the summary holds the message (also shown as a warning).
        """
        try:
            return self._search(image, k, label, tiling)
        except InputError as err:
            logger.info("rejected query: %s", err)
            gr.Warning(str(err))
            return SearchOutputs([], None, f"⚠️ {err}", None, [], [])

    def _search(self, image: Optional[str], k: float, label: Optional[str], tiling: str) -> SearchOutputs:
        started = time.perf_counter()
        if image is None or (isinstance(image, str) and not image.strip()):
            raise InputError("No image yet: drop, paste or browse a tissue image first.")
        try:
            k_int = int(k)
        except (TypeError, ValueError) as err:
            raise InputError(f"k must be a whole number from 1 to {MAX_K}, got {k!r}") from err
        if k_int != k or not 1 <= k_int <= MAX_K:
            raise InputError(f"k must be a whole number from 1 to {MAX_K}, got {k!r}")
        if tiling not in TILE_MODES:
            raise InputError(f"tiling must be one of {', '.join(TILE_MODES)}; got {tiling!r}")
        label = None if label in (None, "", ANY_LABEL) else str(label)
        choices = self.label_choices()
        if label is not None and label not in choices:
            raise InputError(f"label {label!r} is not in the gallery; choose one of: {', '.join(choices[1:])}")

        query = decode_image(image)
        work, tiles, crops = cut_tiles(query, self.input_size, tile_large=tiling == TILE_MODES[0])
        pixel_values = self.embedder.preprocess(crops)
        xq = self._embed(pixel_values)
        per_tile = self._search_gallery("index", self.index, self._index_labels, xq, k_int, label)
        with self._personal_lock:
            if self.personal is not None:
                mine = self._search_gallery(
                    "personal", self.personal, frozenset(self.personal.row_labels), xq, k_int, label
                )
                per_tile = [sorted(a + b, key=lambda h: -h.score)[:k_int] for a, b in zip(per_tile, mine)]
        hits, votes, unit = merge_tiles(per_tile, k_int)
        if not hits:
            raise InputError(f"no gallery patch has the label {label!r}")

        several = len(tiles) > 1
        gallery, table = [], []
        for rank, hit in enumerate(hits, start=1):
            where = "your images" if hit.gallery == "personal" else "gallery"
            tile_text = f" · tile {hit.tile}" if several else ""
            caption = f"{hit.label} · sim {hit.score:.3f}{tile_text} · {short_source(hit.source)}"
            gallery.append((hit.thumbnail, caption))
            table.append([rank, hit.label, round(hit.score, 4), hit.tile, where, hit.source])
        total = sum(n for _, n in votes)
        vote_text = ", ".join(f"{lab}: {n}" for lab, n in votes)
        rule = (
            "Tiles merged: each gallery patch keeps its best similarity over the tiles; the suggestion is the "
            "vote of the tiles' own majority labels (see *How large images are searched* below)."
            if several
            else SINGLE_RULE
        )
        size_text = f"{query.width}×{query.height} px"
        if several and work.size != query.size:
            size_text += f", shrunk to {work.width}×{work.height} px"
        tied = [lab for lab, n in votes[1:] if n == votes[0][1]]
        tie_text = f", tied with {', '.join(tied)} (tie broken by the rule below)" if tied else ""
        summary = (
            f"### Suggestion: **{votes[0][0]}** ({votes[0][1]} of {total} {unit}){tie_text}\n"
            f"Votes: {vote_text}.  \n"
            f"Query: {size_text}, searched as {len(tiles)} tile{'s' if several else ''}"
            f"{' (' + str(self.input_size) + ' px)' if several else ''}; "
            f"{len(hits)} results{' with label ' + repr(label) if label else ''}.  \n"
            f"_{rule}_"
        )
        seen = tensor_to_images(pixel_values, self.embedder.processor.image_mean, self.embedder.processor.image_std)
        tile_labels = {}
        for hits_of_tile, tile in zip(per_tile, tiles):
            tile_labels[tile.number] = majority_votes([h.label for h in hits_of_tile])[0][0] if hits_of_tile else "-"
        tile_gallery = [
            (
                img,
                f"tile {t.number} (row {t.row + 1}, col {t.col + 1}) → {tile_labels[t.number]}"
                if several
                else f"query as the model saw it ({self.input_size}×{self.input_size})",
            )
            for img, t in zip(seen, tiles)
        ]
        logger.info(
            "search: %s, %d tiles, k=%d, %.0f ms", size_text, len(tiles), k_int, 1000 * (time.perf_counter() - started)
        )
        return SearchOutputs(
            gallery=gallery,
            votes={lab: n / total for lab, n in votes},
            summary=summary,
            overview=draw_tile_grid(work, tiles),
            tiles=tile_gallery,
            table=table,
        )

    # ---- add your own images -----------------------------------------------------------

    def _add_patches(self, images: list[Image.Image], labels: list[str], sources: list[str]) -> int:
        from index_build.index import build_index

        with self._personal_lock:
            if self.personal is None:
                self.personal = build_index(
                    images_dataset(images, labels, sources),
                    self.personal_dir,
                    self.embedder,
                    num_workers=0,
                    progress=False,
                )
            else:
                self.personal.add(images, labels, sources)
            return len(self.personal)

    def add_images(self, files: Optional[Sequence[Any]], label: Optional[str]) -> AddOutputs:
        """Add-your-own-images handler: decode the files (images or zips), tile, append, persist.

        Args:
            files: uploaded file paths (images and/or .zip archives of images).
            label: the label for all of them.

        Returns:
            An :class:`AddOutputs` with a status message and the updated label filter.
        """
        try:
            status = self._add_images(files, label)
        except InputError as err:
            gr.Warning(str(err))
            status = f"⚠️ {err}"
        return AddOutputs(status, gr.update(choices=self.label_choices()))

    def _add_images(self, files: Optional[Sequence[Any]], label: Optional[str]) -> str:
        label = (label or "").strip()
        if not LABEL_PATTERN.match(label) or label == ANY_LABEL:
            raise InputError(
                "give a label of 1-64 characters (letters, digits, space and . , ( ) + - _), e.g. 'my_case_12'"
            )
        paths = [_file_path(f) for f in (files or [])]
        if not paths:
            raise InputError("no files: upload one or more images, or a .zip of images")
        patches, sources, skipped = [], [], []
        for path in paths:
            for name, loaded in _iter_upload(path):
                if isinstance(loaded, InputError):
                    skipped.append(str(loaded))
                    continue
                _, tiles, crops = cut_tiles(loaded, self.input_size)
                for tile, crop in zip(tiles, crops):
                    patches.append(crop)
                    sources.append(f"upload:{name}" + (f"#tile{tile.number}" if len(tiles) > 1 else ""))
                if len(patches) > MAX_ADD_PATCHES:
                    raise InputError(
                        f"more than {MAX_ADD_PATCHES} patches in one go (large images count one per tile); "
                        "add them in smaller batches"
                    )
        skipped_text = (" Skipped: " + "; ".join(skipped)) if skipped else ""
        if not patches:
            raise InputError("none of the files could be added." + skipped_text)
        total = self._add(patches, [label] * len(patches), sources)
        logger.info("added %d patches labelled %r to %s", len(patches), label, self.personal_dir)
        return (
            f"✅ Added {len(patches)} patch{'es' if len(patches) != 1 else ''} labelled **{label}** to your personal "
            f"gallery ({total} in all, kept in `{self.personal_dir}`); they are searched together with the "
            f"gallery from now on, also after a restart.{skipped_text}"
        )


def _file_path(item: Any) -> str:
    """A path from what Gradio or a caller passes for a file (str, Path, or object with ``.name``/``.path``)."""
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    for attr in ("path", "name"):
        value = getattr(item, attr, None)
        if isinstance(value, str):
            return value
    raise InputError(f"unexpected upload object {type(item).__name__}")


def _iter_upload(path: str):
    """Yield ``(name, image or InputError)`` for one uploaded file: an image, or every image in a zip."""
    name = os.path.basename(path)
    if not zipfile.is_zipfile(path):
        try:
            yield name, decode_image(path)
        except InputError as err:
            yield name, err
        return
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            members = [
                m
                for m in members
                if not m.filename.startswith("__MACOSX/") and not os.path.basename(m.filename).startswith(".")
            ]
            if len(members) > MAX_ZIP_MEMBERS:
                yield name, InputError(f"{name}: {len(members)} files; at most {MAX_ZIP_MEMBERS} per zip")
                return
            if sum(m.file_size for m in members) > MAX_ZIP_BYTES:
                yield name, InputError(f"{name}: more than {MAX_ZIP_BYTES // 2**20} MB uncompressed")
                return
            for member in members:
                member_name = f"{name}/{member.filename}"
                if member.file_size > MAX_UPLOAD_BYTES:
                    yield member_name, InputError(f"{member_name}: larger than {MAX_UPLOAD_BYTES // 2**20} MB")
                    continue
                try:
                    data = archive.read(member)
                except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
                    yield member_name, InputError(f"{member_name}: cannot be read from the zip ({err})")
                    continue
                try:
                    yield member_name, decode_image(io.BytesIO(data), name=member_name)
                except InputError as err:
                    yield member_name, err
    except (zipfile.BadZipFile, OSError) as err:
        yield name, InputError(f"{name}: corrupt zip file ({err})")


# --------------------------------------------------------------------------------------
# Page text
# --------------------------------------------------------------------------------------

HOW_TO_LOAD = (
    "To search a real reference collection, build an index with `index_build` (for example Kimia Path24C "
    "from its `s0..s23` folders, or PanNuke from the Hub with the tissue type as label; see the README) and "
    "start the app with `python app.py --index DIR` (or `LGFFEM_INDEX=DIR`; a Hub dataset repo id holding an "
    "index works too)."
)


def starter_info(count: int, counts: Counter, size: int) -> str:
    """Page text for the built-in starter gallery."""
    per_label = ", ".join(f"{n} `{lab}`" for lab, n in sorted(counts.items()))
    return (
        "**This page runs on its built-in starter gallery, not on a diagnostic reference collection.** "
        f"It holds {count} patches ({per_label}) cut from the one real tissue image that ships with "
        "scikit-image: `skimage.data.immunohistochemistry()`, a 512×512 px immunohistochemistry image (brown "
        f"DAB stain, blue haematoxylin counterstain), upsampled to the model's {size} px input. Labels follow a "
        f"simple stain rule, not a diagnosis: {STARTER_RULE}. It only shows how the search works; "
        f"H&E queries will find the nearest IHC texture. {HOW_TO_LOAD}"
    )


def index_info(spec: str, index: "PatchIndex") -> str:
    """Page text for a loaded index."""
    manifest = getattr(index, "manifest", {}) or {}
    model = manifest.get("model", {})
    model_name = model.get("model") if isinstance(model, dict) else model
    labels = list(index.labels)
    shown = ", ".join(f"`{lab}`" for lab in labels[:30]) + (" …" if len(labels) > 30 else "")
    return f"**Gallery:** {len(index):,} patches from `{spec}`, {len(labels)} labels: {shown}." + (
        f" Indexed with model `{model_name}`." if model_name else ""
    )


# --------------------------------------------------------------------------------------
# Layout and wiring
# --------------------------------------------------------------------------------------


def _undecoded_preprocess(component: gr.Image, payload: Any) -> Optional[str]:
    """``gr.Image.preprocess`` replacement: the upload's path, never opened (pasted data URLs are saved)."""
    if payload is None:
        return None
    if getattr(payload, "path", None):
        return str(payload.path)
    url = getattr(payload, "url", None) or ""
    if url.startswith("data:"):  # a pasted image sent inline
        try:
            data = base64.b64decode(url.split(",", 1)[1], validate=False)
        except (IndexError, ValueError) as err:
            raise gr.Error(f"could not read the pasted image: {err}") from err
        handle, path = tempfile.mkstemp(suffix=".upload", dir=component.GRADIO_CACHE)
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        return path
    return None


def uploaded_image(**kwargs: Any) -> gr.Image:
    """A ``gr.Image`` (drop, paste, browse) whose upload reaches the handler as an undecoded file path.

    Gradio's own preprocessing opens the file with Pillow before the handler runs, so a corrupt file or a
    decompression bomb would fail inside Gradio; here the handler gets the path and decodes it itself.
    (An instance override, not a subclass: Gradio writes a ``.pyi`` stub next to any module that
    subclasses a component.)
    """
    component = gr.Image(type="filepath", **kwargs)
    component.preprocess = types.MethodType(_undecoded_preprocess, component)
    return component


CSS = """
#results .caption-label { white-space: normal; }
"""


def build_demo(app: SearchApp) -> gr.Blocks:
    """The Gradio page for ``app``: search tab, add-your-own-images tab, about tab."""
    size = app.input_size
    with gr.Blocks(title="LGFFEM Search") as demo:
        gr.Markdown("# LGFFEM Search: similar tissue patches")
        gr.Markdown(app.index_info, elem_id="gallery-info")
        with gr.Tab("Search"):
            with gr.Row():
                with gr.Column(scale=1, min_width=300):
                    query = uploaded_image(
                        label="Tissue image: drop, paste or browse (PNG, JPEG, TIFF)",
                        sources=["upload", "clipboard"],
                        height=300,
                        elem_id="query",
                    )
                    if app.examples:
                        gr.Examples(
                            [[path] for path in app.examples],
                            inputs=[query],
                            cache_examples=False,
                            label="Examples (from the starter image)",
                        )
                    k = gr.Slider(1, MAX_K, value=DEFAULT_K, step=1, label="k (number of results)")
                    label = gr.Dropdown(app.label_choices(), value=ANY_LABEL, label="Only results with label")
                    tiling = gr.Radio(
                        list(TILE_MODES), value=TILE_MODES[0], label=f"Images larger than {int(1.5 * size)} px"
                    )
                    button = gr.Button("Search", variant="primary", elem_id="search-button")
                with gr.Column(scale=2):
                    summary = gr.Markdown(elem_id="summary")
                    results = gr.Gallery(
                        label="Most similar patches", columns=4, height="auto", fit_columns=False, elem_id="results"
                    )
                    votes = gr.Label(label="Majority vote (share of votes)", num_top_classes=10, elem_id="votes")
            with gr.Row():
                overview = gr.Image(
                    label="Query with its tiles", type="pil", interactive=False, height=420, elem_id="overview"
                )
                seen = gr.Gallery(
                    label="What the model saw (per tile)", columns=4, height=420, fit_columns=False, elem_id="seen"
                )
            with gr.Accordion("Result details", open=False):
                table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, elem_id="table")
            gr.Markdown(f"**How large images are searched.** {tiling_rule(size)}")
        with gr.Tab("Add your own images"):
            gr.Markdown(
                "Upload patches (PNG, JPEG, TIFF) or a .zip of them with one label. They are added to your "
                f"personal gallery in `{app.personal_dir}`, kept on disk and searched together with the "
                "gallery, also after a restart. Large images are cut into tiles by the same rule as queries. "
                "The personal gallery belongs to this server: everyone using this page searches it."
            )
            files = gr.File(label="Images or .zip", file_count="multiple", type="filepath", elem_id="add-files")
            new_label = gr.Textbox(label="Label", placeholder="e.g. case_2024_017_tumour", elem_id="add-label")
            add_button = gr.Button("Add to my gallery", elem_id="add-button")
            add_status = gr.Markdown(elem_id="add-status")
        with gr.Tab("About"):
            gr.Markdown(
                "Embeddings from the Local–Global Feature Fusion Embedding Model (LGFFEM; Nuñez-Fernández, "
                "Farias, Solar, *Sensors* 2025, 25(5):1350), cosine similarity in a FAISS index. "
                f"Model: `{app.embedder.model_id}` on `{app.embedder.device}`, {app.embedder.dim}-d "
                f"embeddings, {size} px input. {HOW_TO_LOAD} Accepted images: at least {MIN_SIDE} px on each "
                f"side, at most {MAX_PIXELS / 1e6:.0f} megapixels and {MAX_UPLOAD_BYTES // 2**20} MB. "
                "A research tool, not a diagnostic device."
            )

        button.click(
            app.search,
            inputs=[query, k, label, tiling],
            outputs=[results, votes, summary, overview, seen, table],
            api_name="search",
        )
        add_button.click(app.add_images, inputs=[files, new_label], outputs=[add_status, label], api_name="add_images")
    return demo


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The app's command line (unknown options are an error)."""
    parser = argparse.ArgumentParser(description="LGFFEM Search: similar tissue patch search in the browser.")
    parser.add_argument(
        "--model",
        default=os.environ.get("LGFFEM_MODEL", "default"),
        help="'default' (offline model), a local model folder or a Hub model id (env LGFFEM_MODEL)",
    )
    parser.add_argument(
        "--index",
        default=os.environ.get("LGFFEM_INDEX"),
        help="index folder written by index_build, or a Hub dataset repo id holding one (env LGFFEM_INDEX); "
        "default: the built-in starter gallery",
    )
    parser.add_argument("--index-revision", default=None, help="branch, tag or commit of a Hub index repo")
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("LGFFEM_DATA_DIR", str(DEFAULT_DATA_DIR)),
        help="cache for the starter gallery and your personal gallery (env LGFFEM_DATA_DIR)",
    )
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--concurrency", type=int, default=2, help="searches run at the same time (queue workers)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting in the queue before refusing")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.max_queue < 1:
        parser.error("--concurrency and --max-queue must be at least 1")
    return args


def configure_pillow() -> None:
    """Pillow's own decompression-bomb limit for this process (warning above, error above twice)."""
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Start the app; returns the exit status (2 when the model or index cannot be used)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("faiss.loader", "httpx"):  # CPU-feature probing and per-request lines, not app events
        logging.getLogger(noisy).setLevel(logging.WARNING)
    configure_pillow()
    try:
        app = SearchApp.create(
            model=args.model,
            index=args.index,
            data_dir=args.data_dir,
            device=args.device,
            index_revision=args.index_revision,
        )
    except StartupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    demo = build_demo(app)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=args.max_queue)
    demo.launch(server_name=args.host, server_port=args.port, max_file_size=MAX_UPLOAD_BYTES, css=CSS, show_error=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
