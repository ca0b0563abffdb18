"""Slide-level search: rank the slides of a slide index by their likeness to a query slide.

Patch search alone cannot rank slides: a slide is thousands of tiles, most of them alike. As
Yottixel and SISH do, the query slide is summarised by a **mosaic** of representative tissue
tiles, each mosaic tile is searched, and the scores are aggregated per indexed slide.

**Mosaic** (:func:`build_mosaic`). The query's tissue tiles (same tissue rule, MPP and tile size
as the index) are described by colour histograms (8 bins per RGB channel) read from the
low-resolution view, and clustered with k-means into ``clusters`` groups (default 8; fewer when
there are fewer tiles). The ``mosaic_size`` tiles (default 16) are shared between the clusters in
proportion to their size (at least one per cluster), and taken evenly spread in reading order
within each cluster, so the mosaic covers every kind of tissue of the slide and every part of it.
A slide with no more tissue tiles than ``mosaic_size`` uses them all.

**Aggregation** (:func:`aggregate`). Every mosaic tile is searched for its ``search_k`` nearest
patches; an indexed slide's similarity to a mosaic tile is its best patch's cosine similarity
(a slide absent from the top ``search_k`` gets the lowest score returned for that tile). A
slide's score is the **median over the mosaic tiles** of these best similarities: it rewards a
slide that resembles most of the query, not one that matches a single tile very well (a maximum
would let one lookalike tile decide). ``matched_tiles`` counts the mosaic tiles whose nearest
patch is on that slide. Slides are ranked by score, ties by ``matched_tiles``.

    python -m index_build.slide_search QUERY_SLIDE --index DIR [--mosaic-size 16] [--top 10]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
from PIL import Image

from index_build.slides import (
    DEFAULT_MPP,
    MASK_SIDE,
    Slide,
    SlideError,
    SlideTile,
    load_slide_catalog,
    open_slide,
    read_tile,
    tile_slide,
)
from index_build.tissue import MIN_TISSUE_FRACTION

if TYPE_CHECKING:
    from index_build.patch_index import PatchIndex

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CLUSTERS",
    "DEFAULT_MOSAIC_SIZE",
    "MosaicTile",
    "SlideHit",
    "SlideSearch",
    "aggregate",
    "build_mosaic",
    "colour_histograms",
    "kmeans",
    "search_slide",
    "search_slide_details",
    "slide_of_source",
]

DEFAULT_MOSAIC_SIZE = 16
DEFAULT_CLUSTERS = 8
DEFAULT_SEARCH_K = 1000
HIST_BINS = 8


@dataclass
class SlideHit:
    """One indexed slide in a slide-level ranking."""

    slide: str
    score: float
    label: Optional[str]
    matched_tiles: int


@dataclass(frozen=True)
class MosaicTile:
    """A mosaic tile of the query slide: the tile, its cluster, and the best hit of its search."""

    tile: SlideTile
    cluster: int
    best_slide: Optional[str] = None
    best_score: Optional[float] = None
    best_id: Optional[int] = None


@dataclass
class SlideSearch:
    """The full answer of :func:`search_slide_details`: the ranking and the mosaic it came from."""

    hits: list[SlideHit]
    mosaic: list[MosaicTile]
    tissue_tiles: int


def slide_of_source(source: str) -> Optional[str]:
    """The slide of a slide-index source ``"<slide>@<x>,<y>"``; ``None`` for other sources."""
    slide, sep, coords = str(source).rpartition("@")
    if not sep or coords.count(",") != 1:
        return None
    return slide


def kmeans(x: np.ndarray, k: int, iterations: int = 25, seed: int = 0) -> np.ndarray:
    """Cluster labels of the rows of ``x`` by k-means (k-means++ start, fixed seed)."""
    n = len(x)
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(n)]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
        if d2.sum() <= 0:
            break
        centres.append(x[rng.choice(n, p=d2 / d2.sum())])
    c = np.asarray(centres, dtype=np.float64)
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(iterations):
        labels = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        moved = np.array([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(len(c))])
        if np.allclose(moved, c):
            break
        c = moved
    return labels


def colour_histograms(view: Image.Image, scale: float, tiles: Sequence[SlideTile]) -> np.ndarray:
    """Normalised RGB histograms (``HIST_BINS`` per channel) of the tiles, read from a low-res view."""
    pixels = np.asarray(view.convert("RGB"))
    h, w = pixels.shape[:2]
    out = np.zeros((len(tiles), 3 * HIST_BINS), dtype=np.float64)
    for i, tile in enumerate(tiles):
        x0, y0 = min(w - 1, int(tile.x / scale)), min(h - 1, int(tile.y / scale))
        x1, y1 = max(x0 + 1, round((tile.x + tile.size0) / scale)), max(y0 + 1, round((tile.y + tile.size0) / scale))
        crop = pixels[y0:y1, x0:x1].reshape(-1, 3)
        for c in range(3):
            counts = np.bincount(crop[:, c] // (256 // HIST_BINS), minlength=HIST_BINS)
            out[i, c * HIST_BINS : (c + 1) * HIST_BINS] = counts
        out[i] /= max(1, len(crop))
    return out


def build_mosaic(
    slide: Slide,
    tiles: Sequence[SlideTile],
    mosaic_size: int = DEFAULT_MOSAIC_SIZE,
    clusters: int = DEFAULT_CLUSTERS,
    view: Optional[tuple[Image.Image, float]] = None,
    seed: int = 0,
) -> list[tuple[SlideTile, int]]:
    """Representative tissue tiles ``(tile, cluster)`` of a slide (see the module docstring)."""
    if mosaic_size < 1:
        raise ValueError(f"mosaic_size must be at least 1, got {mosaic_size}")
    if not tiles:
        return []
    if view is None:
        thumb = slide.thumbnail(MASK_SIDE)
        view = (thumb, slide.width / thumb.width)
    labels = kmeans(colour_histograms(view[0], view[1], tiles), min(clusters, mosaic_size), seed=seed)
    if len(tiles) <= mosaic_size:
        return [(tile, int(label)) for tile, label in zip(tiles, labels)]
    sizes = np.bincount(labels)
    present = np.flatnonzero(sizes)
    # proportional shares, at least one per cluster, summing to mosaic_size (largest remainders first)
    quota = np.ones(len(sizes), dtype=np.int64) * (sizes > 0)
    spare = mosaic_size - int(quota.sum())
    if spare > 0:
        exact = sizes / sizes.sum() * mosaic_size - quota
        exact = np.clip(exact, 0, None)
        extra = np.floor(exact / max(exact.sum(), 1e-12) * spare).astype(np.int64)
        order = np.argsort(-(exact / max(exact.sum(), 1e-12) * spare - extra), kind="stable")
        for j in order[: spare - int(extra.sum())]:
            extra[j] += 1
        quota += extra
    quota = np.minimum(quota, sizes)
    chosen: list[tuple[SlideTile, int]] = []
    for j in present:
        members = np.flatnonzero(labels == j)
        picks = members[np.linspace(0, len(members) - 1, int(quota[j])).round().astype(int)]
        chosen.extend((tiles[i], int(j)) for i in sorted(set(picks.tolist())))
    chosen.sort(key=lambda item: (item[0].y, item[0].x))
    return chosen


def aggregate(
    scores: np.ndarray, ids: np.ndarray, row_slides: Sequence[Optional[str]], slide_labels: dict[str, Optional[str]]
) -> list[SlideHit]:
    """Per-slide median over the query tiles of the slide's best similarity (see the module docstring).

    Args:
        scores, ids: ``Nq x k`` search results of the mosaic tiles (ids ``-1`` = none).
        row_slides: the slide of every index row (``None``: not from a slide).
        slide_labels: slide -> label, for every slide to rank.
    """
    slides = sorted(slide_labels)
    column = {s: j for j, s in enumerate(slides)}
    nq = len(scores)
    best = np.full((nq, len(slides)), np.nan)
    matched = np.zeros(len(slides), dtype=np.int64)
    for q in range(nq):
        valid = ids[q] >= 0
        floor = float(scores[q][valid].min()) if valid.any() else 0.0
        top_seen = False
        for score, i in zip(scores[q][valid], ids[q][valid]):
            slide = row_slides[int(i)]
            j = column.get(slide) if slide is not None else None
            if j is None:
                continue
            if not top_seen:
                matched[j] += 1
                top_seen = True
            if np.isnan(best[q, j]):
                best[q, j] = float(score)
        best[q, np.isnan(best[q])] = floor
    median = np.median(best, axis=0) if nq else np.zeros(len(slides))
    hits = [SlideHit(s, float(median[j]), slide_labels[s], int(matched[j])) for j, s in enumerate(slides)]
    hits.sort(key=lambda h: (-h.score, -h.matched_tiles, h.slide))
    return hits


def _embed_images(index: PatchIndex, embed, images: list[Image.Image]) -> np.ndarray:
    if embed is None:
        return index.embed(images)
    if callable(getattr(embed, "embed_images", None)):
        return embed.embed_images(images)
    return np.asarray(embed(images), dtype=np.float32)


def search_slide_details(
    index: PatchIndex,
    embed: Optional[Union[Callable[[list[Image.Image]], np.ndarray], object]],
    slide: Union[str, Path, Slide],
    mosaic_size: int = DEFAULT_MOSAIC_SIZE,
    clusters: int = DEFAULT_CLUSTERS,
    mpp: Optional[float] = None,
    tile_size: Optional[int] = None,
    min_tissue: float = MIN_TISSUE_FRACTION,
    mpp_source: Optional[float] = None,
    search_k: int = DEFAULT_SEARCH_K,
    exclude: Sequence[str] = (),
) -> SlideSearch:
    """:func:`search_slide` with the mosaic and each mosaic tile's best hit."""
    catalog = load_slide_catalog(index.path)
    row_slides = [slide_of_source(s) for s in index.sources]
    labels: dict[str, Optional[str]] = {}
    for row, name in enumerate(row_slides):
        if name is not None and name not in exclude:
            labels.setdefault(name, index.row_labels[row])
    if catalog is not None:
        for name, entry in catalog.slides.items():
            if name in labels and entry.get("label") is not None:
                labels[name] = str(entry["label"])
    if not labels:
        raise SlideError(f"the index {index.path} holds no slides (build it from a folder of slides)")
    mpp = mpp or (catalog.mpp if catalog is not None and catalog.mpp else DEFAULT_MPP)
    tile_size = tile_size or (catalog.tile_size if catalog is not None and catalog.tile_size else None)
    if tile_size is None:
        tile_size = int(getattr(getattr(index.embedder, "processor", None), "image_size", 224) or 224)
    opened = slide if isinstance(slide, Slide) else open_slide(slide, mpp_source=mpp_source)
    try:
        thumb = opened.thumbnail(MASK_SIDE)
        from index_build.tissue import clean_mask, tissue_mask

        mask = (clean_mask(tissue_mask(thumb)), opened.width / thumb.width)
        tissue, _ = tile_slide(opened, mpp, tile_size, min_tissue, mask=mask)
        if not tissue:
            raise SlideError(f"{opened.path} has no tissue tile (tissue rule: see index_build.tissue)")
        mosaic = build_mosaic(opened, tissue, mosaic_size, clusters, view=(thumb, mask[1]))
        images = [read_tile(opened, tile, tile_size) for tile, _ in mosaic]
    finally:
        if not isinstance(slide, Slide):
            opened.close()
    xq = _embed_images(index, embed, images)
    scores, ids = index.search_embeddings(xq, min(len(index), max(1, search_k)))
    hits = aggregate(scores, ids, row_slides, labels)
    tiles = []
    for (tile, cluster), row_scores, row_ids in zip(mosaic, scores, ids):
        found = [(float(s), int(i)) for s, i in zip(row_scores, row_ids) if i >= 0 and row_slides[int(i)] in labels]
        if found:
            score, row = found[0]
            tiles.append(MosaicTile(tile, cluster, row_slides[row], score, row))
        else:
            tiles.append(MosaicTile(tile, cluster))
    return SlideSearch(hits=hits, mosaic=tiles, tissue_tiles=len(tissue))


def search_slide(
    index: PatchIndex,
    embed: Optional[Union[Callable[[list[Image.Image]], np.ndarray], object]],
    slide: Union[str, Path, Slide],
    mosaic_size: int = DEFAULT_MOSAIC_SIZE,
    clusters: int = DEFAULT_CLUSTERS,
    mpp: Optional[float] = None,
    tile_size: Optional[int] = None,
    min_tissue: float = MIN_TISSUE_FRACTION,
    mpp_source: Optional[float] = None,
    search_k: int = DEFAULT_SEARCH_K,
    exclude: Sequence[str] = (),
) -> list[SlideHit]:
    """Rank the slides of a slide index by their likeness to a query slide (best first).

    Args:
        index: a slide index (its sources are ``"<slide>@<x>,<y>"``).
        embed: the model (anything with ``embed_images``), a function ``images -> N x D``, or
            ``None`` to use the index's own model.
        slide: the query slide (path or open :class:`Slide`).
        mosaic_size: tiles in the query's mosaic.
        clusters: colour clusters the mosaic is drawn from.
        mpp, tile_size: tiling of the query; default those the index was built with.
        min_tissue: least tissue share of a query tile.
        mpp_source: µm/px of a query slide that records none.
        search_k: neighbours retrieved per mosaic tile.
        exclude: indexed slides (relative paths) to leave out of the ranking (e.g. the query itself).

    Raises:
        SlideError: the query cannot be read, has no MPP or no tissue; the index holds no slides.
    """
    return search_slide_details(
        index, embed, slide, mosaic_size, clusters, mpp, tile_size, min_tissue, mpp_source, search_k, exclude
    ).hits


def main(argv: Optional[Sequence[str]] = None) -> list[SlideHit]:
    """``python -m index_build.slide_search QUERY_SLIDE --index DIR``: print the slide ranking."""
    parser = argparse.ArgumentParser(prog="python -m index_build.slide_search", description=__doc__.split("\n\n")[0])
    parser.add_argument("slide", help="query slide (any OpenSlide format, or a large PNG/JPEG/TIFF)")
    parser.add_argument("--index", required=True, help="a slide index (python -m index_build SLIDES --out DIR)")
    parser.add_argument("--model", default="default", help="the model the index was built with")
    parser.add_argument("--mosaic-size", type=int, default=DEFAULT_MOSAIC_SIZE, help="tiles in the query's mosaic")
    parser.add_argument("--clusters", type=int, default=DEFAULT_CLUSTERS, help="colour clusters of the mosaic")
    parser.add_argument("--mpp-source", type=float, default=None, help="µm/px of a query slide that records none")
    parser.add_argument("--top", type=int, default=10, help="slides to print")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from index_build.models import load_model
    from index_build.patch_index import PatchIndex

    try:
        embedder = load_model(args.model, device=args.device)
        index = PatchIndex.load(args.index, embedder, read_only=True)
        result = search_slide_details(
            index, embedder, args.slide, args.mosaic_size, args.clusters, mpp_source=args.mpp_source
        )
    except (SlideError, ValueError, OSError) as err:
        parser.exit(1, f"error: {err}\n")
    print(f"query {args.slide}: {result.tissue_tiles} tissue tiles, mosaic of {len(result.mosaic)}")
    print(f"{'rank':>4}  {'score':>6}  {'tiles':>5}  {'label':<16} slide")
    for rank, hit in enumerate(result.hits[: args.top], 1):
        print(f"{rank:>4}  {hit.score:6.3f}  {hit.matched_tiles:>5}  {str(hit.label):<16} {hit.slide}")
    return result.hits


if __name__ == "__main__":
    main()
    sys.exit(0)
