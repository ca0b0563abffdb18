"""A query result for people: the tile grid drawn on the query, what the model saw, captions and summary.

Pure functions of images, tiles and a :class:`~index_build.query.TiledResult` (no model, no
index), shared by the app and scripts; plus the page text of a loaded index and the fresh files a
web page's responses are written to (:class:`ResponseFiles`).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from index_build.metrics import majority_votes
from index_build.query import Tile, TiledResult

if TYPE_CHECKING:
    import torch

    from index_build.patch_index import PatchIndex

__all__ = ["draw_tile_grid", "result_rows", "result_summary", "short_source", "tensor_to_images", "tile_views"]


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


SINGLE_RULE = (
    "The image is searched whole (resized to the model input). Suggestion: the majority label of the "
    "k results; a tie goes to the label ranked first."
)
TILED_RULE = (
    "Tiles merged: each gallery patch keeps its best similarity over the tiles; the suggestion is the "
    "vote of the tiles' own majority labels (see *How large images are searched* below)."
)


def result_rows(found: TiledResult) -> tuple[list[tuple[Optional[Image.Image], str]], list[list[Any]]]:
    """Captioned thumbnails (``label · sim 0.912 · tile 3 · source``) and table rows of the merged hits.

    Table rows are ``rank, label, similarity, tile, gallery, source``.
    """
    several = len(found.tiles) > 1
    gallery, table = [], []
    for rank, hit in enumerate(found.hits, start=1):
        where = "your images" if hit.gallery == "personal" else "gallery"
        tile_text = f" · tile {hit.tile}" if several else ""
        gallery.append((hit.thumbnail, f"{hit.label} · sim {hit.score:.3f}{tile_text} · {short_source(hit.source)}"))
        table.append([rank, hit.label, round(hit.score, 4), hit.tile, where, hit.source])
    return gallery, table


def result_summary(found: TiledResult, query_size: tuple[int, int], size: int, label: Optional[str] = None) -> str:
    """Markdown: the suggestion with its votes (and ties), the query's size and tiling, and the rule used."""
    votes, tiles, work = found.votes, found.tiles, found.work
    several = len(tiles) > 1
    size_text = f"{query_size[0]}×{query_size[1]} px"
    if several and work.size != tuple(query_size):
        size_text += f", shrunk to {work.width}×{work.height} px"
    tied = [lab for lab, n in votes[1:] if n == votes[0][1]]
    tie_text = f", tied with {', '.join(tied)} (tie broken by the rule below)" if tied else ""
    if found.close_match is False:
        headline = (
            "### No close match in this gallery\n"
            f"The best similarity, {found.best_score:.3f}, is below this gallery's close-match threshold "
            f"{found.threshold:.3f}: nothing here resembles the query as closely as the gallery's own patches "
            "resemble each other. The nearest patches are shown for reference, not as a suggestion.  \n"
        )
    else:
        match_text = (
            f"Best similarity {found.best_score:.3f} (close-match threshold {found.threshold:.3f}).  \n"
            if found.close_match
            else ""
        )
        headline = (
            f"### Suggestion: **{votes[0][0]}** ({votes[0][1]} of {sum(n for _, n in votes)} {found.unit}){tie_text}\n"
            + match_text
        )
    return (
        headline + f"Votes: {', '.join(f'{lab}: {n}' for lab, n in votes)}.  \n"
        f"Query: {size_text}, searched as {len(tiles)} tile{'s' if several else ''}"
        f"{' (' + str(size) + ' px)' if several else ''}; "
        f"{len(found.hits)} results{' with label ' + repr(label) if label else ''}.  \n"
        f"_{TILED_RULE if several else SINGLE_RULE}_"
    )


def tile_views(found: TiledResult, processor: Any) -> list[tuple[Image.Image, str]]:
    """Every tile as the model saw it, captioned with its grid position and its own majority label."""
    size = int(processor.image_size)
    seen = tensor_to_images(found.pixel_values, processor.image_mean, processor.image_std)
    if len(found.tiles) == 1:
        return [(seen[0], f"query as the model saw it ({size}×{size})")]
    return [
        (
            image,
            f"tile {t.number} (row {t.row + 1}, col {t.col + 1}) → "
            f"{majority_votes([h.label for h in hits])[0][0] if hits else '-'}",
        )
        for image, t, hits in zip(seen, found.tiles, found.per_tile)
    ]


# --------------------------------------------------------------------------------------
# Page text and response files
# --------------------------------------------------------------------------------------

HOW_TO_LOAD = (
    "To search a real reference collection, build an index with `index_build` (for example Kimia Path24C "
    "from its `s0..s23` folders, or PanNuke from the Hub with the tissue type as label; see the README) and "
    "start the app with `python app.py --index DIR` (or `LGFFEM_INDEX=DIR`; a Hub dataset repo id holding an "
    "index works too)."
)


def index_info(spec: str, index: PatchIndex) -> str:
    """Page text for a loaded index."""
    manifest = getattr(index, "manifest", {}) or {}
    model = manifest.get("model", {})
    model_name = model.get("model") if isinstance(model, dict) else model
    labels = list(index.labels)
    shown = ", ".join(f"`{lab}`" for lab in labels[:30]) + (" …" if len(labels) > 30 else "")
    return f"**Gallery:** {len(index):,} patches from `{spec}`, {len(labels)} labels: {shown}." + (
        f" Indexed with model `{model_name}`." if model_name else ""
    )


class ResponseFiles:
    """Fresh, never-rewritten image files for each response of a web page.

    Each :meth:`writer` call makes a new folder under this process's root folder; folders older
    than ``ttl_s`` are removed then (a client has fetched its images long before).
    """

    def __init__(self, ttl_s: float = 3600.0) -> None:
        self.ttl_s = float(ttl_s)
        self._root: Optional[Path] = None

    @property
    def root(self) -> Path:
        """The per-process folder holding the response folders (created on first use)."""
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="lgffem-results-"))
        return self._root

    def prune(self) -> None:
        """Remove response folders older than ``ttl_s``."""
        cutoff = time.time() - self.ttl_s
        for old in self.root.iterdir():
            if old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)

    def writer(self) -> Callable[[Optional[Image.Image]], Optional[str]]:
        """A function that saves each picture it is given as the next PNG of a new folder (``None`` stays ``None``)."""
        self.prune()
        folder = Path(tempfile.mkdtemp(prefix="response-", dir=self.root))
        counter = iter(range(1_000_000))

        def to_file(picture: Optional[Image.Image]) -> Optional[str]:
            if picture is None:
                return None
            path = folder / f"{next(counter):03d}.png"
            picture.save(path)
            return str(path)

        return to_file
