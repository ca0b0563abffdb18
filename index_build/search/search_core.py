"""The query core: one path from a query of any kind to ranked, merged gallery patches and a decision.

In the spirit of clip-retrieval's ``KnnService.query``: parse -> embed -> search -> map to metadata.
Every query the product answers goes through :func:`run_query`: the Search tab and its ``/search``
API (:meth:`index_build.galleries.Galleries.search`), the Whole slide tab's region search
(:meth:`index_build.slide_page.SlidePage.search`) and ``python -m index_build.evaluate --tile``.
A query is one of four kinds (:class:`Query`):

- ``"image"``: an uploaded file or a picture. Up to 1.5x the model input it is searched whole (the
  result's ``kind`` says ``"patch"``); larger, it is cut into tiles (:func:`index_build.query.plan_tiles`)
  and the blank-glass tiles are skipped (:data:`index_build.tissue.TISSUE_RULE`; if every tile is
  blank, all are searched).
- ``"region"``: tiles of a slide region given by the slide page, with their crops; tiles without a
  crop are background by the slide's tissue mask (the rule the slide index was built with) and skipped.
- ``"embedding"``: query vectors (one row per tile), searched as given.

:func:`run_query` owns the k limit (:data:`MAX_K`), tiling, the tissue rule, chunked embedding
(:data:`~index_build.query.EMBED_CHUNK` tiles per forward pass), the search of every gallery, the
merge (:func:`index_build.query.merge_tiles`), the close-match threshold and the decision
(:func:`_decide`), and it times each stage (``decode``, ``tile``, ``embed``, ``search``, ``merge``).
Only the merged hits get their thumbnails (the per-tile hits carry none).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Protocol

import numpy as np
from PIL import Image

from index_build.query import EMBED_CHUNK, Hit, Tile, TiledResult, cut_tiles, merge_tiles, vote_tiles
from index_build.tissue import MIN_TISSUE_FRACTION, tissue_fraction
from index_build.uploads import InputError, decode_image
from index_build.verdict import VERDICT_K, Verdict, decide

if TYPE_CHECKING:
    import torch

MAX_K = 50  # results per query: the one limit of every tab, the API and the evaluation
STAGES = ("decode", "tile", "embed", "search", "merge")
KINDS = ("image", "region", "embedding")

__all__ = [
    "KINDS",
    "MAX_K",
    "STAGES",
    "Decision",
    "Gallery",
    "Query",
    "QueryResult",
    "VectorGallery",
    "check_k",
    "run_query",
]


class Gallery(Protocol):
    """What :func:`run_query` needs of a gallery (:class:`~index_build.patch_index.PatchIndex` has it)."""

    close_match_threshold: Optional[float]

    def __len__(self) -> int: ...

    def has_label(self, label: str) -> bool: ...

    def search_embeddings(
        self, xq: np.ndarray, k: int, label: Optional[str] = None
    ) -> tuple[np.ndarray, np.ndarray]: ...


class VectorGallery:
    """A gallery that is only a search function and the label of every id (the evaluation's
    in-memory galleries): no sources, no thumbnails, no close-match threshold."""

    close_match_threshold: Optional[float] = None
    decision_rule: Optional[dict] = None  # the verdict's fitted rule (None: its default rule)
    labels: Optional[Sequence[str]] = None  # the gallery's scope (None: the labels of its rows)

    def __init__(self, search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], labels: Sequence[Any]):
        self._search = search
        self.row_labels = list(labels)
        self._labels = frozenset(self.row_labels)

    def __len__(self) -> int:
        return len(self.row_labels)

    def has_label(self, label: str) -> bool:
        return label in self._labels

    def search_embeddings(self, xq: np.ndarray, k: int, label: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
        if label is not None:
            raise ValueError("a VectorGallery cannot filter by label")
        return self._search(xq, k)


@dataclass(frozen=True)
class Query:
    """One query; build it with :meth:`file`, :meth:`picture`, :meth:`region` or :meth:`vectors`."""

    kind: str  # one of KINDS
    path: Optional[str] = None  # "image" from a file: decoded by run_query (timed as "decode")
    image: Optional[Image.Image] = None  # "image": the picture; "region": the region as shown (not searched)
    tile_large: bool = True  # "image": cut a large image into tiles (False: search it whole)
    tiles: tuple[Tile, ...] = ()  # "region": every tile, boxes in ``image``'s pixels
    crops: tuple[Optional[Image.Image], ...] = ()  # "region": one per tile; None: background, skipped
    embeddings: Optional[np.ndarray] = None  # "embedding": T x D

    @classmethod
    def file(cls, path: str, tile_large: bool = True) -> Query:
        """An uploaded file, decoded by :func:`index_build.uploads.decode_image` (its checks and messages)."""
        return cls("image", path=str(path), tile_large=tile_large)

    @classmethod
    def picture(cls, image: Image.Image, tile_large: bool = True) -> Query:
        """A decoded RGB picture of any size."""
        return cls("image", image=image, tile_large=tile_large)

    @classmethod
    def region(
        cls, image: Optional[Image.Image], tiles: Sequence[Tile], crops: Sequence[Optional[Image.Image]]
    ) -> Query:
        """A slide region cut into ``tiles`` by the slide page, with the crop of every tissue tile."""
        if len(tiles) != len(crops):
            raise ValueError(f"a region needs one crop (or None) per tile: {len(tiles)} tiles, {len(crops)} crops")
        return cls("region", image=image, tiles=tuple(tiles), crops=tuple(crops))

    @classmethod
    def vectors(cls, embeddings: np.ndarray) -> Query:
        """Query embeddings, one row per tile."""
        return cls("embedding", embeddings=np.array(embeddings, dtype=np.float32, ndmin=2))


@dataclass(frozen=True)
class Decision:
    """What the page suggests: a label, or none (and why)."""

    suggestion: Optional[str]  # the winning label; None: no suggestion
    votes: list[tuple[str, int]]  # vote counts, most first
    unit: str  # what a vote is: "results" (one tile) or "tiles"
    reason: str  # "vote", "filtered" (a label filter: every result has it), "no close match" or "no results"


@dataclass
class QueryResult(TiledResult):
    """Everything :func:`run_query` produced (:class:`~index_build.query.TiledResult` fields, and:)."""

    kind: str = "image"  # "patch" (an image searched whole), "image" (tiled), "region" or "embedding"
    image: Optional[Image.Image] = None  # the decoded query as given (before shrinking)
    decision: Optional[Decision] = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage of STAGES

    @property
    def suggestion(self) -> Optional[str]:
        return self.decision.suggestion if self.decision is not None else None

    @property
    def searched(self) -> list[Tile]:
        """The tiles searched (every tile but the skipped ones)."""
        return [t for t in self.tiles if t.number not in self.skipped]


def check_k(k: Any) -> int:
    """``k`` as an int, or :class:`InputError` unless it is a whole number from 1 to :data:`MAX_K`."""
    message = f"k must be a whole number from 1 to {MAX_K}, got {k!r}"
    try:
        k_int = int(k)
    except (TypeError, ValueError) as err:
        raise InputError(message) from err
    if isinstance(k, bool) or k_int != k or not 1 <= k_int <= MAX_K:
        raise InputError(message)
    return k_int


def _verdict(
    galleries: Sequence[tuple[str, Gallery]], ranked: list[list[tuple[str, float]]], threshold, skipped: int
) -> Verdict:
    """The calibrated verdict (:func:`index_build.verdict.decide`) on every searched tile's ranked
    ``(label, similarity)`` hits, with the first non-empty gallery's fitted rule and every gallery's labels."""
    main = next((g for _, g in galleries if len(g)), None)
    rule = getattr(main, "decision_rule", None) if main is not None else None
    scope = sorted({str(lab) for _, g in galleries if len(g) for lab in getattr(g, "labels", None) or g.row_labels})
    return decide(ranked, threshold, rule, scope, skipped=skipped)


def _decide(
    per_tile: Sequence[Sequence[Hit]],
    hits: Sequence[Hit],
    threshold: Optional[float],
    label: Optional[str],
    verdict: Optional[Verdict],
) -> Decision:
    """The decision, at one call point: the tiles' vote counts (each tile votes for the majority label
    of its own hits; one tile: the hits vote), and a suggestion only when the calibrated verdict makes
    one (never under a label filter)."""
    votes, unit = vote_tiles(per_tile, hits)
    if not hits:
        return Decision(None, votes, unit, "no results")
    if label is not None or verdict is None:
        return Decision(None, votes, unit, "filtered")
    if verdict.kind == "suggestion":
        return Decision(verdict.label, votes, unit, "vote")
    return Decision(None, votes, unit, verdict.kind.replace("_", " "))


def _search(
    galleries: Sequence[tuple[str, Gallery]], xq: np.ndarray, k: int, label: Optional[str]
) -> list[list[tuple[str, int, float]]]:
    """``(gallery, id, score)`` of every tile's ``k`` best hits over all galleries, best first."""
    per_tile: list[list[tuple[str, int, float]]] = [[] for _ in range(len(xq))]
    for name, gallery in galleries:
        if len(gallery) == 0 or (label is not None and not gallery.has_label(label)):
            continue
        scores, ids = gallery.search_embeddings(xq, min(k, len(gallery)), label=label)
        for tile, (row_scores, row_ids) in enumerate(zip(scores, ids)):
            per_tile[tile] += [(name, int(i), float(s)) for s, i in zip(row_scores, row_ids) if i >= 0]
    if len(galleries) > 1:
        per_tile = [sorted(found, key=lambda h: -h[2])[:k] for found in per_tile]
    return per_tile


def _hit(gallery: Any, name: str, i: int, score: float, tile: int, thumbnail: bool) -> Hit:
    sources = getattr(gallery, "sources", None)
    thumb = gallery.thumbnail(i) if thumbnail and hasattr(gallery, "thumbnail") else None
    return Hit(name, i, score, str(gallery.row_labels[i]), str(sources[i]) if sources is not None else "", thumb, tile)


def run_query(
    query: Query,
    galleries: Sequence[tuple[str, Gallery]],
    k: Any,
    *,
    embedder: Any = None,
    label: Optional[str] = None,
    embed: Optional[Callable[[torch.Tensor], np.ndarray]] = None,
    guard: Optional[AbstractContextManager] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    skip_blank: bool = True,
    thumbnails: bool = True,
) -> QueryResult:
    """Answer ``query``: decode, tile, embed, search every gallery, merge, decide.

    Args:
        query: the :class:`Query`.
        galleries: ``(name, gallery)`` pairs searched together (hits name their gallery); the
            first gallery with a close-match threshold sets the threshold.
        k: results wanted per tile and merged; a whole number from 1 to :data:`MAX_K`.
        embedder: the model (``preprocess``, ``embed_pixels``, ``processor.image_size``); not
            needed for an ``"embedding"`` query.
        label: only results with this label (then no suggestion is made).
        embed: replaces ``embedder.embed_pixels`` (the app runs it under ``spaces.GPU``).
        guard: held while the galleries are searched and read (a lock against concurrent
            additions); decoding, tiling and embedding run outside it.
        progress: called as ``progress(tiles_done, tiles_to_embed)`` before the first and after
            every :data:`~index_build.query.EMBED_CHUNK` tiles embedded.
        skip_blank: leave out the blank-glass tiles of a tiled image (:data:`~index_build.tissue.TISSUE_RULE`).
        thumbnails: read the merged hits' thumbnails.

    Raises:
        InputError: a bad ``k``, an undecodable file, or a region without a tissue tile.
    """
    k = check_k(k)
    if query.kind not in KINDS:
        raise ValueError(f"query kind must be one of {KINDS}, got {query.kind!r}")
    if query.kind != "embedding" and embedder is None:
        raise ValueError(f"a query of kind {query.kind!r} needs embedder= (the model)")
    timings = dict.fromkeys(STAGES, 0.0)
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] += now - clock
        clock = now

    image, work, tissue, skipped, pixel_values = query.image, None, None, (), None
    if query.kind == "image":
        if query.path is not None:
            image = decode_image(query.path)
        elif image is None:
            raise InputError("No image yet: drop, paste or browse a tissue image first.")
        lap("decode")
        size = int(embedder.processor.image_size)
        work, tiles, crops = cut_tiles(image, size, query.tile_large)
        if len(tiles) > 1:
            tissue = [tissue_fraction(crop) for crop in crops]
            if skip_blank:
                blank = tuple(t.number for t, share in zip(tiles, tissue) if share < MIN_TISSUE_FRACTION)
                skipped = blank if len(blank) < len(tiles) else ()
        kind = "image" if len(tiles) > 1 else "patch"
    elif query.kind == "region":
        work, tiles, crops, kind = image, list(query.tiles), list(query.crops), "region"
        skipped = tuple(t.number for t, crop in zip(tiles, crops) if crop is None)
        if len(skipped) == len(tiles):
            raise InputError(f"no tissue in this region ({len(skipped)} background tiles skipped)")
    else:
        xq = query.embeddings
        tiles = [Tile(i + 1, i, 0, (0, 0, 0, 0)) for i in range(len(xq))]
        crops, kind = [], "embedding"
    searched = [i for i, t in enumerate(tiles) if t.number not in skipped]
    lap("tile")

    if query.kind != "embedding":
        # Every tile of an image is preprocessed (the page shows what the model saw of each, skipped
        # ones too); a region has crops of its tissue tiles only.
        pixel_values = embedder.preprocess(crops if query.kind == "image" else [crops[i] for i in searched])
        rows = searched if query.kind == "image" else list(range(len(searched)))
        embed = embed or embedder.embed_pixels
        parts = []
        for start in range(0, len(rows), EMBED_CHUNK):
            if progress is not None:
                progress(start, len(rows))
            parts.append(np.asarray(embed(pixel_values[rows[start : start + EMBED_CHUNK]])))
        if progress is not None:
            progress(len(rows), len(rows))
        xq = np.concatenate(parts)
        lap("embed")

    with guard or nullcontext():  # the verdict reads at least VERDICT_K hits per tile, the page shows k
        found = _search(galleries, xq, max(k, VERDICT_K) if label is None else k, label)
        lap("search")
        by_name = dict(galleries)
        per_tile: list[list[Hit]] = [[] for _ in tiles]
        for i, tile_hits in zip(searched, found):
            per_tile[i] = [_hit(by_name[n], n, j, s, tiles[i].number, False) for n, j, s in tile_hits[:k]]
        hits = merge_tiles(per_tile, k)[0]
        hits = [_hit(by_name[h.gallery], h.gallery, h.id, h.score, h.tile, thumbnails) for h in hits]
        ranked = [[(str(by_name[n].row_labels[j]), s) for n, j, s in tile_hits] for tile_hits in found]
    threshold = next((g.close_match_threshold for _, g in galleries if g.close_match_threshold is not None), None)
    verdict = None if label is not None else _verdict(galleries, ranked, threshold, len(skipped))
    decision = _decide(per_tile, hits, threshold, label, verdict)
    lap("merge")
    return QueryResult(
        work=work,
        tiles=tiles,
        pixel_values=pixel_values,
        per_tile=per_tile,
        hits=hits,
        votes=decision.votes,
        unit=decision.unit,
        threshold=threshold,
        tissue=tissue,
        skipped=skipped,
        kind=kind,
        image=image,
        decision=decision,
        timings=timings,
        verdict=verdict,
    )
