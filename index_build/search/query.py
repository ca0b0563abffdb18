"""Tiling and merging rules of queries of any size (the query core, :mod:`index_build.search_core`, runs them).

A query image up to 1.5x the model input on its longer side is searched whole. A larger one
(a 1000 x 1000 Kimia Path24C patch, a screenshot of a region) is shrunk, if needed, so that its
longer side holds at most 6 tiles, then cut into square tiles of the model input on an even grid
(:func:`plan_tiles`, :func:`cut_tiles`). Every tile is searched for its own k nearest patches in
every gallery; :func:`merge_tiles` keeps each gallery patch's best similarity and
:func:`vote_tiles` votes over the tiles. :func:`index_build.search_core.run_query` does it all for
the app, the slide page, the evaluation (``python -m index_build.evaluate --tile``) and scripts;
there, tiles of a tiled query that are blank glass by :data:`index_build.tissue.TISSUE_RULE` are
neither searched nor counted as votes (they are reported as skipped).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from PIL import Image

from index_build.metrics import majority_votes
from index_build.tissue import TISSUE_RULE

if TYPE_CHECKING:
    from index_build.verdict import Verdict

MIN_SIDE = 32  # px: below this a patch holds too little tissue to search
WHOLE_IMAGE_FACTOR = 1.5  # images up to 1.5x the model input on their longer side are searched whole
MAX_TILES_PER_SIDE = 6  # larger images are shrunk so that their longer side holds at most 6 tiles
MAX_TILES = 36
EMBED_CHUNK = 6  # tiles embedded per forward pass by the query core: progress is reported after each

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
    "merge_tiles",
    "plan_tiles",
    "tile_vote",
    "tiling_rule",
    "vote_tiles",
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
    return (merged, *vote_tiles(per_tile, merged))


def vote_tiles(per_tile: Sequence[Sequence[Hit]], merged: Sequence[Hit]) -> tuple[list[tuple[str, int]], str]:
    """The votes of :func:`tiling_rule`: ``(votes, unit)``, the counts (most first) and what a vote is.

    One tile: its merged hits vote (``"results"``). Several: each tile votes for the majority label
    of its own hits (:func:`tile_vote`; a tile without hits does not vote), a tie going to the label
    whose tile has the highest top-1 similarity (``"tiles"``).
    """
    if len(per_tile) == 1:
        return majority_votes([h.label for h in merged]), "results"
    tile_votes = [(hits[0].score, tile_vote(hits)) for hits in per_tile if hits]
    tile_votes.sort(key=lambda sv: -sv[0])
    return majority_votes([label for _, label in tile_votes]), "tiles"


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
