"""Embed a dataset into a FAISS index with metadata and a manifest; load and search it.

An index directory holds three files, always written atomically (temporary file, then
``os.replace``, with a small commit journal so that an interrupted multi-file write is rolled
forward on the next open):

- ``index.faiss``: the vectors (L2-normalised, inner product = cosine similarity); FAISS id
  ``i`` is row ``i`` of the metadata.
- ``metadata.parquet``: ``id``, ``label``, ``source`` and ``thumbnail`` (small JPEG bytes).
- ``manifest.json``: model (id, revision, config hash, weights fingerprint), embedding dim,
  metric, preprocessing, index type and parameters, count, labels, creation time, package
  versions and the size and SHA-256 of the two data files.

The build is reader -> embedder -> writer: :class:`ImageRowDataset` decodes, preprocesses and
thumbnails rows in DataLoader workers; :func:`embed_dataset` embeds them and persists every
chunk of rows in ``<out>/.partial/`` (so an interrupted build resumes where it stopped);
:func:`write_index` trains/fills the FAISS index and commits the directory.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import platform
import shutil
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence, Union

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm.auto import tqdm

from index_build.metrics import majority_votes

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
METADATA_FILE = "metadata.parquet"
MANIFEST_FILE = "manifest.json"
WORK_DIR = ".partial"
JOURNAL_FILE = ".commit.json"
THUMBNAIL_SIZE = 128
THUMBNAIL_QUALITY = 85
INDEX_TYPES = ("flat", "ivfpq", "hnsw")
DEFAULT_CHUNK_SIZE = 4096
METADATA_SCHEMA = pa.schema(
    [("id", pa.int64()), ("label", pa.string()), ("source", pa.string()), ("thumbnail", pa.binary())]
)
_PACKAGES = ("torch", "timm", "transformers", "datasets", "faiss-cpu", "numpy", "pyarrow", "pillow")

ImageLike = Union[Image.Image, np.ndarray]

__all__ = [
    "INDEX_TYPES",
    "EmbedderLike",
    "ImageRowDataset",
    "IndexLoadError",
    "PatchIndex",
    "SearchResult",
    "build_index",
    "decode_thumbnail",
    "default_num_workers",
    "embed_dataset",
    "make_faiss_index",
    "make_thumbnail",
    "write_index",
]


class IndexLoadError(ValueError):
    """An index directory cannot be used: missing or corrupt files, or a different model."""


class EmbedderLike(Protocol):
    """What the index needs from a model (``index_build.models.Embedder`` or a baseline)."""

    processor: Any
    device: torch.device

    @property
    def dim(self) -> int: ...

    def embed_pixels(self, pixel_values: torch.Tensor) -> np.ndarray: ...

    def embed_images(self, images: Sequence[ImageLike], batch_size: int = 32) -> np.ndarray: ...

    def describe(self) -> dict: ...


# --------------------------------------------------------------------------------------
# Small helpers: thumbnails, files, versions
# --------------------------------------------------------------------------------------


def _to_rgb(image: ImageLike) -> Image.Image:
    from modeling_lgffem import to_rgb_uint8

    return to_rgb_uint8(image)


def make_thumbnail(image: ImageLike, size: int = THUMBNAIL_SIZE, quality: int = THUMBNAIL_QUALITY) -> bytes:
    """JPEG bytes of an RGB copy of ``image`` whose longer side is at most ``size`` pixels."""
    rgb = _to_rgb(image).copy()
    rgb.thumbnail((size, size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def decode_thumbnail(data: bytes) -> Image.Image:
    """JPEG bytes from the metadata -> a loaded PIL image."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def default_num_workers() -> int:
    """DataLoader workers: all cores but one, at most 8 (0 on a single core)."""
    return min(8, max(0, (os.cpu_count() or 1) - 1))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _package_versions() -> dict[str, Optional[str]]:
    versions: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _commit(directory: Path, writers: dict[str, Callable[[Path], None]]) -> dict[str, Path]:
    """Write several files of ``directory`` so that readers see all old or (after recovery) all new.

    Each file is written to a temporary name; a journal listing the renames is then written
    atomically, the renames are done in order (the manifest last) and the journal is removed.
    A crash before the journal leaves the old files; after it, :func:`_recover` finishes the job.
    """
    directory.mkdir(parents=True, exist_ok=True)
    _recover(directory)
    renames: list[tuple[str, str]] = []
    for name, write in writers.items():
        tmp = directory / f".{name}.tmp-{os.getpid()}"
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        renames.append((tmp.name, name))
    _write_atomic(directory / JOURNAL_FILE, lambda p: p.write_text(json.dumps({"renames": renames})))
    _recover(directory, interrupted=False)
    return {name: directory / name for name in writers}


def _recover(directory: Path, interrupted: bool = True) -> None:
    """Finish an interrupted :func:`_commit` (roll forward), if its journal is present."""
    journal = directory / JOURNAL_FILE
    if not journal.exists():
        return
    try:
        renames = json.loads(journal.read_text())["renames"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise IndexLoadError(f"corrupt commit journal {journal}: {err}") from err
    for tmp, name in renames:
        if (directory / tmp).exists():
            os.replace(directory / tmp, directory / name)
    journal.unlink()
    if interrupted:
        logger.warning("completed an interrupted write in %s", directory)


# --------------------------------------------------------------------------------------
# FAISS index construction
# --------------------------------------------------------------------------------------


def _largest_divisor(d: int, limit: int) -> int:
    return max(m for m in range(1, max(1, limit) + 1) if d % m == 0)


def default_index_params(index_type: str, n: int, d: int) -> dict:
    """Parameters used when none are given, sized for ``n`` vectors of dimension ``d``.

    - ``ivfpq``: ``nlist = clip(4 sqrt(n), 1, n / 39)`` inverted lists (FAISS wants >= 39
      training points per centroid), ``m`` = the largest divisor of ``d`` up to ``min(64, d / 4)``
      sub-quantisers, ``nbits = clip(log2(n / 39), 1, 8)``, ``nprobe = min(nlist, 16)``,
      trained on up to ``train_size = 100,000`` random vectors.
    - ``hnsw``: ``M = 32``, ``ef_construction = 200``, ``ef_search = 128``.
    - ``flat``: none.
    """
    if index_type == "flat":
        return {}
    if index_type == "ivfpq":
        train_size = min(n, 100_000)
        nlist = int(max(1, min(4 * math.sqrt(n), train_size // 39)))
        nbits = int(min(8, max(1, math.floor(math.log2(max(2, train_size / 39))))))
        m = _largest_divisor(d, min(64, d // 4))
        return {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": min(nlist, 16), "train_size": train_size}
    if index_type == "hnsw":
        return {"M": 32, "ef_construction": 200, "ef_search": 128}
    if index_type.startswith("factory:"):
        return {"train_size": min(n, 100_000)}
    raise ValueError(f"unknown index type {index_type!r}; choose one of {INDEX_TYPES} or 'factory:<faiss string>'")


def _apply_search_params(index: faiss.Index, index_type: str, params: dict) -> None:
    if index_type == "ivfpq" or (index_type.startswith("factory:") and "nprobe" in params):
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    if index_type == "hnsw" or (index_type.startswith("factory:") and "ef_search" in params):
        faiss.downcast_index(index).hnsw.efSearch = int(params["ef_search"])


def make_faiss_index(xb: np.ndarray, index_type: str = "flat", params: Optional[dict] = None, seed: int = 0):
    """Build a FAISS inner-product index over ``xb`` (``N x D`` float32, L2-normalised).

    Args:
        xb: database vectors; id ``i`` is row ``i``.
        index_type: ``"flat"`` (exact ``IndexFlatIP``), ``"ivfpq"`` (``IndexIVFPQ``, trained on a
            random sample), ``"hnsw"`` (``IndexHNSWFlat``) or ``"factory:<string>"`` (any
            ``faiss.index_factory`` string, trained on a sample when it needs training).
        params: overrides of :func:`default_index_params`.
        seed: seed of the training sample.

    Returns:
        ``(index, params)`` with the parameters actually used.
    """
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    if xb.ndim != 2 or xb.shape[0] < 1:
        raise ValueError(f"xb must be a non-empty N x D array, got shape {xb.shape}")
    n, d = xb.shape
    used = default_index_params(index_type, n, d)
    unknown = set(params or {}) - set(used) - {"nprobe", "ef_search"}
    if unknown:
        raise ValueError(f"unknown parameters {sorted(unknown)} for index type {index_type!r}; known: {sorted(used)}")
    used.update(params or {})
    metric = faiss.METRIC_INNER_PRODUCT
    if index_type == "flat":
        index = faiss.IndexFlatIP(d)
    elif index_type == "ivfpq":
        if d % int(used["m"]):
            raise ValueError(f"ivfpq: m={used['m']} must divide the dimension {d}")
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFPQ(quantizer, d, int(used["nlist"]), int(used["m"]), int(used["nbits"]), metric)
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(used["M"]), metric)
        index.hnsw.efConstruction = int(used["ef_construction"])
    else:  # factory:...
        index = faiss.index_factory(d, index_type.split(":", 1)[1], metric)
    if not index.is_trained:
        size = min(n, int(used["train_size"]))
        sample = xb if size == n else xb[np.sort(np.random.default_rng(seed).choice(n, size, replace=False))]
        logger.info("training %s index on %d of %d vectors", index_type, size, n)
        index.train(sample)
    index.add(xb)
    _apply_search_params(index, index_type, used)
    return index, used


# --------------------------------------------------------------------------------------
# Search results and the PatchIndex
# --------------------------------------------------------------------------------------


@dataclass
class SearchResult:
    """The ranked results of one query (best first); missing results are left out."""

    ids: list[int]
    scores: list[float]
    labels: list[str]
    sources: list[str]
    thumbnails: list[Optional[Image.Image]] = field(repr=False)
    votes: list[tuple[str, int]]

    @property
    def majority_label(self) -> Optional[str]:
        """The label with most votes (ties: the one ranked first); ``None`` without results."""
        return self.votes[0][0] if self.votes else None


def _embedder_summary(desc: dict) -> str:
    return (
        f"{desc.get('model')} (dim {desc.get('embedding_dim')}, config hash {desc.get('config_hash')}, "
        f"weights fingerprint {desc.get('weights_fingerprint')})"
    )


def check_manifest_matches(manifest: dict, embedder: EmbedderLike, path: Union[str, Path] = "index") -> None:
    """Raise :class:`IndexLoadError` unless the index was built with this model.

    Compares the embedding dimension, the config hash and the weights fingerprint.
    """
    built = manifest.get("model", {})
    given = embedder.describe()
    problems = [
        f"{key} {built.get(key)!r} != {given.get(key)!r}"
        for key in ("embedding_dim", "config_hash", "weights_fingerprint")
        if built.get(key) != given.get(key)
    ]
    if problems:
        raise IndexLoadError(
            f"index {path} was built with model {_embedder_summary(built)} but the given model is "
            f"{_embedder_summary(given)}: {'; '.join(problems)}. Load the model the index was built with, "
            "or rebuild the index with this model (python -m index_build ... --model ...)."
        )


class PatchIndex:
    """A loaded index directory: FAISS index + metadata + manifest, optionally with its model.

    Attributes:
        path: the index directory.
        index: the FAISS index (inner product on L2-normalised vectors).
        manifest: the parsed ``manifest.json``.
        embedder: the model used to embed image queries (``None``: embeddings only).
        row_labels: label of every id (list, id order).
        sources: source reference of every id.
    """

    def __init__(
        self, path: Union[str, Path], index: faiss.Index, metadata: pa.Table, manifest: dict, embedder=None
    ) -> None:
        self.path = Path(path)
        self.index = index
        self.manifest = manifest
        self.embedder = embedder
        self.row_labels: list[str] = metadata.column("label").to_pylist()
        self.sources: list[str] = metadata.column("source").to_pylist()
        self._thumbnails = metadata.column("thumbnail").combine_chunks()
        self._label_array = np.asarray(self.row_labels, dtype=object)

    # -- loading ----------------------------------------------------------------------

    @classmethod
    def load(cls, path: Union[str, Path], embedder: Optional[EmbedderLike] = None, verify: bool = True) -> "PatchIndex":
        """Open an index directory.

        Args:
            path: directory holding ``index.faiss``, ``metadata.parquet`` and ``manifest.json``.
            embedder: the model for image queries; the manifest must match it (dimension,
                config hash, weights fingerprint).
            verify: check the SHA-256 of the data files against the manifest.

        Raises:
            IndexLoadError: the directory or a file is missing or corrupt, the files disagree,
                or the index was built with another model.
        """
        path = Path(path)
        if not path.is_dir():
            raise IndexLoadError(f"index directory not found: {path}")
        try:
            _recover(path)
        except OSError as err:
            raise IndexLoadError(f"index {path} has an unfinished write that cannot be completed: {err}") from err
        missing = [name for name in (INDEX_FILE, METADATA_FILE, MANIFEST_FILE) if not (path / name).is_file()]
        if missing:
            raise IndexLoadError(f"index {path} is incomplete: missing {', '.join(missing)}")
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise IndexLoadError(f"corrupt {MANIFEST_FILE} in {path}: {err}") from err
        for key in ("format_version", "count", "model", "index", "files"):
            if not isinstance(manifest, dict) or key not in manifest:
                raise IndexLoadError(f"corrupt {MANIFEST_FILE} in {path}: no {key!r} entry")
        if manifest["format_version"] > FORMAT_VERSION:
            raise IndexLoadError(
                f"index {path} has format version {manifest['format_version']}; this code reads up to {FORMAT_VERSION}"
            )
        for name in (INDEX_FILE, METADATA_FILE):
            expected = manifest["files"].get(name, {})
            size = (path / name).stat().st_size
            if size != expected.get("bytes"):
                raise IndexLoadError(
                    f"corrupt {name} in {path}: {size} bytes, the manifest says {expected.get('bytes')}"
                )
            if verify and _sha256(path / name) != expected.get("sha256"):
                raise IndexLoadError(f"corrupt {name} in {path}: SHA-256 differs from the manifest")
        if embedder is not None:
            check_manifest_matches(manifest, embedder, path)
        try:
            index = faiss.read_index(str(path / INDEX_FILE))
        except RuntimeError as err:
            raise IndexLoadError(f"corrupt {INDEX_FILE} in {path}: {err}") from err
        try:
            metadata = pq.read_table(path / METADATA_FILE)
        except (pa.ArrowException, OSError) as err:
            raise IndexLoadError(f"corrupt {METADATA_FILE} in {path}: {err}") from err
        if not METADATA_SCHEMA.equals(metadata.schema, check_metadata=False):
            raise IndexLoadError(f"{METADATA_FILE} in {path} has schema {metadata.schema}, expected {METADATA_SCHEMA}")
        count = manifest["count"]
        if not index.ntotal == metadata.num_rows == count:
            raise IndexLoadError(
                f"index {path} is inconsistent: {index.ntotal} vectors, {metadata.num_rows} metadata rows, "
                f"manifest count {count}"
            )
        if index.d != manifest["model"].get("embedding_dim"):
            raise IndexLoadError(f"index {path}: vectors have dim {index.d}, manifest says {manifest['model']}")
        _apply_search_params(index, manifest["index"]["type"], manifest["index"].get("params", {}))
        logger.info("loaded index %s: %d vectors (%s)", path, count, manifest["index"]["type"])
        return cls(path, index, metadata, manifest, embedder)

    # -- properties -------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def labels(self) -> list[str]:
        """Sorted distinct labels in the index."""
        return sorted(set(self.row_labels))

    @property
    def index_type(self) -> str:
        return self.manifest["index"]["type"]

    def thumbnail(self, i: int) -> Optional[Image.Image]:
        """The thumbnail of id ``i``; ``None`` for rows stored without one (empty bytes)."""
        data = self._thumbnails[int(i)].as_py()
        return decode_thumbnail(data) if data else None

    def reconstruct_all(self) -> np.ndarray:
        """All stored vectors (``N x D``); exact only for the flat and HNSW types."""
        return np.ascontiguousarray(self.index.reconstruct_n(0, len(self)), dtype=np.float32)

    # -- search -----------------------------------------------------------------------

    def _search_parameters(self, label: str) -> Any:
        ids = np.flatnonzero(self._label_array == label).astype(np.int64)
        selector = faiss.IDSelectorBatch(ids)
        params = self.manifest["index"].get("params", {})
        kind = self.index_type
        if kind == "ivfpq" or (kind.startswith("factory:") and "nprobe" in params):
            return faiss.SearchParametersIVF(sel=selector, nprobe=int(params["nprobe"])), selector
        if kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=selector, efSearch=int(params["ef_search"])), selector
        return faiss.SearchParameters(sel=selector), selector

    def search_embeddings(self, xq: np.ndarray, k: int, label: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search: ``xq`` (``Nq x D``, L2-normalised here) -> ``D`` (scores), ``I`` (ids, -1 = none).

        Args:
            xq: query embeddings.
            k: results per query.
            label: only return results with this label.
        """
        xq = np.array(xq, dtype=np.float32, order="C", ndmin=2)
        if xq.ndim != 2 or xq.shape[1] != self.dim:
            raise ValueError(f"query embeddings must be Nq x {self.dim}, got shape {xq.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        faiss.normalize_L2(xq)
        if label is None:
            return self.index.search(xq, k)
        if label not in set(self.row_labels):
            raise ValueError(f"label {label!r} is not in the index; labels: {self.labels}")
        params, _selector = self._search_parameters(label)  # keep the selector alive during search
        return self.index.search(xq, k, params=params)

    def embed(self, queries: Union[ImageLike, Sequence[ImageLike]], batch_size: int = 32) -> np.ndarray:
        """Images (one or a list) -> query embeddings with this index's model."""
        if self.embedder is None:
            raise ValueError("this PatchIndex was loaded without a model: pass embeddings, or load with embedder=")
        images = [queries] if isinstance(queries, (Image.Image, np.ndarray)) else list(queries)
        return self.embedder.embed_images(images, batch_size=batch_size)

    def search(
        self, queries: Union[np.ndarray, ImageLike, Sequence[ImageLike]], k: int = 8, label: Optional[str] = None
    ) -> list[SearchResult]:
        """Search images or embeddings.

        Args:
            queries: an ``Nq x D`` floating-point array of embeddings (``D`` = index dim), or one
                image / a list of images (PIL or uint8/uint16 arrays), embedded with ``embedder``.
            k: results per query.
            label: only results with this label.

        Returns:
            One :class:`SearchResult` per query.
        """
        is_embeddings = (
            isinstance(queries, np.ndarray)
            and queries.ndim == 2
            and np.issubdtype(queries.dtype, np.floating)
            and queries.shape[1] == self.dim
        )
        xq = queries if is_embeddings else self.embed(queries)
        scores, ids = self.search_embeddings(xq, k, label=label)
        return [self._result(row_scores, row_ids) for row_scores, row_ids in zip(scores, ids)]

    def _result(self, scores: np.ndarray, ids: np.ndarray) -> SearchResult:
        keep = ids >= 0
        ids_list = [int(i) for i in ids[keep]]
        labels = [self.row_labels[i] for i in ids_list]
        return SearchResult(
            ids=ids_list,
            scores=[float(s) for s in scores[keep]],
            labels=labels,
            sources=[self.sources[i] for i in ids_list],
            thumbnails=[self.thumbnail(i) for i in ids_list],
            votes=majority_votes(labels),
        )

    # -- append -----------------------------------------------------------------------

    def add(
        self, images: Sequence[ImageLike], labels: Sequence[str], sources: Optional[Sequence[str]] = None
    ) -> np.ndarray:
        """Embed images and append them to the index on disk (atomic). Returns their new ids.

        Args:
            images: PIL images or arrays.
            labels: one label per image.
            sources: one source reference per image (default ``"added:<id>"``).
        """
        images = list(images)
        if len(labels) != len(images) or (sources is not None and len(sources) != len(images)):
            raise ValueError(f"need one label and one source per image ({len(images)} images)")
        if not images:
            raise ValueError("no images to add")
        xb = self.embed(images)
        thumbnails = [make_thumbnail(image) for image in images]
        if sources is None:
            sources = [f"added:{len(self) + i}" for i in range(len(images))]
        return self.add_embeddings(xb, labels, sources, thumbnails)

    def add_embeddings(
        self, xb: np.ndarray, labels: Sequence[str], sources: Sequence[str], thumbnails: Sequence[bytes]
    ) -> np.ndarray:
        """Append precomputed embeddings with their metadata and rewrite the directory atomically."""
        xb = np.array(xb, dtype=np.float32, order="C", ndmin=2)
        n = xb.shape[0]
        if xb.shape[1] != self.dim or not len(labels) == len(sources) == len(thumbnails) == n:
            raise ValueError(f"need an N x {self.dim} array and N labels, sources, thumbnails; got {xb.shape}")
        faiss.normalize_L2(xb)
        start = len(self)
        new_ids = np.arange(start, start + n, dtype=np.int64)
        added = pa.table(
            {
                "id": pa.array(new_ids, pa.int64()),
                "label": pa.array([str(v) for v in labels], pa.string()),
                "source": pa.array([str(v) for v in sources], pa.string()),
                "thumbnail": pa.array(list(thumbnails), pa.binary()),
            },
            schema=METADATA_SCHEMA,
        )
        metadata = pa.concat_tables([self._metadata_table(), added])
        index = faiss.clone_index(self.index)
        index.add(xb)
        _apply_search_params(index, self.index_type, self.manifest["index"].get("params", {}))
        manifest = dict(self.manifest, updated=_now())
        manifest = _write_directory(self.path, index, metadata, manifest)
        self.__init__(self.path, index, metadata, manifest, self.embedder)
        logger.info("appended %d vectors to %s (now %d)", n, self.path, len(self))
        return new_ids

    def _metadata_table(self) -> pa.Table:
        return pa.table(
            {
                "id": pa.array(np.arange(len(self.row_labels), dtype=np.int64)),
                "label": pa.array(self.row_labels, pa.string()),
                "source": pa.array(self.sources, pa.string()),
                "thumbnail": self._thumbnails,
            },
            schema=METADATA_SCHEMA,
        )


# --------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------


def _write_directory(path: Path, index: faiss.Index, metadata: pa.Table, manifest: dict) -> dict:
    """Commit index, metadata and manifest (with counts, labels and checksums) atomically."""
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
            name: {"bytes": staged[name].stat().st_size, "sha256": _sha256(staged[name])}
            for name in (INDEX_FILE, METADATA_FILE)
        }
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")

    _commit(
        path,
        {
            INDEX_FILE: stage(INDEX_FILE, lambda tmp: faiss.write_index(index, str(tmp))),
            METADATA_FILE: stage(METADATA_FILE, lambda tmp: pq.write_table(metadata, tmp)),
            MANIFEST_FILE: write_manifest,
        },
    )
    return manifest


def _preprocessing(embedder: EmbedderLike) -> dict:
    processor = embedder.processor
    return {
        "processor": type(processor).__name__,
        "image_size": getattr(processor, "image_size", None),
        "image_mean": getattr(processor, "image_mean", None),
        "image_std": getattr(processor, "image_std", None),
        "resize": "bilinear, antialiased, to a square",
        "color": "RGB (alpha composited on white, 16-bit scaled to 8-bit)",
    }


def write_index(
    path: Union[str, Path],
    xb: np.ndarray,
    metadata: pa.Table,
    embedder: EmbedderLike,
    index_type: str = "flat",
    index_params: Optional[dict] = None,
    dataset_info: Optional[dict] = None,
) -> PatchIndex:
    """Writer: FAISS index over ``xb`` + ``metadata`` (schema ``id, label, source, thumbnail``) + manifest.

    Args:
        path: output directory (created).
        xb: ``N x D`` float32 embeddings, row ``i`` = id ``i``.
        metadata: one row per vector.
        embedder: the model that made ``xb`` (recorded in the manifest).
        index_type: see :func:`make_faiss_index`.
        index_params: overrides of the index parameters.
        dataset_info: what the vectors came from (source, split, columns), recorded as is.
    """
    path = Path(path)
    if metadata.num_rows != len(xb):
        raise ValueError(f"{len(xb)} vectors but {metadata.num_rows} metadata rows")
    desc = embedder.describe()
    if xb.shape[1] != desc["embedding_dim"]:
        raise ValueError(f"vectors have dim {xb.shape[1]}, the model says {desc['embedding_dim']}")
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    faiss.normalize_L2(xb)
    index, used = make_faiss_index(xb, index_type, index_params)
    metadata = metadata.set_column(0, "id", pa.array(np.arange(len(xb), dtype=np.int64)))
    now = _now()
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": now,
        "updated": now,
        "model": desc,
        "embedding_dim": int(xb.shape[1]),
        "metric": "cosine (inner product of L2-normalised vectors)",
        "preprocessing": _preprocessing(embedder),
        "index": {"type": index_type, "class": type(index).__name__, "params": used},
        "count": int(index.ntotal),
        "thumbnail": {"max_side": THUMBNAIL_SIZE, "format": "JPEG", "quality": THUMBNAIL_QUALITY},
        "dataset": dataset_info or {},
        "packages": _package_versions(),
    }
    manifest = _write_directory(path, index, metadata, manifest)
    logger.info("wrote %s index with %d vectors to %s", index_type, index.ntotal, path)
    return PatchIndex(path, index, metadata, manifest, embedder)


# --------------------------------------------------------------------------------------
# Reader and embedder (resumable)
# --------------------------------------------------------------------------------------


class ImageRowDataset(torch.utils.data.Dataset):
    """Rows ``start..`` of a dataset -> ``(pixel_values, label, source, thumbnail JPEG)``.

    Runs in DataLoader workers: decoding, preprocessing and thumbnailing happen there.
    ``thumbnail_size <= 0`` skips the thumbnail (empty bytes).
    """

    def __init__(self, dataset, processor: Any, start: int = 0, thumbnail_size: int = THUMBNAIL_SIZE) -> None:
        self.dataset = dataset
        self.processor = processor
        self.start = start
        self.thumbnail_size = thumbnail_size

    def __len__(self) -> int:
        return len(self.dataset) - self.start

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, str, bytes]:
        row = self.start + i
        try:
            item = self.dataset[row]
            image = item["image"]
            pixels = torch.from_numpy(self.processor.to_array(image))
            thumbnail = make_thumbnail(image, self.thumbnail_size) if self.thumbnail_size > 0 else b""
        except (OSError, ValueError, SyntaxError) as err:
            source = self.dataset.select([row]).select_columns(["source"])[0]["source"]
            raise ValueError(f"cannot read image at row {row} ({source}): {err}") from err
        return pixels, item["label"], item["source"], thumbnail


def _data_hash(dataset) -> str:
    digest = hashlib.sha256()
    for name in ("label", "source"):
        for value in dataset.select_columns([name])[name]:
            digest.update(str(value).encode())
            digest.update(b"\0")
    return digest.hexdigest()[:16]


def _chunk_paths(work: Path, chunk: int) -> tuple[Path, Path]:
    return work / f"chunk-{chunk:06d}.parquet", work / f"chunk-{chunk:06d}.npy"


def _complete_chunks(work: Path, n: int, chunk_size: int) -> int:
    """Number of leading chunks that are fully on disk (later leftovers are removed)."""
    done = 0
    while done * chunk_size < n:
        meta, vecs = _chunk_paths(work, done)
        rows = min(chunk_size, n - done * chunk_size)
        if not (meta.exists() and vecs.exists()):
            break
        try:
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
            logger.warning("partial build in %s is for another model or dataset; starting over", work)
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    _write_atomic(state_file, lambda p: p.write_text(json.dumps(state, indent=2)))


def _write_chunk(work: Path, chunk: int, xb: np.ndarray, labels: list, sources: list, thumbs: list) -> None:
    meta, vecs = _chunk_paths(work, chunk)
    table = pa.table(
        {
            "id": pa.array(np.zeros(len(labels), np.int64)),
            "label": pa.array(labels, pa.string()),
            "source": pa.array(sources, pa.string()),
            "thumbnail": pa.array(thumbs, pa.binary()),
        },
        schema=METADATA_SCHEMA,
    )
    _write_atomic(meta, lambda p: pq.write_table(table, p))

    # The vectors go last: a chunk counts as done only when both files exist.
    def save_vectors(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, xb)

    _write_atomic(vecs, save_vectors)


def embed_dataset(
    dataset,
    embedder: EmbedderLike,
    work_dir: Union[str, Path],
    batch_size: int = 32,
    num_workers: Optional[int] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    resume: bool = True,
    progress: bool = True,
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

    Returns:
        ``(xb, metadata)``: ``N x D`` float32 embeddings and the metadata table (ids 0..N-1).
    """
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size}, {chunk_size}")
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty: nothing to index")
    work = Path(work_dir)
    desc = embedder.describe()
    state = {
        "model": {k: desc.get(k) for k in ("model", "config_hash", "weights_fingerprint", "embedding_dim")},
        "rows": n,
        "data_hash": _data_hash(dataset),
        "chunk_size": chunk_size,
        "thumbnail_size": THUMBNAIL_SIZE,
    }
    _prepare_work_dir(work, state, resume)
    done = _complete_chunks(work, n, chunk_size)
    start = done * chunk_size
    if done:
        logger.info("resuming: %d of %d rows already embedded in %s", start, n, work)
    workers = default_num_workers() if num_workers is None else num_workers
    if start < n:
        loader = torch.utils.data.DataLoader(
            ImageRowDataset(dataset, embedder.processor, start),
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            pin_memory=torch.device(embedder.device).type == "cuda",
        )
        buffers: dict[str, list] = {"xb": [], "labels": [], "sources": [], "thumbs": []}
        pending = 0
        chunk = done
        with tqdm(total=n, initial=start, unit="img", desc="embedding", disable=not progress) as bar:
            for pixels, labels, sources, thumbs in loader:
                xb = embedder.embed_pixels(pixels)
                if xb.shape != (len(labels), embedder.dim):
                    raise ValueError(f"embedder returned shape {xb.shape} for {len(labels)} images")
                buffers["xb"].append(xb)
                buffers["labels"].extend(labels)
                buffers["sources"].extend(sources)
                buffers["thumbs"].extend(thumbs)
                pending += len(labels)
                bar.update(len(labels))
                while pending >= chunk_size or (pending and chunk * chunk_size + pending == n):
                    take = min(pending, chunk_size)
                    stacked = np.concatenate(buffers["xb"])
                    _write_chunk(
                        work,
                        chunk,
                        stacked[:take],
                        buffers["labels"][:take],
                        buffers["sources"][:take],
                        buffers["thumbs"][:take],
                    )
                    buffers = {
                        "xb": [stacked[take:]],
                        "labels": buffers["labels"][take:],
                        "sources": buffers["sources"][take:],
                        "thumbs": buffers["thumbs"][take:],
                    }
                    pending -= take
                    chunk += 1
    chunks = math.ceil(n / chunk_size)
    xb = np.concatenate([np.load(_chunk_paths(work, c)[1]) for c in range(chunks)])
    metadata = pa.concat_tables([pq.read_table(_chunk_paths(work, c)[0]) for c in range(chunks)])
    metadata = metadata.set_column(0, "id", pa.array(np.arange(n, dtype=np.int64)))
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
) -> PatchIndex:
    """Reader -> embedder -> writer: embed ``dataset`` and write (or append to) an index directory.

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
            ``index_type`` and ``index_params`` are then those of the existing index).
        overwrite: replace an existing index (otherwise an existing index is an error).
        index_params: overrides of the index parameters (see :func:`default_index_params`).
        chunk_size: rows per persisted chunk (the resume granularity).
        dataset_info: recorded in the manifest.

    Raises:
        ValueError: an index already exists (without ``append``/``overwrite``), or bad input.
        IndexLoadError: ``append`` to a missing/corrupt index or one built with another model.
    """
    out = Path(out_dir)
    exists = (out / MANIFEST_FILE).exists()
    if append and overwrite:
        raise ValueError("append and overwrite exclude each other")
    if exists and not (append or overwrite):
        raise ValueError(f"an index already exists in {out}; append to it or overwrite it")
    if index_type not in INDEX_TYPES and not index_type.startswith("factory:"):
        raise ValueError(f"unknown index type {index_type!r}; choose one of {INDEX_TYPES} or 'factory:<faiss string>'")
    existing = PatchIndex.load(out, embedder) if append else None
    work = out / (WORK_DIR + ("-append" if append else ""))
    xb, metadata = embed_dataset(dataset, embedder, work, batch_size, num_workers, chunk_size, resume, progress)
    if existing is not None:
        existing.add_embeddings(
            xb,
            metadata.column("label").to_pylist(),
            metadata.column("source").to_pylist(),
            metadata.column("thumbnail").to_pylist(),
        )
        result = existing
    else:
        result = write_index(out, xb, metadata, embedder, index_type, index_params, dataset_info)
    shutil.rmtree(work)
    return result
