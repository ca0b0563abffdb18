"""Text from an index reaches the page as text: labels with markup, CSV cells that look like formulas."""

from __future__ import annotations

import csv
import io
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app
from index_build import starter
from index_build.display import csv_cell, escape_text
from index_build.index import build_index

CHROMIUM = Path("/usr/bin/chromium")
BEACON = "http://beacon.invalid/p.png"
CRAFTED = [
    f"<img src={BEACON} onerror=alert(1)>",
    "<script>alert(1)</script>",
    "[x](javascript:alert(1))",
    "benign\n### Suggestion: benign",
]


def test_escape_text_leaves_no_markup():
    assert escape_text("<img src=x onerror=alert(1)>") == "&lt;img src=x onerror=alert(1)&gt;"
    assert escape_text("[x](javascript:alert(1))") == "\\[x\\](javascript\\:alert(1))"
    assert escape_text("see http://a.b www.c.d e@f.g") == "see http\\://a.b www\\.c.d e\\@f.g"
    assert escape_text("a\n### Suggestion: benign") == "a ### Suggestion\\: benign"
    assert escape_text("colon_aca *bold* `code` a|b ~x~ \\") == "colon\\_aca \\*bold\\* \\`code\\` a\\|b \\~x\\~ \\\\"
    assert escape_text("CRC muscle (MUS) & 5") == "CRC muscle (MUS) &amp; 5"


def test_csv_cells_are_never_formulas():
    assert [csv_cell(v) for v in ["=1+1", "+1", "-2", "@SUM(A1)", "\tx", "ok", 3, "a=b"]] == [
        "'=1+1",
        "'+1",
        "'-2",
        "'@SUM(A1)",
        "'\tx",
        "ok",
        3,
        "a=b",
    ]


@pytest.fixture(scope="module")
def crafted_app(tmp_path_factory, tiny_embedder):
    """An app over an index whose labels and sources are markup and formulas."""
    tmp = tmp_path_factory.mktemp("crafted")
    images, _, _ = starter.starter_tiles()
    images = images[:8]
    labels = [CRAFTED[i % len(CRAFTED)] for i in range(8)]
    sources = [f'=HYPERLINK("{BEACON}")#{i}' for i in range(8)]
    build_index(
        starter.images_dataset(images, labels, sources), tmp / "index", tiny_embedder, num_workers=0, progress=False
    )
    search_app = app.SearchApp.create(index=str(tmp / "index"), data_dir=tmp / "data", embedder=tiny_embedder)
    query = tmp / "q.png"
    Image.fromarray(np.asarray(images[0])).save(query)
    return search_app, query


def test_search_summary_and_csv_of_a_crafted_index(crafted_app):
    search_app, query = crafted_app
    out = search_app.search(str(query), 8)
    for label in CRAFTED:
        assert label not in out.summary  # only its escaped form
    assert "<img" not in out.summary and "<script" not in out.summary and "[x](javascript" not in out.summary
    assert "\n### Suggestion: benign" not in out.summary and "\\[x\\](javascript\\:alert(1))" in out.summary
    rows = list(csv.reader(io.StringIO(Path(out.csv).read_text())))
    assert all(not cell.startswith(("=", "+", "-", "@")) for row in rows[1:] for cell in row)
    assert {row[5][:12] for row in rows[1:]} == {"'=HYPERLINK("}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.browser
def test_a_crafted_label_renders_as_text_in_chromium(crafted_app):
    """The summary Markdown of a search over the crafted index, rendered by Gradio in Chromium: the
    label shows as literal text and no request leaves for the beacon URL."""
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is not installed (make chromium)")
    import gradio as gr
    from playwright.sync_api import sync_playwright

    search_app, query = crafted_app
    summary = search_app.search(str(query), 8).summary
    with gr.Blocks() as demo:
        gr.Markdown(summary, elem_id="summary")
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    requests: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page()
                page.on("request", lambda request: requests.append(request.url))
                page.goto(f"http://127.0.0.1:{port}/")
                page.wait_for_selector("#summary", timeout=60_000)
                page.wait_for_timeout(1000)
                text = page.locator("#summary").inner_text()
                hrefs = page.eval_on_selector_all("#summary a", "links => links.map(a => a.href)")
                assert page.locator("#summary img").count() == 0 and not [
                    h for h in hrefs if "beacon" in h or "javascript" in h
                ]
                assert page.locator("#summary h3").count() == 1  # the real headline only
            finally:
                browser.close()
    finally:
        demo.close()
    assert f"<img src={BEACON} onerror=alert(1)>" in text or "<script>alert(1)</script>" in text
    assert not [url for url in requests if "beacon.invalid" in url]
