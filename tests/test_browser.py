"""End to end in a real browser: the app on a free local port (tiny model, tiny index), Debian's
Chromium driven by Playwright uploads a real patch, and the page shows k captioned results.
Also the same search through Gradio's API with gradio_client."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CHROMIUM, CHROMIUM_ARGS, free_port
from PIL import Image

import app
from index_build import starter

K = 8
SHARED_SCREENSHOT = Path("/tmp/lgffem-screenshot.png")


def _real_patches(shared: Path | None) -> tuple[list[Image.Image], list[str], list[str], Path | None]:
    """A small gallery (10 per class of LC25000 lung when ../shared/data is there, else IHC tiles) and a query."""
    if shared is not None:
        root = shared / "lc25000_lung"
        images, labels, sources = [], [], []
        for label in ("lung_aca", "lung_n", "lung_scc"):
            for path in sorted((root / "gallery" / label).glob("*.jpg"))[:10]:
                images.append(Image.open(path).convert("RGB"))
                labels.append(label)
                sources.append(str(path.relative_to(root)))
        return images, labels, sources, sorted((root / "query" / "lung_scc").glob("*.jpg"))[0]
    images, labels, sources = starter.starter_tiles()
    return images[::6], labels[::6], sources[::6], None


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_config):
    """The app, launched in this process on a free port; yields ``(url, query_path, labels)``."""
    from index_build.index import build_index
    from index_build.models import Embedder
    from modeling_lgffem import LgffemConfig, LgffemImageProcessor, LgffemModel

    torch.set_num_threads(2)
    from conftest import SHARED_DATA

    shared = SHARED_DATA if (SHARED_DATA / "lc25000_lung").is_dir() else None
    config = LgffemConfig(**{**tiny_config.to_dict(), "image_size": 224})  # real patches are searched whole
    torch.manual_seed(0)
    embedder = Embedder(LgffemModel(config).eval(), LgffemImageProcessor.from_config(config), model_id="tiny")
    images, labels, sources, query = _real_patches(shared)
    tmp = tmp_path_factory.mktemp("browser")
    build_index(starter.images_dataset(images, labels, sources), tmp / "index", embedder, num_workers=0, progress=False)
    if query is None:  # no real data: a generated patch
        query = tmp / "query.jpg"
        Image.fromarray(np.asarray(images[1].resize((224, 224)))).save(query, quality=90)
    search_app = app.SearchApp.create(index=str(tmp / "index"), data_dir=tmp / "data", embedder=embedder)
    demo = app.build_demo(search_app)
    demo.queue(default_concurrency_limit=2)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, css=app.CSS)
    try:
        yield f"http://127.0.0.1:{port}/", Path(query), sorted(set(labels))
    finally:
        demo.close()


@pytest.fixture(scope="module")
def starter_server(tmp_path_factory, tiny_config):
    """The app on its built-in starter gallery (a 24-tile subset, to build it fast); yields its URL."""
    from index_build.models import Embedder
    from modeling_lgffem import LgffemConfig, LgffemImageProcessor, LgffemModel

    config = LgffemConfig(**{**tiny_config.to_dict(), "image_size": 224})
    torch.manual_seed(0)
    embedder = Embedder(LgffemModel(config).eval(), LgffemImageProcessor.from_config(config), model_id="tiny")
    tiles = starter.starter_tiles
    starter.starter_tiles = lambda: tuple(list(x[::10]) for x in tiles())
    try:
        search_app = app.SearchApp.create(data_dir=tmp_path_factory.mktemp("starter"), embedder=embedder)
    finally:
        starter.starter_tiles = tiles
    demo = app.build_demo(search_app)
    demo.queue(default_concurrency_limit=2)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, css=app.CSS)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def _chromium(p):
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is not installed (make chromium)")
    return p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


@pytest.mark.browser
def test_upload_and_search_in_chromium(server, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is not installed (make chromium)")
    from playwright.sync_api import sync_playwright

    url, query, labels = server
    shared_thumbs = "lc25000" in str(query)  # LC25000 patches are 768 px: stored as 224 px thumbnails
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(query.read_bytes()[: query.stat().st_size // 2])
    caption = re.compile(rf"^({'|'.join(map(re.escape, labels))}) · sim -?[01]\.\d{{3}} · \S")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.wait_for_selector("#search-button", timeout=60_000)
            assert "Gallery:" in page.locator("#gallery-info").inner_text()

            # A broken upload: a clear warning, and the page keeps working.
            page.locator("#query input[type=file]").set_input_files(str(truncated))
            page.locator("#query img").first.wait_for(timeout=30_000)
            page.click("#search-button")
            page.get_by_text("corrupt or truncated").first.wait_for(timeout=60_000)
            assert page.locator("#results .thumbnail-item").count() == 0

            # before anything is clicked: no empty "result at full resolution" box, no empty Tile votes table
            assert not page.locator("#selected-column").is_visible() and not page.locator("#tile-table").is_visible()
            assert page.locator("#download-csv").is_disabled() and page.locator("#download-zip").is_disabled()
            page.locator("#query button[aria-label='Remove Image']").first.click()
            page.locator("#query input[type=file]").set_input_files(str(query))
            page.locator("#query img").first.wait_for(timeout=30_000)
            page.click("#search-button")
            page.wait_for_function(
                f"document.querySelectorAll('#results .thumbnail-item').length === {K}", timeout=120_000
            )
            captions = page.locator("#results .caption-label").all_inner_texts()
            assert len(captions) == K
            assert all(caption.match(text.strip()) for text in captions), captions
            summary = page.locator("#summary").inner_text()
            # one verdict (index_build.verdict), ending with the gallery's scope
            verdict = rf"^(Suggestion: ({'|'.join(labels)})|Close call: |No close match in this gallery)"
            assert re.search(verdict, summary) and "This gallery holds" in summary, summary
            page.locator("#seen .thumbnail-item").first.wait_for(timeout=30_000)
            page.wait_for_timeout(500)  # the search's follow-up step that shows or hides the Tile votes
            assert not page.locator("#tile-table").is_visible()  # a patch searched whole has no tile votes
            # Captions sit below their image, not over it, and are not cut off.
            item = page.locator("#results .thumbnail-item").first
            image_box = item.locator("img").bounding_box()
            caption_box = item.locator(".caption-label").bounding_box()
            assert caption_box["y"] >= image_box["y"] + image_box["height"] - 1, (image_box, caption_box)
            assert item.locator(".caption-label").evaluate("e => e.scrollWidth <= e.clientWidth")
            # Clicking a result shows it at its full stored resolution next to the query.
            item.click()
            page.wait_for_function(
                "(() => { const i = document.querySelector('#selected img'); return i && i.naturalWidth > 0; })()",
                timeout=30_000,
            )
            natural = page.locator("#selected img").evaluate("i => [i.naturalWidth, i.naturalHeight]")
            assert natural == ([224, 224] if shared_thumbs else [64, 64])
            shown = page.locator("#selected img").bounding_box()
            query_box = page.locator("#query").bounding_box()
            assert shown["width"] == pytest.approx(natural[0], abs=1) and abs(shown["y"] - query_box["y"]) < 80
            assert "Selected result:" in page.locator("#selected-caption").inner_text()
            assert page.locator("#download-csv").is_visible() and page.locator("#download-zip").is_visible()
            assert page.locator("#download-csv").is_enabled() and page.locator("#download-zip").is_enabled()
            page.screenshot(path=str(tmp_path / "screenshot.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "screenshot.png").stat().st_size > 10_000
    shutil.copyfile(tmp_path / "screenshot.png", SHARED_SCREENSHOT)


@pytest.mark.browser
def test_tiff_query_shows_a_png_preview(server, tmp_path):
    from playwright.sync_api import sync_playwright

    url, query, _ = server
    tiff = tmp_path / "query.tif"
    Image.open(query).convert("RGB").save(tiff)
    with sync_playwright() as p:
        browser = _chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.wait_for_selector("#search-button", timeout=60_000)
            page.locator("#query input[type=file]").set_input_files(str(tiff))
            page.wait_for_function(
                "(() => { const i = document.querySelector('#query img');"
                " return i && i.complete && i.naturalWidth > 0 && /\\.png/.test(i.src); })()",
                timeout=60_000,
            )
            assert page.locator("#query img").evaluate("i => i.naturalWidth") == Image.open(tiff).width
        finally:
            browser.close()


@pytest.mark.browser
def test_starter_banner_on_a_phone(starter_server, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = _chromium(p)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)
            page.goto(starter_server)
            page.wait_for_selector("#search-button", timeout=60_000)
            info = page.locator("#gallery-info")
            # the page-load refresh of the personal-images line shows a timer until it answers
            page.wait_for_function(r"() => !/\d\.\ds/.test(document.querySelector('#gallery-info').innerText)")
            assert info.inner_text().strip() == (
                "This page runs on its built-in starter gallery, not on a diagnostic reference collection."
            )
            box = info.bounding_box()
            assert box["y"] + box["height"] < 844 / 2  # the headline is on the first half of the first screen
            assert page.get_by_text("More about this gallery").is_visible()
            assert not page.get_by_text("It holds", exact=False).first.is_visible()  # the details are folded
            page.get_by_text("More about this gallery").click()
            page.get_by_text("It holds", exact=False).first.wait_for(state="visible", timeout=10_000)
            page.get_by_text("More about this gallery").click()
            page.screenshot(path=str(tmp_path / "phone.png"), full_page=False)
        finally:
            browser.close()


def test_search_through_gradio_client(server):
    from gradio_client import Client, handle_file

    url, query, labels = server
    client = Client(url, verbose=False, download_files=False)
    returns = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/search"]["returns"]
    names = [r["label"] for r in returns]
    assert not any(n.startswith("value_") for n in names) and len(set(names)) == len(names) == 9
    gallery, votes, summary, _overview, seen, table, tile_table, csv_file, zip_file = client.predict(
        handle_file(str(query)), 5, app.ANY_LABEL, app.TILE_MODES[0], api_name="/search"
    )
    assert len(gallery) == 5 and all(item["caption"].split(" · ")[0] in labels for item in gallery)
    assert [row[0] for row in table["data"]] == [1, 2, 3, 4, 5]
    assert summary.startswith(("### Suggestion: **", "### Close call: ", "### No close match")), summary
    assert (votes is not None and votes.get("label") in labels) == summary.startswith("### Suggestion: **")
    assert len(seen) == 1 and tile_table["data"] in ([], [[""] * 6], [[None] * 6])
    import httpx

    text = httpx.get(csv_file["url"], timeout=30).text  # the same CSV the page's button gives
    import csv

    rows = list(csv.reader(text.splitlines()))
    verdict = ["verdict", "estimated precision", "close-match threshold", "close-match tiles"]
    assert rows[0] == ["rank", "label", "similarity", "tile", "gallery", "source"] + verdict
    # the CSV holds the plain headline; the page's Markdown escapes the labels' underscores
    assert summary.replace("\\", "").startswith(f"### {rows[1][6]}".replace("Suggestion: ", "Suggestion: **"))
    assert [r[:4] for r in rows[1:]] == [[str(v) for v in row[:4]] for row in table["data"]]
    assert not any(r[5].startswith("/") for r in rows[1:])  # no server paths
    assert zip_file["url"].endswith("results.zip")
    bad = client.predict(handle_file(__file__), 5, app.ANY_LABEL, app.TILE_MODES[0], api_name="/search")
    assert bad[2].startswith("⚠️ test_browser.py: not an image file")


# -- the personal gallery (run last: they add to the server's personal gallery) ---------------------

SHOTS = Path("/tmp/shots12b")


def personal_count(banner: str) -> int:
    """The "+ N personal images" of the gallery banner (0 when it has none)."""
    found = re.search(r"\+ (\d+) personal image", banner)
    return int(found.group(1)) if found else 0


def test_new_label_add_search_and_delete_through_gradio_client(server, tmp_path):
    from gradio_client import Client, handle_file

    url, query, labels = server
    client = Client(url, verbose=False, download_files=False)
    rng = np.random.default_rng(3)
    mine = [tmp_path / f"mus{i}.png" for i in range(2)]
    for path in mine:
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), np.uint8)).save(path)
    status, search_label, add_label, table, banner = client.predict(
        [handle_file(str(p)) for p in mine], "CRC muscle (MUS)", api_name="/add_images"
    )
    assert status.startswith("✅ Added 2 patches labelled **CRC muscle (MUS)**")
    assert "**+ 2 personal images**" in banner and [row[0] for row in table["data"]] == [0, 1]
    # A new client (another browser session) searches with the new label: no restart, no "not in the list".
    other = Client(url, verbose=False, download_files=False)
    label_update, _, table_now, _ = other.predict(api_name="/personal_images")
    assert "CRC muscle (MUS)" in [c[0] if isinstance(c, (list, tuple)) else c for c in label_update["choices"]]
    outputs = other.predict(handle_file(str(mine[1])), 3, "CRC muscle (MUS)", app.TILE_MODES[0], api_name="/search")
    results = outputs[5]  # the result details table (the 6th of the 9 named outputs)
    assert [row[1] for row in results["data"]] == ["CRC muscle (MUS)"] * 2
    assert results["data"][0][5] == "upload:mus1.png"
    status, *_ = other.predict([handle_file(str(mine[1]))], "CRC muscle (MUS)", api_name="/add_images")
    assert status.startswith("⚠️ Nothing added.\n\n**1 duplicate skipped:** mus1.png (already added on ")
    status, _, _, table, banner = other.predict("0", table_now, api_name="/delete_images")
    assert status == "Deleted 1 image (id 0) from your personal gallery."
    assert [row[3] for row in table["data"]] == ["upload:mus1.png"] and "**+ 1 personal image**" in banner
    # The README's call, without a table: ids are stable, so id 1 is still mus1.png.
    status, _, _, table, banner = other.predict("1, 5-7", None, api_name="/delete_images")
    assert status.startswith("⚠️ no image with id 5, 6, 7 in your personal gallery")
    status, _, _, table, banner = other.predict("1", None, api_name="/delete_images")
    assert status == "Deleted 1 image (id 1) from your personal gallery." and table["data"] in ([], [[]])


@pytest.mark.browser
def test_personal_gallery_table_after_a_delete_in_chromium(server, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is not installed (make chromium)")
    from playwright.sync_api import sync_playwright

    url, query, labels = server
    from skimage import data

    ihc, files = data.immunohistochemistry(), []  # real tissue (512 x 512), three 224 px crops
    for name, (y, x) in zip(("case12_a.png", "case12_b.png", "case12_c.png"), [(0, 0), (0, 288), (288, 144)]):
        Image.fromarray(ihc[y : y + 224, x : x + 224]).save(tmp_path / name)
        files.append(str(tmp_path / name))
    (tmp_path / "notes.txt").write_text("not an image")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1100})
            page.goto(url)
            page.wait_for_selector("#search-button", timeout=60_000)
            page.get_by_role("tab", name="Add your own images").click()
            table = page.locator("#personal-table")
            before = personal_count(page.locator("#gallery-info").inner_text())
            page.locator("#add-files input[type=file]").set_input_files([*files, str(tmp_path / "notes.txt")])
            page.locator("#add-label input").fill("case12 tumour")
            page.locator("#add-label input").press("Enter")
            page.click("#add-button")
            page.locator("#add-status").get_by_text("1 file skipped").wait_for(timeout=120_000)
            status = page.locator("#add-status").inner_text()
            assert status.startswith("⚠️ Added 3 patches labelled case12 tumour"), status
            assert "notes.txt: not an image file" in status
            table.get_by_text("upload:case12_c.png").wait_for(timeout=60_000)
            assert personal_count(page.locator("#gallery-info").inner_text()) == before + 3
            table.locator("[role=row]").filter(has_text="upload:case12_b.png").get_by_text("case12 tumour").click()
            page.wait_for_function("document.querySelector('#delete-ids textarea, #delete-ids input').value !== ''")
            page.click("#delete-button")  # first step: the page names what would go and deletes nothing
            page.locator("#delete-question").get_by_text("Delete 1 image from your personal gallery?").wait_for(
                timeout=60_000
            )
            assert "upload:case12_b.png" in page.locator("#delete-question").inner_text()
            assert "upload:case12_b.png" in table.inner_text()
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.locator("#delete-confirm").screenshot(path=str(SHOTS / "personal-gallery-confirm-delete.png"))
            page.click("#confirm-delete")
            page.locator("#add-status").get_by_text("Deleted 1 image").wait_for(timeout=60_000)
            page.locator("#delete-confirm").wait_for(state="hidden", timeout=60_000)
            table.get_by_text("upload:case12_b.png").wait_for(state="detached", timeout=60_000)
            text = table.inner_text()
            assert "upload:case12_a.png" in text and "upload:case12_c.png" in text
            assert table.locator("[role=row] img").count() >= 2  # thumbnails shown
            assert personal_count(page.locator("#gallery-info").inner_text()) == before + 2
            for close in page.locator(".toast-close").all():  # the warnings of the add, for the screenshot
                close.click()
            page.wait_for_timeout(1500)  # let them fade out
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOTS / "personal-gallery-after-delete.png"), full_page=True)
        finally:
            browser.close()
    assert (SHOTS / "personal-gallery-after-delete.png").stat().st_size > 10_000


@pytest.mark.browser
def test_search_tab_decodes_uploads_itself_in_chromium(server, tmp_path):
    """The browser upload reaches the app undecoded: a text file named .png gets the app's one-line
    message (not Gradio's "Error" and traceback), and an RGBA PNG's transparent half becomes white
    glass exactly as through the API (same top similarity)."""
    from gradio_client import Client, handle_file
    from playwright.sync_api import sync_playwright

    url, query, _ = server
    fake = tmp_path / "not_image.png"
    fake.write_text("this is a text file, not a PNG\n")
    rgba = np.asarray(Image.open(query).convert("RGBA")).copy()
    rgba[:, rgba.shape[1] // 2 :, 3] = 0  # the right half fully transparent
    transparent = tmp_path / "half_transparent.png"
    Image.fromarray(rgba, "RGBA").save(transparent)
    api = Client(url, verbose=False, download_files=False).predict(
        handle_file(str(transparent)), app.DEFAULT_K, app.ANY_LABEL, app.TILE_MODES[0], api_name="/search"
    )
    api_top = api[0][0]["caption"].split(" · ")[1]  # "sim 0.854"
    with sync_playwright() as p:
        browser = _chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.wait_for_selector("#search-button", timeout=60_000)
            page.locator("#query input[type=file]").set_input_files(str(fake))
            page.wait_for_timeout(1_000)
            page.click("#search-button")
            page.get_by_text("not an image file").first.wait_for(timeout=60_000)
            assert "not_image.png: not an image file" in page.locator("#summary").inner_text()
            toasts = page.locator(".toast-body").all_inner_texts()  # a warning, never an error naming a cache path
            assert page.locator(".toast-body.error").count() == 0 and not any("/tmp/gradio" in t for t in toasts)
            assert "Error" not in page.locator("#summary").inner_text()

            page.goto(url)
            page.wait_for_selector("#search-button", timeout=60_000)
            page.locator("#query input[type=file]").set_input_files(str(transparent))
            page.locator("#query img").first.wait_for(timeout=30_000)
            page.click("#search-button")
            page.wait_for_function(
                f"document.querySelectorAll('#results .thumbnail-item').length === {app.DEFAULT_K}", timeout=120_000
            )
            first = page.locator("#results .caption-label").first.inner_text().split(" · ")[1]
            assert first == api_top, (first, api_top)

            # a large image is searched as tiles: the Tile votes table appears, one row per tile
            large = tmp_path / "large.png"
            Image.open(query).convert("RGB").resize((700, 460)).save(large)
            page.locator("#query button[aria-label='Remove Image']").first.click()
            page.locator("#query input[type=file]").set_input_files(str(large))
            page.locator("#query img").first.wait_for(timeout=30_000)
            page.click("#search-button")
            page.locator("#tile-table").wait_for(state="visible", timeout=120_000)
            assert "searched as 12 tiles (224 px)" in page.locator("#summary").inner_text()  # 4 x 3, overlapping
        finally:
            browser.close()
