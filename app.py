"""LGFFEM Search: drop a tissue image, see the most similar patches of a reference collection.

Gradio Blocks app in three parts: handlers (methods of :class:`SearchApp`), the layout
(:func:`build_demo`), and the event wiring at the end of :func:`build_demo`. Retrieval lives in
``index_build``: uploads are decoded by :mod:`index_build.uploads`, queries are tiled, searched
over the main and personal galleries and merged by :mod:`index_build.query` and
:mod:`index_build.galleries`; this file checks the inputs and shows the results.

Run ``python app.py --help`` for the options. Nothing heavy happens at import: the model and the
index are loaded by :meth:`SearchApp.create`, called from :func:`main` (or from tests).
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import sys
import tempfile
import time
import types
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Union

import gradio as gr
import numpy as np
from PIL import Image

from index_build.display import (
    HOW_TO_LOAD,
    ResponseFiles,
    draw_tile_grid,
    index_info,
    result_rows,
    result_summary,
    tile_views,
)
from index_build.galleries import StartupError, open_galleries
from index_build.query import MIN_SIDE, tiling_rule
from index_build.slide_page import SlidePage, max_slide_mb_default
from index_build.sources import check_source
from index_build.starter import starter_description, write_starter_examples
from index_build.uploads import (
    MAX_ADD_PATCHES,
    MAX_PIXELS,
    MAX_UPLOAD_BYTES,
    InputError,
    check_label,
    configure_pillow,
    decode_image,
    file_path,
    summarize_errors,
    upload_patches,
)

if TYPE_CHECKING:
    import torch

    from index_build.galleries import Galleries
    from index_build.models import Embedder
    from index_build.patch_index import PatchIndex

logger = logging.getLogger(__name__)

DEFAULT_K = 8
MAX_K = 50
ANY_LABEL = "(any label)"
TILE_MODES = ("tile large images", "whole image")
DEFAULT_DATA_DIR = Path(os.path.expanduser("~/.cache/lgffem"))
TABLE_HEADERS = ["rank", "label", "similarity", "tile", "gallery", "source"]


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def gpu(fn: Callable) -> Callable:
    """Decorate ``fn`` with ``spaces.GPU`` when the ``spaces`` package (ZeroGPU Spaces) is importable."""
    try:
        import spaces
    except ImportError:
        return fn
    logger.info("spaces package found: %s runs under spaces.GPU", fn.__name__)
    return spaces.GPU(fn)


# --------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------


class SearchOutputs(NamedTuple):
    """What one search returns, in the order of the page's output components."""

    gallery: list[tuple[Union[Image.Image, str], str]]
    votes: Optional[dict[str, float]]
    summary: str
    overview: Union[Image.Image, str, None]
    tiles: list[tuple[Union[Image.Image, str], str]]
    table: list[list[Any]]


class AddOutputs(NamedTuple):
    """What adding images returns: a status message and the label filter's new choices."""

    status: str
    label_filter: Any


class SearchApp:
    """The app's state (model, galleries) and its event handlers.

    Args:
        galleries: the main and personal galleries, with their model.
        data_dir: where the personal gallery (and the starter gallery) are kept.
        index_info: Markdown describing the gallery, shown at the top of the page.
    """

    def __init__(self, galleries: Galleries, data_dir: Path, index_info: str) -> None:
        self.galleries = galleries
        self.embedder = galleries.embedder
        self.data_dir = Path(data_dir)
        self.index_info = index_info
        self.examples: list[str] = []  # example query files shown under the upload box
        self._embed = gpu(self._embed_pixels)
        self._add = gpu(self._add_patches)
        self._responses = ResponseFiles()  # see :meth:`search_page`

    @classmethod
    def create(
        cls,
        model: Optional[str] = None,
        index: Optional[str] = None,
        data_dir: Optional[Union[str, Path]] = None,
        device: Optional[str] = None,
        index_revision: Optional[str] = None,
        embedder: Optional[Embedder] = None,
        model_revision: Optional[str] = None,
    ) -> SearchApp:
        """Load the model and the galleries (:func:`index_build.galleries.open_galleries`, whose
        docstring gives the arguments); build the starter gallery when no index is given.

        Raises:
            StartupError: the model or index cannot be loaded, or they do not match.
        """
        galleries, index = open_galleries(
            model, index, data_dir, device, index_revision, embedder, model_revision, DEFAULT_DATA_DIR
        )
        main, size = galleries.main, galleries.embedder.config.image_size
        if index is None:
            info = starter_description(len(main), Counter(main.row_labels), size, HOW_TO_LOAD)
        else:
            info = index_info(index, main)
        app = cls(galleries, galleries.data_dir, info)
        if index is None:
            app.examples = write_starter_examples(galleries.data_dir / "examples")
        return app

    @property
    def index(self) -> PatchIndex:
        """The main gallery."""
        return self.galleries.main

    @property
    def personal(self) -> Optional[PatchIndex]:
        """The personal gallery (``None`` until the first addition)."""
        return self.galleries.personal

    @property
    def personal_dir(self) -> Path:
        """Where the personal gallery of this model lives."""
        return self.galleries.personal_dir

    @property
    def input_size(self) -> int:
        return int(self.embedder.config.image_size)

    def label_choices(self) -> list[str]:
        """The label filter's choices: "(any label)" then every label of both galleries."""
        return [ANY_LABEL, *self.galleries.labels()]

    # ---- search ------------------------------------------------------------------------

    def _embed_pixels(self, pixel_values: torch.Tensor) -> np.ndarray:
        return self.embedder.embed_pixels(pixel_values)

    def search(
        self, image: Optional[str], k: float = DEFAULT_K, label: Optional[str] = None, tiling: str = TILE_MODES[0]
    ) -> SearchOutputs:
        """Search handler: decode, tile, embed, search both galleries, merge, caption.

        Args:
            image: path of the uploaded file (the app decodes it itself).
            k: number of results (1..50).
            label: only results with this label; ``None``, ``""`` or "(any label)": no filter.
            tiling: one of :data:`TILE_MODES`.

        Returns:
            A :class:`SearchOutputs`; on bad input the summary holds the message (also shown as a warning).
        """
        try:
            return self._search(image, k, label, tiling)
        except InputError as err:
            logger.info("rejected query: %s", err)
            gr.Warning(str(err))
            return SearchOutputs([], None, f"⚠️ {err}", None, [], [])

    def _search(self, image: Optional[str], k: float, label: Optional[str], tiling: str) -> SearchOutputs:
        started = time.perf_counter()
        if image is None or (isinstance(image, str) and not image.strip()):
            raise InputError("No image yet: drop, paste or browse a tissue image first.")
        try:
            k_int = int(k)
        except (TypeError, ValueError) as err:
            raise InputError(f"k must be a whole number from 1 to {MAX_K}, got {k!r}") from err
        if k_int != k or not 1 <= k_int <= MAX_K:
            raise InputError(f"k must be a whole number from 1 to {MAX_K}, got {k!r}")
        if tiling not in TILE_MODES:
            raise InputError(f"tiling must be one of {', '.join(TILE_MODES)}; got {tiling!r}")
        label = None if label in (None, "", ANY_LABEL) else str(label)
        choices = self.label_choices()
        if label is not None and label not in choices:
            raise InputError(f"label {label!r} is not in the gallery; choose one of: {', '.join(choices[1:])}")

        query = decode_image(image)
        found = self.galleries.search(query, k_int, label, tile_large=tiling == TILE_MODES[0], embed=self._embed)
        if not found.hits:
            raise InputError(f"no gallery patch has the label {label!r}")
        gallery, table = result_rows(found)
        shares = {lab: n / sum(n for _, n in found.votes) for lab, n in found.votes}
        elapsed = 1000 * (time.perf_counter() - started)
        logger.info("search: %s px, %d tiles, k=%d, %.0f ms", query.size, len(found.tiles), k_int, elapsed)
        return SearchOutputs(
            gallery=gallery,
            votes=None if found.close_match is False else shares,  # no close match: no chart that reads as a suggestion
            summary=result_summary(found, query.size, self.input_size, label),
            overview=draw_tile_grid(found.work, found.tiles),
            tiles=tile_views(found, self.embedder.processor),
            table=table,
        )

    def search_page(
        self, image: Optional[str], k: float = DEFAULT_K, label: Optional[str] = None, tiling: str = TILE_MODES[0]
    ) -> SearchOutputs:
        """The page's search handler: :meth:`search` with every image written to a fresh, unique file.

        Gradio caches a returned PIL image under a name made from its content and rewrites that file
        on every response holding the same image, while an earlier response may still be sending it
        (h11: "Too little data for declared Content-Length"). A file path is copied into the cache
        atomically and never rewritten, so each response gets files of its own.
        """
        out = self.search(image, k, label, tiling)
        to_file = self._responses.writer()
        return out._replace(
            gallery=[(to_file(picture), caption) for picture, caption in out.gallery],
            overview=to_file(out.overview),
            tiles=[(to_file(picture), caption) for picture, caption in out.tiles],
        )

    # ---- add your own images -----------------------------------------------------------

    def _add_patches(self, images: list[Image.Image], labels: list[str], sources: list[str]) -> int:
        return self.galleries.add(images, labels, sources)

    def add_images(self, files: Optional[Sequence[Any]], label: Optional[str]) -> AddOutputs:
        """Add-your-own-images handler: decode the files (images or zips), tile, append, persist.

        Args:
            files: uploaded file paths (images and/or .zip archives of images).
            label: the label for all of them.

        Returns:
            An :class:`AddOutputs` with a status message and the updated label filter.
        """
        from index_build.storage import IndexBusyError

        try:
            status = self._add_images(files, label)
        except (InputError, IndexBusyError) as err:
            gr.Warning(str(err))
            status = f"⚠️ {err}"
        return AddOutputs(status, gr.update(choices=self.label_choices()))

    def _add_images(self, files: Optional[Sequence[Any]], label: Optional[str]) -> str:
        label = check_label(label, reserved=(ANY_LABEL,))
        paths = [file_path(f) for f in (files or [])]
        if not paths:
            raise InputError("no files: upload one or more images, or a .zip of images")
        patches, sources, skipped = upload_patches(paths, self.input_size, MAX_ADD_PATCHES)
        skipped_text = (" Skipped: " + summarize_errors(skipped)) if skipped else ""
        if not patches:
            raise InputError("none of the files could be added." + skipped_text)
        total = self._add(patches, [label] * len(patches), sources)
        logger.info("added %d patches labelled %r to %s", len(patches), label, self.personal_dir)
        return (
            f"✅ Added {len(patches)} patch{'es' if len(patches) != 1 else ''} labelled **{label}** to your personal "
            f"gallery ({total} in all, kept in `{self.personal_dir}`); they are searched together with the "
            f"gallery from now on, also after a restart.{skipped_text}"
        )


# --------------------------------------------------------------------------------------
# Layout and wiring
# --------------------------------------------------------------------------------------


def _undecoded_preprocess(component: gr.Image, payload: Any) -> Optional[str]:
    """``gr.Image.preprocess`` replacement: the upload's path, never opened (pasted data URLs are saved)."""
    if payload is None:
        return None
    if getattr(payload, "path", None):
        return str(payload.path)
    url = getattr(payload, "url", None) or ""
    if url.startswith("data:"):  # a pasted image sent inline
        try:
            data = base64.b64decode(url.split(",", 1)[1], validate=False)
        except (IndexError, ValueError) as err:
            raise gr.Error(f"could not read the pasted image: {err}") from err
        handle, path = tempfile.mkstemp(suffix=".upload", dir=component.GRADIO_CACHE)
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        return path
    return None


def uploaded_image(**kwargs: Any) -> gr.Image:
    """A ``gr.Image`` (drop, paste, browse) whose upload reaches the handler as an undecoded file path.

    Gradio's own preprocessing opens the file with Pillow before the handler runs, so a corrupt file or a
    decompression bomb would fail inside Gradio; here the handler gets the path and decodes it itself.
    (An instance override, not a subclass: Gradio writes a ``.pyi`` stub next to any module that
    subclasses a component.)
    """
    component = gr.Image(type="filepath", **kwargs)
    component.preprocess = types.MethodType(_undecoded_preprocess, component)
    return component


CSS = """
#results .caption-label { white-space: normal; }
"""


def build_demo(app: SearchApp) -> gr.Blocks:
    """The Gradio page for ``app``: search tab, add-your-own-images tab, about tab."""
    size = app.input_size
    with gr.Blocks(title="LGFFEM Search") as demo:
        gr.Markdown("# LGFFEM Search: similar tissue patches")
        gr.Markdown(app.index_info, elem_id="gallery-info")
        with gr.Tab("Search"):
            with gr.Row():
                with gr.Column(scale=1, min_width=300):
                    query = uploaded_image(
                        label="Tissue image: drop, paste or browse (PNG, JPEG, TIFF)",
                        sources=["upload", "clipboard"],
                        height=300,
                        elem_id="query",
                    )
                    if app.examples:
                        gr.Examples(
                            [[path] for path in app.examples],
                            inputs=[query],
                            cache_examples=False,
                            label="Examples (from the starter image)",
                        )
                    k = gr.Slider(1, MAX_K, value=DEFAULT_K, step=1, label="k (number of results)")
                    label = gr.Dropdown(app.label_choices(), value=ANY_LABEL, label="Only results with label")
                    tiling = gr.Radio(
                        list(TILE_MODES), value=TILE_MODES[0], label=f"Images larger than {int(1.5 * size)} px"
                    )
                    button = gr.Button("Search", variant="primary", elem_id="search-button")
                with gr.Column(scale=2):
                    summary = gr.Markdown(elem_id="summary")
                    results = gr.Gallery(
                        label="Most similar patches", columns=4, height="auto", fit_columns=False, elem_id="results"
                    )
                    votes = gr.Label(label="Majority vote (share of votes)", num_top_classes=10, elem_id="votes")
            with gr.Row():
                overview = gr.Image(
                    label="Query with its tiles", type="pil", interactive=False, height=420, elem_id="overview"
                )
                seen = gr.Gallery(
                    label="What the model saw (per tile)", columns=4, height=420, fit_columns=False, elem_id="seen"
                )
            with gr.Accordion("Result details", open=False):
                table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, elem_id="table")
            gr.Markdown(f"**How large images are searched.** {tiling_rule(size)}")
        with gr.Tab("Add your own images"):
            gr.Markdown(
                "Upload patches (PNG, JPEG, TIFF) or a .zip of them with one label. They are added to your "
                f"personal gallery in `{app.personal_dir}`, kept on disk and searched together with the "
                "gallery, also after a restart. Large images are cut into tiles by the same rule as queries. "
                "The personal gallery belongs to this server: everyone using this page searches it."
            )
            files = gr.File(label="Images or .zip", file_count="multiple", type="filepath", elem_id="add-files")
            new_label = gr.Textbox(label="Label", placeholder="e.g. case_2024_017_tumour", elem_id="add-label")
            add_button = gr.Button("Add to my gallery", elem_id="add-button")
            add_status = gr.Markdown(elem_id="add-status")
        SlidePage(app.galleries, app._embed, getattr(app, "max_slide_mb", None), app._responses).build()
        with gr.Tab("About"):
            gr.Markdown(
                "Embeddings from the Local–Global Feature Fusion Embedding Model (LGFFEM; Nuñez-Fernández, "
                "Farias, Solar, *Sensors* 2025, 25(5):1350), cosine similarity in a FAISS index. "
                f"Model: `{app.embedder.model_id}` on `{app.embedder.device}`, {app.embedder.dim}-d "
                f"embeddings, {size} px input. {HOW_TO_LOAD} Accepted images: at least {MIN_SIDE} px on each "
                f"side, at most {MAX_PIXELS / 1e6:.0f} megapixels and {MAX_UPLOAD_BYTES // 2**20} MB. "
                "A research tool, not a diagnostic device."
            )

        button.click(
            app.search_page,
            inputs=[query, k, label, tiling],
            outputs=[results, votes, summary, overview, seen, table],
            api_name="search",
        )
        add_button.click(app.add_images, inputs=[files, new_label], outputs=[add_status, label], api_name="add_images")
    return demo


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The app's command line (unknown options are an error)."""
    parser = argparse.ArgumentParser(description="LGFFEM Search: similar tissue patch search in the browser.")
    parser.add_argument(
        "--model",
        default=os.environ.get("LGFFEM_MODEL", "default"),
        help="'default' (offline model), a local model folder or a Hub model id (env LGFFEM_MODEL)",
    )
    parser.add_argument(
        "--model-revision",
        default=os.environ.get("LGFFEM_MODEL_REVISION") or None,
        help="branch, tag or commit of a Hub model; its code runs here, so pin a commit (env LGFFEM_MODEL_REVISION); "
        "default: the commit the index records",
    )
    parser.add_argument(
        "--index",
        default=os.environ.get("LGFFEM_INDEX"),
        help="index folder written by index_build, or a Hub dataset repo id holding one (env LGFFEM_INDEX); "
        "default: the built-in starter gallery",
    )
    parser.add_argument("--index-revision", default=None, help="branch, tag or commit of a Hub index repo")
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("LGFFEM_DATA_DIR", str(DEFAULT_DATA_DIR)),
        help="cache for the starter gallery and your personal gallery (env LGFFEM_DATA_DIR)",
    )
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--concurrency", type=int, default=2, help="searches run at the same time (queue workers)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting in the queue before refusing")
    parser.add_argument(
        "--max-slide-mb",
        type=int,
        default=max_slide_mb_default(),
        help="largest slide accepted by the Whole slide tab, in MB (env LGFFEM_MAX_SLIDE_MB; default 2048)",
    )
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.max_queue < 1 or args.max_slide_mb < 1:
        parser.error("--concurrency, --max-queue and --max-slide-mb must be at least 1")
    try:  # a bad path is an argument error, reported before the model is loaded
        if args.model not in (None, "", "default"):
            check_source(args.model, "model directory")
        if args.index:
            check_source(args.index, "index directory")
    except FileNotFoundError as err:
        parser.error(str(err))
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Start the app; returns the exit status (2 when the model or index cannot be used)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("faiss.loader", "httpx"):  # CPU-feature probing and per-request lines, not app events
        logging.getLogger(noisy).setLevel(logging.WARNING)
    configure_pillow()
    try:
        app = SearchApp.create(
            model=args.model,
            index=args.index,
            data_dir=args.data_dir,
            device=args.device,
            index_revision=args.index_revision,
            model_revision=args.model_revision,
        )
    except StartupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    app.max_slide_mb = args.max_slide_mb
    demo = build_demo(app)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=args.max_queue)
    # Gradio's limit is the largest upload of any tab; the Search and Add tabs check their own (MAX_UPLOAD_BYTES).
    max_bytes = max(MAX_UPLOAD_BYTES, args.max_slide_mb * 2**20)
    demo.launch(server_name=args.host, server_port=args.port, max_file_size=max_bytes, css=CSS, show_error=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
