"""The query core (index_build.search_core.run_query) with a colour embedder and hand-computed galleries.

The embedder maps an image to its unit mean RGB colour, so every similarity below is worked out by hand.
"""

from __future__ import annotations

import re
import types

import numpy as np
import pytest
import torch
from PIL import Image

from index_build.query import EMBED_CHUNK, Tile
from index_build.search_core import MAX_K, STAGES, Query, check_k, run_query
from index_build.uploads import InputError

RED, GREEN, BLUE, WHITE = (200, 0, 0), (0, 200, 0), (0, 0, 200), (255, 255, 255)


class ColourEmbedder:
    """32 px input; an image's embedding is its mean RGB colour, L2-normalised."""

    processor = types.SimpleNamespace(image_size=32)

    def __init__(self) -> None:
        self.embedded = 0  # rows embedded so far

    def preprocess(self, images) -> torch.Tensor:
        return torch.tensor(np.array([np.asarray(im, dtype=np.float32).mean(axis=(0, 1)) for im in images]))

    def embed_pixels(self, pixel_values: torch.Tensor) -> np.ndarray:
        self.embedded += len(pixel_values)
        x = pixel_values.numpy().astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


class ListGallery:
    """An exact in-memory gallery with labels, sources and thumbnails (the PatchIndex surface the core reads)."""

    def __init__(self, vectors, labels, threshold=None) -> None:
        self.xb = np.asarray(vectors, dtype=np.float32)
        self.row_labels = list(labels)
        self.sources = [f"src{i}" for i in range(len(labels))]
        self.close_match_threshold = threshold

    def __len__(self) -> int:
        return len(self.row_labels)

    def has_label(self, label: str) -> bool:
        return label in self.row_labels

    def thumbnail(self, i: int) -> Image.Image:
        return Image.new("RGB", (4, 4), (i, i, i))

    def search_embeddings(self, xq, k, label=None):
        scores = np.asarray(xq, dtype=np.float32) @ self.xb.T
        if label is not None:
            scores[:, np.array(self.row_labels) != label] = -np.inf
        ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(scores, ids, axis=1)
        return np.where(np.isfinite(top), top, 0.0), np.where(np.isfinite(top), ids, -1)


def gallery(threshold=None) -> ListGallery:
    # id 0 red, id 1 orange-ish red, id 2 green, id 3 blue
    return ListGallery([(1, 0, 0), (0.8, 0.6, 0), (0, 1, 0), (0, 0, 1)], ["red", "red", "green", "blue"], threshold)


def blocks(grid: list[list[tuple[int, int, int]]], side: int = 32) -> Image.Image:
    """An image of ``side`` px colour squares, row by row."""
    image = Image.new("RGB", (side * len(grid[0]), side * len(grid)))
    for r, row in enumerate(grid):
        for c, colour in enumerate(row):
            image.paste(colour, (c * side, r * side, (c + 1) * side, (r + 1) * side))
    return image


@pytest.mark.parametrize("k, expected", [(1, 1), (50, 50), (8.0, 8)])
def test_check_k_accepts_whole_numbers_up_to_max_k(k, expected):
    assert check_k(k) == expected and MAX_K == 50


@pytest.mark.parametrize("k", [0, 51, 2.5, "x", "7", None, True])
def test_check_k_refuses_with_one_line(k):
    with pytest.raises(InputError, match=f"^{re.escape(f'k must be a whole number from 1 to 50, got {k!r}')}$"):
        check_k(k)


def test_a_patch_is_searched_whole():
    embedder = ColourEmbedder()
    found = run_query(Query.picture(blocks([[(200, 40, 40)]])), [("index", gallery())], 3, embedder=embedder)
    assert found.kind == "patch" and len(found.tiles) == 1 and found.skipped == () and found.tissue is None
    # query (200, 40, 40) / 207.8 = (0.962, 0.192, 0.192): id 0 0.962, id 1 0.885, ids 2 and 3 0.192 (lower id first)
    assert [h.id for h in found.hits] == [0, 1, 2]
    assert [round(h.score, 3) for h in found.hits] == [0.962, 0.885, 0.192]
    assert [h.source for h in found.hits] == ["src0", "src1", "src2"]
    assert found.votes == [("red", 2), ("green", 1)] and found.unit == "results"
    assert (
        found.suggestion is None and found.verdict.kind == "close_call"
    )  # 4 patches, 3 labels: the calibrated verdict (default rule) calls it close
    assert found.close_match is None and embedder.embedded == 1
    assert list(found.timings) == list(STAGES) and all(s >= 0 for s in found.timings.values())
    assert found.hits[0].thumbnail.getpixel((0, 0)) == (0, 0, 0)  # merged hits carry their thumbnails
    assert all(h.thumbnail is None for h in found.per_tile[0])  # per-tile hits do not


def test_a_large_image_is_tiled_and_blank_glass_skipped():
    embedder, calls = ColourEmbedder(), []
    image = blocks([[RED, RED, WHITE], [GREEN, BLUE, GREEN]])  # 96 x 64: 3 x 2 tiles of 32 px
    found = run_query(
        Query.picture(image), [("index", gallery())], 2, embedder=embedder, progress=lambda *a: calls.append(a)
    )
    assert found.kind == "image" and [t.box for t in found.tiles][2] == (64, 0, 96, 32)
    assert found.skipped == (3,) and found.per_tile[2] == [] and [t.number for t in found.searched] == [1, 2, 4, 5, 6]
    assert found.tissue == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    assert embedder.embedded == 5 and calls == [(0, 5), (5, 5)] and EMBED_CHUNK == 6
    assert found.tile_votes() == ["red", "red", None, "green", "blue", "green"]
    # red and green tie at 2 tiles; every tile's top-1 is 1.0, so the earlier tile (red) wins
    assert found.votes == [("red", 2), ("green", 2), ("blue", 1)] and found.unit == "tiles"
    assert found.suggestion is None and found.decision.reason == "close call"  # tiles split: no suggestion
    assert [(h.id, h.tile, h.score) for h in found.hits] == [(0, 1, 1.0), (2, 4, 1.0)]
    assert len(found.pixel_values) == 6  # what the model saw of every tile, the skipped one too


def test_whole_image_mode_and_all_blank_tiles():
    found = run_query(Query.picture(blocks([[RED, WHITE, WHITE]]), tile_large=False), [("g", gallery())], 1,
                      embedder=ColourEmbedder())  # fmt: skip
    # searched whole: the mean colour (236.7, 170, 170) / 337.4 = (0.701, 0.504, 0.504) is closest to id 1
    assert found.kind == "patch" and found.hits[0].id == 1 and round(found.hits[0].score, 3) == 0.864
    blank = run_query(Query.picture(blocks([[WHITE, WHITE, WHITE]])), [("g", gallery())], 1, embedder=ColourEmbedder())
    assert blank.skipped == () and len(blank.searched) == 3  # every tile blank: all are searched


def test_a_region_skips_the_tiles_without_crops():
    tiles = [Tile(1, 0, 0, (0, 0, 32, 32)), Tile(2, 0, 1, (32, 0, 64, 32)), Tile(3, 0, 2, (64, 0, 96, 32))]
    crops = [blocks([[BLUE]]), None, blocks([[BLUE]])]
    embedder = ColourEmbedder()
    found = run_query(Query.region(None, tiles, crops), [("index", gallery())], 2, embedder=embedder)
    assert found.kind == "region" and found.skipped == (2,) and embedder.embedded == 2
    assert found.tile_votes() == ["blue", None, "blue"] and found.votes == [("blue", 2)]
    assert [(h.id, h.tile) for h in found.hits] == [(3, 1), (0, 1)]
    with pytest.raises(InputError, match="no tissue in this region"):
        run_query(Query.region(None, tiles, [None] * 3), [("index", gallery())], 2, embedder=embedder)
    with pytest.raises(ValueError, match="one crop"):
        Query.region(None, tiles, crops[:2])


def test_embeddings_are_searched_without_a_model():
    found = run_query(Query.vectors([0, 1, 0]), [("index", gallery())], 2)
    assert found.kind == "embedding" and found.pixel_values is None and found.timings["embed"] == 0.0
    assert [(h.id, round(h.score, 6)) for h in found.hits] == [(2, 1.0), (1, 0.6)]
    assert found.votes == [("green", 1), ("red", 1)] and found.suggestion is None


def test_no_suggestion_below_the_close_match_threshold_or_under_a_label_filter():
    query = Query.picture(blocks([[(200, 40, 40)]]))
    below = run_query(query, [("index", gallery(threshold=0.99))], 3, embedder=ColourEmbedder())
    assert below.close_match is False and below.suggestion is None and below.decision.reason == "no close match"
    assert below.votes == [("red", 2), ("green", 1)]  # still shown, for reference
    above = run_query(query, [("index", gallery(threshold=0.9))], 3, embedder=ColourEmbedder())
    assert above.close_match is True and above.suggestion is None and above.verdict.kind == "close_call"
    filtered = run_query(query, [("index", gallery())], 3, embedder=ColourEmbedder(), label="blue")
    assert [h.id for h in filtered.hits] == [3] and filtered.suggestion is None
    assert filtered.decision.reason == "filtered"


def test_several_galleries_are_merged_by_similarity():
    personal = ListGallery([(0.6, 0.8, 0)], ["mine"])
    found = run_query(Query.vectors([0, 1, 0]), [("index", gallery(0.5)), ("personal", personal)], 3)
    assert [(h.gallery, h.id, round(h.score, 6)) for h in found.hits] == [
        ("index", 2, 1.0),
        ("personal", 0, 0.8),
        ("index", 1, 0.6),
    ]
    assert found.threshold == 0.5  # the first gallery with a threshold
    assert found.hits[1].source == "src0" and found.hits[1].label == "mine"
    assert run_query(Query.vectors([0, 1, 0]), [("index", gallery())], 2, thumbnails=False).hits[0].thumbnail is None


def test_a_bad_file_is_refused_with_its_message(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(InputError):
        run_query(Query.file(str(tmp_path / "bad.png")), [("index", gallery())], 2, embedder=ColourEmbedder())
    with pytest.raises(InputError, match="k must be"):
        run_query(Query.vectors([0, 1, 0]), [("index", gallery())], 0)


def test_an_image_query_needs_the_model():
    with pytest.raises(ValueError, match="needs embedder="):
        run_query(Query.picture(blocks([[RED]])), [("index", gallery())], 2)
