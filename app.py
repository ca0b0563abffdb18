"""LGFFEM Search: drop a tissue image, see the most similar patches of a reference collection.

Gradio Blocks app in three parts: handlers (methods of :class:`SearchApp`), the layout
(:func:`build_demo`), and the event wiring at the end of :func:`build_demo`. Retrieval lives in
``index_build``: every query is decoded, tiled, searched over the main and personal galleries,
merged and decided by the query core (:func:`index_build.search_core.run_query`, through
:meth:`index_build.galleries.Galleries.search`); this file checks the inputs and shows the results.

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
    TABLE_HEADERS,
    TILE_HEADERS,
    ResponseFiles,
    draw_tile_grid,
    index_info,
    plural,
    public_index_name,
    result_rows,
    result_summary,
    results_csv,
    source_root,
    tile_rows,
    tile_views,
    vote_shares,
    write_export,
)
from index_build.galleries import MAIN, StartupError, open_galleries
from index_build.query import MIN_SIDE, tiling_rule
from index_build.search_core import MAX_K, Query, check_k
from index_build.slide_page import SlidePage, max_slide_mb_default
from index_build.sources import check_source, env_model_revision, is_default_model
from index_build.starter import starter_description, write_starter_examples
from index_build.uploads import (
    MAX_ADD_PATCHES,
    MAX_PIXELS,
    MAX_UPLOAD_BYTES,
    InputError,
    check_label,
    colour_warning,
    configure_pillow,
    escape_markdown,
    file_path,
    list_errors,
    preview_png,
    upload_batch,
)

if TYPE_CHECKING:
    import torch

    from index_build.galleries import AddReport, Galleries
    from index_build.models import Embedder
    from index_build.patch_index import PatchIndex

logger = logging.getLogger(__name__)

DEFAULT_K = 8
ANY_LABEL = "(any label)"
TILE_MODES = ("tile large images", "whole image")
DEFAULT_DATA_DIR = Path(os.path.expanduser("~/.cache/lgffem"))
PERSONAL_HEADERS = ["id", "thumbnail", "label", "source", "added"]
PERSONAL_TYPES = ["number", "html", "str", "str", "str"]


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
    tile_table: list[list[Any]]  # one row per tile (TILE_HEADERS); empty for a query searched whole
    csv: Optional[str]  # path of results.csv (TABLE_HEADERS)
    archive: Optional[str]  # path of results.zip: the CSV, the query and the result thumbnails


class AddOutputs(NamedTuple):
    """What adding or deleting personal images returns, in the order of the page's output components."""

    status: str
    label_filter: Any
    """The search tab's label filter, with the labels of both galleries now."""
    add_label: Any
    """The label box of the add tab, with the same labels to pick from."""
    table: list[list[Any]]
    """The personal-gallery table (:meth:`SearchApp.personal_table`)."""
    banner: str
    """The gallery description at the top of the page, counting personal images."""


def parse_ids(text: Any) -> list[int]:
    """``"3, 5-7"`` -> ``[3, 5, 6, 7]`` (also a number or a list of numbers); :class:`InputError` if malformed."""
    if isinstance(text, (int, float)) and not isinstance(text, bool) and float(text).is_integer():
        return [int(text)]
    if isinstance(text, (list, tuple)):
        return sorted({i for item in text for i in parse_ids(item)})
    ids: set[int] = set()
    for part in str(text or "").replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        first, dash, last = part.partition("-")
        try:
            low, high = int(first), int(last if dash else first)
        except ValueError:
            raise InputError(f"ids must be numbers or ranges like '3, 5-7'; got {part!r}") from None
        if low < 0 or high < low or high - low > 100_000:
            raise InputError(f"ids must be numbers or ranges like '3, 5-7'; got {part!r}")
        ids.update(range(low, high + 1))
    return sorted(ids)


def when_added(iso: Optional[str]) -> str:
    """``2026-12-01T18:30:05+00:00`` -> ``2026-12-01 18:30 UTC``; ``"—"`` when unknown."""
    if not iso:
        return "—"
    date, _, clock = iso.partition("T")
    return f"{date} {clock[:5]} UTC" if clock else date


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
        # Dataset roots: the page shows file sources relative to them, never as server paths.
        self.roots = {MAIN: source_root(galleries.main.sources)}
        # Seconds per stage of the latest search (the core's, then "draw" and "export"), for the log
        # and benchmarks/bench_query.py; concurrent searches overwrite it.
        self.last_timings: dict[str, float] = {}

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
            info = index_info(public_index_name(index), main)
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
        """The label filter's choices: "(any label)" then every label of both galleries (read now)."""
        return [ANY_LABEL, *self.galleries.labels()]

    def banner(self) -> str:
        """The banner's first line (the rest is folded below it), with the personal images counted (read now)."""
        head = split_banner(self.index_info)[0]
        personal = self.personal_line()
        return f"{head}\n\n{personal}" if personal else head

    def personal_line(self) -> str:
        """The banner's personal-images line (read now); empty when there are none."""
        count = self.galleries.personal_count()
        if not count:
            return ""
        return (
            f"**+ {plural(count, 'personal image')}** added on this page (searched with it; see *Add your own images*)."
        )

    def personal_table(self) -> list[list[Any]]:
        """One row per personal image: id, thumbnail (an ``<img>`` with the JPEG inline), label, source, date added."""
        return [
            [
                row.id,
                f'<img src="data:image/jpeg;base64,{base64.b64encode(row.thumbnail).decode()}" '
                f'alt="{row.id}" width="64" height="64" style="object-fit:contain">'
                if row.thumbnail
                else "",
                row.label,
                row.source,
                when_added(row.added),
            ]
            for row in self.galleries.personal_rows()
        ]

    def refresh_page(self) -> AddOutputs:
        """On page load: labels, table and banner as they are now (other sessions may have added or deleted)."""
        return self._outputs("")

    # ---- search ------------------------------------------------------------------------

    def _embed_pixels(self, pixel_values: torch.Tensor) -> np.ndarray:
        return self.embedder.embed_pixels(pixel_values)

    def search(
        self,
        image: Optional[str],
        k: float = DEFAULT_K,
        label: Optional[str] = None,
        tiling: str = TILE_MODES[0],
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> SearchOutputs:
        """Search handler: decode, tile, embed, search both galleries, merge, caption, export.

        Args:
            image: path of the uploaded file (the app decodes it itself).
            k: number of results (1..50).
            label: only results with this label; ``None``, ``""`` or "(any label)": no filter.
            tiling: one of :data:`TILE_MODES`.
            progress: called as ``progress(tiles_done, tiles)`` while the tiles are embedded.

        Returns:
            A :class:`SearchOutputs`; on bad input the summary holds the message (also shown as a warning).
        """
        try:
            return self._search(image, k, label, tiling, progress)
        except InputError as err:
            logger.info("rejected query: %s", err)
            gr.Warning(str(err))
            return SearchOutputs([], None, f"⚠️ {err}", None, [], [], [], None, None)

    def _search(
        self,
        image: Optional[str],
        k: float,
        label: Optional[str],
        tiling: str,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> SearchOutputs:
        started = time.perf_counter()
        if image is None or (isinstance(image, str) and not image.strip()):
            raise InputError("No image yet: drop, paste or browse a tissue image first.")
        k_int = check_k(k)
        if tiling not in TILE_MODES:
            raise InputError(f"tiling must be one of {', '.join(TILE_MODES)}; got {tiling!r}")
        label = None if label in (None, "", ANY_LABEL) else str(label)
        choices = self.label_choices()
        if label is not None and label not in choices:
            raise InputError(f"label {label!r} is not in the gallery; choose one of: {', '.join(choices[1:])}")

        query_spec = Query.file(image, tile_large=tiling == TILE_MODES[0])
        found = self.galleries.search(query_spec, k_int, label, embed=self._embed, progress=progress)
        query = found.image
        notes = [note] if (note := colour_warning(query)) else []
        for note in notes:
            gr.Warning(note)
        if not found.hits:
            raise InputError(f"no gallery patch has the label {label!r}")
        shown = time.perf_counter()
        gallery, table = result_rows(found, self.roots)
        several = len(found.tiles) > 1
        overview = draw_tile_grid(
            found.work,
            found.tiles,
            votes=None if label is not None else found.tile_votes(),
            skipped=found.skipped,
        )
        tiles = tile_views(found, self.embedder.processor)
        drawn = time.perf_counter()
        csv_path, zip_path = write_export(
            self._responses.new_folder("export-"),
            results_csv(found, self.roots),
            query,
            [hit.thumbnail for hit in found.hits],
        )
        self.last_timings = {**found.timings, "draw": drawn - shown, "export": time.perf_counter() - drawn}
        elapsed = 1000 * (time.perf_counter() - started)
        logger.info(
            "search: %s px, %s (%d skipped), k=%d, %.0f ms (%s)",
            query.size,
            plural(len(found.tiles), "tile"),
            len(found.skipped),
            k_int,
            elapsed,
            ", ".join(f"{stage} {1000 * s:.0f}" for stage, s in self.last_timings.items()),
        )
        # No vote chart where it would read as a suggestion: a label filter (every result has that
        # label by construction) or no close match.
        no_chart = found.suggestion is None
        return SearchOutputs(
            gallery=gallery,
            votes=None if no_chart else vote_shares(found.votes),
            summary=result_summary(found, query.size, self.input_size, label, notes),
            overview=overview,
            tiles=tiles,
            table=table,
            tile_table=tile_rows(found, filtered=label is not None) if several else [],
            csv=csv_path,
            archive=zip_path,
        )

    def search_page(
        self,
        image: Optional[str],
        k: float = DEFAULT_K,
        label: Optional[str] = None,
        tiling: str = TILE_MODES[0],
        progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio injects a tracker for this default)
    ) -> SearchOutputs:
        """The page's search handler: :meth:`search` with every image written to a fresh, unique file,
        and the tiles' embedding reported to ``progress``.

        Gradio caches a returned PIL image under a name made from its content and rewrites that file
        on every response holding the same image, while an earlier response may still be sending it
        (h11: "Too little data for declared Content-Length"). A file path is copied into the cache
        atomically and never rewritten, so each response gets files of its own.
        """

        def report(done: int, total: int) -> None:
            progress((done, total), desc=f"embedding {plural(total, 'tile')}", unit="tiles")

        out = self.search(image, k, label, tiling, report)
        to_file = self._responses.writer()
        return out._replace(
            gallery=[(to_file(picture), caption) for picture, caption in out.gallery],
            overview=to_file(out.overview),
            tiles=[(to_file(picture), caption) for picture, caption in out.tiles],
        )

    def preview(self, image: Optional[str]) -> Any:
        """Upload handler: a PNG copy of a query the browser cannot show (TIFF), else the upload itself.

        Never ``gr.skip()`` for an upload: Gradio answers any update of a component by rebuilding it in
        the session from its class, which would drop :func:`uploaded_image`'s undecoded preprocessing
        (the next search would then be decoded by Gradio: a text file named .png gave a traceback)."""
        if not image:
            return gr.skip()
        png = preview_png(image, str(self._responses.new_folder("preview-")))
        return png if png is not None else image

    def select_result(self, evt: gr.SelectData) -> tuple[Optional[str], str, Any]:
        """Result-click handler: the clicked result at its full stored resolution, its caption, and
        the column that shows them made visible (hidden until a result is clicked)."""
        value = evt.value if isinstance(evt.value, dict) else {}
        image = value.get("image") or {}
        path = image.get("path") if isinstance(image, dict) else None
        return path, f"**Selected result:** {value.get('caption') or ''}", gr.update(visible=True)

    # ---- add your own images -----------------------------------------------------------

    def _add_patches(
        self, images: list[Image.Image], labels: list[str], sources: list[str], hashes: list[str]
    ) -> AddReport:
        return self.galleries.add_new(images, labels, sources, hashes)

    def _outputs(self, status: str) -> AddOutputs:
        labels = self.label_choices()
        return AddOutputs(
            status,
            gr.update(choices=labels),
            gr.update(choices=labels[1:]),
            self.personal_table(),
            self.personal_line(),
        )

    def add_images(self, files: Optional[Sequence[Any]], label: Optional[str]) -> AddOutputs:
        """Add-your-own-images handler: decode the files (images or zips), skip duplicates, tile, append, persist.

        Args:
            files: uploaded file paths (images and/or .zip archives of images).
            label: the label for all of them (one of the galleries' labels or a new one).

        Returns:
            An :class:`AddOutputs`: a status message (✅ when everything was added, ⚠️ with one line
            per skipped file otherwise, also shown as a warning), the updated labels, table and banner.
        """
        from index_build.storage import IndexBusyError

        try:
            status = self._add_images(files, label)
        except (InputError, IndexBusyError) as err:
            status = f"⚠️ {err}"
        if status.startswith("⚠️"):
            gr.Warning(_toast(status))
        return self._outputs(status)

    def _add_images(self, files: Optional[Sequence[Any]], label: Optional[str]) -> str:
        label = check_label(label, reserved=(ANY_LABEL,))
        paths = [file_path(f) for f in (files or [])]
        if not paths:
            raise InputError("no files: upload one or more images, or a .zip of images")
        batch = upload_batch(paths, self.input_size, MAX_ADD_PATCHES)
        report = None
        if batch.patches:
            report = self._add(batch.patches, [label] * len(batch.patches), batch.sources, batch.hashes)
            logger.info("added %d patches labelled %r to %s", report.added, label, self.personal_dir)
        problems = []
        if batch.skipped:
            n = len(batch.skipped)
            problems.append(f"**{plural(n, 'file')} skipped:**\n\n{list_errors(batch.skipped)}")
        earlier_adds = report.duplicates if report else []
        duplicates = [
            f"{escape_markdown(source.removeprefix('upload:'))} (already added on {when_added(added)} as "
            f"{escape_markdown(earlier)})"
            for source, earlier, added in earlier_adds
        ]
        duplicates += [
            f"{escape_markdown(name)} (same image as {escape_markdown(first)} in this batch)"
            for name, first in batch.repeated
        ]
        if duplicates:
            n = len(duplicates)
            problems.append(f"**{n} duplicate{'s' if n != 1 else ''} skipped:** {', '.join(duplicates)}")
        details = "\n\n" + "\n\n".join(problems) if problems else ""
        if report is None or not report.added:
            if batch.skipped and not duplicates:
                raise InputError(f"none of the files could be added.{details}")
            return f"⚠️ Nothing added.{details}"
        n = report.added
        added = (
            f"Added {n} patch{'es' if n != 1 else ''} labelled **{label}** to your personal "
            f"gallery ({report.total} in all); they are searched together with the gallery from now on, "
            "also after a restart."
        )
        return f"⚠️ {added}{details}" if problems else f"✅ {added}"

    def delete_images(self, ids: Any, table: Any = None) -> AddOutputs:
        """Delete personal images by id (written atomically, under the gallery's writer lock).

        Args:
            ids: ``"3, 5-7"``, a number or a list of numbers: ids of the personal-gallery table
                (stable: a delete never renumbers them and an id is never given to another image).
            table: optional, the table as ``/personal_images`` returned it (its ``id`` and ``source``
                columns); when given, nothing is deleted if those rows show other sources now.
        """
        from index_build.patch_index import IndexChangedError
        from index_build.storage import IndexBusyError

        try:
            wanted = _wanted_ids(ids)
            shown = {int(row[0]): str(row[3]) for row in _table_rows(table)}
            expected = {i: shown[i] for i in wanted if i in shown} if shown else None
            deleted = self.galleries.delete(wanted, expected)
            logger.info("deleted %d personal patches (ids %s) from %s", deleted, wanted, self.personal_dir)
            which = f"ids {_id_list(wanted)}" if len(wanted) > 1 else f"id {wanted[0]}"
            status = f"Deleted {deleted} image{'s' if deleted != 1 else ''} ({which}) from your personal gallery."
        except (InputError, ValueError, IndexChangedError, IndexBusyError) as err:
            gr.Warning(str(err))
            status = f"⚠️ {err}"
        return self._outputs(status)

    def ask_delete(self, ids: Any) -> tuple[str, Any]:
        """The page's first step of a delete: name what would go and ask to confirm (nothing is deleted here).

        Returns the question (Markdown) and the visibility of the confirmation row."""
        try:
            wanted = _wanted_ids(ids)
        except (InputError, ValueError) as err:
            gr.Warning(str(err))
            return f"⚠️ {err}", gr.update(visible=False)
        rows = {row.id: row for row in self.galleries.personal_rows()}
        missing = [i for i in wanted if i not in rows]
        if missing:
            message = f"no personal image has id {_id_list(missing)} (the table shows the ids there are)"
            gr.Warning(message)
            return f"⚠️ {message}", gr.update(visible=False)
        shown = wanted[:10]
        lines = "\n".join(
            f"- id {i}: {escape_markdown(str(rows[i].label))}, {escape_markdown(str(rows[i].source))}" for i in shown
        )
        more = f"\n- and {len(wanted) - len(shown)} more" if len(wanted) > len(shown) else ""
        question = (
            f"**Delete {plural(len(wanted), 'image')} from your personal gallery?** This cannot be undone.\n\n"
            f"{lines}{more}"
        )
        return question, gr.update(visible=True)

    @staticmethod
    def select_row(ids: Optional[str], evt: gr.SelectData) -> str:
        """Clicking a row of the personal-gallery table adds its id to the ids box (a second click removes it)."""
        row = evt.row_value if evt.row_value else None
        if not row:
            return ids or ""
        chosen = parse_ids(ids)
        picked = int(row[0])
        chosen = [i for i in chosen if i != picked] if picked in chosen else sorted([*chosen, picked])
        return _id_list(chosen)


def _toast(status: str) -> str:
    """A status message as a short plain-text warning: its first paragraph and the headings of the lists below."""
    first, *rest = status.removeprefix("⚠️ ").split("\n\n")
    headings = [part.split(":**", 1)[0].strip("*") for part in rest if part.startswith("**")]
    text = first.replace("**", "")
    return f"{text} {', '.join(headings)}: see the list on the page." if headings else text


def _wanted_ids(ids: Any) -> list[int]:
    """The ids of a delete (:func:`parse_ids`); none at all is an :class:`InputError`."""
    wanted = parse_ids(ids)
    if not wanted:
        raise InputError("no ids: click rows of the table or type ids like '3, 5-7'")
    return wanted


def _id_list(ids: Sequence[int]) -> str:
    return ", ".join(str(i) for i in ids)


def _table_rows(table: Any) -> list[list[Any]]:
    """The rows of a table as Gradio passes it (list of lists, a ``{"data": ...}`` dict or a DataFrame)."""
    if table is None:
        return []
    if isinstance(table, dict):
        table = table.get("data") or []
    if hasattr(table, "values") and hasattr(table, "columns"):
        table = table.values.tolist()
    return [list(row) for row in table if len(row) >= 4 and str(row[0]).strip() not in ("", "nan")]


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
#results .thumbnail-item, #seen .thumbnail-item {
  aspect-ratio: auto; height: auto; display: flex; flex-direction: column; overflow: visible;
}
#results .thumbnail-item img, #seen .thumbnail-item img {
  aspect-ratio: 1 / 1; width: 100%; height: auto; object-fit: contain;
}
#results .caption-label, #seen .caption-label {
  position: static; max-width: 100%; white-space: normal; overflow-wrap: anywhere; opacity: 1;
  border: none; border-top: 1px solid var(--border-color-primary); border-radius: 0;
}
#results .grid-container, #seen .grid-container { grid-auto-rows: auto; }
@media (max-width: 640px) { #selected-column { order: 3; } #controls-column { order: 2; } }
#selected img { width: auto !important; height: auto !important; max-width: 100%; max-height: 100%; margin: auto; }
"""


def split_banner(info: str) -> tuple[str, str]:
    """The gallery banner split into its first paragraph (always shown) and the rest (folded)."""
    head, _, rest = info.partition("\n\n")
    return head, rest.strip()


def build_demo(app: SearchApp) -> gr.Blocks:
    """The Gradio page for ``app``: search tab, add-your-own-images tab, about tab."""
    size = app.input_size
    with gr.Blocks(title="LGFFEM Search") as demo:
        gr.Markdown("# LGFFEM Search: similar tissue patches")
        with gr.Column(elem_id="gallery-info", variant="compact"):
            gr.Markdown(split_banner(app.index_info)[0])
            # the personal-images line is its own component: refreshed on page load, add and delete
            # without a progress indicator over the line above
            banner = gr.Markdown(app.personal_line(), elem_id="personal-info")
        details = split_banner(app.index_info)[1]
        if details:
            with gr.Accordion("More about this gallery", open=False, elem_id="gallery-details"):
                gr.Markdown(details)
        with gr.Tab("Search"):
            with gr.Row():
                with gr.Column(scale=1, min_width=240):
                    query = uploaded_image(
                        label="Tissue image: drop, paste or browse (PNG, JPEG, TIFF)",
                        sources=["upload", "clipboard"],
                        height=300,
                        elem_id="query",
                    )
                with gr.Column(scale=1, min_width=240, elem_id="selected-column", visible=False) as selected_column:
                    selected = gr.Image(
                        label="Result at full stored resolution (click a result)",
                        type="filepath",
                        interactive=False,
                        height=300,
                        elem_id="selected",
                    )
                    selected_caption = gr.Markdown(elem_id="selected-caption")
                with gr.Column(scale=1, min_width=240, elem_id="controls-column"):
                    if app.examples:
                        gr.Examples(
                            [[path] for path in app.examples],
                            inputs=[query],
                            cache_examples=False,
                            label="Examples (from the starter image)",
                        )
                    k = gr.Slider(1, MAX_K, value=DEFAULT_K, step=1, label="k (number of results)")
                    label = gr.Dropdown(
                        app.label_choices(), value=ANY_LABEL, label="Only results with label", allow_custom_value=True
                    )
                    tiling = gr.Radio(
                        list(TILE_MODES), value=TILE_MODES[0], label=f"Images larger than {int(1.5 * size)} px"
                    )
                    button = gr.Button("Search", variant="primary", elem_id="search-button")
            with gr.Row():
                with gr.Column(scale=2):
                    summary = gr.Markdown(label="Summary", elem_id="summary")
                    results = gr.Gallery(
                        label="Most similar patches",
                        columns=4,
                        height="auto",
                        fit_columns=False,
                        allow_preview=False,
                        elem_id="results",
                    )
                with gr.Column(scale=1, min_width=240):
                    votes = gr.Label(label="Vote shares", num_top_classes=10, elem_id="votes")
                    with gr.Row():
                        # not live before a search has something to download (the search turns them on)
                        csv_file = gr.DownloadButton(
                            "Download results (CSV)", interactive=False, elem_id="download-csv"
                        )
                        zip_file = gr.DownloadButton("Download images (zip)", interactive=False, elem_id="download-zip")
            with gr.Row():
                overview = gr.Image(
                    label="Query with its tiles (colour: the tile's vote)",
                    type="pil",
                    interactive=False,
                    height=420,
                    elem_id="overview",
                )
                seen = gr.Gallery(
                    label="What the model saw (per tile)", columns=4, height=420, fit_columns=False, elem_id="seen"
                )
            with gr.Accordion("Tile votes (tiled searches)", open=True, visible=False) as tile_box:
                tile_table = gr.Dataframe(
                    headers=TILE_HEADERS, label="Tile votes", interactive=False, elem_id="tile-table"
                )
            with gr.Accordion("Result details", open=False):
                table = gr.Dataframe(headers=TABLE_HEADERS, label="Result details", interactive=False, elem_id="table")
            gr.Markdown(f"**How large images are searched.** {tiling_rule(size)}")
        with gr.Tab("Add your own images"):
            gr.Markdown(
                "Upload patches (PNG, JPEG, TIFF) or a .zip of them with one label. They are added to your "
                "personal gallery, kept on this server's disk and searched together with the gallery, also "
                "after a restart. Large images are cut into tiles by the same rule as queries; an image "
                "already in the gallery (same pixels) is skipped. The personal gallery belongs to this server "
                "and to the gallery it extends (another index served here has its own): everyone using this "
                "page searches it."
            )
            files = gr.File(label="Images or .zip", file_count="multiple", type="filepath", elem_id="add-files")
            new_label = gr.Dropdown(
                app.label_choices()[1:],
                value=None,
                label="Label (pick one or type a new one)",
                allow_custom_value=True,
                elem_id="add-label",
            )
            add_button = gr.Button("Add to my gallery", elem_id="add-button")
            add_status = gr.Markdown(elem_id="add-status")
            gr.Markdown("### Your personal images\nClick rows (or type ids), then *Delete…*, and confirm.")
            personal_table = gr.Dataframe(
                value=app.personal_table(),
                headers=PERSONAL_HEADERS,
                datatype=PERSONAL_TYPES,
                type="array",
                interactive=False,
                column_widths=["8%", "14%", "24%", "34%", "20%"],
                elem_id="personal-table",
            )
            with gr.Row():
                delete_ids = gr.Textbox(label="Ids to delete", placeholder="e.g. 3, 5-7", elem_id="delete-ids")
                delete_button = gr.Button("Delete…", variant="stop", elem_id="delete-button")
            with gr.Column(visible=False, elem_id="delete-confirm") as confirm_row:
                confirm_text = gr.Markdown(elem_id="delete-question")
                with gr.Row():
                    confirm_button = gr.Button("Yes, delete", variant="stop", elem_id="confirm-delete")
                    cancel_button = gr.Button("Cancel", elem_id="cancel-delete")
                # the API's optional second argument (the table as /personal_images returned it); ids are
                # stable, so the page itself needs no guard: a hidden JSON value that accepts None
                delete_guard = gr.JSON(value=None, visible=False)
        SlidePage(
            app.galleries,
            app._embed,
            getattr(app, "max_slide_mb", None),
            app._responses,
            slides_root=getattr(app, "slides_root", None),
        ).build()
        with gr.Tab("About"):
            gr.Markdown(
                "Embeddings from the Local–Global Feature Fusion Embedding Model (LGFFEM; Nuñez-Fernández, "
                "Farias, Solar, *Sensors* 2025, 25(5):1350), cosine similarity in a FAISS index. "
                f"Model: `{app.embedder.model_id}` on `{app.embedder.device}`, {app.embedder.dim}-d "
                f"embeddings, {size} px input. {HOW_TO_LOAD} Accepted images: at least {MIN_SIDE} px on each "
                f"side, at most {MAX_PIXELS / 1e6:.0f} megapixels and {MAX_UPLOAD_BYTES // 2**20} MB. "
                "A research tool, not a diagnostic device."
            )

        searched = button.click(
            app.search_page,
            inputs=[query, k, label, tiling],
            outputs=[results, votes, summary, overview, seen, table, tile_table, csv_file, zip_file],
            api_name="search",
        )
        # the Tile votes table only when the query was tiled (a single patch has no tile votes); the
        # Download buttons live only when there is something to download
        searched.then(
            lambda rows, csv_path, zip_path: (
                gr.update(visible=bool(_table_rows(rows))),
                gr.update(interactive=bool(csv_path)),
                gr.update(interactive=bool(zip_path)),
            ),
            inputs=[tile_table, csv_file, zip_file],
            outputs=[tile_box, csv_file, zip_file],
            api_visibility="private",
        )
        query.upload(app.preview, inputs=[query], outputs=[query], api_name=False)
        results.select(
            app.select_result, inputs=None, outputs=[selected, selected_caption, selected_column], api_name=False
        )
        gallery_outputs = [label, new_label, personal_table, banner]
        add_button.click(
            app.add_images, inputs=[files, new_label], outputs=[add_status, *gallery_outputs], api_name="add_images"
        )
        # two steps on the page: name what would go, then delete on "Yes, delete" (the API deletes at once)
        delete_button.click(
            app.ask_delete, inputs=[delete_ids], outputs=[confirm_text, confirm_row], api_visibility="private"
        )
        cancel_button.click(lambda: gr.update(visible=False), outputs=[confirm_row], api_visibility="private")
        confirm_button.click(
            app.delete_images,
            inputs=[delete_ids, delete_guard],
            outputs=[add_status, *gallery_outputs],
            api_name="delete_images",
        ).then(lambda: ("", gr.update(visible=False)), outputs=[delete_ids, confirm_row], api_visibility="private")
        personal_table.select(app.select_row, inputs=[delete_ids], outputs=[delete_ids], api_visibility="private")
        demo.load(  # not queued: a queued load shows "queue: 1/1" over the banner while it waits
            lambda: app.refresh_page()[1:],
            outputs=gallery_outputs,
            api_name="personal_images",
            show_progress="hidden",
            queue=False,
        )
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
        default=env_model_revision(),
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
    parser.add_argument(
        "--slides-root",
        default=os.environ.get("LGFFEM_SLIDES_ROOT") or None,
        help="folder of the source slides of a slide index: the Whole slide tab reads full-resolution views "
        "only from inside it (env LGFFEM_SLIDES_ROOT; default none: the stored tiles are shown)",
    )
    args = parser.parse_args(argv)
    if args.slides_root is not None and not os.path.isdir(os.path.expanduser(args.slides_root)):
        parser.error(f"--slides-root is not a folder: {args.slides_root}")
    if args.concurrency < 1 or args.max_queue < 1 or args.max_slide_mb < 1:
        parser.error("--concurrency, --max-queue and --max-slide-mb must be at least 1")
    try:  # a bad path is an argument error, reported before the model is loaded
        if not is_default_model(args.model):
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
    app.slides_root = os.path.expanduser(args.slides_root) if args.slides_root else None
    demo = build_demo(app)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=args.max_queue)
    # Gradio's limit is the largest upload of any tab; the Search and Add tabs check their own (MAX_UPLOAD_BYTES).
    max_bytes = max(MAX_UPLOAD_BYTES, args.max_slide_mb * 2**20)
    demo.launch(server_name=args.host, server_port=args.port, max_file_size=max_bytes, css=CSS, show_error=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
