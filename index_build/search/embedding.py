"""Reader -> embedder -> writer: embed a dataset (resumably) and build an index directory from it.

:class:`ImageRowDataset` decodes, preprocesses and thumbnails rows in DataLoader workers;
:func:`embed_batches` is the one DataLoader loop of the project; :func:`embed_dataset` persists
every chunk of rows in ``<out>/.partial/`` (so an interrupted build resumes where it stopped);
:func:`build_index` writes (or appends to) the index directory.
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm.auto import tqdm

from index_build.faiss_index import check_index_type
from index_build.patch_index import EmbedderLike, PatchIndex, write_index
from index_build.storage import (
    DEFAULT_CHUNK_SIZE,
    MANIFEST_FILE,
    THUMBNAIL_SIZE,
    WORK_DIR,
    has_index,
    index_lock,
    make_thumbnail,
    metadata_table,
    model_mismatches,
    remove_stale_temporaries,
    write_atomic,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ImageRowDataset",
    "build_index",
    "default_num_workers",
    "die_with_parent",
    "embed_batches",
    "embed_dataset",
]


def default_num_workers() -> int:
    """DataLoader workers: all cores but one, at most 8 (0 on a single core)."""
    return min(8, max(0, (os.cpu_count() or 1) - 1))


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(worker_id: int = 0, parent: Optional[int] = None) -> None:
    """DataLoader ``worker_init_fn``: the worker gets SIGKILL when its parent dies (Linux; no-op elsewhere).

    A build killed with SIGKILL cannot stop its workers; without this they are re-parented to
    PID 1 and keep their memory forever.

    Args:
        worker_id: the DataLoader worker number (unused).
        parent: the pid the worker belongs to; if it is already gone, the worker exits now.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
    if parent is not None and os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, TypeError, Image.DecompressionBombError)
"""What decoding a bad file raises: not an image, empty, truncated or corrupt, or a decompression bomb."""


class ImageRowDataset(torch.utils.data.Dataset):
    """Rows ``start..`` of a dataset -> ``(row, pixel_values, label, source, thumbnail JPEG, error)``.

    Runs in DataLoader workers: decoding, preprocessing and thumbnailing happen there.
    ``thumbnail_size <= 0`` skips the thumbnail (empty bytes). An unreadable image raises a
    ``ValueError`` naming its row and file; with ``strict=False`` it gives ``pixel_values=None``
    and the reason in ``error`` instead (the row is then skipped by :func:`collate_rows`).
    """

    def __init__(
        self, dataset, processor: Any, start: int = 0, thumbnail_size: int = THUMBNAIL_SIZE, strict: bool = True
    ) -> None:
        self.dataset = dataset
        self.processor = processor
        self.start = start
        self.thumbnail_size = thumbnail_size
        self.strict = strict

    def __len__(self) -> int:
        return len(self.dataset) - self.start

    def __getitem__(self, i: int) -> tuple[int, Optional[torch.Tensor], str, str, bytes, Optional[str]]:
        row = self.start + i
        try:
            item = self.dataset[row]
            image = item["image"]
            pixels = torch.from_numpy(self.processor.to_array(image))
            thumbnail = make_thumbnail(image, self.thumbnail_size) if self.thumbnail_size > 0 else b""
        except UNREADABLE as err:
            reason = f"{type(err).__name__}: {err}"
            columns = self.dataset.select([row]).select_columns(["label", "source"])[0]
            if self.strict:
                raise ValueError(f"cannot read image at row {row} ({columns['source']}): {reason}") from err
            return row, None, columns["label"], columns["source"], b"", reason
        return row, pixels, item["label"], item["source"], thumbnail, None


def collate_rows(items: list[tuple]) -> dict[str, Any]:
    """DataLoader ``collate_fn`` for :class:`ImageRowDataset`: stacks the readable rows, lists the others.

    Returns:
        ``end`` (the row after the batch); for the readable rows ``rows``, ``pixels`` (stacked;
        ``None`` when there are none), ``labels``, ``sources`` and ``thumbs``; and ``skipped``:
        ``(row, source, reason)`` per unreadable row.
    """
    good = [item for item in items if item[5] is None]
    return {
        "end": max(item[0] for item in items) + 1,
        "rows": [item[0] for item in good],
        "pixels": torch.stack([item[1] for item in good]) if good else None,
        "labels": [item[2] for item in good],
        "sources": [item[3] for item in good],
        "thumbs": [item[4] for item in good],
        "skipped": [(item[0], item[3], item[5]) for item in items if item[5] is not None],
    }


def _embed_rows(
    dataset,
    embedder: EmbedderLike,
    batch_size: int,
    num_workers: Optional[int],
    start: int,
    thumbnail_size: int,
    progress: bool,
    strict: bool,
) -> Iterator[tuple[int, np.ndarray, dict[str, Any]]]:
    """Embed rows ``start..`` batch by batch; yields ``(end, xb, batch)``, ``end`` = the row after the batch."""
    workers = default_num_workers() if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(
        ImageRowDataset(dataset, embedder.processor, start, thumbnail_size, strict),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_rows,
        pin_memory=torch.device(embedder.device).type == "cuda",
        worker_init_fn=functools.partial(die_with_parent, parent=os.getpid()),
    )
    with tqdm(total=len(dataset), initial=start, unit="img", desc="embedding", disable=not progress) as bar:
        for batch in loader:
            n = len(batch["labels"])
            if n:
                xb = embedder.embed_pixels(batch["pixels"])
                if xb.shape != (n, embedder.dim):
                    raise ValueError(f"embedder returned shape {xb.shape} for {n} images")
            else:
                xb = np.zeros((0, embedder.dim), np.float32)
            for row, source, reason in batch["skipped"]:
                logger.warning("skipped unreadable image at row %d (%s): %s", row, source, reason)
            bar.update(n + len(batch["skipped"]))
            yield batch["end"], xb, batch


def embed_batches(
    dataset,
    embedder: EmbedderLike,
    batch_size: int = 32,
    num_workers: Optional[int] = None,
    start: int = 0,
    thumbnail_size: int = THUMBNAIL_SIZE,
    progress: bool = True,
) -> Iterator[tuple[np.ndarray, list[str], list[str], list[bytes]]]:
    """Embed rows ``start..`` of ``dataset`` batch by batch through a DataLoader with workers.

    Yields:
        ``(xb, labels, sources, thumbnails)`` per batch; ``xb`` is ``B x D`` float32.

    Raises:
        ValueError: an image cannot be read (the message names its row and file).
    """
    for _end, xb, batch in _embed_rows(
        dataset, embedder, batch_size, num_workers, start, thumbnail_size, progress, strict=True
    ):
        yield xb, batch["labels"], batch["sources"], batch["thumbs"]


# --------------------------------------------------------------------------------------
# Resumable embedding: chunks persisted in a work directory
# --------------------------------------------------------------------------------------


def _data_hash(dataset) -> str:
    digest = hashlib.sha256()
    for name in ("label", "source"):
        for value in dataset.select_columns([name])[name]:
            digest.update(str(value).encode())
            digest.update(b"\0")
    return digest.hexdigest()[:16]


def _work_state(dataset, desc: dict, chunk_size: int, skip_unreadable: bool) -> dict:
    """What a partial build depends on: it is resumed only when all of it is unchanged."""
    return {
        "model": {k: desc.get(k) for k in ("model", "config_hash", "weights_fingerprint", "embedding_dim")},
        "rows": len(dataset),
        "data_hash": _data_hash(dataset),
        "chunk_size": chunk_size,
        "thumbnail_size": THUMBNAIL_SIZE,
        "skip_unreadable": skip_unreadable,
    }


def _chunk_paths(work: Path, chunk: int) -> tuple[Path, Path, Path]:
    """Metadata, vectors and skipped rows of one chunk."""
    name = f"chunk-{chunk:06d}"
    return work / f"{name}.parquet", work / f"{name}.npy", work / f"{name}.skipped.json"


def _read_skipped(path: Path) -> list[dict]:
    """The unreadable rows of a chunk (``row``, ``source``, ``reason``); raises ``ValueError`` when corrupt."""
    skipped = json.loads(path.read_text())
    if not isinstance(skipped, list) or not all(isinstance(entry, dict) for entry in skipped):
        raise ValueError(f"{path} is not a list of objects")
    return skipped


def _complete_chunks(work: Path, n: int, chunk_size: int) -> int:
    """Number of leading chunks that are fully on disk (later leftovers are removed)."""
    done = 0
    while done * chunk_size < n:
        meta, vecs, skipped = _chunk_paths(work, done)
        rows = min(chunk_size, n - done * chunk_size)
        if not (meta.exists() and vecs.exists() and skipped.exists()):
            break
        try:
            rows -= len(_read_skipped(skipped))
            if np.load(vecs, mmap_mode="r").shape[0] != rows or pq.read_metadata(meta).num_rows != rows:
                break
        except (ValueError, OSError, pa.ArrowException):
            break
        done += 1
    for stale in work.glob("chunk-*"):
        if int(stale.name.split("-")[1].split(".")[0]) >= done:
            stale.unlink()
    return done


def _prepare_work_dir(work: Path, state: dict, resume: bool) -> None:
    state_file = work / "state.json"
    if work.exists():
        old = None
        if state_file.exists():
            try:
                old = json.loads(state_file.read_text())
            except json.JSONDecodeError:
                old = None
        if not resume:
            logger.info("not resuming: removing partial build in %s", work)
            shutil.rmtree(work)
        elif old != state:
            logger.warning("partial build in %s is for another model, dataset or setting; starting over", work)
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(work)
    write_atomic(state_file, lambda p: p.write_text(json.dumps(state, indent=2)))


def _write_chunk(
    work: Path, chunk: int, xb: np.ndarray, labels: list, sources: list, thumbs: list, skipped: list[dict]
) -> None:
    meta, vecs, skipped_file = _chunk_paths(work, chunk)
    write_atomic(skipped_file, lambda p: p.write_text(json.dumps(skipped)))
    table = metadata_table(np.zeros(len(labels), np.int64), labels, sources, thumbs)
    write_atomic(meta, lambda p: pq.write_table(table, p))

    # The vectors go last: a chunk counts as done only when all three files exist.
    def save_vectors(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, xb)

    write_atomic(vecs, save_vectors)


def embed_dataset(
    dataset,
    embedder: EmbedderLike,
    work_dir: Union[str, Path],
    batch_size: int = 32,
    num_workers: Optional[int] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    resume: bool = True,
    progress: bool = True,
    skipped: Optional[list[dict]] = None,
) -> tuple[np.ndarray, pa.Table]:
    """Embed every row of ``dataset``, persisting each chunk of ``chunk_size`` rows in ``work_dir``.

    An interrupted run called again with the same model, dataset and chunk size embeds only
    the rows of the chunks that are not on disk yet.

    Args:
        dataset: output of :func:`index_build.data.load_image_dataset`.
        embedder: the model.
        work_dir: where the chunks live (removed by the caller after a successful write).
        batch_size: images per forward pass.
        num_workers: DataLoader workers (default :func:`default_num_workers`).
        chunk_size: rows per persisted chunk.
        resume: reuse chunks of an earlier, interrupted run.
        progress: show a progress bar.
        skipped: when given, unreadable images (not an image, empty, truncated, decompression
            bomb) are left out and appended here as ``{"source", "reason"}``, each also logged;
            otherwise the first one raises.

    Returns:
        ``(xb, metadata)``: ``N x D`` float32 embeddings and the metadata table (ids 0..N-1).

    Raises:
        ValueError: an unreadable image (without ``skipped``; the message names the file), or
            no readable image at all.
    """
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size}, {chunk_size}")
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty: nothing to index")
    work = Path(work_dir)
    state = _work_state(dataset, embedder.describe(), chunk_size, skip_unreadable=skipped is not None)
    _prepare_work_dir(work, state, resume)
    done = _complete_chunks(work, n, chunk_size)
    start = min(done * chunk_size, n)
    if done:
        logger.info("resuming: %d of %d rows already embedded in %s", start, n, work)
    if start < n:
        buffers: dict[str, list] = {"xb": [], "rows": [], "labels": [], "sources": [], "thumbs": [], "skipped": []}
        chunk = done
        for end, xb, batch in _embed_rows(
            dataset, embedder, batch_size, num_workers, start, THUMBNAIL_SIZE, progress, strict=skipped is None
        ):
            buffers["xb"].append(xb)
            for key in ("rows", "labels", "sources", "thumbs"):
                buffers[key].extend(batch[key])
            buffers["skipped"].extend({"row": r, "source": s, "reason": e} for r, s, e in batch["skipped"])
            while chunk * chunk_size < n and min((chunk + 1) * chunk_size, n) <= end:
                stop = (chunk + 1) * chunk_size
                take = bisect.bisect_left(buffers["rows"], stop)
                stacked = np.concatenate(buffers["xb"])
                rows = {key: buffers[key][:take] for key in ("labels", "sources", "thumbs")}
                bad = [entry for entry in buffers["skipped"] if entry["row"] < stop]
                _write_chunk(work, chunk, stacked[:take], rows["labels"], rows["sources"], rows["thumbs"], bad)
                later = [entry for entry in buffers["skipped"] if entry["row"] >= stop]
                buffers = {key: buffers[key][take:] for key in ("rows", "labels", "sources", "thumbs")}
                buffers["xb"] = [stacked[take:]]
                buffers["skipped"] = later
                chunk += 1
    chunks = math.ceil(n / chunk_size)
    unreadable = [entry for c in range(chunks) for entry in _read_skipped(_chunk_paths(work, c)[2])]
    if len(unreadable) == n:
        raise ValueError(
            f"none of the {n} images could be read (first: {unreadable[0]['source']}: {unreadable[0]['reason']})"
        )
    if unreadable:
        logger.warning(
            "skipped %d unreadable images of %d (listed in the manifest under 'skipped')", len(unreadable), n
        )
    if skipped is not None:
        skipped.extend({"source": entry["source"], "reason": entry["reason"]} for entry in unreadable)
    xb = np.concatenate([np.load(_chunk_paths(work, c)[1]) for c in range(chunks)])
    metadata = pa.concat_tables([pq.read_table(_chunk_paths(work, c)[0]) for c in range(chunks)])
    metadata = metadata.set_column(0, "id", pa.array(np.arange(metadata.num_rows, dtype=np.int64)))
    return np.ascontiguousarray(xb, dtype=np.float32), metadata


def build_index(
    dataset,
    out_dir: Union[str, Path],
    embedder: EmbedderLike,
    index_type: str = "flat",
    batch_size: int = 32,
    num_workers: Optional[int] = None,
    resume: bool = True,
    progress: bool = True,
    append: bool = False,
    overwrite: bool = False,
    index_params: Optional[dict] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    dataset_info: Optional[dict] = None,
    strict: bool = False,
    extra_files: Optional[dict] = None,
) -> PatchIndex:
    """Reader -> embedder -> writer: embed ``dataset`` and write (or append to) an index directory.

    Columns of ``dataset`` besides ``image``, ``label`` and ``source`` (a slide dataset's ``slide, x,
    y, size0, mpp``) become metadata columns, matched to the embedded rows by their (unique) source.

    Args:
        dataset: output of :func:`index_build.data.load_image_dataset`.
        out_dir: the index directory.
        embedder: the model.
        index_type: ``"flat"`` (exact, default), ``"ivfpq"``, ``"hnsw"`` or ``"factory:<string>"``.
        batch_size: images per forward pass.
        num_workers: DataLoader workers (default :func:`default_num_workers`).
        resume: continue an interrupted build of the same model and dataset.
        progress: show a progress bar.
        append: add the dataset to the existing index in ``out_dir`` (same model required;
            ``index_type`` and ``index_params`` are then those of the existing index). Rows
            already in the index (same label, source and image) are skipped, so appending is
            idempotent.
        overwrite: replace an existing index (otherwise an existing index is an error).
        index_params: overrides of the index parameters (see
            :func:`index_build.faiss_index.default_index_params`).
        chunk_size: rows per persisted chunk (the resume granularity).
        dataset_info: recorded in the manifest.
        strict: stop at the first unreadable image; by default unreadable images (not an image,
            empty, truncated, decompression bomb) are skipped, logged and listed in the manifest
            under ``"skipped"`` (``{"source", "reason"}`` each).
        extra_files: more files committed with the index (name -> writer of a temporary path;
            see :data:`index_build.storage.OPTIONAL_COMMIT_FILES`), e.g. a slide index's ``slides.json``.

    A rerun of a build that was interrupted after its index was written (same model, same
    dataset, its partial build still in ``out_dir``) finishes the clean-up and returns that index.

    Raises:
        ValueError: an index already exists (without ``append``/``overwrite``), an unreadable
            image with ``strict``, no readable image, or bad input.
        IndexLoadError: ``append`` to a missing/corrupt index or one built with another model.
        IndexBusyError: another process kept writing to ``out_dir`` longer than the lock timeout.
    """
    out = Path(out_dir)
    if append and overwrite:
        raise ValueError("append and overwrite exclude each other")
    check_index_type(index_type)
    # One writer at a time: a second build or append of the same directory waits, then fails clearly.
    with index_lock(out):
        work = out / (WORK_DIR + ("-append" if append else ""))
        if has_index(out) and not (append or overwrite):
            finished = _finished_build(out, work, dataset, embedder, chunk_size, strict)
            if finished is not None:
                return finished
            raise ValueError(f"an index already exists in {out}; append to it or overwrite it")
        existing = PatchIndex.load(out, embedder) if append else None
        skipped: Optional[list[dict]] = None if strict else []
        xb, metadata = embed_dataset(
            dataset, embedder, work, batch_size, num_workers, chunk_size, resume, progress, skipped
        )
        extra = _extra_columns(dataset, metadata)
        if existing is not None:
            existing.add_embeddings(
                xb,
                metadata.column("label").to_pylist(),
                metadata.column("source").to_pylist(),
                metadata.column("thumbnail").to_pylist(),
                skip_existing=True,  # a rerun (or a run killed after its commit) adds nothing twice
                skipped=skipped,
                extra=extra,
                extra_files=extra_files,
            )
            result = existing
        else:
            info = dict(dataset_info or {}, data_hash=_data_hash(dataset))
            if extra is not None:
                for name in extra.column_names:
                    metadata = metadata.append_column(name, extra.column(name))
            result = write_index(out, xb, metadata, embedder, index_type, index_params, info, skipped, extra_files)
        shutil.rmtree(work)
    return result


def _extra_columns(dataset, metadata: pa.Table) -> Optional[pa.Table]:
    """The dataset's columns beyond image/label/source for the embedded rows of ``metadata``; ``None`` if none."""
    names = [name for name in dataset.column_names if name not in ("image", "label", "source")]
    if not names:
        return None
    plain = dataset.with_format(None).select_columns(["source", *names])
    table = plain.with_format("arrow")[:]
    row_of = {source: row for row, source in enumerate(table.column("source").to_pylist())}
    if len(row_of) != table.num_rows:
        raise ValueError(f"extra columns {names} need a unique source per row")
    rows = [row_of[source] for source in metadata.column("source").to_pylist()]
    return table.select(names).take(pa.array(rows, pa.int64()))


def _finished_build(
    out: Path, work: Path, dataset, embedder: EmbedderLike, chunk_size: int, strict: bool
) -> Optional[PatchIndex]:
    """The index in ``out`` when it was written by an earlier run of this very build that was killed
    before it removed its partial build ``work`` (which is removed now); otherwise ``None``."""
    if not (work / "state.json").is_file():
        return None
    try:
        state = json.loads((work / "state.json").read_text())
        manifest = json.loads((out / MANIFEST_FILE).read_text())
        data_hash = manifest["dataset"]["data_hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    desc = embedder.describe()
    expected = _work_state(dataset, desc, chunk_size, skip_unreadable=not strict)
    if state != expected or data_hash != expected["data_hash"] or model_mismatches(manifest["model"], desc):
        return None
    index = PatchIndex.load(out, embedder)
    logger.info("%s already holds this build (it was interrupted after writing the index); removed %s", out, work)
    shutil.rmtree(work)
    return index
