"""The Whole slide tab end to end in Chromium (Playwright, Debian's chromium): upload the real SVS, click a
region on its thumbnail, search it, click a result; the tile vote map, the result's position marked on the
slide's thumbnail, the full-resolution view and the heat map appear. Screenshots go to /tmp/shots11/."""

from __future__ import annotations

import io
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CHROMIUM, CHROMIUM_ARGS, free_port
from PIL import Image
from slide_fixtures import write_slide_index

import app

SHOTS = Path("/tmp/shots11")
INDEXED = (896, 1344, 896, 672)  # the SVS's tissue tiles in this level-0 box make the served slide index


@pytest.fixture(scope="module")
def slide_server(tmp_path_factory, shared_data):
    """The app with the default model serving a slide index of part of the SVS; yields ``(url, svs, scale)``."""
    from index_build.models import load_model

    torch.set_num_threads(2)
    svs = shared_data / "slides" / "cmu_small_region.svs"
    embedder = load_model("default", device="cpu")
    tmp = tmp_path_factory.mktemp("slide-browser")
    write_slide_index(svs, tmp / "index", embedder, region=INDEXED)
    search_app = app.SearchApp.create(index=str(tmp / "index"), data_dir=tmp / "data", embedder=embedder)
    search_app.slides_root = svs.parent  # --slides-root: full-resolution views are read from there only
    demo = app.build_demo(search_app)
    demo.queue(default_concurrency_limit=2)
    port = free_port()
    demo.launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, css=app.CSS,
        max_file_size=200 * 2**20,
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}/", svs
    finally:
        demo.close()


@contextmanager
def slide_tab(url: str, upload: Path):
    """A Chromium page on the app's Whole slide tab with ``upload`` chosen in its file box."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(url)
            page.get_by_role("tab", name="Whole slide").click()
            page.locator("#slide-file input[type=file]").set_input_files(str(upload))
            yield page
        finally:
            browser.close()


def fetch_image(page, selector: str) -> Image.Image:
    """The picture an ``<img>`` of the page shows, fetched as the browser would."""
    src = page.locator(selector).first.get_attribute("src")
    response = page.request.get(src)
    assert response.ok, src
    return Image.open(io.BytesIO(response.body())).convert("RGB")


@pytest.mark.browser
def test_slide_tab_in_chromium(slide_server):
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is not installed (make chromium)")
    url, svs = slide_server
    SHOTS.mkdir(parents=True, exist_ok=True)
    with slide_tab(url, svs) as page:
        page.get_by_text("2,220×2,967 px at level 0").first.wait_for(timeout=120_000)
        thumb = page.locator("#slide-thumb img").first
        thumb.wait_for(timeout=30_000)
        page.screenshot(path=str(SHOTS / "1-uploaded.png"), full_page=True)

        # a click at level-0 (1232, 1680) centres a 3 x 3 tile region there, snapped to the grid at (896, 1344)
        natural = thumb.evaluate("img => [img.naturalWidth, img.naturalHeight]")
        box = thumb.bounding_box()
        scale = 2220 / natural[0]
        shown = box["width"] / natural[0]
        thumb.click(position={"x": 1232 / scale * shown, "y": 1680 / scale * shown})
        page.get_by_text("Region: level-0 x=896, y=1,344, 672×672 px").first.wait_for(timeout=60_000)

        page.click("#slide-search-button")
        page.locator("#slide-results .thumbnail-item").first.wait_for(timeout=180_000)
        page.locator("#slide-votes img").first.wait_for(timeout=30_000)
        summary = page.locator("#slide-summary").inner_text()
        assert "9 tissue tiles searched, 0 background tiles skipped" in summary, summary
        captions = page.locator("#slide-results .caption-label").all_inner_texts()
        assert captions and all("cmu_small_region.svs @ x=" in c for c in captions), captions
        votes = np.asarray(fetch_image(page, "#slide-votes img"))
        assert votes.shape[1] == 672 and votes.shape[0] > 672  # 3 x 3 tiles of 224 px, and the legend
        page.screenshot(path=str(SHOTS / "2-searched.png"), full_page=True)

        page.locator("#slide-results .thumbnail-item").first.click()
        page.locator("#slide-heat img").first.wait_for(timeout=180_000)
        page.locator("#slide-where img").first.wait_for(timeout=30_000)
        page.locator("#slide-view img").first.wait_for(timeout=30_000)
        where_text = page.locator("#slide-where-text").inner_text()
        assert "slide cmu_small_region.svs, level-0 x=" in where_text.replace("`", ""), where_text
        assert "Full-resolution view read from the slide" in where_text
        x, y = (int(v.replace(",", "")) for v in where_text.split("level-0 x=")[1].split(", 224 px")[0].split(", y="))
        assert INDEXED[0] <= x < INDEXED[0] + INDEXED[2] and INDEXED[1] <= y < INDEXED[1] + INDEXED[3]
        where = np.asarray(fetch_image(page, "#slide-where img"))
        left, middle = round(x / scale - 2), round((y + 112) / scale)
        assert tuple(where[middle, left]) == (255, 0, 0)  # the match's place, framed in red
        assert fetch_image(page, "#slide-view img").size == (448, 448)
        heat = fetch_image(page, "#slide-heat img")
        assert heat.width > 672  # the region, with its colour bar
        page.locator("#slide-heat").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "3-explained.png"), full_page=True)

        page.click("#slide-rank-button")
        page.locator("#slide-rank-text").get_by_text("1 slide ranked").wait_for(timeout=180_000)
        # the outcome shows under the button the user clicked, not far down the page
        button, told = (
            page.locator("#slide-rank-button").bounding_box(),
            page.locator("#slide-rank-text").bounding_box(),
        )
        assert 0 <= told["y"] - (button["y"] + button["height"]) < 60, (button, told)
        assert "cmu_small_region.svs" in page.locator("#slide-rank-table").inner_text()
        page.screenshot(path=str(SHOTS / "4-ranked.png"), full_page=True)
    assert (SHOTS / "3-explained.png").stat().st_size > 50_000


@pytest.mark.browser
def test_a_resolution_typed_after_the_upload_applies_without_a_new_upload(slide_server, tmp_path):
    """An image that records no µm/px asks for it; typing it and pressing Enter reads the same upload with it."""
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is not installed (make chromium)")
    url, svs = slide_server
    plain = tmp_path / "no_resolution.png"
    rng = np.random.default_rng(3)
    pixels = np.full((900, 1200, 3), 235, np.uint8)
    pixels[200:700, 300:900] = rng.integers(90, 200, (500, 600, 3), dtype=np.uint8) * np.array([1.0, 0.5, 1.0])
    Image.fromarray(pixels).save(plain)  # a PNG without a pHYs chunk: no resolution recorded
    with slide_tab(url, plain) as page:
        page.locator("#slide-status").get_by_text("records no resolution").wait_for(timeout=120_000)
        assert "press Enter" in page.locator("#slide-status").inner_text()
        page.locator("#slide-mpp input").fill("0.5")
        page.locator("#slide-mpp input").press("Enter")
        page.get_by_text("1,200×900 px at level 0").first.wait_for(timeout=120_000)
        assert "records no resolution" not in page.locator("#slide-status").inner_text()
        page.locator("#slide-thumb img").first.wait_for(timeout=30_000)
