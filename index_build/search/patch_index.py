"""``PatchIndex``: a loaded index directory (FAISS index + metadata + manifest) that can be searched and grown.

Queries are explicit: ``search(images=...)`` embeds images with the index's model,
``search(embeddings=...)`` takes vectors; a label filter restricts results to one label on any
index type. :func:`write_index` builds a new index directory from vectors and metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Protocol, Union

import faiss
import numpy as np
import pyarrow as pa
from PIL import Image

from index_build.calibration import close_match_threshold
from index_build.faiss_index import make_faiss_index, search_parameters, set_search_params
from index_build.metrics import majority_votes
from index_build.storage import (
    FORMAT_VERSION,
    JOURNAL_FILE,
    MANIFEST_FILE,
    METADATA_SCHEMA,
    THUMBNAIL_QUALITY,
    THUMBNAIL_SIZE,
    ImageLike,
    check_model,
    decode_thumbnail,
    extra_table,
    index_lock,
    make_thumbnail,
    metadata_table,
    now,
    package_versions,
    read_directory,
    write_directory,
)
from index_build.verdict import fit_decision, near_duplicate_groups, rule_of

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "EmbedderLike",
    "IndexChangedError",
    "PatchIndex",
    "SearchResult",
    "check_manifest_matches",
    "write_built_index",
    "write_index",
]


class IndexChangedError(RuntimeError):
    """The rows to delete were changed by another writer since the caller read them."""


class EmbedderLike(Protocol):
    """What the index needs from a model (``index_build.models.Embedder`` or a baseline)."""

    processor: Any
    device: torch.device

    @property
    def dim(self) -> int: ...

    def embed_pixels(self, pixel_values: torch.Tensor) -> np.ndarray: ...

    def embed_images(self, images: Sequence[ImageLike], batch_size: int = 32) -> np.ndarray: ...

    def describe(self) -> dict: ...


def check_manifest_matches(manifest: dict, embedder: EmbedderLike, path: Union[str, Path] = "index") -> None:
    """Raise :class:`~index_build.storage.IndexLoadError` unless the index was built with this model.

    Compares the embedding dimension, the config hash and the weights fingerprint.
    """
    check_model(manifest, embedder.describe(), path)


@dataclass
class SearchResult:
    """The ranked results of one query (best first); missing results are left out."""

    ids: list[int]
    scores: list[float]
    labels: list[str]
    sources: list[str]
    thumbnails: list[Optional[Image.Image]] = field(repr=False)
    votes: list[tuple[str, int]]
    threshold: Optional[float] = None
    """The index's calibrated close-match similarity (``None`` when it has none)."""

    @property
    def close_match(self) -> Optional[bool]:
        """Whether the best result reaches the close-match threshold (``None``: no threshold or no result)."""
        if self.threshold is None or not self.scores:
            return None
        return self.scores[0] >= self.threshold

    @property
    def majority_label(self) -> Optional[str]:
        """The label with most votes (ties: the one ranked first); ``None`` without results."""
        return self.votes[0][0] if self.votes else None


class PatchIndex:
    """A loaded index directory: FAISS index + metadata + manifest, optionally with its model.

    Attributes:
        path: the index directory.
        index: the FAISS index (inner product on L2-normalised vectors).
        manifest: the parsed ``manifest.json``.
        embedder: the model used to embed image queries (``None``: embeddings only).
        row_labels: label of every id (list, id order).
        sources: source reference of every id.
        extra: the metadata columns after ``id, label, source, thumbnail``, name -> one value (or
            ``None``) per id: ``added`` and ``sha256`` in a personal gallery, ``slide, x, y, size0,
            mpp`` in a slide index.
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
        # columns after id/label/source/thumbnail (a slide index: slide, x, y, size0, mpp)
        self._extra = metadata.drop_columns([name for name in METADATA_SCHEMA.names if name in metadata.column_names])
        self._label_array = np.asarray(self.row_labels, dtype=object)
        self._label_set = frozenset(self.row_labels)

    @classmethod
    def load(
        cls,
        path: Union[str, Path],
        embedder: Optional[EmbedderLike] = None,
        verify: bool = True,
        read_only: bool = False,
    ) -> PatchIndex:
        """Open an index directory.

        Args:
            path: directory holding ``index.faiss``, ``metadata.parquet`` and ``manifest.json``.
            embedder: the model for image queries; the manifest must match it (dimension,
                config hash, weights fingerprint).
            verify: check the SHA-256 of the data files against the manifest.
            read_only: never write to the directory (an unfinished write is read, not completed).

        Raises:
            IndexLoadError: the directory or a file is missing or corrupt, the files disagree,
                or the index was built with another model.
        """
        model = embedder.describe() if embedder is not None else None
        index, metadata, manifest = read_directory(path, model, verify, read_only)
        set_search_params(index, manifest["index"].get("params", {}))
        logger.info("loaded index %s: %d vectors (%s)", path, manifest["count"], manifest["index"]["type"])
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

    def has_label(self, label: str) -> bool:
        """Whether some patch of the index has this label."""
        return label in self._label_set

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

    def metadata_table(self) -> pa.Table:
        """The metadata of every id, in id order (with any extra columns, e.g. a slide index's)."""
        table = metadata_table(np.arange(len(self)), self.row_labels, self.sources, self._thumbnails)
        for name in self._extra.column_names:
            table = table.append_column(name, self._extra.column(name))
        return table

    @property
    def extra(self) -> dict[str, list]:
        """The extra metadata columns, name -> one value (or ``None``) per id."""
        return {name: self._extra.column(name).to_pylist() for name in self._extra.column_names}

    @property
    def extra_columns(self) -> list[str]:
        """Metadata columns beyond ``id, label, source, thumbnail`` (``slide, x, y, size0, mpp`` for slides)."""
        return list(self._extra.column_names)

    @property
    def row_ids(self) -> list[int]:
        """The stable id of each row (its ``row_id`` column; row numbers for an index without one)."""
        if "row_id" not in self.extra_columns:
            return list(range(len(self)))
        return [int(v) if v is not None else i for i, v in enumerate(self.extra["row_id"])]

    def next_row_id(self) -> int:
        """The row id the next added row gets: never one that was given before (kept by ``next_row_id``)."""
        ids = self.row_ids
        return max(int(self.manifest.get("next_row_id") or 0), max(ids) + 1 if ids else 0)

    def assign_row_ids(self) -> None:
        """Give an index without a ``row_id`` column one (row numbers, the ids it was shown with). Commits."""
        with index_lock(self.path):
            self._refresh()
            if "row_id" in self.extra_columns:
                return
            metadata = self.metadata_table().append_column(
                pa.field("row_id", pa.int64()), pa.array(range(len(self)), pa.int64())
            )
            self._commit(faiss.clone_index(self.index), metadata, dict(self.manifest, next_row_id=self.next_row_id()))

    def column(self, name: str) -> list:
        """The values of an extra metadata column, in id order.

        Raises:
            KeyError: no such column.
        """
        if name not in self._extra.column_names:
            raise KeyError(f"{self.path} has no metadata column {name!r} (extra columns: {self.extra_columns})")
        return self._extra.column(name).to_pylist()

    # -- search -----------------------------------------------------------------------

    def where_mask(self, where: Optional[Mapping[str, Any]]) -> Optional[np.ndarray]:
        """The rows matching a metadata filter, as a boolean array (``None``: no filter).

        ``where`` maps a column (``label`` or an extra column: ``organ``, ``stain``, ``slide``, ...)
        to a value or a list of values; a row matches when each of its columns holds one of the
        values given for it. Computed column-wise with Arrow, not row by row in Python.

        Raises:
            ValueError: an unknown column, or an empty list of values.
        """
        if not where:
            return None
        import pyarrow.compute as pc

        mask = np.ones(len(self), dtype=bool)
        for name, wanted in where.items():
            if name == "label":
                column = pa.array(self.row_labels, pa.string())
            elif name in self._extra.column_names:
                column = self._extra.column(name)
            else:
                raise ValueError(f"no metadata column {name!r} to filter on; columns: {['label', *self.extra_columns]}")
            values = list(wanted) if isinstance(wanted, (list, tuple, set, frozenset)) else [wanted]
            if not values:
                raise ValueError(f"filter on {name!r}: give at least one value")
            try:
                allowed = pa.array(values, type=column.type)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as err:
                raise ValueError(f"filter on {name!r}: {values!r} are not {column.type} values ({err})") from err
            mask &= np.asarray(pc.fill_null(pc.is_in(column, value_set=allowed), False))
        return mask

    def case_column(self) -> Optional[str]:
        """The column that names a result's case for per-case diversity: ``case``, else ``patient``, else ``slide``."""
        return next((name for name in ("case", "patient", "slide") if name in self._extra.column_names), None)

    def search_embeddings(
        self,
        xq: np.ndarray,
        k: int,
        label: Optional[str] = None,
        where: Optional[Mapping[str, Any]] = None,
        per_case: Optional[int] = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search: ``xq`` (``Nq x D``, L2-normalised here) -> ``D`` (scores), ``I`` (ids, -1 = none).

        Args:
            xq: query embeddings.
            k: results per query.
            label: only return results with this label.
            where: only rows matching this metadata filter (:meth:`where_mask`); FAISS skips the
                other rows during the search (an ID selector), so k matching results come back.
            per_case: at most this many results per case (:meth:`case_column`); the search
                over-fetches and regroups until k results are found or the index is exhausted.
        """
        xq = np.array(xq, dtype=np.float32, order="C", ndmin=2)
        if xq.ndim != 2 or xq.shape[1] != self.dim:
            raise ValueError(f"query embeddings must be Nq x {self.dim}, got shape {xq.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if per_case is not None and per_case < 1:
            raise ValueError(f"per_case must be >= 1, got {per_case}")
        faiss.normalize_L2(xq)
        mask = self.where_mask(where)
        if label is not None:
            if not self.has_label(label):
                raise ValueError(f"label {label!r} is not in the index; labels: {self.labels}")
            mask = (self._label_array == label) if mask is None else mask & (self._label_array == label)
        case = self.case_column() if per_case is not None else None
        if case is None:
            return self._search_masked(xq, k, mask)
        cases = self._extra.column(case).to_pylist()
        scores = np.full((len(xq), k), np.finfo(np.float32).min, dtype=np.float32)  # as FAISS pads
        ids = np.full((len(xq), k), -1, dtype=np.int64)
        available = len(self) if mask is None else int(mask.sum())
        fetch = min(available, k * 4)
        todo = list(range(len(xq)))
        while todo and fetch > 0:
            found_s, found_i = self._search_masked(xq[todo], fetch, mask)
            left = []
            for row, row_s, row_i in zip(todo, found_s, found_i):
                taken, counts = 0, {}
                for score, i in zip(row_s, row_i):
                    if i < 0 or taken == k:
                        break
                    key = cases[i]
                    if counts.get(key, 0) < per_case:
                        counts[key] = counts.get(key, 0) + 1
                        scores[row, taken], ids[row, taken] = score, i
                        taken += 1
                if taken < k and fetch < available:
                    left.append(row)
            todo, fetch = left, min(available, fetch * 4) if fetch < available else 0
        return scores, ids

    def _search_masked(self, xq: np.ndarray, k: int, mask: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if mask is None:
            return self.index.search(xq, k)
        bitmap = np.packbits(mask, bitorder="little")
        selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bitmap))
        # ``bitmap`` and ``selector`` stay referenced until the search returns (the parameters only point to them).
        return self.index.search(xq, k, params=search_parameters(self.index, selector))

    def embed(self, images: Union[ImageLike, Sequence[ImageLike]], batch_size: int = 32) -> np.ndarray:
        """Images (one or a list) -> query embeddings with this index's model."""
        if self.embedder is None:
            raise ValueError("this PatchIndex was loaded without a model: pass embeddings, or load with embedder=")
        batch = [images] if isinstance(images, (Image.Image, np.ndarray)) else list(images)
        return self.embedder.embed_images(batch, batch_size=batch_size)

    def search(
        self,
        *,
        images: Union[ImageLike, Sequence[ImageLike], None] = None,
        embeddings: Optional[np.ndarray] = None,
        k: int = 8,
        label: Optional[str] = None,
        where: Optional[Mapping[str, Any]] = None,
        per_case: Optional[int] = None,
    ) -> list[SearchResult]:
        """Search with images or with embeddings (exactly one of the two).

        Args:
            images: one image or a list of images (PIL, or uint8/uint16/float arrays of pixels),
                embedded with this index's model.
            embeddings: ``Nq x D`` query embeddings (``D`` = the index's dimension).
            k: results per query.
            label: only results with this label.
            where: metadata filter, e.g. ``{"organ": "lung", "stain": ["HE"]}`` (:meth:`where_mask`).
            per_case: at most this many results per case or slide (:meth:`case_column`).

        Returns:
            One :class:`SearchResult` per query.
        """
        if (images is None) == (embeddings is None):
            raise ValueError("give images= or embeddings= (exactly one)")
        xq = self.embed(images) if images is not None else embeddings
        scores, ids = self.search_embeddings(xq, k, label=label, where=where, per_case=per_case)
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
            threshold=self.close_match_threshold,
        )

    @property
    def close_match_threshold(self) -> Optional[float]:
        """The similarity a best result must reach to count as a close match (see
        :mod:`index_build.calibration`); ``None`` for indexes built without one."""
        calibration = self.manifest.get("close_match")
        return float(calibration["threshold"]) if isinstance(calibration, dict) and "threshold" in calibration else None

    @property
    def decision_rule(self) -> dict:
        """The fitted decision rule of :mod:`index_build.verdict` (manifest ``decision``).

        An index written before the rule existed gets it fitted on first use from its stored vectors
        (kept in memory, marked ``"computed": "on load"``, not written); where the vectors cannot be
        read back (IVF without a direct map) or no rule can be fitted (a single label), the
        conservative :data:`~index_build.verdict.DEFAULT_RULE`.
        """
        if "decision" in self.manifest or len(self) == 0:
            return rule_of(self.manifest)
        cached = getattr(self, "_decision_on_load", None)
        if cached is None:
            try:
                fitted = gallery_decision(
                    self.reconstruct_all(), self.metadata_table(), self.manifest.get("close_match")
                )
            except RuntimeError:
                fitted = None
            cached = dict(fitted, computed="on load") if fitted else rule_of({})
            self._decision_on_load = cached
        return cached

    # -- append -----------------------------------------------------------------------

    def add(
        self,
        images: Sequence[ImageLike],
        labels: Sequence[str],
        sources: Optional[Sequence[str]] = None,
        extra: Optional[dict[str, Sequence]] = None,
    ) -> np.ndarray:
        """Embed images and append them to the index on disk (atomic). Returns their new ids.

        Args:
            images: PIL images or arrays.
            labels: one label per image.
            sources: one source reference per image (default ``"added:<id>"``).
            extra: optional metadata columns, name -> one value per image (see :attr:`extra`).
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
        return self.add_embeddings(xb, labels, sources, thumbnails, extra=extra)

    def add_embeddings(
        self,
        xb: np.ndarray,
        labels: Sequence[str],
        sources: Sequence[str],
        thumbnails: Sequence[bytes],
        skip_existing: bool = False,
        skipped: Optional[Sequence[dict]] = None,
        extra: Optional[Union[dict[str, Sequence], pa.Table]] = None,
        extra_files: Optional[dict] = None,
    ) -> np.ndarray:
        """Append precomputed embeddings with their metadata and rewrite the directory atomically.

        Holds the directory's writer lock and appends to what is committed on disk now (rows
        another process added since this object was loaded are kept).

        Args:
            xb: ``N x D`` embeddings.
            labels, sources, thumbnails: one per row.
            skip_existing: leave out rows already in the index (same source, label and thumbnail
                bytes, i.e. the same image from the same place), so that rerunning an append adds
                nothing twice.
            skipped: unreadable images left out of this append (``{"source", "reason"}`` each),
                added to the manifest's ``"skipped"`` list (once each).
            extra: extra metadata columns of the new rows, as a table or name -> one value per row
                (e.g. ``added`` and ``sha256`` of a personal gallery, ``slide, x, y, size0, mpp`` of a
                slide index); rows of a column the index or this append lacks are null there.
            extra_files: files committed with the index (see :func:`index_build.storage.write_directory`).

        Returns:
            The ids of the rows added (skipped rows have none).
        """
        xb = np.array(xb, dtype=np.float32, order="C", ndmin=2)
        n = xb.shape[0]
        if xb.shape[1] != self.dim or not len(labels) == len(sources) == len(thumbnails) == n:
            raise ValueError(f"need an N x {self.dim} array and N labels, sources, thumbnails; got {xb.shape}")
        labels, sources, thumbnails = list(labels), list(sources), list(thumbnails)
        extra = extra_table(extra, n)
        blank = [i for i, label in enumerate(labels) if not str(label).strip()]
        if blank:
            raise ValueError(f"every row needs a label (a class name); rows {blank[:10]} have an empty one")
        if extra is not None and extra.num_rows != n:
            raise ValueError(f"{n} rows but {extra.num_rows} rows of extra columns")
        with index_lock(self.path):
            self._refresh()
            return self._append(xb, labels, sources, thumbnails, skip_existing, list(skipped or ()), extra, extra_files)

    def _refresh(self) -> None:
        """Reload the directory if another writer committed since this object read it."""
        try:
            on_disk = json.loads((self.path / MANIFEST_FILE).read_text()).get("files")
        except (OSError, ValueError, AttributeError):
            on_disk = None
        if on_disk == self.manifest.get("files") and not (self.path / JOURNAL_FILE).exists():
            return
        model = self.embedder.describe() if self.embedder is not None else None
        index, metadata, manifest = read_directory(self.path, model)
        set_search_params(index, manifest["index"].get("params", {}))
        logger.info("%s changed on disk: %d -> %d vectors", self.path, len(self), index.ntotal)
        self.__init__(self.path, index, metadata, manifest, self.embedder)

    def _append(
        self,
        xb: np.ndarray,
        labels: list[str],
        sources: list[str],
        thumbnails: list[bytes],
        skip_existing: bool,
        skipped: list[dict],
        extra: Optional[pa.Table] = None,
        extra_files: Optional[dict] = None,
    ) -> np.ndarray:
        n = xb.shape[0]
        recorded = self.manifest.get("skipped", [])
        skipped = [dict(entry) for entry in skipped if entry not in recorded]
        if skip_existing:
            present = {self.row_key(i) for i in range(len(self))}
            keep = [i for i in range(n) if _row_key(labels[i], sources[i], thumbnails[i]) not in present]
            if len(keep) < n:
                logger.info("skipped %d of %d rows already in %s", n - len(keep), n, self.path)
            xb = xb[keep]
            labels, sources, thumbnails = ([values[i] for i in keep] for values in (labels, sources, thumbnails))
            if extra is not None:
                extra = extra.take(pa.array(keep, pa.int64()))
            n = len(keep)
            if n == 0 and not skipped:
                return np.zeros(0, dtype=np.int64)
        faiss.normalize_L2(xb)
        new_ids = np.arange(len(self), len(self) + n, dtype=np.int64)
        added = metadata_table(new_ids, labels, sources, thumbnails)
        for name in extra.column_names if extra is not None else ():
            added = added.append_column(name, extra.column(name))
        manifest = dict(self.manifest, updated=now())
        if "row_id" in self.extra_columns:  # stable ids: new rows get ids never given before
            first = self.next_row_id()
            row_ids = pa.array(range(first, first + n), pa.int64())
            if "row_id" in added.column_names:
                added = added.set_column(added.column_names.index("row_id"), "row_id", row_ids)
            else:
                added = added.append_column(pa.field("row_id", pa.int64()), row_ids)
            manifest["next_row_id"] = first + n
        metadata = pa.concat_tables([self.metadata_table(), added], promote_options="default")
        index = faiss.clone_index(self.index)
        index.add(xb)
        if skipped:
            manifest["skipped"] = [*recorded, *skipped]
        self._commit(index, metadata, manifest, extra_files)
        logger.info("appended %d vectors to %s (now %d)", n, self.path, len(self))
        return new_ids

    def _commit(
        self, index: faiss.Index, metadata: pa.Table, manifest: dict, extra_files: Optional[dict] = None
    ) -> None:
        """Recalibrate, write the directory atomically (caller holds the writer lock) and become it."""
        set_search_params(index, self.manifest["index"].get("params", {}))
        try:  # recalibrate on the changed gallery (exact for flat and HNSW, decoded codes otherwise)
            vectors = index.reconstruct_n(0, index.ntotal) if index.ntotal else np.zeros((0, index.d), np.float32)
            manifest["close_match"] = close_match_threshold(vectors)
            manifest["decision"] = gallery_decision(vectors, metadata, manifest["close_match"])
        except RuntimeError:  # an IVF index without a direct map cannot reconstruct: keep the old value
            pass
        manifest = write_directory(self.path, index, metadata, manifest, extra_files)
        self.__init__(self.path, index, metadata, manifest, self.embedder)

    def reload_if_changed(self) -> bool:
        """Reload the directory if another writer (process) committed since this object read it.

        Returns:
            Whether it was reloaded.

        Raises:
            IndexLoadError: the directory on disk cannot be read now.
        """
        before = self.manifest.get("files")
        self._refresh()
        return self.manifest.get("files") != before

    # -- delete -----------------------------------------------------------------------

    def remove(self, ids: Sequence[int], expected: Optional[dict[int, str]] = None) -> int:
        """Delete rows (vectors and metadata) and rewrite the directory atomically. Returns how many.

        Holds the directory's writer lock and deletes from what is committed on disk now. The
        remaining rows are renumbered ``0 .. N-1`` in their old order (row numbers), so row
        numbers read before a delete must not be reused after it: pass ``expected``, or delete by
        the stable :attr:`row_ids` (kept, and never given again, by indexes with a ``row_id`` column).

        Args:
            ids: the rows (row numbers) to delete.
            expected: row -> its :meth:`fingerprint` (pixel SHA-256, else source) as the caller saw
                it; if another writer changed the index since, nothing is deleted and
                :class:`IndexChangedError` is raised.

        Raises:
            ValueError: an id that is not in the index, or an index type that cannot delete
                (only ``flat`` and ``hnsw`` can: their vectors are stored exactly).
            IndexChangedError: ``expected`` does not match the rows on disk.
        """
        wanted = sorted({int(i) for i in ids})
        if not wanted:
            return 0
        with index_lock(self.path):
            self._refresh()
            bad = [i for i in wanted if not 0 <= i < len(self)]
            if bad:
                raise ValueError(f"no row with id {', '.join(map(str, bad))} (ids are 0 to {len(self) - 1})")
            changed = [i for i, seen in (expected or {}).items() if self.fingerprint(int(i)) != seen]
            if changed:
                raise IndexChangedError(
                    f"the gallery changed since it was shown (row {changed[0]} is now "
                    f"{self.sources[changed[0]]!r}); nothing was deleted: reload the list and try again"
                )
            manifest = dict(self.manifest, updated=now())
            if "row_id" in self.extra_columns:  # the deleted ids are never given again
                manifest["next_row_id"] = self.next_row_id()
            keep = np.setdiff1d(np.arange(len(self)), wanted)
            index = self._without(wanted, keep)
            metadata = self.metadata_table().take(pa.array(keep, pa.int64()))
            metadata = metadata.set_column(0, "id", pa.array(np.arange(len(keep), dtype=np.int64)))
            self._commit(index, metadata, manifest)
        logger.info("deleted %d vectors from %s (now %d)", len(wanted), self.path, len(self))
        return len(wanted)

    def fingerprint(self, row: int) -> str:
        """What a delete guard compares for a row: the SHA-256 of its image's pixels (``sha256``
        column), or its source for rows without one."""
        hashes = self.extra.get("sha256")
        return (hashes[row] if hashes and hashes[row] else None) or self.sources[row]

    def _without(self, wanted: list[int], keep: np.ndarray) -> faiss.Index:
        """A copy of the FAISS index without the rows ``wanted``, ids renumbered like ``keep``."""
        if not len(keep) and isinstance(self.index, (faiss.IndexFlat, faiss.IndexHNSWFlat)):
            index = faiss.clone_index(self.index)
            index.reset()
            return index
        if isinstance(self.index, faiss.IndexFlat):  # remove_ids shifts the later vectors down: ids stay row numbers
            index = faiss.clone_index(self.index)
            index.remove_ids(faiss.IDSelectorBatch(np.asarray(wanted, dtype=np.int64)))
            return index
        if isinstance(self.index, faiss.IndexHNSWFlat):  # no remove_ids: rebuild from the exact kept vectors
            xb = self.reconstruct_all()[keep] if len(keep) else np.zeros((0, self.dim), np.float32)
            index, _ = make_faiss_index(np.ascontiguousarray(xb), self.index_type, self.manifest["index"].get("params"))
            return index
        raise ValueError(f"cannot delete rows from a {self.index_type!r} index; only 'flat' and 'hnsw' indexes can")

    def row_key(self, i: int) -> tuple[str, str, str]:
        """What identifies row ``i`` for duplicate detection: label, source, SHA-256 of the thumbnail."""
        return _row_key(self.row_labels[i], self.sources[i], self._thumbnails[int(i)].as_py() or b"")


def _row_key(label: str, source: str, thumbnail: bytes) -> tuple[str, str, str]:
    return str(label), str(source), hashlib.sha256(thumbnail or b"").hexdigest()


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
    skipped: Optional[Sequence[dict]] = None,
    extra_files: Optional[dict] = None,
    normalized: bool = False,
) -> PatchIndex:
    """Writer: FAISS index over ``xb`` + ``metadata`` (``id, label, source, thumbnail``, then any extra
    columns) + manifest.

    Args:
        path: output directory (created).
        xb: ``N x D`` float32 embeddings, row ``i`` = id ``i``.
        metadata: one row per vector.
        embedder: the model that made ``xb`` (recorded in the manifest).
        index_type: see :func:`index_build.faiss_index.make_faiss_index`.
        index_params: overrides of the index parameters.
        dataset_info: what the vectors came from (source, split, columns), recorded as is.
        skipped: the unreadable images left out (``{"source", "reason"}`` each), recorded as ``"skipped"``.
        extra_files: more files committed with the index (e.g. a slide index's ``slides.json``).
        normalized: ``xb`` are unit vectors already (read back from indexes, e.g. shards): stored
            as they are, so that a merge holds the very bits of its shards.
    """
    path = Path(path)
    if metadata.num_rows != len(xb):
        raise ValueError(f"{len(xb)} vectors but {metadata.num_rows} metadata rows")
    desc = embedder.describe()
    if xb.shape[1] != desc["embedding_dim"]:
        raise ValueError(f"vectors have dim {xb.shape[1]}, the model says {desc['embedding_dim']}")
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    if not normalized:
        faiss.normalize_L2(xb)
    index, used = make_faiss_index(xb, index_type, index_params)
    close_match = close_match_threshold(xb)
    return write_built_index(
        path,
        index,
        used,
        metadata,
        embedder,
        index_type,
        dataset_info,
        skipped,
        close_match,
        extra_files,
        decision=gallery_decision(xb, metadata, close_match),
    )


def gallery_decision(vectors: np.ndarray, metadata: pa.Table, close_match: Optional[dict]) -> Optional[dict]:
    """The fitted decision rule (:func:`index_build.verdict.fit_decision`) of a gallery, for its manifest."""
    names = [name for name in ("group_id", "group", "slide") if name in metadata.column_names]
    extra = {name: metadata.column(name).to_pylist() for name in names}
    groups, how = near_duplicate_groups(metadata.column("source").to_pylist(), extra)
    threshold = close_match.get("threshold") if isinstance(close_match, dict) else None
    return fit_decision(vectors, metadata.column("label").to_pylist(), groups, threshold, groups_from=how)


def write_built_index(
    path: Union[str, Path],
    index: faiss.Index,
    used: dict,
    metadata: pa.Table,
    embedder: EmbedderLike,
    index_type: str,
    dataset_info: Optional[dict],
    skipped: Optional[Sequence[dict]],
    close_match: Optional[dict],
    extra_files: Optional[dict] = None,
    decision: Optional[dict] = None,
) -> PatchIndex:
    """Writer of an index already built (:func:`write_index` builds it from the vectors first).

    ``used`` are the index parameters, ``close_match`` the gallery's calibration
    (:mod:`index_build.calibration`), ``decision`` its fitted decision rule
    (:mod:`index_build.verdict`); the other arguments are those of :func:`write_index`.
    """
    path = Path(path)
    if metadata.num_rows != index.ntotal:
        raise ValueError(f"{index.ntotal} vectors but {metadata.num_rows} metadata rows")
    desc = embedder.describe()
    metadata = metadata.set_column(0, "id", pa.array(np.arange(index.ntotal, dtype=np.int64)))
    created = now()
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": created,
        "updated": created,
        "model": desc,
        "embedding_dim": int(index.d),
        "metric": "cosine (inner product of L2-normalised vectors)",
        "preprocessing": _preprocessing(embedder),
        "index": {"type": index_type, "class": type(index).__name__, "params": used},
        "count": int(index.ntotal),
        "thumbnail": {"max_side": THUMBNAIL_SIZE, "format": "JPEG", "quality": THUMBNAIL_QUALITY},
        "dataset": dataset_info or {},
        "skipped": [dict(entry) for entry in skipped or ()],
        "packages": package_versions(),
        "close_match": close_match,
        "decision": decision,
    }
    manifest = write_directory(path, index, metadata, manifest, extra_files)
    logger.info("wrote %s index with %d vectors to %s", index_type, index.ntotal, path)
    return PatchIndex(path, index, metadata, manifest, embedder)
