"""The Whole slide tab's handlers, called directly on the real SVS (skipped without ../shared/data):
upload checks, region picking, region search over a slide index, where a match comes from, slide ranking."""

from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from slide_fixtures import write_slide_index

import app
from index_build.slide_page import CLICK_MODES, SlidePage, slide_place
from index_build.slides import open_slide, read_tile, tile_slide

torch.set_num_threads(2)

INDEXED = (896, 1344, 896, 672)  # level-0 box of the SVS whose tissue tiles the test index holds (4 x 3 tiles)


@pytest.fixture(scope="module")
def svs(shared_data) -> Path:
    return shared_data / "slides" / "cmu_small_region.svs"


@pytest.fixture(scope="module")
def tiny224(tiny_config):
    from index_build.models import Embedder
    from modeling_lgffem import LgffemConfig, LgffemImageProcessor, LgffemModel

    config = LgffemConfig(**{**tiny_config.to_dict(), "image_size": 224})
    torch.manual_seed(0)
    return Embedder(LgffemModel(config).eval(), LgffemImageProcessor.from_config(config), model_id="tiny224")


@pytest.fixture(scope="module")
def served(tmp_path_factory, svs, tiny224):
    """``(page, search_app, index info)`` for an app serving a slide index of part of the SVS."""
    tmp = tmp_path_factory.mktemp("slide-page")
    info = write_slide_index(svs, tmp / "index", tiny224, region=INDEXED)
    search_app = app.SearchApp.create(index=str(tmp / "index"), data_dir=tmp / "data", embedder=tiny224)
    page = SlidePage(search_app.galleries, search_app._embed, max_slide_mb=100, slides_root=svs.parent)
    return page, search_app, info


@pytest.fixture()
def loaded(served, svs):
    page = served[0]
    thumb, status, session = page.load(str(svs), 0, 2)
    assert session is not None, status
    return page, session


def at(session, x0: float, y0: float) -> tuple[float, float]:
    """Thumbnail pixel of a level-0 point."""
    return x0 / session.scale, y0 / session.scale


def test_upload_shows_thumbnail_with_tissue_outline(loaded, svs):
    page, session = loaded
    thumb, status, again = page.load(str(svs), 0, 2)
    assert thumb.size == (766, 1024) and session.scale == pytest.approx(2220 / 766)
    assert "2,220×2,967 px at level 0, 0.499 µm/px (from the file)" in status
    pixels = np.asarray(thumb)
    assert (pixels == (0, 200, 0)).all(-1).sum() > 1000  # the tissue outline
    assert (pixels == (0, 90, 255)).all(-1).sum() > 400  # the region
    assert session.size0 == 224  # 224 px at 0.5 µm/px on a 0.499 µm/px slide
    x, y, w, h = session.region
    assert x % 224 == 0 and y % 224 == 0 and (w, h) == (448, 448)


@pytest.mark.parametrize(
    "name, data, limit_mb, message",
    [
        (None, None, 100, "No slide yet"),
        ("notes.txt", b"hello", 100, "notes.txt: not a slide or image file; accepted: .bif"),
        ("broken.svs", b"II*\x00garbage" * 10, 100, "cannot read image"),
        ("cmu_small_region.svs", "svs", 1, "file of 2 MB; this server accepts slides up to 1 MB"),
        ("target_image.png", "png", 100, "records no resolution (µm per pixel): enter it"),
    ],
)
def test_upload_refuses_bad_files_with_a_message(served, svs, tmp_path, name, data, limit_mb, message):
    page = SlidePage(served[1].galleries, max_slide_mb=limit_mb)
    if name is None:
        path = None
    elif data == "svs":
        path = str(svs)
    elif data == "png":
        path = str(svs.parent / name)
    else:
        path = str(tmp_path / name)
        Path(path).write_bytes(data)
    thumb, status, session = page.load(path, 0, 2)
    assert thumb is None and session is None
    assert status.startswith("⚠️ ") and message in status, status
    # the message names the file, never a folder of the server (issue 22)
    for folder in {str(tmp_path), str(svs.parent), str(svs.parent.resolve()), "/tmp/"}:
        assert folder not in status, status


def test_image_without_mpp_is_used_with_the_mpp_entered(served, svs):
    thumb, status, session = served[0].load(str(svs.parent / "target_image.png"), 0.5, 2)
    assert session is not None and "1,000×1,000 px at level 0, 0.5 µm/px (as entered)" in status
    assert session.size0 == 224 and thumb.size == (1000, 1000)


def test_click_centres_a_region_on_the_tile_grid_and_two_clicks_draw_a_box(loaded):
    page, session = loaded
    _, text, centred = page.pick(session, CLICK_MODES[0], 2, at(session, 1100, 1500))
    assert centred.region == (896, 1344, 448, 448) and "x=896, y=1,344, 448×448 px" in text
    _, text, half = page.pick(session, CLICK_MODES[1], 2, at(session, 900, 1350))
    assert half.corner == (900, 1350) and half.region == session.region and "opposite corner" in text
    _, text, box = page.pick(half, CLICK_MODES[1], 2, at(session, 1800, 2020))
    assert box.corner is None and box.region[:2] == (896, 1344) and abs(box.region[2] - 900) <= 1
    assert abs(box.region[3] - 670) <= 1
    _, _, corner = page.pick(session, CLICK_MODES[1], 2, (0, 0))
    _, text, refused = page.pick(corner, CLICK_MODES[1], 2, at(session, 2219, 2966))
    assert refused.region == session.region and text.startswith("⚠️ That box holds 117 tiles"), text
    assert page.pick(None, CLICK_MODES[0], 2, (1, 1))[1].startswith("⚠️ No slide yet")


def test_region_search_finds_its_own_tiles_and_draws_the_vote_map(loaded):
    page, session = loaded
    session = replace(session, region=(896, 1344, 448, 448))
    out = page.search(session, 4)
    assert "4 tissue tiles searched, 0 background tiles skipped" in out.summary, out.summary
    s = out.session
    assert [(x, y) for x, y, _, tissue, _ in s.tiles] == [(896, 1344), (1120, 1344), (896, 1568), (1120, 1568)]
    # the region is on the index's grid: its four tiles are in the index, pixel for pixel, and come first
    assert {(h["x"], h["y"]) for h in s.hits} == {(x, y) for x, y, *_ in s.tiles}
    assert all(h["slide"] == "cmu_small_region.svs" and h["size0"] == 224 for h in s.hits)
    assert s.hits[0]["score"] > 0.9999 and len(out.results) == 4
    assert out.results[0][1].startswith(f"{s.hits[0]['label']} · sim 1.000 · tile ")
    assert out.results[0][1].endswith(f"cmu_small_region.svs @ x={s.hits[0]['x']:,}, y={s.hits[0]['y']:,}")
    vote_map = np.asarray(Image.open(out.vote_map))
    assert vote_map.shape[1] == 448 and vote_map.shape[0] > 448  # the region at 1:1, the legend underneath
    for number, (x, y, _, _, vote) in enumerate(s.tiles):
        edge = vote_map[y - 1344 + 100, x - 896 + 3]  # on the tile's left outline
        assert tuple(edge) == page.label_colour(vote), (number, vote)
    assert out.table[0][6:] == ["cmu_small_region.svs", s.hits[0]["x"], s.hits[0]["y"], 224]
    assert out.table[0][2] == "1.000" and all(len(row[2]) == 5 for row in out.table)  # 3 decimals, "1.000" too


def test_background_tiles_are_skipped_and_counted(loaded, svs):
    page, session = loaded
    region = (0, 1344, 1120, 448)
    out = page.search(replace(session, region=region), 3)
    with open_slide(svs) as slide:
        tissue, skipped = tile_slide(slide, 0.5, 224, region=region)
    assert len(tissue) > 0 and len(skipped) > 0
    assert f"{len(tissue)} tissue tile" in out.summary and f"{len(skipped)} background tile" in out.summary
    assert sum(not t[3] for t in out.session.tiles) == len(skipped)
    glass = page.search(replace(session, region=(0, 0, 448, 448)), 3)
    assert glass.summary.startswith("⚠️ no tissue in this region (4 background tiles skipped)")
    assert page.search(None, 3).summary.startswith("⚠️ No slide yet")


def test_a_result_shows_where_it_comes_from_and_why(loaded, svs):
    page, session = loaded
    s = page.search(replace(session, region=(896, 1344, 448, 448)), 4).session
    hit = s.hits[0]
    out = page.explain(s, 0)
    assert f"slide `cmu_small_region.svs`, level-0 x={hit['x']:,}, y={hit['y']:,}, 224 px a side" in out.where_text
    assert "Full-resolution view read from the slide" in out.where_text
    where = np.asarray(Image.open(out.where))
    assert where.shape[:2] == (1024, 766)
    left, top = hit["x"] / s.scale, hit["y"] / s.scale
    frame_x, middle_y = round(left - 2), round(top + 112 / s.scale)
    assert tuple(where[middle_y, frame_x]) == (255, 0, 0)  # the red frame around the match
    view = Image.open(out.view).convert("RGB")
    assert view.size == (448, 448)  # the 224 px tile with half a tile of context on each side, at level 0
    with open_slide(svs) as slide:
        tile = np.asarray(
            read_tile(slide, tile_slide(slide, 0.5, 224, region=(hit["x"], hit["y"], 224, 224))[0][0], 224)
        )
    inner = np.asarray(view)[120:328, 120:328].astype(int)
    assert np.abs(inner - tile[8:216, 8:216].astype(int)).mean() < 1.0
    heat = Image.open(out.heat)
    assert heat.width > 448 and heat.height > 448  # the region, a title and a colour bar

    page.slides_root, root = None, page.slides_root  # no --slides-root: the slide is not read
    try:
        far = page.explain(s, 0)
    finally:
        page.slides_root = root
    assert "not on this server: the stored thumbnail is shown" in far.where_text and far.where is not None
    assert Image.open(far.view).size == page.galleries.main.thumbnail(hit["id"]).size

    other = replace(s, hits=[{**hit, "slide": None, "source": "lung/aca_1.jpg", "x": None, "y": None}])
    plain = page.explain(other, 0)
    assert "patch `lung/aca_1.jpg` of the gallery (not from a slide; its stored patch is shown)" in plain.where_text
    stored = page.galleries.main.thumbnail(hit["id"])  # "Where it comes from" shows the source patch, not nothing
    assert plain.where is not None and Image.open(plain.where).size == stored.size
    assert page.explain(s, 9).where_text.startswith("⚠️ No result number 9")


def test_slide_place_parses_slide_sources(served):
    page = served[0]
    assert slide_place("cmu_small_region.svs@896,1344", page.catalog, 224).size0 == 224
    assert slide_place("a/b@c.svs@1,2", None, 224) == type(slide_place("x@1,2", None, 224))("a/b@c.svs", 1, 2, None)
    assert slide_place("lung/aca_1.jpg", page.catalog, 224) is None


def test_rank_slides(loaded):
    page, session = loaded
    rows, text = page.rank_slides(session)
    assert [row[1] for row in rows] == ["cmu_small_region.svs"] and rows[0][0] == 1 and rows[0][4] > 0
    assert re.fullmatch(r"[01]\.\d{3}", rows[0][2]), rows[0][2]  # 3 decimals, also for 1.000
    assert "1 slide ranked" in text
    catalog, page.catalog = page.catalog, None
    try:
        rows, text = page.rank_slides(session)
    finally:
        page.catalog = catalog
    assert rows == [] and text.startswith("⚠️ The served index is not a slide index")


def test_tab_is_wired_into_the_app(served, monkeypatch):
    demo = app.build_demo(served[1])
    api = {fn.api_name: fn for fn in demo.fns.values()}
    assert {"search", "add_images", "search_region", "rank_slides"} <= set(api)
    assert [type(c).__name__ for c in api["search_region"].outputs] == [
        "Image",
        "Gallery",
        "Markdown",
        "Dataframe",
        "State",
    ]
    monkeypatch.setenv("LGFFEM_MAX_SLIDE_MB", "300")
    assert app.parse_args([]).max_slide_mb == 300
    assert app.parse_args(["--max-slide-mb", "50"]).max_slide_mb == 50
    with pytest.raises(SystemExit):
        app.parse_args(["--max-slide-mb", "0"])


def test_an_index_built_by_the_slide_build(svs, tmp_path):
    """The same page over an index written by ``python -m index_build SLIDES --out DIR`` (tiny 64 px model at
    2 µm/px): places come from its metadata columns, the thumbnail from its catalog, the slide file is read."""
    from index_build.__main__ import main as build_main
    from modeling_lgffem import LgffemConfig, LgffemModel

    torch.manual_seed(0)
    LgffemModel(LgffemConfig(neck_channels=16, neck_layers=1, image_size=64)).save_pretrained(tmp_path / "model")
    (tmp_path / "slides" / "skin").mkdir(parents=True)
    shutil.copy(svs, tmp_path / "slides" / "skin" / "cmu.svs")
    model = ["--model", str(tmp_path / "model")]
    build_main([str(tmp_path / "slides"), "--out", str(tmp_path / "index"), "--mpp", "2", *model, "--num-workers", "0"])
    search_app = app.SearchApp.create(
        model=str(tmp_path / "model"), index=str(tmp_path / "index"), data_dir=tmp_path / "data"
    )
    page = SlidePage(search_app.galleries, max_slide_mb=100, slides_root=tmp_path / "slides")
    assert page.mpp == 2.0 and page.tile_size == 64 and page._places is not None
    _, status, session = page.load(str(svs), 0, 2)
    assert session.size0 == 257 and "x=" in status  # 64 px at 2 µm/px on a 0.499 µm/px slide: 256.5 px
    out = page.search(replace(session, region=(3 * 257, 5 * 257, 514, 514)), 4)
    tiles = {(x, y) for x, y, _, tissue, _ in out.session.tiles if tissue}
    assert tiles and {(h["x"], h["y"]) for h in out.session.hits} == tiles  # its own tiles, found pixel for pixel
    assert all(h["slide"] == "skin/cmu.svs" and h["size0"] == 257 and h["label"] == "skin" for h in out.session.hits)
    explained = page.explain(out.session, 0)
    assert (
        "slide `skin/cmu.svs`" in explained.where_text
        and "Full-resolution view read from the slide" in explained.where_text
    )
    assert Image.open(explained.view).size == (513, 513)  # 257 px and round(128.5) = 128 px of context on each side


def test_region_below_the_close_match_threshold_gives_no_suggestion(loaded, monkeypatch):
    page, session = loaded
    session = replace(session, region=(896, 1344, 448, 448))
    own = page.search(session, 4).summary  # its own tiles: similarity 1, a close match
    assert not own.startswith("### No close match") and "Best similarity 1.000 (close-match threshold" in own
    assert "4 of 4 tissue tiles (100%) have a close match" in own and "This gallery holds" in own
    main = page.galleries.main
    monkeypatch.setattr(type(main), "close_match_threshold", property(lambda self: 1.5))
    out = page.search(session, 4)
    assert out.summary.startswith(
        "### No close match in this gallery  \nThe best similarity, 1.000, is below this gallery's close-match "
        "threshold 1.500.  \nThe nearest patches are shown for reference, not as a suggestion."
    ), out.summary
    assert "Tile votes" not in out.summary and "0 of 4 tissue tiles (0%) have a close match" in out.summary


def test_region_search_goes_through_the_query_core(loaded, svs):
    """The page's ranked hits are the query core's for the region's tiles (background ones skipped),
    with the core's k limit and per-stage timings."""
    from index_build.search_core import run_query
    from index_build.slide_page import region_query

    page, session = loaded
    region = (0, 1344, 1120, 448)
    out = page.search(replace(session, region=region), 5)
    with open_slide(svs) as slide:
        tissue, skipped = tile_slide(slide, page.mpp, page.tile_size, region=region)
        crops = [read_tile(slide, tile, page.tile_size) for tile in tissue]
    ratio = page.tile_size / session.size0
    core = run_query(
        region_query(None, region, ratio, tissue, skipped, crops), page.galleries.current(), 5, embedder=page.embedder
    )
    assert [(h["gallery"], h["id"], h["tile"]) for h in out.session.hits] == [
        (h.gallery, h.id, h.tile) for h in core.hits
    ]
    assert core.skipped == tuple(range(len(tissue) + 1, len(tissue) + len(skipped) + 1)) and len(skipped) > 0
    assert [t[4] for t in out.session.tiles[: len(tissue)]] == [v or "" for v in core.tile_votes()[: len(tissue)]]
    assert ratio == 1.0 and [t.box for t in core.tiles] == [
        (t.x - region[0], t.y - region[1], t.x - region[0] + 224, t.y - region[1] + 224) for t in [*tissue, *skipped]
    ]
    assert set(page.last_timings) == {"decode", "tile", "embed", "search", "merge", "draw", "export"}
    refused = page.search(replace(session, region=region), 51)
    assert refused.summary == "⚠️ k must be a whole number from 1 to 50, got 51"
