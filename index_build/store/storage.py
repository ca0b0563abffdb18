"""The on-disk format of an index directory: file names, atomic writes, the commit journal, the manifest.

An index directory holds three files, always written atomically (temporary file, then
``os.replace``, with a small commit journal so that an interrupted multi-file write is rolled
forward on the next open):

- ``index.faiss``: the vectors (L2-normalised, inner product = cosine similarity); FAISS id
  ``i`` is row ``i`` of the metadata.
- ``metadata.parquet``: ``id``, ``label``, ``source`` and ``thumbnail`` (small JPEG bytes).
- ``manifest.json``: model (id, revision, config hash, weights fingerprint), embedding dim,
  metric, preprocessing, index type and parameters, count, labels, creation time, package
  versions and the size and SHA-256 of the two data files.

:func:`write_directory` commits the three files; :func:`read_directory` opens and checks them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import platform
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Optional, Union

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, Timeout
from PIL import Image

from index_build.faiss_index import check_index_type

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
METADATA_FILE = "metadata.parquet"
MANIFEST_FILE = "manifest.json"
JOURNAL_FILE = ".commit.json"
# The only files a commit (and so its journal) may replace; staged as ``.<name>.tmp-<pid>``.
COMMIT_FILES = (INDEX_FILE, METADATA_FILE, MANIFEST_FILE)
# Files of some indexes that a commit may also replace, with the others (a slide index's catalog).
OPTIONAL_COMMIT_FILES = ("slides.json",)
_STAGED = re.compile(r"\.([A-Za-z0-9_][A-Za-z0-9_.]*)\.tmp-[0-9]+")
_TEMPORARY = re.compile(r"\..+\.tmp-([0-9]+)")  # any file of write_atomic or commit, with its writer's pid
LOCK_FILE = ".lock"  # held by the one process writing to the directory
LOCK_TIMEOUT = 120.0  # seconds a writer waits for another one before giving up
WORK_DIR = ".partial"  # where a build keeps its embedded chunks until the index is written
DEFAULT_CHUNK_SIZE = 4096  # rows per persisted chunk: the resume granularity of a build
THUMBNAIL_SIZE = 224  # the model's input side: results are shown as large as the model saw them
THUMBNAIL_QUALITY = 85
METADATA_SCHEMA = pa.schema(
    [("id", pa.int64()), ("label", pa.string()), ("source", pa.string()), ("thumbnail", pa.binary())]
)
# Columns a metadata table may have after the four of METADATA_SCHEMA (in this order; nullable):
# the personal gallery records when each patch was added, the SHA-256 of the decoded image it came from,
# and its row id: a number given once, never changed by deletes and never given again (the manifest's
# ``next_row_id`` is the next one to give).
OPTIONAL_COLUMNS = {"added": pa.string(), "sha256": pa.string(), "row_id": pa.int64()}
# Manifest "model" entries that must agree for vectors to be comparable.
MODEL_KEYS = ("embedding_dim", "config_hash", "weights_fingerprint")
_PACKAGES = ("torch", "timm", "transformers", "datasets", "faiss-cpu", "numpy", "pyarrow", "pillow")

ImageLike = Union[Image.Image, np.ndarray]

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "MANIFEST_FILE",
    "METADATA_FILE",
    "METADATA_SCHEMA",
    "MODEL_KEYS",
    "OPTIONAL_COLUMNS",
    "OPTIONAL_COMMIT_FILES",
    "WORK_DIR",
    "IndexBusyError",
    "IndexLoadError",
    "check_metadata_schema",
    "check_contained",
    "contained_path",
    "decode_thumbnail",
    "extra_table",
    "has_index",
    "index_identity",
    "index_lock",
    "make_thumbnail",
    "metadata_table",
    "model_mismatches",
    "read_directory",
    "recorded_model_revision",
    "remove_stale_temporaries",
    "write_atomic",
    "write_directory",
]


class IndexLoadError(ValueError):
    """An index directory cannot be used: missing or corrupt files, or a different model."""


def _allowed_roots(directory: Path) -> list[Path]:
    """Folders the files of an index folder may resolve into: the folder itself and, for a Hub
    snapshot (``<repo>/snapshots/<revision>``, whose files link to ``<repo>/blobs``), its blobs."""
    real = directory.resolve()
    roots = [real]
    if directory.parent.name == "snapshots":
        roots.append((directory.parent.parent / "blobs").resolve())
    return roots


def contained_path(directory: Union[str, Path], name: str, what: str = "file") -> Path:
    """``directory / name`` when it names a place inside ``directory`` (no absolute path, no ``..``,
    no symlink that leaves the folder; a Hub snapshot's links to its blobs are allowed).

    Raises:
        IndexLoadError: ``name`` is absolute, climbs out, or resolves outside the folder.
    """
    directory = Path(directory)
    parts = Path(name).parts
    if not name or "\x00" in name or Path(name).is_absolute() or ".." in parts or "\\" in name:
        raise IndexLoadError(f"refusing {what} {name!r} of the index {directory.name}: not a path inside the folder")
    path = directory / name
    real = path.resolve()
    if not any(real == root or real.is_relative_to(root) for root in _allowed_roots(directory)):
        raise IndexLoadError(
            f"refusing {what} {name!r} of the index {directory.name}: it is a link that leaves the index folder"
        )
    return path


def check_contained(directory: Union[str, Path], subfolders: Sequence[str] = ("slides",)) -> None:
    """Refuse an index folder any of whose entries (top level and ``subfolders``) links outside it.

    Raises:
        IndexLoadError: naming the first entry that leaves the folder.
    """
    directory = Path(directory)
    for folder in (*subfolders, ""):
        here = directory / folder if folder else directory
        if folder:
            contained_path(directory, folder, "folder")
            if not here.is_dir():
                continue
        for entry in os.scandir(here):
            if entry.is_symlink():
                contained_path(directory, f"{folder}/{entry.name}" if folder else entry.name)


class IndexBusyError(TimeoutError):
    """Another process kept writing to the index directory for longer than the lock timeout."""


# --------------------------------------------------------------------------------------
# Thumbnails and metadata rows
# --------------------------------------------------------------------------------------


def make_thumbnail(image: ImageLike, size: int = THUMBNAIL_SIZE, quality: int = THUMBNAIL_QUALITY) -> bytes:
    """JPEG bytes of an RGB copy of ``image`` whose longer side is at most ``size`` pixels."""
    from image_processing_lgffem import to_rgb_uint8

    rgb = to_rgb_uint8(image).copy()
    rgb.thumbnail((size, size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def decode_thumbnail(data: bytes) -> Image.Image:
    """JPEG bytes from the metadata -> a loaded PIL image."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def metadata_table(
    ids: Any, labels: Any, sources: Any, thumbnails: Any, extra: Optional[Union[dict[str, Any], pa.Table]] = None
) -> pa.Table:
    """A metadata table: :data:`METADATA_SCHEMA`'s four columns, then the ``extra`` ones (:func:`extra_table`)."""
    table = pa.table(
        {
            "id": pa.array(np.asarray(ids, dtype=np.int64)),
            "label": pa.array([str(v) for v in labels], pa.string()),
            "source": pa.array([str(v) for v in sources], pa.string()),
            "thumbnail": thumbnails if isinstance(thumbnails, pa.Array) else pa.array(list(thumbnails), pa.binary()),
        },
        schema=METADATA_SCHEMA,
    )
    columns = extra_table(extra, table.num_rows)
    for name in columns.column_names if columns is not None else ():
        table = table.append_column(columns.schema.field(name), columns.column(name))
    return table


def extra_table(extra: Optional[Union[dict[str, Any], pa.Table]], rows: int) -> Optional[pa.Table]:
    """Extra metadata columns as a table of ``rows`` rows, or ``None`` when there are none.

    ``extra`` is a table, or name -> one value (or ``None``) per row; a column named in
    :data:`OPTIONAL_COLUMNS` gets that type, any other one the type Arrow infers.

    Raises:
        ValueError: a column with the wrong number of rows, or one named like a base column.
    """
    if extra is None or (isinstance(extra, dict) and not extra):
        return None
    if isinstance(extra, dict):
        extra = pa.table({name: pa.array(list(values), OPTIONAL_COLUMNS.get(name)) for name, values in extra.items()})
    clash = set(extra.column_names) & set(METADATA_SCHEMA.names)
    if clash:
        raise ValueError(f"extra metadata columns cannot be named {sorted(clash)}")
    if extra.num_rows != rows:
        raise ValueError(f"{rows} rows but {extra.num_rows} rows of extra metadata columns")
    return extra


def check_metadata_schema(schema: pa.Schema) -> bool:
    """Whether a metadata schema is :data:`METADATA_SCHEMA`'s columns then any extra ones (e.g. ``slide, x, y,
    size0, mpp`` of a slide index), those named in :data:`OPTIONAL_COLUMNS` with their type."""
    base = len(METADATA_SCHEMA)
    if len(schema) < base or not pa.schema(list(schema)[:base]).equals(METADATA_SCHEMA, check_metadata=False):
        return False
    extra = list(schema)[base:]
    if {field.name for field in extra} & set(METADATA_SCHEMA.names):
        return False
    return all(field.type == OPTIONAL_COLUMNS.get(field.name, field.type) for field in extra)


def index_identity(manifest: dict) -> str:
    """A short, stable identity of the index a manifest describes: its model, creation time and
    dataset (hex, 16 characters). Appending to the index keeps it; a rebuild gives a new one."""
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    key = {
        "model": {name: model.get(name) for name in MODEL_KEYS},
        "created": manifest.get("created"),
        "dataset": manifest.get("dataset"),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------
# The manifest's model entry
# --------------------------------------------------------------------------------------


def _model_summary(desc: dict) -> str:
    return (
        f"{desc.get('model')} (dim {desc.get('embedding_dim')}, config hash {desc.get('config_hash')}, "
        f"weights fingerprint {desc.get('weights_fingerprint')})"
    )


def model_mismatches(built: dict, given: dict) -> list[str]:
    """What differs between two manifest ``model`` entries (``"key built != given"``), empty when they agree."""
    return [f"{key} {built.get(key)!r} != {given.get(key)!r}" for key in MODEL_KEYS if built.get(key) != given.get(key)]


def check_model(manifest: dict, given: dict, path: Union[str, Path] = "index") -> None:
    """Raise :class:`IndexLoadError` unless the index of ``manifest`` was built with the model ``given``."""
    built = manifest.get("model", {})
    problems = model_mismatches(built, given)
    if problems:
        raise IndexLoadError(
            f"index {path} was built with model {_model_summary(built)} but the given model is "
            f"{_model_summary(given)}: {'; '.join(problems)}. Load the model the index was built with, "
            "or rebuild the index with this model (python -m index_build ... --model ...)."
        )


# --------------------------------------------------------------------------------------
# Atomic writes and the commit journal
# --------------------------------------------------------------------------------------


_locks: dict[str, FileLock] = {}
_locks_guard = threading.Lock()


@contextmanager
def index_lock(directory: Union[str, Path], timeout: Optional[float] = None) -> Iterator[None]:
    """Hold the writer lock of an index directory (created if needed) for the ``with`` block.

    One process writes at a time; a writer re-reads the committed state under the lock, so
    concurrent writers (processes or threads) append to each other's rows instead of losing them.
    Re-entrant within a thread.

    Raises:
        IndexBusyError: another writer held the lock for ``timeout`` seconds (default :data:`LOCK_TIMEOUT`).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = str(directory.resolve())
    with _locks_guard:
        lock = _locks.setdefault(key, FileLock(directory / LOCK_FILE))
    timeout = LOCK_TIMEOUT if timeout is None else timeout
    try:
        lock.acquire(timeout=timeout)
    except Timeout as err:
        raise IndexBusyError(
            f"another process is writing to the index {directory} (it holds {directory / LOCK_FILE}); "
            f"gave up after {timeout:g} s: try again when it has finished"
        ) from err
    try:
        yield
    finally:
        lock.release()


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 4 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, Optional[str]]:
    """Python and the versions of the packages that shape the vectors (``None``: not installed)."""
    versions: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a temporary file next to ``path``, flush it to disk, then rename it to ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _process_alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user counts as alive)."""
    if pid <= 0:
        return True  # not a writer's pid: leave its file alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OverflowError:
        return False
    except OSError:  # e.g. PermissionError: it exists
        return True
    return True


def remove_stale_temporaries(directory: Path) -> list[str]:
    """Remove the ``.<name>.tmp-<pid>`` files that killed writers left in ``directory``.

    Only files whose writer process is gone are removed (a live writer may still be writing
    its own). Call it while holding the directory's writer lock, after :func:`recover`.

    Returns:
        The names removed.
    """
    removed = []
    for path in directory.iterdir():
        match = _TEMPORARY.fullmatch(path.name)
        if match is None or (path.is_dir() and not path.is_symlink()) or _process_alive(int(match.group(1))):
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path.name)
    if removed:
        logger.info("removed %d temporary files of interrupted writes in %s: %s", len(removed), directory, removed)
    return sorted(removed)


def commit(directory: Path, writers: dict[str, Callable[[Path], None]]) -> dict[str, Path]:
    """Write several files of ``directory`` so that readers see all old or (after recovery) all new.

    Each file is written to a temporary name; a journal listing the renames is then written
    atomically, the renames are done in order (the manifest last) and the journal is removed.
    A crash before the journal leaves the old files; after it, :func:`recover` finishes the job.
    """
    with index_lock(directory):
        return _commit(directory, writers)


def _commit(directory: Path, writers: dict[str, Callable[[Path], None]]) -> dict[str, Path]:
    recover(directory)
    remove_stale_temporaries(directory)
    renames: list[tuple[str, str]] = []
    for name, write in writers.items():
        if name not in COMMIT_FILES + OPTIONAL_COMMIT_FILES:
            raise ValueError(
                f"{name!r} is not a file of an index directory ({', '.join(COMMIT_FILES + OPTIONAL_COMMIT_FILES)})"
            )
        tmp = directory / _staged_name(name)
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        renames.append((tmp.name, name))
    write_atomic(directory / JOURNAL_FILE, lambda p: p.write_text(json.dumps({"renames": renames})))
    recover(directory, interrupted=False)
    return {name: directory / name for name in writers}


def _staged_name(name: str) -> str:
    return f".{name}.tmp-{os.getpid()}"


def _journal_renames(directory: Path, journal: Path) -> list[tuple[str, str]]:
    """The renames of a commit journal, checked: an index folder is untrusted input.

    Only a staged name written by :func:`commit` (``.<name>.tmp-<pid>``, a regular file in
    ``directory``) may be renamed, and only to its known final name (:data:`COMMIT_FILES`).

    Raises:
        IndexLoadError: the journal is unreadable or names anything else.
    """
    try:
        renames = json.loads(journal.read_text())["renames"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise IndexLoadError(f"corrupt commit journal {journal}: {err}") from err
    if not isinstance(renames, list):
        raise IndexLoadError(f"corrupt commit journal {journal}: 'renames' is not a list")
    checked: list[tuple[str, str]] = []
    for entry in renames:
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(v, str) for v in entry)):
            raise IndexLoadError(f"corrupt commit journal {journal}: bad entry {entry!r}")
        tmp, name = entry
        match = _STAGED.fullmatch(tmp)
        if name not in COMMIT_FILES + OPTIONAL_COMMIT_FILES or match is None or match.group(1) != name:
            raise IndexLoadError(
                f"refusing the commit journal {journal}: it renames {tmp!r} to {name!r}, but a journal may only "
                f"rename a staged .<name>.tmp-<pid> file to <name>, one of "
                f"{', '.join(COMMIT_FILES + OPTIONAL_COMMIT_FILES)}"
            )
        staged = directory / tmp
        if staged.is_symlink() or (staged.exists() and not staged.is_file()):
            raise IndexLoadError(f"refusing the commit journal {journal}: {tmp} is not a regular file")
        checked.append((tmp, name))
    return checked


def recover(directory: Path, interrupted: bool = True, write: bool = True) -> dict[str, Path]:
    """Finish an interrupted :func:`commit` (roll forward), if its journal is present.

    Args:
        directory: the index directory.
        interrupted: log that an interrupted write was completed.
        write: do the renames; ``False`` (a read-only load) leaves the folder untouched and
            only says where the committed files are.

    Returns:
        The path to read for each committed file whose staged copy is still pending
        (only when ``write`` is ``False``; otherwise the files are in place: empty).

    Raises:
        IndexLoadError: the journal is corrupt or names files other than the staged index files.
    """
    journal = directory / JOURNAL_FILE
    if not journal.exists():
        return {}
    renames = _journal_renames(directory, journal)
    if not write:
        return {name: directory / tmp for tmp, name in renames if (directory / tmp).is_file()}
    for tmp, name in renames:
        if (directory / tmp).exists():
            os.replace(directory / tmp, directory / name)
    journal.unlink()
    if interrupted:
        logger.warning("completed an interrupted write in %s", directory)
    return {}


# --------------------------------------------------------------------------------------
# The directory: write and read
# --------------------------------------------------------------------------------------


def recorded_model_revision(path: Union[str, Path], model: Optional[str]) -> Optional[str]:
    """The Hub revision (commit) of ``model`` recorded in the manifest of the index in ``path``.

    ``None`` when the index records another model, no revision, or cannot be read (loading the
    index reports that properly). Reads only; the manifest is untrusted, so only a plain
    revision string is returned.
    """
    try:
        built = json.loads((Path(path) / MANIFEST_FILE).read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(built, dict) or built.get("model") != model:
        return None
    revision = built.get("revision")
    return revision if isinstance(revision, str) and re.fullmatch(r"[\w.\-/]{1,128}", revision) else None


def has_index(path: Union[str, Path]) -> bool:
    """Whether ``path`` holds an index directory (its manifest exists)."""
    return (Path(path) / MANIFEST_FILE).is_file()


def write_directory(
    path: Path,
    index: faiss.Index,
    metadata: pa.Table,
    manifest: dict,
    extra_files: Optional[dict[str, Callable[[Path], None]]] = None,
) -> dict:
    """Commit index, metadata and manifest (with counts, labels and checksums) atomically.

    ``extra_files`` (name -> writer of a temporary path; names of :data:`OPTIONAL_COMMIT_FILES`)
    are committed with them, before the manifest.

    Returns:
        The manifest as written.
    """
    path.mkdir(parents=True, exist_ok=True)
    staged: dict[str, Path] = {}

    def stage(name: str, write: Callable[[Path], None]) -> Callable[[Path], None]:
        def run(tmp: Path) -> None:
            write(tmp)
            staged[name] = tmp

        return run

    labels = metadata.column("label").to_pylist()
    manifest = dict(manifest)
    manifest["count"] = int(index.ntotal)
    manifest["labels"] = dict(sorted(Counter(labels).items()))

    def write_manifest(tmp: Path) -> None:
        manifest["files"] = {
            name: {"bytes": staged[name].stat().st_size, "sha256": sha256_file(staged[name])}
            for name in (INDEX_FILE, METADATA_FILE)
        }
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")

    commit(
        path,
        {
            INDEX_FILE: stage(INDEX_FILE, lambda tmp: faiss.write_index(index, str(tmp))),
            METADATA_FILE: stage(METADATA_FILE, lambda tmp: pq.write_table(metadata, tmp)),
            **(extra_files or {}),
            MANIFEST_FILE: write_manifest,
        },
    )
    return manifest


_NUMBER = (int, float)
_OPTIONAL_STR = (str, type(None))
_JSON_TYPES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}
# Built-in index types -> the FAISS class they are written as (factory strings: any class).
_INDEX_CLASSES = {"flat": "IndexFlatIP", "ivfpq": "IndexIVFPQ", "hnsw": "IndexHNSWFlat"}
UNIT_NORM_TOLERANCE = 1e-3


def _field(container: dict, key: str, types: tuple, name: str, required: bool = True) -> Any:
    """``container[key]`` checked against ``types`` (``bool`` is not a number); raises ``_ManifestError``."""
    if key not in container:
        if required:
            raise _ManifestError(f"no {name!r} entry")
        return None
    value = container[key]
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        expected = " or ".join(_JSON_TYPES[t] for t in types)
        got = _JSON_TYPES.get(type(value), type(value).__name__)
        raise _ManifestError(f"{name!r} must be {expected}, got {got} {json.dumps(value)[:40]}")
    return value


class _ManifestError(Exception):
    pass


def validate_manifest(manifest: Any) -> None:
    """Check the structure and JSON types of a manifest (the fields this code reads).

    Raises:
        _ManifestError: naming the first field that is missing or has the wrong type.
    """
    if not isinstance(manifest, dict):
        raise _ManifestError(f"the manifest must be a JSON object, got {type(manifest).__name__}")
    version = _field(manifest, "format_version", (int,), "format_version")
    if version < 1:
        raise _ManifestError(f"'format_version' must be at least 1, got {version}")
    if _field(manifest, "count", (int,), "count") < 0:
        raise _ManifestError("'count' must not be negative")
    model = _field(manifest, "model", (dict,), "model")
    if _field(model, "embedding_dim", (int,), "model.embedding_dim") < 1:
        raise _ManifestError("'model.embedding_dim' must be positive")
    for key in ("model", "config_hash", "weights_fingerprint", "revision"):
        _field(model, key, _OPTIONAL_STR, f"model.{key}", required=False)
    index = _field(manifest, "index", (dict,), "index")
    index_type = _field(index, "type", (str,), "index.type")
    try:
        check_index_type(index_type)
    except ValueError as err:
        raise _ManifestError(f"'index.type': {err}") from err
    _field(index, "class", (str,), "index.class")
    params = _field(index, "params", (dict,), "index.params", required=False) or {}
    for key in params:
        _field(params, key, (int, float, str), f"index.params.{key}")
    files = _field(manifest, "files", (dict,), "files")
    for name in (INDEX_FILE, METADATA_FILE):
        entry = _field(files, name, (dict,), f"files.{name}")
        _field(entry, "bytes", (int,), f"files.{name}.bytes")
        _field(entry, "sha256", (str,), f"files.{name}.sha256")
    labels = _field(manifest, "labels", (dict,), "labels", required=False) or {}
    for key in labels:
        _field(labels, key, (int,), f"labels.{key}")
    _field(manifest, "metric", (str,), "metric", required=False)
    skipped = _field(manifest, "skipped", (list,), "skipped", required=False) or []
    for i, entry in enumerate(skipped):
        if not isinstance(entry, dict):
            raise _ManifestError(f"'skipped[{i}]' must be an object, got {_JSON_TYPES.get(type(entry), 'a value')}")
        for key in ("source", "reason"):
            _field(entry, key, (str,), f"skipped[{i}].{key}")
    next_row_id = _field(manifest, "next_row_id", (int,), "next_row_id", required=False)
    if next_row_id is not None and next_row_id < 0:
        raise _ManifestError(f"'next_row_id' must not be negative, got {next_row_id}")
    calibration = _field(manifest, "close_match", (dict, type(None)), "close_match", required=False)
    if calibration:
        _field(calibration, "threshold", _NUMBER, "close_match.threshold", required=False)
    decision = _field(manifest, "decision", (dict, type(None)), "decision", required=False)
    if decision:
        _field(decision, "weights", (list,), "decision.weights", required=False)
        _field(decision, "intercept", _NUMBER, "decision.intercept", required=False)


def _read_manifest(path: Path, files: dict[str, Path], verify: bool) -> dict:
    try:
        manifest = json.loads(files[MANIFEST_FILE].read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IndexLoadError(f"corrupt {MANIFEST_FILE} in {path}: {err}") from err
    try:
        validate_manifest(manifest)
    except _ManifestError as err:
        raise IndexLoadError(f"corrupt {MANIFEST_FILE} in {path}: {err}") from None
    if manifest["format_version"] > FORMAT_VERSION:
        raise IndexLoadError(
            f"index {path} has format version {manifest['format_version']}; this code reads up to {FORMAT_VERSION}"
        )
    for name in (INDEX_FILE, METADATA_FILE):
        expected = manifest["files"][name]
        size = files[name].stat().st_size
        if size != expected["bytes"]:
            raise IndexLoadError(f"corrupt {name} in {path}: {size} bytes, the manifest says {expected['bytes']}")
        if verify and sha256_file(files[name]) != expected["sha256"]:
            raise IndexLoadError(f"corrupt {name} in {path}: SHA-256 differs from the manifest")
    return manifest


def _check_index(path: Path, index: faiss.Index, manifest: dict, block: int = 1 << 16) -> None:
    """The FAISS index agrees with the manifest's type, and (cosine) holds finite unit vectors.

    Flat and HNSW vectors are read back exactly and must be unit-norm; other types are checked
    as far as is cheap: decoded vectors (or, without a direct map, the IVF and PQ centroids) must be finite.
    """
    declared = manifest["index"]
    expected = _INDEX_CLASSES.get(declared["type"], declared["class"])
    if not type(index).__name__ == declared["class"] == expected:
        raise IndexLoadError(
            f"corrupt {MANIFEST_FILE} in {path}: 'index.type' {declared['type']!r} / 'index.class' "
            f"{declared['class']!r} do not match the FAISS index in {INDEX_FILE} ({type(index).__name__})"
        )
    if "cosine" not in manifest.get("metric", "cosine"):
        return
    exact = isinstance(index, (faiss.IndexFlat, faiss.IndexHNSWFlat))
    try:
        for start in range(0, index.ntotal, block):
            xb = index.reconstruct_n(start, min(block, index.ntotal - start))
            bad = ~np.isfinite(xb).all(axis=1)
            if exact:
                bad |= np.abs(np.linalg.norm(np.nan_to_num(xb), axis=1) - 1) > UNIT_NORM_TOLERANCE
            if bad.any():
                row = start + int(np.flatnonzero(bad)[0])
                raise IndexLoadError(
                    f"corrupt {INDEX_FILE} in {path}: {int(bad.sum())} vectors from id {row} are not finite "
                    "unit vectors, but the metric is cosine"
                )
    except RuntimeError:  # an IVF index without a direct map cannot reconstruct
        ivf = faiss.try_extract_index_ivf(index)
        parts = []
        if ivf is not None:
            parts.append(ivf.quantizer.reconstruct_n(0, ivf.quantizer.ntotal))
            pq = getattr(faiss.downcast_index(index), "pq", None)
            if pq is not None:
                parts.append(faiss.vector_to_array(pq.centroids))
        if not all(np.isfinite(part).all() for part in parts):
            raise IndexLoadError(f"corrupt {INDEX_FILE} in {path}: its centroids are not finite") from None


def read_directory(
    path: Union[str, Path], model: Optional[dict] = None, verify: bool = True, read_only: bool = False
) -> tuple[faiss.Index, pa.Table, dict]:
    """Open an index directory and check it: files present, sizes and checksums, counts, model.

    The directory is untrusted input: an unfinished write is completed only by renaming staged
    index files inside it, and only when it is writable and ``read_only`` is not set (otherwise
    the staged files are read where they are and nothing is written).

    Args:
        path: the directory.
        model: the ``describe()`` of the model that will query it; must match the manifest.
        verify: check the SHA-256 of the data files against the manifest.
        read_only: never write to the directory.

    Returns:
        ``(index, metadata, manifest)``.

    Raises:
        IndexLoadError: the directory or a file is missing or corrupt, the files disagree, or
            the index was built with another model.
    """
    path = Path(path)
    if not path.is_dir():
        raise IndexLoadError(f"index directory not found: {path}")
    write = not read_only and os.access(path, os.W_OK)
    try:
        if write and (path / JOURNAL_FILE).exists():
            with index_lock(path):  # roll forward only what no writer is doing right now
                pending = recover(path)
        else:
            pending = recover(path, write=False)
    except OSError as err:
        raise IndexLoadError(f"index {path} has an unfinished write that cannot be completed: {err}") from err
    check_contained(path)
    files = {name: pending.get(name, path / name) for name in COMMIT_FILES}
    missing = [name for name, file in files.items() if not file.is_file()]
    if missing:
        raise IndexLoadError(f"index {path} is incomplete: missing {', '.join(missing)}")
    manifest = _read_manifest(path, files, verify)
    if model is not None:
        check_model(manifest, model, path)
    try:
        # on-disk inverted lists (a merge with --on-disk) live next to the index file
        index = faiss.read_index(str(files[INDEX_FILE]), faiss.IO_FLAG_ONDISK_SAME_DIR)
    except RuntimeError as err:
        raise IndexLoadError(f"corrupt {INDEX_FILE} in {path}: {err}") from err
    try:
        metadata = pq.read_table(files[METADATA_FILE])
    except (pa.ArrowException, OSError) as err:
        raise IndexLoadError(f"corrupt {METADATA_FILE} in {path}: {err}") from err
    if not check_metadata_schema(metadata.schema):
        raise IndexLoadError(
            f"{METADATA_FILE} in {path} has schema {metadata.schema}, expected {METADATA_SCHEMA} then any extra "
            f"columns (of these types when named {', '.join(f'{k}: {v}' for k, v in OPTIONAL_COLUMNS.items())})"
        )
    count = manifest["count"]
    if not index.ntotal == metadata.num_rows == count:
        raise IndexLoadError(
            f"index {path} is inconsistent: {index.ntotal} vectors, {metadata.num_rows} metadata rows, "
            f"manifest count {count}"
        )
    if index.d != manifest["model"]["embedding_dim"]:
        raise IndexLoadError(f"index {path}: vectors have dim {index.d}, manifest says {manifest['model']}")
    _check_index(path, index, manifest)
    return index, metadata, manifest
