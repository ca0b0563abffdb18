"""A query result for people: the tile grid drawn on the query, what the model saw, captions and summary.

Pure functions of images, tiles and a :class:`~index_build.query.TiledResult` (no model, no
index), shared by the app and scripts; plus the page text of a loaded index and the fresh files a
web page's responses are written to (:class:`ResponseFiles`).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from index_build.inputs.text import code_text, csv_cell, escape_text
from index_build.query import Tile, TiledResult

if TYPE_CHECKING:
    import torch

    from index_build.patch_index import PatchIndex

__all__ = [
    "code_text",
    "csv_cell",
    "escape_text",
    "TABLE_HEADERS",
    "TILE_HEADERS",
    "VERDICT_HEADERS",
    "draw_tile_grid",
    "plural",
    "public_index_name",
    "public_source",
    "result_rows",
    "result_summary",
    "results_csv",
    "short_source",
    "source_root",
    "tensor_to_images",
    "tile_rows",
    "tile_views",
    "vote_shares",
    "write_export",
]

TABLE_HEADERS = ["rank", "label", "similarity", "tile", "gallery", "source"]
VERDICT_HEADERS = ["verdict", "estimated precision", "close-match threshold", "close-match tiles"]
TILE_HEADERS = ["tile", "position", "tissue", "top label", "top similarity", "vote"]
BLANK = "skipped (blank glass)"
MAX_RESPONSE_BYTES = 200 * 1024 * 1024  # all response and export files of one process, at most


def plural(n: int, word: str, many: Optional[str] = None) -> str:
    """``"1 tile"``, ``"3 tiles"`` (``many``: an irregular plural, e.g. ``"patches"``)."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def vote_shares(votes: Sequence[tuple[str, int]]) -> dict[str, float]:
    """Vote counts -> shares in whole percent that add up to exactly 100 (largest remainder).

    Each share is ``percent / 100``, so a page that rounds ``share * 100`` shows the same whole
    numbers; remainders that tie go to the label listed first (the one with more votes).
    """
    total = sum(n for _, n in votes)
    if total <= 0:
        return {}
    exact = [100 * n / total for _, n in votes]
    whole = [int(e) for e in exact]
    order = sorted(range(len(votes)), key=lambda i: (-(exact[i] - whole[i]), i))
    for i in order[: 100 - sum(whole)]:
        whole[i] += 1
    return {lab: w / 100 for (lab, _), w in zip(votes, whole)}


def _is_path(source: str) -> bool:
    return source.startswith(("/", "~", "\\\\")) or (len(source) > 2 and source[1] == ":" and source[2] in "/\\")


def source_root(sources: Sequence[str]) -> Optional[str]:
    """The folder all file-path sources of a gallery share (its dataset root), ``None`` when there are none.

    A single class folder would leave only file names, so the root is taken one level above the
    common folder of the files' folders.
    """
    folders = {os.path.dirname(s.replace("\\", "/")) for s in sources if _is_path(s)}
    if not folders:
        return None
    try:
        common = os.path.commonpath(sorted(folders))
    except ValueError:  # mixed drives
        return None
    return os.path.dirname(common) if len(folders) == 1 else common


def public_source(source: str, root: Optional[str] = None) -> str:
    """A source as a public page may show it: a file path relative to its dataset ``root`` (only the
    file name when it is outside the root), never an absolute server path; other sources unchanged."""
    if not _is_path(source):
        return source
    path = source.replace("\\", "/")
    if root and path.startswith(root.rstrip("/") + "/"):
        return path[len(root.rstrip("/")) + 1 :]
    return os.path.basename(path)


def public_index_name(spec: str) -> str:
    """The index as a public page may name it: a Hub dataset id as given, a local folder by its own name."""
    expanded = os.path.expanduser(spec)
    if os.path.isdir(expanded) or _is_path(spec):
        return os.path.basename(os.path.normpath(expanded)) or spec
    return spec


def tensor_to_images(pixel_values: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> list[Image.Image]:
    """Undo the processor's normalisation: N x 3 x S x S tensor -> what the model saw, as RGB images."""
    array = pixel_values.detach().to("cpu").float().numpy()
    array = array * np.asarray(std, np.float32)[:, None, None] + np.asarray(mean, np.float32)[:, None, None]
    array = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return [Image.fromarray(a) for a in array]


_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))
_GREY = (128, 128, 128)


def draw_tile_grid(
    image: Image.Image,
    tiles: Sequence[Tile],
    max_side: int = 1024,
    votes: Optional[Sequence[Optional[str]]] = None,
    skipped: Sequence[int] = (),
) -> Image.Image:
    """The working image with every tile outlined and numbered (single-tile queries: unchanged).

    With ``votes`` (one label or ``None`` per tile), each tile is drawn in its vote's colour, the
    ``skipped`` tiles in grey, and a legend of the colours is added below the image.
    """
    scale = min(1.0, max_side / max(image.size))
    canvas = image.resize((round(image.width * scale), round(image.height * scale))) if scale < 1.0 else image.copy()
    if len(tiles) == 1:
        return canvas
    labels = sorted({v for v in votes or () if v is not None})
    colour_of = {lab: _COLOURS[i % len(_COLOURS)] for i, lab in enumerate(labels)}
    font = ImageFont.load_default(size=max(12, round(min(canvas.size) / 40)))
    line_width = max(2, round(min(canvas.size) / 250))
    colours = [
        _COLOURS[(t.row + t.col) % len(_COLOURS)]
        if votes is None
        else _GREY
        if t.number in skipped or votes[i] is None
        else colour_of[votes[i]]
        for i, t in enumerate(tiles)
    ]
    if votes is not None:  # the vote map: the middle half of each tile tinted by its vote (neighbours never overlap)
        tint = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
        shade = ImageDraw.Draw(tint)
        for tile, colour in zip(tiles, colours):
            left, top, right, bottom = (v * scale for v in tile.box)
            dx, dy = (right - left) / 4, (bottom - top) / 4
            shade.rectangle(
                [round(left + dx), round(top + dy), round(right - dx), round(bottom - dy)], fill=colour + (90,)
            )
        canvas = Image.alpha_composite(canvas.convert("RGBA"), tint).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    for tile, colour in zip(tiles, colours):
        box = [round(v * scale) for v in tile.box]
        draw.rectangle([box[0] + 1, box[1] + 1, box[2] - 2, box[3] - 2], outline=colour, width=line_width)
        text = str(tile.number)
        left, top, right, bottom = draw.textbbox((box[0] + 4, box[1] + 3), text, font=font)
        draw.rectangle([left - 2, top - 2, right + 2, bottom + 2], fill=colour)
        draw.text((box[0] + 4, box[1] + 3), text, fill=(255, 255, 255), font=font)
    if votes is None:
        return canvas
    entries = [(colour_of[lab], f"vote {lab}") for lab in labels] + (
        [(_GREY, "skipped: blank glass")] if skipped else []
    )
    line = font.size + 10
    legend = Image.new("RGB", (canvas.width, line * len(entries) + 6), (255, 255, 255))
    pen = ImageDraw.Draw(legend)
    for row, (colour, text) in enumerate(entries):
        y = 4 + row * line
        pen.rectangle([6, y, 6 + font.size, y + font.size], fill=colour)
        pen.text((12 + font.size, y), text, fill=(0, 0, 0), font=font)
    out = Image.new("RGB", (canvas.width, canvas.height + legend.height), (255, 255, 255))
    out.paste(canvas, (0, 0))
    out.paste(legend, (0, canvas.height))
    return out


def short_source(source: str, keep: int = 2) -> str:
    """The last ``keep`` path components of a file source (Hub and other sources unchanged)."""
    parts = source.replace("\\", "/").split("/")
    return source if len(parts) <= keep else "…/" + "/".join(parts[-keep:])


SINGLE_RULE = (
    "The image is searched whole (resized to the model input). Suggestion: the majority label of the "
    "k results; a tie goes to the label ranked first."
)
TILED_RULE = (
    "**Best results** are the gallery patches most similar to any single tile (each with the tile that found "
    "it), while the **tile vote** counts, for every tile, the majority label of that tile's own k results, so a "
    "few tiles with very close matches can fill the results while most tiles vote for another label (see "
    "*Tile votes* below and *How large images are searched*)."
)

VERDICT_RULE = (
    "The verdict reads the 8 best hits of each tile: a suggestion when the precision this gallery's own "
    "leave-group-out search gives such evidence (vote share, similarity margin between the best two labels, "
    "best similarity) reaches 97%; tiles without a close match abstain, and tiles that surely name different "
    "labels make the query mixed (see *The verdict* in the README)."
)


def result_rows(
    found: TiledResult, roots: Optional[dict[str, Optional[str]]] = None
) -> tuple[list[tuple[Optional[Image.Image], str]], list[list[Any]]]:
    """Captioned thumbnails (``label · sim 0.912 · tile 3 · file name``) and table rows of the merged hits.

    Table rows are :data:`TABLE_HEADERS` (``rank, label, similarity, tile, gallery, source``), the
    similarity as text with 3 decimals and the source made public by :func:`public_source` with the
    hit's gallery root from ``roots``.
    """
    several = len(found.tiles) > 1
    roots = roots or {}
    gallery, table = [], []
    for rank, hit in enumerate(found.hits, start=1):
        where = "your images" if hit.gallery == "personal" else "gallery"
        source = public_source(hit.source, roots.get(hit.gallery))
        tile_text = f" · tile {hit.tile}" if several else ""
        gallery.append((hit.thumbnail, f"{hit.label} · sim {hit.score:.3f}{tile_text} · {source.rsplit('/', 1)[-1]}"))
        table.append([rank, hit.label, f"{hit.score:.3f}", hit.tile, where, source])
    return gallery, table


def tile_rows(found: TiledResult, filtered: bool = False) -> list[list[Any]]:
    """One row per tile (:data:`TILE_HEADERS`): number, grid position, tissue share, its best hit's
    label and similarity, and its vote (``"skipped (blank glass)"``; ``"-"`` when a label filter is on)."""
    rows = []
    for tile, hits, vote in zip(found.tiles, found.per_tile, found.tile_votes()):
        tissue = f"{found.tissue[tile.number - 1]:.0%}" if found.tissue is not None else "-"
        if tile.number in found.skipped:
            rows.append([tile.number, f"row {tile.row + 1}, col {tile.col + 1}", tissue, "-", "-", BLANK])
            continue
        top_label, top_score = (hits[0].label, f"{hits[0].score:.3f}") if hits else ("-", "-")
        rows.append(
            [
                tile.number,
                f"row {tile.row + 1}, col {tile.col + 1}",
                tissue,
                top_label,
                top_score,
                "-" if filtered or vote is None else vote,
            ]
        )
    return rows


def results_csv(found: TiledResult, roots: Optional[dict[str, Optional[str]]] = None) -> str:
    """The results as CSV text: a header (:data:`TABLE_HEADERS` + :data:`VERDICT_HEADERS`) and the rows of
    :func:`result_rows`, each followed by the search's verdict, its estimated precision, the close-match
    threshold and the share of tiles with a close match (the same on every row; empty with a label filter)."""
    v = found.verdict
    threshold = "" if found.threshold is None else f"{found.threshold:.3f}"
    tail = (
        [v.headline(), "" if v.precision is None else f"{v.precision:.3f}", threshold, f"{v.close_share:.3f}"]
        if v
        else ["", "", threshold, ""]
    )
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(TABLE_HEADERS + VERDICT_HEADERS)
    writer.writerows([csv_cell(cell) for cell in row + tail] for row in result_rows(found, roots)[1])
    return buffer.getvalue()


def write_export(
    folder: Path, csv_text: str, query: Image.Image, thumbnails: Sequence[Optional[Image.Image]]
) -> tuple[str, str]:
    """Write ``results.csv`` and ``results.zip`` (the CSV, ``query.png`` and ``result_01.png``, ... in
    rank order) into ``folder``; returns both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, zip_path = folder / "results.csv", folder / "results.zip"
    csv_path.write_text(csv_text, encoding="utf-8")
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:  # PNGs are stored: already compressed
        archive.writestr("results.csv", csv_text)
        for name, picture in [("query.png", query)] + [
            (f"result_{rank:02d}.png", thumb) for rank, thumb in enumerate(thumbnails, start=1)
        ]:
            if picture is not None:
                buffer = io.BytesIO()
                picture.save(buffer, format="PNG", compress_level=1)  # fast: it is written on every search
                archive.writestr(name, buffer.getvalue(), compress_type=zipfile.ZIP_STORED)
    return str(csv_path), str(zip_path)


def result_summary(
    found: TiledResult,
    query_size: tuple[int, int],
    size: int,
    label: Optional[str] = None,
    notes: Sequence[str] = (),
) -> str:
    """Markdown: the suggestion with its votes (and ties), the query's size and tiling, and the rule used.

    With a label filter there is no suggestion (every result has the label by construction): the
    headline says "Results within <label>". ``notes`` (e.g. a colour warning) come first.
    """
    votes, tiles, work = found.votes, found.tiles, found.work
    several = len(tiles) > 1
    size_text = f"{query_size[0]}×{query_size[1]} px"
    if several and work.size != tuple(query_size):
        size_text += f", shrunk to {work.width}×{work.height} px"
    below = (
        f"The best similarity, {found.best_score:.3f}, is below this gallery's close-match threshold "
        f"{found.threshold:.3f}: nothing here resembles the query as closely as the gallery's own patches "
        "resemble each other."
    )
    shares = vote_shares(votes)
    vote_text = (
        f"Votes ({found.unit}): {', '.join(f'{escape_text(lab)} {n} ({shares[lab]:.0%})' for lab, n in votes)}.  \n"
    )
    if label is not None:
        headline = (
            f"### Results within **{escape_text(label)}**\n"
            f"A label filter is on, so every result is `{code_text(label)}` by construction: this is not a suggestion "
            "(clear the filter to get one). " + (below if found.close_match is False else "") + "  \n"
        )
        vote_text = ""
    elif found.verdict is not None:  # the one decision (index_build.verdict): no separate vote line
        headline, vote_text = found.verdict.text() + "  \n", ""
    elif found.close_match is False:
        headline = (
            f"### No close match in this gallery\n{below} The nearest patches are shown for reference, "
            "not as a suggestion.  \n"
        )
    else:
        tied = [lab for lab, n in votes[1:] if n == votes[0][1]]
        tie_text = f", tied with {', '.join(map(escape_text, tied))} (tie broken by the rule below)" if tied else ""
        match_text = (
            f"Best similarity {found.best_score:.3f} (close-match threshold {found.threshold:.3f}).  \n"
            if found.close_match
            else ""
        )
        count = sum(n for _, n in votes)
        top = escape_text(votes[0][0])
        headline = f"### Suggestion: **{top}** ({votes[0][1]} of {count} {found.unit}){tie_text}\n" + match_text
    skipped_text = f", {len(found.skipped)} skipped as blank glass" if found.skipped else ""
    return (
        "".join(f"⚠️ {note}  \n" for note in notes)
        + headline
        + vote_text
        + f"Query: {size_text}, searched as {plural(len(tiles), 'tile')}"
        f"{' (' + str(size) + ' px)' if several else ''}{skipped_text}; "
        f"{plural(len(found.hits), 'result')}{' with label ' + escape_text(repr(label)) if label else ''}.  \n"
        + (f"_{TILED_RULE if several else SINGLE_RULE}_" if found.verdict is None else "")
        + (f"_{TILED_RULE}_  \n" if several and found.verdict is not None else "")
        + (f"_{VERDICT_RULE}_" if found.verdict is not None else "")
    )


def _tile_word(vote: Optional[str], hits: Sequence[Any], threshold: Optional[float]) -> str:
    """A tile's caption word: its vote, or "no close match" when its best hit is below the threshold."""
    if hits and threshold is not None and hits[0].score < threshold:
        return "no close match"
    return vote or "-"


def tile_views(found: TiledResult, processor: Any) -> list[tuple[Image.Image, str]]:
    """Every tile as the model saw it, captioned with its grid position and its own majority label."""
    size = int(processor.image_size)
    seen = tensor_to_images(found.pixel_values, processor.image_mean, processor.image_std)
    if len(found.tiles) == 1:
        return [(seen[0], f"query as the model saw it ({size}×{size})")]
    return [
        (
            image,
            f"tile {t.number} (row {t.row + 1}, col {t.col + 1}) → "
            f"{'skipped (blank glass)' if t.number in found.skipped else _tile_word(vote, hits, found.threshold)}",
        )
        for image, t, vote, hits in zip(seen, found.tiles, found.tile_votes(), found.per_tile)
    ]


# --------------------------------------------------------------------------------------
# Page text and response files
# --------------------------------------------------------------------------------------

HOW_TO_LOAD = (
    "To search a real reference collection, build an index with `index_build` (for example Kimia Path24C "
    "from its `s0..s23` folders, or PanNuke from the Hub with the tissue type as label; see the README) and "
    "start the app with `python app.py --index DIR` (or `LGFFEM_INDEX=DIR`; a Hub dataset repo id holding an "
    "index works too)."
)


def index_info(spec: str, index: PatchIndex) -> str:
    """Page text for a loaded index."""
    manifest = getattr(index, "manifest", {}) or {}
    model = manifest.get("model", {})
    model_name = model.get("model") if isinstance(model, dict) else model
    labels = list(index.labels)
    shown = ", ".join(f"`{lab}`" for lab in labels[:30]) + (" …" if len(labels) > 30 else "")
    return f"**Gallery:** {len(index):,} patches from `{spec}`, {len(labels)} labels: {shown}." + (
        f" Indexed with model `{model_name}`." if model_name else ""
    )


class ResponseFiles:
    """Fresh, never-rewritten image files for each response of a web page.

    Each :meth:`writer` call makes a new folder under this process's root folder; folders older
    than ``ttl_s`` are removed then (a client has fetched its images long before), and then the
    oldest folders until all of them hold at most ``max_bytes`` (each search writes about 2 MB of
    images and export files: without the bound a busy page filled gigabytes within the hour).
    """

    def __init__(self, ttl_s: float = 3600.0, max_bytes: int = MAX_RESPONSE_BYTES) -> None:
        self.ttl_s = float(ttl_s)
        self.max_bytes = int(max_bytes)
        self._root: Optional[Path] = None

    @property
    def root(self) -> Path:
        """The per-process folder holding the response folders (created on first use)."""
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="lgffem-results-"))
        return self._root

    def prune(self) -> None:
        """Remove response folders older than ``ttl_s``, then the oldest until the rest fit ``max_bytes``."""
        cutoff = time.time() - self.ttl_s
        kept = []
        for old in self.root.iterdir():
            try:
                mtime = old.stat().st_mtime
                if mtime < cutoff:
                    shutil.rmtree(old, ignore_errors=True)
                    continue
                size = sum(entry.stat().st_size for entry in os.scandir(old) if entry.is_file())
            except OSError:  # removed meanwhile (another thread pruning)
                continue
            kept.append((mtime, old.name, size, old))
        total = sum(size for _, _, size, _ in kept)
        for _, _, size, old in sorted(kept):
            if total <= self.max_bytes:
                break
            shutil.rmtree(old, ignore_errors=True)
            total -= size

    def new_folder(self, prefix: str = "response-") -> Path:
        """A new, empty folder for one response's files (old ones are pruned first)."""
        self.prune()
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.root))

    def writer(self) -> Callable[[Optional[Image.Image]], Optional[str]]:
        """A function that saves each picture it is given as the next PNG of a new folder (``None`` stays ``None``)."""
        folder = self.new_folder()
        counter = iter(range(1_000_000))

        def to_file(picture: Optional[Image.Image]) -> Optional[str]:
            if picture is None:
                return None
            path = folder / f"{next(counter):03d}.png"
            picture.save(path, compress_level=1)  # fast: these files only travel to this page
            return str(path)

        return to_file
