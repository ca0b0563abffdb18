"""The Gradio app's handlers, called directly: good input, every kind of bad input, tiling,
personal gallery persisted across restarts, start-up errors. Tiny model, CPU only."""

from __future__ import annotations

import io
import os
import struct
import sys
import types
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import app
from app import SearchApp, StartupError
from index_build import query, starter, storage, uploads
from index_build.metrics import majority_votes
from index_build.search_core import Query
from index_build.uploads import InputError
from index_build.verdict import decide

torch.set_num_threads(2)


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------


def make_embedder(config, seed: int = 0):
    from index_build.models import Embedder
    from modeling_lgffem import LgffemImageProcessor, LgffemModel

    torch.manual_seed(seed)
    model = LgffemModel(config).eval()
    return Embedder(model=model, processor=LgffemImageProcessor.from_config(config), model_id=f"tiny-{seed}")


@pytest.fixture(scope="module")
def tiny(tiny_config):
    """A tiny random LGFFEM (64 px input, 64-d embeddings)."""
    return make_embedder(tiny_config)


@pytest.fixture(scope="module")
def starter_subset():
    """All 5 background tiles of the starter gallery plus every 6th other tile (35 tiles)."""
    images, labels, sources = starter.starter_tiles()
    keep = sorted({i for i, lab in enumerate(labels) if lab == "background"} | set(range(0, len(images), 6)))
    return [images[i] for i in keep], [labels[i] for i in keep], [sources[i] for i in keep]


@pytest.fixture(scope="module")
def base_index_dir(tmp_path_factory, tiny, starter_subset):
    from index_build.index import build_index

    path = tmp_path_factory.mktemp("base") / "index"
    build_index(starter.images_dataset(*starter_subset), path, tiny, num_workers=0, progress=False)
    return path


@pytest.fixture(scope="module")
def search_app(tmp_path_factory, tiny, base_index_dir):
    return SearchApp.create(index=str(base_index_dir), data_dir=tmp_path_factory.mktemp("data"), embedder=tiny)


def save(image: Image.Image, path: Path, **kwargs) -> str:
    image.save(path, **kwargs)
    return str(path)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (1-bit) with almost no pixel data."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def tissue(size: int = 224) -> Image.Image:
    """A real tissue crop (scikit-image's IHC image), resized to ``size``."""
    from skimage import data

    return Image.fromarray(data.immunohistochemistry()[:256, :256]).resize((size, size))


# --------------------------------------------------------------------------------------
# Tiling rule (hand-computed)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "length, tile, expected",
    [
        (224, 224, [0]),
        (100, 224, [0]),
        (448, 224, [0, 224]),
        (500, 224, [0, 138, 276]),  # ceil(500/224) = 3 windows, step (500-224)/2 = 138
        (1000, 224, [0, 194, 388, 582, 776]),  # 5 windows, step 776/4 = 194
    ],
)
def test_axis_starts(length, tile, expected):
    assert query.axis_starts(length, tile) == expected


@pytest.mark.parametrize(
    "size, tile_large, scale, count, last_box",
    [
        ((224, 224), True, 1.0, 1, (0, 0, 224, 224)),
        ((336, 300), True, 1.0, 1, (0, 0, 336, 300)),  # up to 1.5x the input: whole
        ((337, 300), True, 1.0, 4, (113, 76, 337, 300)),  # 2 x 2 tiles of 224
        ((1000, 1000), True, 1.0, 25, (776, 776, 1000, 1000)),
        ((1000, 1000), False, 1.0, 1, (0, 0, 1000, 1000)),
        ((3000, 2000), True, 0.448, 24, (1120, 672, 1344, 896)),  # shrunk to 1344 x 896: 6 x 4 tiles
        ((1000, 100), True, 1.0, 10, (900, 0, 1000, 100)),  # thin strip: 100 px tiles, one row
    ],
)
def test_plan_tiles(size, tile_large, scale, count, last_box):
    got_scale, tiles = query.plan_tiles(*size, 224, tile_large)
    assert got_scale == pytest.approx(scale)
    assert len(tiles) == count
    assert tiles[-1].box == last_box
    assert [t.number for t in tiles] == list(range(1, count + 1))


def test_merge_tiles_rule():
    thumb = Image.new("RGB", (4, 4))

    def hit(i, score, label, tile):
        return query.Hit("index", i, score, label, f"src{i}", thumb, tile)

    tile1 = [hit(0, 0.90, "x", 1), hit(1, 0.80, "y", 1)]  # tie x/y -> x (ranked first)
    tile2 = [hit(1, 0.95, "y", 2), hit(2, 0.50, "y", 2)]  # y
    hits, votes, unit = query.merge_tiles([tile1, tile2], k=2)
    assert [(h.id, h.score, h.tile) for h in hits] == [(1, 0.95, 2), (0, 0.90, 1)]
    assert votes == [("y", 1), ("x", 1)]  # tie between tiles: tile 2 has the higher top-1 score
    assert unit == "tiles"
    hits, votes, unit = query.merge_tiles([tile1], k=8)
    assert [h.id for h in hits] == [0, 1] and votes == [("x", 1), ("y", 1)] and unit == "results"


# --------------------------------------------------------------------------------------
# Decoding: accepted formats
# --------------------------------------------------------------------------------------


def test_decode_accepts_modes(tmp_path):
    import tifffile

    rgb = np.zeros((40, 50, 3), np.uint8)
    rgb[..., 0] = 200
    assert np.array_equal(np.asarray(uploads.decode_image(save(Image.fromarray(rgb), tmp_path / "a.png"))), rgb)
    gray = Image.fromarray(np.full((40, 50), 77, np.uint8))
    out = uploads.decode_image(save(gray, tmp_path / "g.jpg", quality=100))
    assert out.mode == "RGB" and out.size == (50, 40) and abs(int(np.asarray(out)[5, 5, 0]) - 77) <= 1
    rgba = np.zeros((40, 50, 4), np.uint8)  # fully transparent -> white glass
    out = uploads.decode_image(save(Image.fromarray(rgba), tmp_path / "t.png"))
    assert np.asarray(out).min() == 255
    g16 = np.full((40, 50), 25700, np.uint16)  # 25700 / 257 = 100
    out = uploads.decode_image(save(Image.fromarray(g16), tmp_path / "g16.png"))
    assert np.asarray(out)[0, 0].tolist() == [100, 100, 100]
    rgb16 = np.zeros((40, 50, 3), np.uint16)
    rgb16[..., 1] = 0xC800  # high byte 200
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb16)
    assert np.asarray(uploads.decode_image(tmp_path / "rgb16.tif"))[0, 0].tolist() == [0, 200, 0]
    frames = [Image.fromarray(np.full((40, 50, 3), v, np.uint8)) for v in (10, 250)]
    frames[0].save(tmp_path / "multi.tif", save_all=True, append_images=frames[1:])
    assert np.asarray(uploads.decode_image(tmp_path / "multi.tif"))[0, 0].tolist() == [10, 10, 10]  # first page


def test_decode_zip_member_from_memory():
    buffer = io.BytesIO()
    tissue(64).save(buffer, format="PNG")
    buffer.seek(0)
    assert uploads.decode_image(buffer, name="z.zip/a.png").size == (64, 64)


# --------------------------------------------------------------------------------------
# Bad input: a clear message, never an exception out of the handler
# --------------------------------------------------------------------------------------


LIMIT = "more than the 40-megapixel limit of this app; crop or downscale the region of interest first."


def _bad_files(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (path, part of the expected message)."""
    files = {}
    (tmp_path / "notes.txt").write_text("not an image at all\n")
    files["text"] = (str(tmp_path / "notes.txt"), "not an image file")
    (tmp_path / "empty.png").write_bytes(b"")
    files["empty"] = (str(tmp_path / "empty.png"), "the file is empty")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), np.uint8)).save(buffer, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    files["truncated"] = (str(tmp_path / "cut.jpg"), "corrupt or truncated")
    buffer = io.BytesIO()
    tissue(100).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[200:260] = bytes(60)
    (tmp_path / "broken.png").write_bytes(bytes(data))
    files["corrupt"] = (str(tmp_path / "broken.png"), "corrupt or truncated")
    (tmp_path / "bomb.png").write_bytes(png_header_only(20_000, 20_000))  # 400 MP: Pillow's bomb error
    files["bomb"] = (str(tmp_path / "bomb.png"), "bomb.png: the image has 400.0 megapixels, " + LIMIT)
    (tmp_path / "bomb2.png").write_bytes(png_header_only(10_000, 10_000))  # 100 MP: Pillow's bomb warning
    files["bomb warning"] = (str(tmp_path / "bomb2.png"), "bomb2.png: the image has 100.0 megapixels, " + LIMIT)
    (tmp_path / "huge.png").write_bytes(png_header_only(7_000, 6_000))  # 42 MP: above the app's 40 MP
    files["too many pixels"] = (
        str(tmp_path / "huge.png"),
        "huge.png: the image (7000×6000 px) has 42.0 megapixels, " + LIMIT,
    )
    files["tiny"] = (save(tissue(20), tmp_path / "tiny.png"), "image too small (20×20 px); at least 32 px")
    files["thin"] = (save(tissue(200).crop((0, 0, 200, 31)), tmp_path / "thin.png"), "image too small (200×31 px)")
    files["missing"] = (str(tmp_path / "nope.png"), "file not found")
    return files


def test_decode_rejects_bad_files(tmp_path):
    for name, (path, message) in _bad_files(tmp_path).items():
        with pytest.raises(InputError) as info:
            uploads.decode_image(path)
        assert message in str(info.value), name


def test_decode_rejects_large_file(tmp_path, monkeypatch):
    monkeypatch.setattr(uploads, "MAX_UPLOAD_BYTES", 1000)
    path = save(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)), tmp_path / "b.png")
    with pytest.raises(InputError, match="the limit is 0 MB"):
        uploads.decode_image(path)


def test_configured_pillow_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    uploads.configure_pillow()
    assert Image.MAX_IMAGE_PIXELS == uploads.MAX_PIXELS == 40_000_000
    (tmp_path / "b.png").write_bytes(png_header_only(9_000, 9_000))  # 81 MP > 2 x 40 MP: Pillow's own error
    with pytest.raises(InputError) as info:
        uploads.decode_image(tmp_path / "b.png")
    # one limit, one sentence: Pillow's own "exceeds limit of 80000000 pixels" is not passed on
    assert str(info.value) == (
        "b.png: the image has 81.0 megapixels, more than the 40-megapixel limit of this app; "
        "crop or downscale the region of interest first."
    )


def test_search_handler_bad_inputs_keep_serving(search_app, tmp_path):
    for name, (path, message) in _bad_files(tmp_path).items():
        with pytest.warns(UserWarning, match="."):
            out = search_app.search(path, 8, None)
        assert out.summary.startswith("⚠️") and message in out.summary, name
        assert out.gallery == [] and out.votes is None and out.tiles == [] and out.table == []
    for args, message in [
        ((None, 8, None), "No image yet"),
        ((str(tmp_path / "ok.png"), 0, None), "k must be a whole number from 1 to 50"),
        ((str(tmp_path / "ok.png"), 51, None), "k must be a whole number from 1 to 50"),
        ((str(tmp_path / "ok.png"), 2.5, None), "k must be a whole number"),
        ((str(tmp_path / "ok.png"), 8, "lung_aca"), "label 'lung_aca' is not in the gallery"),
        ((str(tmp_path / "ok.png"), 8, None, "zoom"), "tiling must be one of"),
    ]:
        save(tissue(64), tmp_path / "ok.png")
        with pytest.warns(UserWarning):
            out = search_app.search(*args)
        assert message in out.summary
    out = search_app.search(str(tmp_path / "ok.png"), 8, None)  # still serving
    assert len(out.gallery) == 8


# --------------------------------------------------------------------------------------
# Good searches
# --------------------------------------------------------------------------------------


def test_search_finds_itself(search_app, starter_subset, tmp_path):
    images, labels, sources = starter_subset
    path = save(images[3], tmp_path / "q.png")  # 64 x 64 = the tiny model's input: searched whole
    out = search_app.search(path, 8, app.ANY_LABEL)
    assert len(out.gallery) == 8 and len(out.table) == 8
    top = out.table[0]
    assert top[1] == labels[3] and top[5] == sources[3] and top[2] == "1.000"
    assert [row[0] for row in out.table] == list(range(1, 9))
    scores = [row[2] for row in out.table]
    assert all(len(s.split(".")[1]) == 3 for s in scores)  # always 3 decimals, "1.000" too
    assert [float(s) for s in scores] == sorted((float(s) for s in scores), reverse=True)
    caption = out.gallery[0][1]
    assert caption.startswith(f"{labels[3]} · sim 1.000 · ") and "immunohistochemistry" in caption
    # one verdict, decided on the query's 8 hits by the index's own threshold and fitted rule
    index = search_app.index
    found = search_app.galleries.search(Query.picture(uploads.decode_image(path)), 8)
    verdict = decide(
        [[(h.label, h.score) for h in found.per_tile[0]]],
        index.close_match_threshold,
        index.decision_rule,
        search_app.label_choices()[1:],
    )
    assert out.summary.startswith(verdict.text()) and verdict.unit == "results"
    assert (out.votes is not None) == (verdict.kind == "suggestion")
    if out.votes is not None:
        assert sum(round(100 * share) for share in out.votes.values()) == 100
        counts = {lab: round(share * 8) for lab, share in out.votes.items()}
        assert list(counts.items()) == majority_votes([row[1] for row in out.table])
    assert len(out.tiles) == 1 and out.tiles[0][0].size == (64, 64)
    assert out.tiles[0][1] == "query as the model saw it (64×64)"
    assert np.abs(np.asarray(out.tiles[0][0], int) - np.asarray(images[3], int)).max() <= 1  # undone normalisation


def test_no_close_match_shows_no_suggestion(search_app, starter_subset, tmp_path, monkeypatch):
    """Below the gallery's close-match threshold: the headline says so, no vote chart, results kept for reference."""
    images, _, _ = starter_subset
    path = save(images[3], tmp_path / "q.png")
    threshold = search_app.index.close_match_threshold
    assert threshold is not None
    out = search_app.search(path, 8, app.ANY_LABEL)  # the query is a gallery patch: similarity 1.0
    assert not out.summary.startswith("### No close match")
    assert f"Best similarity 1.000 (close-match threshold {threshold:.3f})" in out.summary
    calibration = dict(search_app.index.manifest["close_match"], threshold=1.5)  # nothing reaches it
    monkeypatch.setitem(search_app.index.manifest, "close_match", calibration)
    out = search_app.search(path, 8, app.ANY_LABEL)
    assert out.summary.startswith(
        "### No close match in this gallery  \nThe best similarity, 1.000, is below this gallery's close-match "
        "threshold 1.500"
    )
    assert out.votes is None and "### Suggestion" not in out.summary and "Votes" not in out.summary
    assert len(out.gallery) == 8 and len(out.table) == 8


def test_page_search_writes_fresh_files_per_response(search_app, tmp_path):
    """Two identical searches never share (and so never rewrite) a result file: gradio would cache a
    PIL image under a content hash and rewrite it while an earlier response is still sending it."""
    import gradio as gr

    path = save(tissue(128), tmp_path / "q.png")
    first, second = (search_app.search_page(path, 8, app.ANY_LABEL) for _ in range(2))
    files = [[p for p, _ in out.gallery] + [out.overview] + [p for p, _ in out.tiles] for out in (first, second)]
    assert all(isinstance(f, str) and Path(f).is_file() for f in files[0] + files[1])
    assert not set(files[0]) & set(files[1]) and len(set(files[0])) == len(files[0])
    plain = search_app.search(path, 8, app.ANY_LABEL)
    assert [c for _, c in first.gallery] == [c for _, c in plain.gallery] and first.table == plain.table
    assert Image.open(first.gallery[0][0]).size == plain.gallery[0][0].size
    demo = app.build_demo(search_app)
    assert {fn.api_name: fn for fn in demo.fns.values()}["search"].fn == search_app.search_page
    assert isinstance(demo, gr.Blocks)


def test_label_filter_is_never_a_suggestion(search_app, tmp_path):
    path = save(tissue(64), tmp_path / "q.png")
    out = search_app.search(path, 8, "background")
    assert [row[1] for row in out.table] == ["background"] * 5  # the subset holds exactly 5 background tiles
    assert out.summary.startswith(
        "### Results within **background**\nA label filter is on, so every result is `background` by "
        "construction: this is not a suggestion (clear the filter to get one)."
    )
    assert "### Suggestion" not in out.summary and "Votes" not in out.summary and out.votes is None
    unfiltered = search_app.search(path, 8, app.ANY_LABEL)
    assert "Results within" not in unfiltered.summary


def test_large_query_is_tiled(search_app, tmp_path):
    path = save(tissue(1000), tmp_path / "big.png")  # tiny model: 64 px input, so 1000 px -> 384 px, 6 x 6 tiles
    out = search_app.search(path, 8, None)
    assert len(out.tiles) == 36
    assert out.tiles[7][1].startswith("tile 8 (row 2, col 2) → ")
    voted = {row[5] for row in out.tile_table}
    legend = 22 * len(voted) + 6  # one 22 px line (12 px font) per voted label under the 384 px image
    assert out.overview.size == (384, 384 + legend)
    assert all(1 <= row[3] <= 36 for row in out.table)
    assert all(f" · tile {row[3]} · " in caption for row, (_, caption) in zip(out.table, out.gallery))
    assert "of 36 tissue tiles" in out.summary and "shrunk to 384×384 px" in out.summary
    assert "**Best results** are the gallery patches most similar to any single tile" in out.summary
    assert (out.votes is not None) == out.summary.startswith("### Suggestion: **")
    whole = search_app.search(path, 8, None, "whole image")
    assert len(whole.tiles) == 1 and whole.tile_table == [] and "tissue tiles" not in whole.summary
    assert "searched as 1 tile;" in whole.summary


def test_tiled_search_shows_every_tile_vote_and_skips_blank_glass(search_app, tmp_path):
    image = Image.new("RGB", (1000, 1000), (242, 242, 240))  # blank glass on the right half
    image.paste(tissue(500).resize((500, 1000)), (0, 0))
    calls = []
    out = search_app.search(save(image, tmp_path / "half.png"), 8, None, progress=lambda *a: calls.append(a))
    blank = tuple(r * 6 + c + 1 for r in range(6) for c in (3, 4, 5))  # 6 x 6 tiles of 64 px, right 3 columns
    assert [row[0] for row in out.tile_table] == list(range(1, 37))
    assert [row[1] for row in out.tile_table[:7]] == [f"row 1, col {c}" for c in range(1, 7)] + ["row 2, col 1"]
    assert tuple(row[0] for row in out.tile_table if row[5] == "skipped (blank glass)") == blank
    assert all(row[2] == "0%" and row[3:5] == ["-", "-"] for row in out.tile_table if row[0] in blank)
    voting = [row for row in out.tile_table if row[0] not in blank]
    assert all(row[5] in ("background", "DAB-positive", "haematoxylin-dominant") for row in voting)
    assert all(len(row[4]) == 5 and row[4][1] == "." for row in voting)  # similarity with 3 decimals
    assert calls == [(0, 18), (6, 18), (12, 18), (18, 18)]  # progress per embedded tile, in chunks of 6
    counted = {lab: sum(row[5] == lab for row in voting) for lab in {row[5] for row in voting}}
    assert sum(counted.values()) == 18 and "18 skipped as blank glass" in out.summary
    assert all(row[3] not in blank for row in out.table)  # no result comes from a blank tile
    assert out.tiles[3][1] == "tile 4 (row 1, col 4) → skipped (blank glass)"
    assert "of 18 tissue tiles" in out.summary and "18 blank tiles skipped" in out.summary  # the verdict's count
    assert (out.votes is not None) == out.summary.startswith("### Suggestion: **")  # a chart only for a suggestion
    if out.votes is not None:
        shown = {lab: round(100 * share) for lab, share in out.votes.items()}
        assert sum(shown.values()) == 100 and set(shown) == set(counted)


def test_page_handler_and_evaluate_rank_the_same_patches(tiny, base_index_dir, tmp_path):
    """One query core: the Search tab's handler and ``evaluate --tile`` rank the same gallery patches
    for the same file, blank-glass tiles skipped by both (the evaluation used to search them)."""
    from index_build.data import load_image_dataset
    from index_build.display import public_source
    from index_build.evaluate import tiled_retrieval

    image = Image.new("RGB", (1000, 1000), (242, 242, 240))  # blank glass on the right half
    image.paste(tissue(500).resize((500, 1000)), (0, 0))
    (tmp_path / "queries" / "tissue").mkdir(parents=True)
    path = save(image, tmp_path / "queries" / "tissue" / "half.png")
    fresh = SearchApp.create(index=str(base_index_dir), data_dir=tmp_path / "data", embedder=tiny)  # no personal
    out = fresh.search(path, 8)
    index = fresh.galleries.main
    retrieved, _labels, _seconds, tiles, ids = tiled_retrieval(
        load_image_dataset(str(tmp_path / "queries")), tiny, index.search_embeddings, index.row_labels, 8, False
    )
    assert len(set(index.sources)) == len(index)  # a source names one gallery patch
    assert tiles == 18 and sum(row[5] == "skipped (blank glass)" for row in out.tile_table) == 18
    assert len(ids[0]) == 8
    assert [row[5] for row in out.table] == [public_source(index.sources[i], fresh.roots["index"]) for i in ids[0]]
    assert [row[1] for row in out.table] == retrieved[0].tolist()
    assert set(fresh.last_timings) == {"decode", "tile", "embed", "search", "merge", "draw", "export"}


def test_filtered_tiled_search_has_no_tile_votes(search_app, tmp_path):
    out = search_app.search(save(tissue(1000), tmp_path / "big.png"), 8, "DAB-positive")
    assert len(out.tile_table) == 36 and {row[5] for row in out.tile_table} == {"-"}
    assert out.overview.size == (384, 384)  # no vote colours, no legend
    assert out.votes is None and out.summary.startswith("### Results within **DAB-positive**")


def test_grayscale_query_is_warned(search_app, tmp_path):
    grey = np.asarray(tissue(64).convert("L"), np.uint16) * 257
    tiff = tmp_path / "grey16.tif"
    Image.fromarray(grey).save(tiff)  # 16-bit grayscale TIFF
    assert Image.open(tiff).mode.startswith("I;16")
    equal = save(tissue(64).convert("L").convert("RGB"), tmp_path / "equal.png")  # RGB, equal channels
    for path in (str(tiff), equal):
        with pytest.warns(UserWarning, match="no colour"):
            out = search_app.search(path, 8, None)
        assert out.summary.startswith("⚠️ This image has no colour (grayscale). H&E is a colour stain") and out.gallery
    assert uploads.colour_warning(tissue(64)) is None
    assert "no colour" not in search_app.search(save(tissue(64), tmp_path / "c.png"), 8, None).summary


def test_tiff_query_gets_a_png_preview(search_app, tmp_path):
    import gradio as gr

    tiff = save(tissue(100), tmp_path / "q.tif")
    png = search_app.preview(tiff)
    assert png.endswith(".png") and Image.open(png).format == "PNG"
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(uploads.decode_image(tiff)))
    assert search_app.search(png, 5, None).table == search_app.search(tiff, 5, None).table
    shown = save(tissue(100), tmp_path / "q.png")
    assert search_app.preview(shown) == shown  # browsers show PNG: the upload itself (never an update)
    assert search_app.preview(str(tmp_path / "missing.tif")) == str(tmp_path / "missing.tif")
    assert search_app.preview(None) == gr.skip()


def test_export_csv_and_zip(search_app, tmp_path):
    import csv

    query = tissue(128)
    out = search_app.search(save(query, tmp_path / "q.png"), 5, None)
    rows = list(csv.reader(Path(out.csv).read_text().splitlines()))
    verdict = ["verdict", "estimated precision", "close-match threshold", "close-match tiles"]
    assert rows[0] == ["rank", "label", "similarity", "tile", "gallery", "source"] + verdict
    assert [row[:6] for row in rows[1:]] == [[str(v) for v in row] for row in out.table]
    # every row carries the search's verdict (the summary's headline), its precision and the threshold
    assert {tuple(row[6:]) for row in rows[1:]} == {tuple(rows[1][6:])}
    assert f"### {rows[1][6]}" in out.summary and f"close-match threshold {rows[1][8]}" in out.summary
    assert rows[1][9] == "1.000"
    with zipfile.ZipFile(out.archive) as archive:
        names = archive.namelist()
        assert names == ["results.csv", "query.png"] + [f"result_{i:02d}.png" for i in range(1, 6)]
        assert archive.read("results.csv").decode() == Path(out.csv).read_text()
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(archive.read("query.png")))), np.asarray(query))
        first = Image.open(io.BytesIO(archive.read("result_01.png")))
        assert np.array_equal(np.asarray(first), np.asarray(out.gallery[0][0]))


def test_select_result_shows_it_at_stored_resolution(search_app, tmp_path):
    import gradio as gr

    page = search_app.search_page(save(tissue(64), tmp_path / "q.png"), 3, None)
    path, caption = page.gallery[1]
    event = gr.SelectData(None, {"index": 1, "value": {"image": {"path": path}, "caption": caption}})
    shown, text, column = search_app.select_result(event)
    assert shown == path and text == f"**Selected result:** {caption}" and column["visible"] is True
    assert Image.open(shown).size == (64, 64)  # the starter tiles' own size: no upsampling


def test_vote_shares_add_to_100():
    from index_build.display import plural, vote_shares

    assert vote_shares([("a", 5), ("b", 3)]) == {"a": 0.63, "b": 0.37}  # 62.5 + 37.5: was shown as 63% + 38%
    assert vote_shares([("a", 1), ("b", 1), ("c", 1)]) == {"a": 0.34, "b": 0.33, "c": 0.33}
    assert vote_shares([("a", 11), ("b", 8), ("c", 6)]) == {"a": 0.44, "b": 0.32, "c": 0.24}
    assert vote_shares([("a", 2), ("b", 2), ("c", 2), ("d", 1)]) == {"a": 0.29, "b": 0.29, "c": 0.28, "d": 0.14}
    assert vote_shares([]) == {}
    assert (plural(1, "tile"), plural(2, "tile"), plural(1, "patch", "patches"), plural(0, "patch", "patches")) == (
        "1 tile",
        "2 tiles",
        "1 patch",
        "0 patches",
    )


def test_no_server_paths_on_the_page(search_app, base_index_dir, tmp_path):
    from index_build.display import public_index_name, public_source, result_rows, source_root
    from index_build.query import Hit, Tile, TiledResult

    assert str(base_index_dir) not in search_app.index_info and "`index`" in search_app.index_info
    assert public_index_name(str(base_index_dir)) == "index"
    assert public_index_name("someone/lung-index") == "someone/lung-index"  # a Hub dataset id as given
    sources = ["/srv/work/tmpab12/lung/lung_aca/a1.jpg", "/srv/work/tmpab12/lung/lung_n/n1.jpg"]
    assert source_root(sources) == "/srv/work/tmpab12/lung"
    assert source_root(sources[:1]) == "/srv/work/tmpab12/lung"  # one class folder: its parent
    assert source_root(["upload:a.png", "ds/x:train:3"]) is None
    assert public_source(sources[0], "/srv/work/tmpab12/lung") == "lung_aca/a1.jpg"
    assert public_source("/tmp/gradio/abc/q.png", "/srv/work/tmpab12/lung") == "q.png"  # outside the root
    assert public_source("C:\\data\\x.png") == "x.png"
    assert public_source("user/ds:train:12") == "user/ds:train:12" and public_source("upload:a.zip/b.png") == (
        "upload:a.zip/b.png"
    )
    hits = [Hit("index", i, 0.9 - i / 10, "lung_aca", src, None, 1) for i, src in enumerate(sources)]
    found = TiledResult(Image.new("RGB", (64, 64)), [Tile(1, 0, 0, (0, 0, 64, 64))], None, [hits], hits, [], "results")
    gallery, table = result_rows(found, {"index": source_root(sources)})
    assert [row[5] for row in table] == ["lung_aca/a1.jpg", "lung_n/n1.jpg"]
    assert [row[2] for row in table] == ["0.900", "0.800"]
    assert [c for _, c in gallery] == ["lung_aca · sim 0.900 · a1.jpg", "lung_aca · sim 0.800 · n1.jpg"]


def test_huge_image_is_shrunk_then_tiled(search_app, tmp_path):
    path = save(tissue(512).resize((6000, 4000), Image.Resampling.NEAREST), tmp_path / "huge.jpg", quality=80)
    out = search_app.search(path, 8, None)  # 24 MP: accepted; 384 / 6000 -> 384 x 256 px -> 6 x 4 tiles of 64
    assert "Query: 6000×4000 px, shrunk to 384×256 px, searched as 24 tiles" in out.summary
    assert len(out.tiles) == 24 and out.tiles[-1][1].startswith("tile 24 (row 4, col 6)")
    assert len(out.gallery) == 8


# --------------------------------------------------------------------------------------
# Add your own images: persisted, searchable after a restart
# --------------------------------------------------------------------------------------


def test_add_images_persist_across_restart(tmp_path, tiny, base_index_dir):
    data_dir = tmp_path / "data"
    first = SearchApp.create(index=str(base_index_dir), data_dir=data_dir, embedder=tiny)
    rng = np.random.default_rng(5)
    mine = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)) for _ in range(4)]
    paths = [save(mine[0], tmp_path / "a.png"), save(mine[1], tmp_path / "b.tif")]
    with zipfile.ZipFile(tmp_path / "more.zip", "w") as archive:
        for i in (2, 3):
            buffer = io.BytesIO()
            mine[i].save(buffer, "PNG")
            archive.writestr(f"case/img{i}.png", buffer.getvalue())
        archive.writestr("case/readme.txt", "hello")
        archive.writestr("__MACOSX/._img2.png", "junk")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.warns(UserWarning, match="Added 4 patches"):  # some files failed: a warning, not a ✅
        out = first.add_images([*paths, str(tmp_path / "more.zip"), str(tmp_path / "notes.txt")], "  my_case  ")
    reason = "not an image file (format not recognised); upload PNG, JPEG or TIFF"
    assert out.status == (
        "⚠️ Added 4 patches labelled **my_case** to your personal gallery (4 in all); they are searched together "
        "with the gallery from now on, also after a restart.\n\n**2 files skipped:**\n\n"
        f"- more.zip/readme.txt: {reason}\n- notes.txt: {reason}"
    )
    assert "my_case" in out.label_filter["choices"] and "my_case" in out.add_label["choices"]
    identity = storage.index_identity(first.index.manifest)
    assert first.personal_dir == data_dir / "personal" / starter.model_key(tiny) / f"index-{identity}"
    assert (first.personal_dir / "manifest.json").is_file()

    restarted = SearchApp.create(index=str(base_index_dir), data_dir=data_dir, embedder=tiny)
    assert restarted.personal is not None and len(restarted.personal) == 4
    assert "my_case" in restarted.label_choices()
    query = save(mine[2], tmp_path / "q.png")
    res = restarted.search(query, 8, None)
    assert res.table[0][1:5] == ["my_case", "1.000", 1, "your images"]
    assert res.table[0][5] == "upload:img2.png"  # a zip entry's directories are not kept
    assert res.gallery[0][1].startswith("my_case · sim 1.000")
    only = restarted.search(query, 8, "my_case")
    assert [row[1] for row in only.table] == ["my_case"] * 4
    more = restarted.add_images([save(tissue(64), tmp_path / "c.png")], "my_case")
    assert more.status.startswith("✅ Added 1 patch labelled **my_case**") and "(5 in all" in more.status
    assert len(SearchApp.create(index=str(base_index_dir), data_dir=data_dir, embedder=tiny).personal) == 5


def test_add_images_large_image_is_tiled(tmp_path, tiny, base_index_dir):
    fresh = SearchApp.create(index=str(base_index_dir), data_dir=tmp_path, embedder=tiny)
    out = fresh.add_images([save(tissue(128), tmp_path / "region.png")], "region")  # 128 > 96: 2 x 2 tiles of 64
    assert out.status.startswith("✅ Added 4 patches")
    assert fresh.personal.sources == [f"upload:region.png#tile{i}" for i in (1, 2, 3, 4)]


@pytest.mark.parametrize(
    "files, label, message",
    [
        (None, "ok", "no files"),
        ([], "ok", "no files"),
        (["PLACEHOLDER"], "", "give a label of 1-64 characters"),
        (["PLACEHOLDER"], "a/b", "give a label"),
        (["PLACEHOLDER"], "x" * 65, "give a label"),
        (["PLACEHOLDER"], app.ANY_LABEL, "give a label"),
        (["TEXT"], "ok", "none of the files could be added.\n\n**1 file skipped:**\n\n- notes.txt: not an image file"),
        (["BADZIP"], "ok", "none of the files could be added.\n\n**1 file skipped:**\n\n- bad.zip/x.png: corrupt or"),
    ],
)
def test_add_images_bad_input(tmp_path, search_app, files, label, message):
    (tmp_path / "notes.txt").write_text("x")
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as archive:
        buffer = io.BytesIO()
        tissue(64).save(buffer, "PNG")
        archive.writestr("x.png", buffer.getvalue()[:300])  # truncated
    mapping = {
        "PLACEHOLDER": save(tissue(64), tmp_path / "ok.png"),
        "TEXT": str(tmp_path / "notes.txt"),
        "BADZIP": str(tmp_path / "bad.zip"),
    }
    files = None if files is None else [mapping[f] for f in files]
    before = None if search_app.personal is None else len(search_app.personal)
    with pytest.warns(UserWarning):
        out = search_app.add_images(files, label)
    assert out.status.startswith("⚠️") and message in out.status
    assert (None if search_app.personal is None else len(search_app.personal)) == before


def test_add_images_summarises_a_zip_of_many_bad_files(tmp_path, search_app):
    with zipfile.ZipFile(tmp_path / "many.zip", "w") as archive:
        for i in range(1900):
            archive.writestr(f"notes/{i:04d}.png", "not an image")
    with pytest.warns(UserWarning):
        out = search_app.add_images([str(tmp_path / "many.zip")], "ok")
    reason = "not an image file (format not recognised); upload PNG, JPEG or TIFF"
    listed = "\n".join(f"- many.zip/{i:04d}.png: {reason}" for i in range(5))
    assert out.status == (
        "⚠️ none of the files could be added.\n\n**1900 files skipped:**\n\n"
        f"{listed}\n- … and 1895 more (1900 files skipped in all)"
    )


# --------------------------------------------------------------------------------------
# Start-up: starter gallery, Hub index, mismatch, CLI
# --------------------------------------------------------------------------------------


def test_starter_tiles_rule():
    images, labels, sources = starter.starter_tiles()
    assert len(images) == 180 and {im.size for im in images} == {(64, 64)}
    assert {lab: labels.count(lab) for lab in set(labels)} == {
        "DAB-positive": 121,
        "haematoxylin-dominant": 54,
        "background": 5,
    }
    assert sources[0] == "skimage.data.immunohistochemistry()[0:64, 0:64]"


def test_starter_gallery_built_once_and_cached(tmp_path, tiny, starter_subset, monkeypatch):
    monkeypatch.delenv("LGFFEM_INDEX", raising=False)
    monkeypatch.setattr(starter, "starter_tiles", lambda: tuple(list(x[:12]) for x in starter_subset))
    first = SearchApp.create(data_dir=tmp_path, embedder=tiny)
    assert len(first.index) == 12
    assert first.index.path == tmp_path / "starter" / starter.model_key(tiny)
    assert "built-in starter gallery" in first.index_info and "skimage.data.immunohistochemistry()" in first.index_info
    assert "`index_build`" in first.index_info and "--index DIR" in first.index_info
    head, details = app.split_banner(first.index_info)  # one line shown, the details folded
    assert head == "**This page runs on its built-in starter gallery, not on a diagnostic reference collection.**"
    assert details.startswith("It holds 12 patches") and "--index DIR" in details
    assert [Image.open(p).size for p in first.examples] == [(224, 224), (224, 224), (512, 512)]
    assert all(Path(p).parent == tmp_path / "examples" for p in first.examples)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the starter gallery was rebuilt")

    monkeypatch.setattr("index_build.embedding.build_index", no_rebuild)
    again = SearchApp.create(data_dir=tmp_path, embedder=tiny)
    assert len(again.index) == 12


def test_index_from_env_and_hub(tmp_path, tiny, base_index_dir, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("LGFFEM_INDEX", str(base_index_dir))
    assert SearchApp.create(data_dir=tmp_path, embedder=tiny).index.path == base_index_dir
    monkeypatch.delenv("LGFFEM_INDEX")
    calls = []

    def fake_snapshot(**kwargs):
        calls.append(kwargs)
        return str(base_index_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    hub = SearchApp.create(index="org/lgffem-index", index_revision="v1", data_dir=tmp_path, embedder=tiny)
    assert calls == [{"repo_id": "org/lgffem-index", "repo_type": "dataset", "revision": "v1"}]
    assert len(hub.index) == len(SearchApp.create(index=str(base_index_dir), data_dir=tmp_path, embedder=tiny).index)
    assert "from `org/lgffem-index`" in hub.index_info

    def offline(**kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline and not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(StartupError, match="could not get the index 'org/lgffem-index' from the Hugging Face Hub"):
        SearchApp.create(index="org/lgffem-index", data_dir=tmp_path, embedder=tiny)


def test_index_model_mismatch(tmp_path, tiny_config, base_index_dir):
    other = make_embedder(tiny_config, seed=1)  # same architecture, other weights
    with pytest.raises(StartupError, match="cannot be used with this model.*weights_fingerprint"):
        SearchApp.create(index=str(base_index_dir), data_dir=tmp_path, embedder=other)
    with pytest.raises(StartupError, match="index directory not found: /no/such/index"):
        SearchApp.create(index="/no/such/index", data_dir=tmp_path, embedder=other)


def test_main_exits_cleanly_on_mismatch(tmp_path, tiny_config, base_index_dir, capsys):
    from modeling_lgffem import LgffemConfig, LgffemModel

    config = LgffemConfig(**{**tiny_config.to_dict(), "neck_channels": 8})  # 32-d: dimension mismatch
    LgffemModel(config).save_pretrained(tmp_path / "model")
    status = app.main(
        [
            "--model",
            str(tmp_path / "model"),
            "--index",
            str(base_index_dir),
            "--data-dir",
            str(tmp_path / "data"),
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err
    assert status == 2
    assert "error: the index" in err and "embedding_dim 64 != 32" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--index", "./missing-index", "--data-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "error: index directory not found: ./missing-index" in capsys.readouterr().err


def test_parse_args(monkeypatch):
    monkeypatch.setenv("LGFFEM_INDEX", "org/idx")
    monkeypatch.setenv("LGFFEM_DATA_DIR", "/tmp/d")
    monkeypatch.delenv("LGFFEM_MODEL", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    args = app.parse_args([])
    assert (args.model, args.index, args.data_dir, args.port, args.concurrency) == (
        "default",
        "org/idx",
        "/tmp/d",
        7860,
        2,
    )
    monkeypatch.setenv("LGFFEM_MODEL", "org/model")
    assert app.parse_args([]).model == "org/model"
    args = app.parse_args(["--port", "9000", "--host", "0.0.0.0", "--model", "m", "--index", "d"])
    assert (args.port, args.host, args.model, args.index) == (9000, "0.0.0.0", "m", "d")
    with pytest.raises(SystemExit):
        app.parse_args(["--bogus"])
    with pytest.raises(SystemExit):
        app.parse_args(["--concurrency", "0"])


# --------------------------------------------------------------------------------------
# GPU wrapping, Gradio wiring
# --------------------------------------------------------------------------------------


def test_spaces_gpu_decorates_inference(monkeypatch, tmp_path, tiny, base_index_dir):
    wrapped = []

    def fake_gpu(fn):
        def run(*args, **kwargs):
            wrapped.append(fn.__name__)
            return fn(*args, **kwargs)

        return run

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=fake_gpu))
    gpu_app = SearchApp.create(index=str(base_index_dir), data_dir=tmp_path, embedder=tiny)
    out = gpu_app.search(save(tissue(64), tmp_path / "q.png"), 3, None)
    assert len(out.gallery) == 3 and wrapped == ["_embed_pixels"]
    gpu_app.add_images([save(tissue(64), tmp_path / "a.png")], "mine")
    assert wrapped == ["_embed_pixels", "_add_patches"]
    monkeypatch.setitem(sys.modules, "spaces", None)  # not importable -> undecorated
    assert app.gpu(len) is len


def test_build_demo_wiring(search_app):
    import gradio as gr

    demo = app.build_demo(search_app)
    assert isinstance(demo, gr.Blocks)
    api = {fn.api_name: fn for fn in demo.fns.values()}
    assert {"search", "add_images"} <= set(api)
    assert [type(c).__name__ for c in api["search"].inputs] == ["Image", "Slider", "Dropdown", "Radio"]
    assert [type(c).__name__ for c in api["search"].outputs] == [
        "Gallery",
        "Label",
        "Markdown",
        "Image",
        "Gallery",
        "Dataframe",
        "Dataframe",
        "DownloadButton",
        "DownloadButton",
    ]
    assert search_app.index_info.startswith("**Gallery:**") and app.split_banner(search_app.index_info)[1] == ""
    query = api["search"].inputs[0]
    assert query.type == "filepath" and query.preprocess.__func__ is app._undecoded_preprocess
    assert api["search"].inputs[1].value == 8
    assert search_app.examples == []  # examples only with the starter gallery


def test_uploaded_image_preprocess(tmp_path):
    from gradio.data_classes import ImageData

    component = app.uploaded_image(render=False)
    (tmp_path / "x.bin").write_bytes(b"anything")
    assert component.preprocess(ImageData(path=str(tmp_path / "x.bin"))) == str(tmp_path / "x.bin")  # not decoded
    assert component.preprocess(None) is None
    buffer = io.BytesIO()
    tissue(40).save(buffer, "PNG")
    import base64

    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    path = component.preprocess(ImageData(url=url))
    assert Path(path).read_bytes() == buffer.getvalue()
    os.remove(path)


def test_import_is_light():
    import subprocess

    code = "import sys, app; print('torch' in sys.modules, 'index_build.index' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(app.__file__).parent, check=True
    )
    assert out.stdout.split() == ["False", "False"]
    assert not Path(app.__file__).with_suffix(".pyi").exists()  # no Gradio stub written next to app.py


def test_response_files_are_bounded_by_size(tmp_path):
    """The oldest response folders go first once all of them exceed ``max_bytes``; the newest stay."""
    import time

    from index_build.display import ResponseFiles

    files = ResponseFiles(max_bytes=1000)
    folders = []
    for i in range(5):
        folder = files.new_folder("export-")
        (folder / "results.zip").write_bytes(b"x" * 400)
        stamp = time.time() - 100 + i  # distinct ages, well inside the hour
        os.utime(folder, (stamp, stamp))
        folders.append(folder)
    # before the 5th folder: 4 x 400 bytes > 1000, so the two oldest went; the 5th is added after
    assert sorted(p for p in files.root.iterdir()) == sorted(folders[2:])
    files.prune()
    assert sorted(p for p in files.root.iterdir()) == sorted(folders[3:])  # 1,200 bytes -> 800
    aged = ResponseFiles(ttl_s=50, max_bytes=10**9)
    old = aged.new_folder()
    os.utime(old, (time.time() - 60, time.time() - 60))
    aged.prune()
    assert not old.exists()  # the hour-long (here 50 s) age limit still applies
