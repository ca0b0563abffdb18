"""Queries of any size: tiling, per-tile hits, merging and search over several galleries.

A query image up to 1.5x the model input on its longer side is searched whole. A larger one
(a 1000 x 1000 Kimia Path24C patch, a screenshot of a region) is shrunk, if needed, so that its
longer side holds at most 6 tiles, then cut into square tiles of the model input on an even grid
(:func:`plan_tiles`, :func:`cut_tiles`). Every tile is searched for its own k nearest patches in
every gallery (:func:`search_galleries`); :func:`merge_tiles` keeps each gallery patch's best
similarity and votes over the tiles. :func:`tiled_search` does it all; the app, the evaluation
(``python -m index_build.evaluate --tile``) and scripts share it. In :func:`tiled_search`, tiles of
a tiled query that are blank glass by :data:`index_build.tissue.TISSUE_RULE` are neither searched
nor counted as votes (they are reported as skipped).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from PIL import Image

from index_build.metrics import majority_votes
from index_build.tissue import TISSUE_RULE, is_tissue, tissue_fraction
from index_build.verdict import VERDICT_K, Verdict, decide

if TYPE_CHECKING:
    import torch

    from index_build.patch_index import PatchIndex

MIN_SIDE = 32  # px: below this a patch holds too little tissue to search
WHOLE_IMAGE_FACTOR = 1.5  # images up to 1.5x the model input on their longer side are searched whole
MAX_TILES_PER_SIDE = 6  # larger images are shrunk so that their longer side holds at most 6 tiles
MAX_TILES = 36
EMBED_CHUNK = 6  # tiles embedded per forward pass in tiled_search: progress is reported after each

__all__ = [
    "MAX_TILES",
    "MAX_TILES_PER_SIDE",
    "EMBED_CHUNK",
    "MIN_SIDE",
    "WHOLE_IMAGE_FACTOR",
    "Hit",
    "Tile",
    "TiledResult",
    "axis_starts",
    "cut_tiles",
    "embed_tiles",
    "merge_tiles",
    "plan_tiles",
    "search_galleries",
    "tiled_search",
    "tile_vote",
    "tiling_rule",
]


def tiling_rule(size: int) -> str:
    """The tiling and aggregation rule, in words, for a model input of ``size`` px."""
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
        "highest top-1 similarity). " + TISSUE_RULE.replace("a tile", "a tile of a tiled query")
    )


# --------------------------------------------------------------------------------------
# Tiles
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Hits: search every gallery per tile, then merge
# --------------------------------------------------------------------------------------


@dataclass
class Hit:
    """One gallery patch found for a query tile."""

    gallery: str  # the gallery's name, e.g. "index" or "personal"
    id: int
    score: float
    label: str
    source: str
    thumbnail: Optional[Image.Image]
    tile: int  # 1-based tile number


def search_galleries(
    galleries: Sequence[tuple[str, PatchIndex]], xq: np.ndarray, k: int, label: Optional[str] = None
) -> list[list[Hit]]:
    """Search every tile embedding in every gallery and keep each tile's ``k`` best hits.

    Args:
        galleries: ``(name, index)`` pairs; a gallery without ``label`` contributes nothing.
        xq: one embedding per tile (``T x D``).
        k: hits per tile.
        label: only hits with this label.

    Returns:
        One list of hits per tile, best first.
    """
    per_tile: list[list[Hit]] = [[] for _ in range(len(xq))]
    for name, gallery in galleries:
        if len(gallery) == 0 or (label is not None and not gallery.has_label(label)):
            continue
        results = gallery.search(embeddings=xq, k=min(k, len(gallery)), label=label)
        for tile, r in enumerate(results):
            per_tile[tile] += [
                Hit(name, int(i), float(s), str(lab), str(src), thumb, tile + 1)
                for i, s, lab, src, thumb in zip(r.ids, r.scores, r.labels, r.sources, r.thumbnails)
            ]
    if len(galleries) > 1:
        per_tile = [sorted(hits, key=lambda h: -h.score)[:k] for hits in per_tile]
    return per_tile


def tile_vote(hits: Sequence[Hit]) -> Optional[str]:
    """One tile's vote: the majority label of its own hits (``None``: no hits, e.g. a skipped tile)."""
    return majority_votes([h.label for h in hits])[0][0] if hits else None


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
    tile_votes = [(hits[0].score, tile_vote(hits)) for hits in per_tile if hits]
    tile_votes.sort(key=lambda sv: -sv[0])
    return merged, majority_votes([label for _, label in tile_votes]), "tiles"


@dataclass
class TiledResult:
    """Everything one tiled search produced, for display or evaluation."""

    work: Image.Image  # the query after shrinking (the tiles' coordinate frame)
    tiles: list[Tile]
    pixel_values: Any  # N x 3 x S x S tensor: what the model saw, per tile
    per_tile: list[list[Hit]]
    hits: list[Hit]  # the k best distinct gallery patches
    votes: list[tuple[str, int]]
    unit: str  # what a vote is: "results" (one tile) or "tiles"
    threshold: Optional[float] = None  # the main gallery's calibrated close-match similarity
    tissue: Optional[list[float]] = None  # tissue share of every tile (tiled queries; ``None``: not measured)
    skipped: tuple[int, ...] = ()  # numbers of the blank-glass tiles, neither searched nor voting
    verdict: Optional[Verdict] = None  # the search's one decision (``None`` with a label filter)

    def tile_votes(self) -> list[Optional[str]]:
        """Every tile's vote (:func:`tile_vote`), in tile order; ``None`` for a skipped tile."""
        return [tile_vote(hits) for hits in self.per_tile]

    @property
    def best_score(self) -> Optional[float]:
        return self.hits[0].score if self.hits else None

    @property
    def close_match(self) -> Optional[bool]:
        """Whether the best hit reaches the close-match threshold (``None``: no threshold or no hit)."""
        if self.threshold is None or not self.hits:
            return None
        return self.hits[0].score >= self.threshold


def embed_tiles(
    image: Image.Image,
    embedder: Any,
    tile_large: bool = True,
    embed: Optional[Callable[[torch.Tensor], np.ndarray]] = None,
) -> tuple[Image.Image, list[Tile], Any, np.ndarray]:
    """Cut ``image`` into the tiles of :func:`plan_tiles` for ``embedder``'s input size and embed them.

    Returns:
        ``(working_image, tiles, pixel_values, xq)``: one embedding per tile, in tile order.
    """
    work, tiles, crops = cut_tiles(image, int(embedder.processor.image_size), tile_large)
    pixel_values = embedder.preprocess(crops)
    return work, tiles, pixel_values, (embed or embedder.embed_pixels)(pixel_values)


def tiled_search(
    image: Image.Image,
    embedder: Any,
    galleries: Sequence[tuple[str, PatchIndex]],
    k: int,
    label: Optional[str] = None,
    tile_large: bool = True,
    embed: Optional[Callable[[torch.Tensor], np.ndarray]] = None,
    guard: Optional[AbstractContextManager] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    skip_blank: bool = True,
) -> TiledResult:
    """Search ``image`` the way the app does: tile, embed, search every gallery, merge.

    Args:
        image: an RGB query image of any size.
        embedder: the model (``preprocess``, ``embed_pixels``, ``processor.image_size``).
        galleries: ``(name, index)`` pairs searched together.
        k: results wanted (per tile, and merged).
        label: only results with this label.
        tile_large: cut large images into tiles (``False``: always search the image whole).
        embed: replaces ``embedder.embed_pixels`` (the app runs it under ``spaces.GPU``).
        guard: held while the galleries are searched (a lock against concurrent additions);
            tiling and embedding run outside it.
        progress: called as ``progress(tiles_done, tiles_to_embed)`` before the first and after
            every :data:`EMBED_CHUNK` tiles embedded.
        skip_blank: with several tiles, leave out the blank-glass tiles (:data:`TISSUE_RULE`);
            when every tile is blank, all are searched.
    """
    work, tiles, crops = cut_tiles(image, int(embedder.processor.image_size), tile_large)
    pixel_values = embedder.preprocess(crops)
    tissue, skipped = None, ()
    if len(tiles) > 1:
        tissue = [tissue_fraction(crop) for crop in crops]
        if skip_blank:
            blank = tuple(t.number for t, crop in zip(tiles, crops) if not is_tissue(crop))
            skipped = blank if len(blank) < len(tiles) else ()
    searched = [i for i, t in enumerate(tiles) if t.number not in skipped]
    embed = embed or embedder.embed_pixels
    parts = []
    for start in range(0, len(searched), EMBED_CHUNK):
        if progress is not None:
            progress(start, len(searched))
        parts.append(np.asarray(embed(pixel_values[searched[start : start + EMBED_CHUNK]])))
    if progress is not None:
        progress(len(searched), len(searched))
    xq = np.concatenate(parts)
    with guard or nullcontext():  # the verdict reads at least VERDICT_K hits per tile, the page shows k
        found = search_galleries(galleries, xq, max(k, VERDICT_K), label)
    threshold = next((g.close_match_threshold for _, g in galleries if g.close_match_threshold is not None), None)
    verdict = None
    if label is None:
        main = next((g for _, g in galleries if len(g)), None)
        verdict = decide(
            [[(h.label, h.score) for h in hits] for hits in found],
            threshold,
            main.decision_rule if main is not None else None,
            sorted({lab for _, g in galleries for lab in g.labels}),
            skipped=len(skipped),
        )
    per_tile: list[list[Hit]] = [[] for _ in tiles]
    for i, hits in zip(searched, found):
        per_tile[i] = [replace(h, tile=tiles[i].number) for h in hits[:k]]
    hits, votes, unit = merge_tiles(per_tile, k)
    return TiledResult(work, tiles, pixel_values, per_tile, hits, votes, unit, threshold, tissue, skipped, verdict)
