"""Per-stage query times: the query core alone against the page handlers, side by side in one run.

Three queries: a 224 px patch, an 896 px image (16 tiles of 224 px) and a 4 x 4-tile slide region,
each searched with the default model over the starter gallery (built in ``--work`` on the first
run). For each, two ways:

- ``core``: :meth:`index_build.galleries.Galleries.search`, i.e. :func:`index_build.search_core.run_query`
  (for the region: the tiles read from the slide, then the core);
- ``handler``: the page's handler, as the ``/search`` API and the Search tab run it
  (:meth:`app.SearchApp.search_page`: decode, the core, tile grid, tile views, CSV and zip export,
  images written to response files), or the Whole slide tab's :meth:`SlidePage.search`;
- ``Chromium`` (``--browser``, images only): the app served on a local port, the file chosen in
  the page, *Search* clicked, until the k results are shown (upload, queue, transport, rendering).

Stages are the core's own timings (``decode``, ``tile``, ``embed``, ``search``, ``merge``; a
region's decode is reading its tiles from the slide) and the handler's ``draw`` and ``export``;
``other`` is the rest of the handler's wall time (writing the response images, checks, logging).
Every figure is the median of ``--repeats`` runs after one warm-up. ``not embed/search`` is the
share of the total outside the model's forward passes and the FAISS search (goal for the
handler: at most 20%).

Inputs come from ``../shared/data`` (the stain-normalisation target image, the CMU SVS); without
it synthetic tissue is used and the slide row is left out.

Usage::

    python benchmarks/bench_query.py                  # default model, 5 repeats
    python benchmarks/bench_query.py --repeats 3 --k 8
    python benchmarks/bench_query.py --browser        # and end to end in Chromium (images only)
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app import TILE_MODES, SearchApp  # noqa: E402
from index_build.search_core import Query  # noqa: E402
from index_build.slide_page import SlidePage, region_query  # noqa: E402
from index_build.slides import open_slide, read_tile, tile_slide  # noqa: E402
from index_build.tissue import MIN_TISSUE_FRACTION  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "slides"
COLUMNS = ("decode", "tile", "embed", "search", "merge", "draw", "export", "other")


def query_images(work: Path) -> dict[str, str]:
    """``{"224 px patch": path, "16-tile image": path}``: PNG files cut from real H&E, else synthetic."""
    source = SHARED / "target_image.png"
    if source.is_file():
        big = Image.open(source).convert("RGB").crop((0, 0, 896, 896))
    else:
        rng = np.random.default_rng(0)
        pixels = np.clip(rng.normal((190, 110, 160), 25, (896, 896, 3)), 0, 255).astype(np.uint8)
        big = Image.fromarray(pixels)
    paths = {"224 px patch": work / "patch.png", "16-tile image": work / "image.png"}
    big.crop((336, 336, 560, 560)).save(paths["224 px patch"])
    big.save(paths["16-tile image"])
    return {name: str(path) for name, path in paths.items()}


def median_row(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run.get(key, 0.0) for run in runs) for key in (*COLUMNS, "total")}


def time_image(app: SearchApp, path: str, k: int, repeats: int) -> tuple[dict, dict, int]:
    """Median stage times of the core and of the handler for one query file, and its tiles searched."""
    core_runs, handler_runs, searched = [], [], 0
    for run in range(repeats + 1):
        start = time.perf_counter()
        found = app.galleries.search(Query.file(path), k, embed=app._embed)
        core = {**found.timings, "total": time.perf_counter() - start}
        start = time.perf_counter()
        app.search_page(path, k, None, TILE_MODES[0], progress=lambda *a, **kw: None)
        total = time.perf_counter() - start
        handler = {**app.last_timings, "total": total}
        handler["other"] = total - sum(app.last_timings.values())
        if run:  # the first run warms up
            core_runs.append(core)
            handler_runs.append(handler)
        searched = len(found.searched)
    return median_row(core_runs), median_row(handler_runs), searched


def time_region(page: SlidePage, slide_path: Path, k: int, repeats: int) -> tuple[dict, dict, int]:
    """Median stage times of the core (tiles read from the slide, then the core) and of the tab's handler."""
    _, status, session = page.load(str(slide_path), 0, 4)
    if session is None:
        raise SystemExit(f"cannot load {slide_path}: {status}")
    mask = (np.load(session.mask), session.mask_scale)
    core_runs, handler_runs, searched = [], [], 0
    for run in range(repeats + 1):
        start = time.perf_counter()
        with open_slide(session.path) as slide:
            tissue, skipped = tile_slide(slide, page.mpp, page.tile_size, MIN_TISSUE_FRACTION, session.region, mask)
            crops = [read_tile(slide, tile, page.tile_size) for tile in tissue]
        read = time.perf_counter() - start
        ratio = page.tile_size / session.size0
        found = page.galleries.search(region_query(None, session.region, ratio, tissue, skipped, crops), k)
        core = {**found.timings, "decode": read, "total": time.perf_counter() - start}
        start = time.perf_counter()
        view = page.search(session, k)
        if view.session is None or not view.results:
            raise SystemExit(f"region search failed: {view.summary}")
        total = time.perf_counter() - start
        handler = {**page.last_timings, "total": total}
        handler["other"] = total - sum(page.last_timings.values())
        if run:
            core_runs.append(core)
            handler_runs.append(handler)
        searched = len(found.searched)
    return median_row(core_runs), median_row(handler_runs), searched


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


def time_browser(app: SearchApp, paths: list[str], k: int, repeats: int) -> list[float]:
    """Median seconds from choosing the file in Chromium to the k results shown, per query file (the
    app launched in this process, as ``python app.py`` serves it)."""
    import socket

    from playwright.sync_api import sync_playwright

    import app as app_module

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo = app_module.build_demo(app)
    demo.queue(default_concurrency_limit=2)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, css=app_module.CSS)
    medians = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                for path in paths:
                    runs = []
                    for run in range(repeats + 1):
                        page.goto(f"http://127.0.0.1:{port}/")
                        page.wait_for_selector("#search-button", timeout=120_000)
                        start = time.perf_counter()
                        page.locator("#query input[type=file]").set_input_files(path)
                        page.locator("#query img").first.wait_for(timeout=60_000)
                        page.click("#search-button")
                        page.wait_for_function(
                            f"document.querySelectorAll('#results .thumbnail-item').length === {k}", timeout=300_000
                        )
                        if run:
                            runs.append(time.perf_counter() - start)
                    medians.append(statistics.median(runs))
            finally:
                browser.close()
    finally:
        demo.close()
    return medians


def format_table(rows: list[tuple[str, str, dict]]) -> str:
    header = ["query", "way", *COLUMNS, "total", "not embed/search", "/ core"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    core_total: dict[str, float] = {}
    for name, way, row in rows:
        core_total.setdefault(name, row["total"]) if way == "core" else None
        outside = 1 - (row.get("embed", 0) + row.get("search", 0)) / max(row["total"], 1e-9)
        ratio = f"{row['total'] / core_total[name]:.2f}×" if way != "core" else ""
        cells = [f"{1000 * row[c]:.1f}" if c in row else "" for c in (*COLUMNS, "total")]
        share = f"{outside:.0%}" if "embed" in row else ""
        lines.append("| " + " | ".join([name, way, *cells, share, ratio]) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_query"))
    parser.add_argument("--model", default="default")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--browser", action="store_true", help="add the Chromium end-to-end time (file chosen to results shown)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)

    app = SearchApp.create(model=args.model, data_dir=args.work / "data")
    print(
        f"model {args.model}, starter gallery of {len(app.galleries.main)} patches, k={args.k}, "
        f"median of {args.repeats} runs (ms), torch threads {args.threads}, device {app.embedder.device}"
    )
    rows: list[tuple[str, str, dict]] = []
    images = query_images(args.work)
    browser = {}
    if args.browser and CHROMIUM.exists():
        browser = dict(zip(images, time_browser(app, list(images.values()), args.k, args.repeats)))
    elif args.browser:
        print(f"{CHROMIUM} not found: no Chromium rows")
    for name, path in images.items():
        core, handler, searched = time_image(app, path, args.k, args.repeats)
        label = f"{name} ({searched} tile{'s' if searched != 1 else ''})"
        rows += [(label, "core", core), (label, "handler", handler)]
        if name in browser:
            rows.append((label, "Chromium", {"total": browser[name]}))
    slide = SHARED / "cmu_small_region.svs"
    if slide.is_file():
        page = SlidePage(app.galleries, app._embed, max_slide_mb=100)
        core, handler, searched = time_region(page, slide, args.k, args.repeats)
        label = f"slide region 4×4 ({searched} tissue tiles)"
        rows += [(label, "core", core), (label, "handler", handler)]
    else:
        print(f"{slide} not found: no slide region row")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
