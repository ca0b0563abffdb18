"""The galleries one server searches: a main index and a personal gallery that grows, searched together.

The personal gallery is an ordinary index directory in
``<data_dir>/personal/<model key>/index-<index identity>/``: it belongs to the main index it
extends (:func:`~index_build.storage.index_identity`: the index's model, creation time and
dataset), so another index served with the same model from the same data directory does not
show it. It is created on the first :meth:`Galleries.add`, appended to and deleted from
atomically under the directory's writer lock, and kept across restarts. Each of its rows records
when it was added and the SHA-256 of the decoded image it came from (duplicates are refused).

A personal gallery of an earlier version lies directly in ``<data_dir>/personal/<model key>/``;
the first index served with that model after the upgrade takes it over (it is copied to that
index's folder, and its manifest renamed ``manifest.json.migrated``).

A lock serialises additions and deletions against searches; every request first picks up what
other processes (workers sharing the data directory) committed (:meth:`Galleries.refresh`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
from PIL import Image

from index_build.search_core import Query, QueryResult, run_query
from index_build.starter import ensure_starter_index, model_key
from index_build.storage import MANIFEST_FILE, IndexLoadError, has_index, index_identity, index_lock, now

if TYPE_CHECKING:
    import torch

    from index_build.models import Embedder
    from index_build.patch_index import PatchIndex

logger = logging.getLogger(__name__)

MAIN, PERSONAL = "index", "personal"

MIGRATED_SUFFIX = ".migrated"

__all__ = ["MAIN", "PERSONAL", "AddReport", "Galleries", "PersonalGalleryError", "PersonalRow", "personal_dir_for"]


@dataclass
class AddReport:
    """What :meth:`Galleries.add_new` did."""

    added: int
    """Patches added."""
    total: int
    """Patches in the personal gallery now."""
    duplicates: list[tuple[str, str, Optional[str]]] = field(default_factory=list)
    """``(new source, source already in the gallery, when that one was added)`` per image left out."""


@dataclass
class PersonalRow:
    """One patch of the personal gallery, as the management table shows it."""

    id: int
    """Its stable row id: never changed by deletes, never given to another image."""
    label: str
    source: str
    added: Optional[str]
    """ISO time it was added (``None`` for rows of galleries made before this was recorded)."""
    thumbnail: bytes


def personal_dir_for(data_dir: Path, embedder: Embedder, main: PatchIndex) -> Path:
    """Where the personal gallery extending ``main`` (searched with ``embedder``) lives."""
    return Path(data_dir) / "personal" / model_key(embedder) / f"index-{index_identity(main.manifest)}"


class PersonalGalleryError(IndexLoadError):
    """The personal gallery on disk cannot be read."""


class StartupError(RuntimeError):
    """A search service cannot start (model, index or data directory problem); the message says why."""


class Galleries:
    """A main gallery and the personal gallery of one model.

    Args:
        embedder: the model of both galleries.
        main: the main gallery.
        personal_dir: where the personal gallery lives (created on the first addition).
        personal: the personal gallery, when it already exists.
        data_dir: the folder of the starter and personal galleries (default: two levels above ``personal_dir``).
    """

    def __init__(
        self,
        embedder: Embedder,
        main: PatchIndex,
        personal_dir: Path,
        personal: Optional[PatchIndex] = None,
        data_dir: Optional[Path] = None,
    ) -> None:
        self.embedder = embedder
        self.data_dir = Path(data_dir) if data_dir is not None else Path(personal_dir).parent.parent
        self.main = main
        self.personal_dir = Path(personal_dir)
        self.personal = personal
        self._main_labels = frozenset(main.labels)  # the main gallery does not change while serving
        self._lock = threading.RLock()

    @classmethod
    def open(cls, embedder: Embedder, index_dir: Optional[Path], data_dir: Path) -> Galleries:
        """Load the main gallery (``index_dir``, else the starter gallery) and the personal gallery.

        Raises:
            IndexLoadError: the main gallery is missing, corrupt or built with another model.
            PersonalGalleryError: the personal gallery is unreadable.
        """
        from index_build.patch_index import PatchIndex

        data_dir = Path(data_dir)
        main = ensure_starter_index(embedder, data_dir) if index_dir is None else PatchIndex.load(index_dir, embedder)
        personal_dir = personal_dir_for(data_dir, embedder, main)
        try:
            migrate_legacy(personal_dir.parent, personal_dir, embedder)
        except (IndexLoadError, OSError) as err:
            raise PersonalGalleryError(
                f"your personal gallery at {personal_dir.parent} could not be moved to {personal_dir} ({err}); "
                "move it away to start a new one"
            ) from err
        personal = None
        if has_index(personal_dir):
            try:
                personal = PatchIndex.load(personal_dir, embedder)
            except IndexLoadError as err:
                raise PersonalGalleryError(
                    f"your personal gallery at {personal_dir} is unreadable ({err}); move it away to start a new one"
                ) from err
            logger.info("personal gallery: %d patches from %s", len(personal), personal_dir)
        return cls(embedder, main, personal_dir, personal, data_dir)

    def refresh(self) -> None:
        """Pick up what another process (a worker sharing the data directory) committed to the
        personal gallery since this one read it. A gallery that cannot be read right now (a write in
        progress elsewhere) keeps the state read before; the next request tries again."""
        from index_build.patch_index import PatchIndex

        with self._lock:
            try:
                if self.personal is None:
                    if has_index(self.personal_dir):
                        self.personal = PatchIndex.load(self.personal_dir, self.embedder)
                else:
                    self.personal.reload_if_changed()
            except (IndexLoadError, OSError) as err:
                logger.warning("personal gallery %s not re-read now: %s", self.personal_dir, err)

    def labels(self) -> list[str]:
        """Every label of both galleries (as committed on disk now), sorted."""
        labels = set(self._main_labels)
        with self._lock:
            self.refresh()
            if self.personal is not None:
                labels |= set(self.personal.labels)
        return sorted(labels)

    def personal_count(self) -> int:
        """Patches in the personal gallery (as committed on disk now)."""
        with self._lock:
            self.refresh()
            return 0 if self.personal is None else len(self.personal)

    def personal_rows(self) -> list[PersonalRow]:
        """Every patch of the personal gallery (as committed on disk now), in id order."""
        with self._lock:
            self.refresh()
            personal = self.personal
            if personal is None:
                return []
            added = personal.extra.get("added") or [None] * len(personal)
            thumbnails = personal.metadata_table().column("thumbnail").to_pylist()
            ids = personal.row_ids
            return [
                PersonalRow(ids[i], personal.row_labels[i], personal.sources[i], added[i], thumbnails[i] or b"")
                for i in range(len(personal))
            ]

    def current(self) -> list[tuple[str, PatchIndex]]:
        """The galleries to search, as committed on disk now: ``("index", main)``, then
        ``("personal", personal)`` when the personal gallery has patches."""
        with self._lock:
            self.refresh()
            personal = [(PERSONAL, self.personal)] if self.personal is not None and len(self.personal) else []
            return [(MAIN, self.main), *personal]

    def search(
        self,
        query: Query,
        k: Any,
        label: Optional[str] = None,
        embed: Optional[Callable[[torch.Tensor], np.ndarray]] = None,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> QueryResult:
        """:func:`~index_build.search_core.run_query` over :meth:`current` (hits name ``"index"`` or
        ``"personal"``), searched under the galleries' lock against additions and deletes."""
        return run_query(
            query,
            self.current(),
            k,
            embedder=self.embedder,
            label=label,
            embed=embed,
            guard=self._lock,
            progress=progress,
        )

    def add(self, images: Sequence[Image.Image], labels: Sequence[str], sources: Sequence[str]) -> int:
        """Embed patches and append them to the personal gallery on disk. Returns its new size.

        Raises:
            IndexBusyError: another process kept writing to the personal gallery too long.
        """
        return self.add_new(images, labels, sources).total

    def add_new(
        self,
        images: Sequence[Image.Image],
        labels: Sequence[str],
        sources: Sequence[str],
        hashes: Optional[Sequence[str]] = None,
    ) -> AddReport:
        """Embed patches and append them to the personal gallery on disk, with the time they were added.

        Args:
            images, labels, sources: one per patch.
            hashes: :func:`~index_build.uploads.image_hash` of the image each patch came from;
                patches whose hash is already in the gallery are left out (checked under the
                writer lock, so two sessions adding the same image at once add it once).

        Raises:
            IndexBusyError: another process kept writing to the personal gallery too long.
        """
        from index_build.patch_index import PatchIndex, write_index
        from index_build.storage import make_thumbnail, metadata_table

        images, labels, sources = list(images), list(labels), list(sources)
        hashes = list(hashes) if hashes is not None else [None] * len(images)
        # The directory lock orders this against other processes sharing the data directory:
        # the gallery may have been created (or grown) by another server since this one opened it.
        with self._lock, index_lock(self.personal_dir):
            if self.personal is None and has_index(self.personal_dir):
                self.personal = PatchIndex.load(self.personal_dir, self.embedder)
            elif self.personal is not None:
                self.personal.reload_if_changed()
            duplicates = []
            if self.personal is not None and any(hashes):
                known = self._known_hashes()
                for i, digest in enumerate(hashes):
                    if digest in known and (i == 0 or hashes[i - 1] != digest):  # tiles of one image: once
                        duplicates.append((sources[i].split("#tile")[0], *known[digest]))
                keep = [i for i, digest in enumerate(hashes) if digest not in known]
                images, labels, sources, hashes = (
                    [values[i] for i in keep] for values in (images, labels, sources, hashes)
                )
            if not images:
                return AddReport(0, 0 if self.personal is None else len(self.personal), duplicates)
            extra = {"added": [now()] * len(images), "sha256": hashes}
            if self.personal is None:
                extra["row_id"] = list(range(len(images)))
                xb = self.embedder.embed_images(images)
                thumbnails = [make_thumbnail(image) for image in images]
                metadata = metadata_table(range(len(images)), labels, sources, thumbnails, extra)
                info = {"personal gallery of index": index_identity(self.main.manifest)}
                self.personal = write_index(self.personal_dir, xb, metadata, self.embedder, dataset_info=info)
            else:
                if "row_id" not in self.personal.extra_columns:  # a gallery of an earlier version
                    self.personal.assign_row_ids()
                self.personal.add(images, labels, sources, extra=extra)
            return AddReport(len(images), len(self.personal), duplicates)

    def _known_hashes(self) -> dict[str, tuple[str, Optional[str]]]:
        """Image hash -> (source, time added) of its first patch in the personal gallery."""
        extra = self.personal.extra if self.personal is not None else {}
        hashes, added = extra.get("sha256") or [], extra.get("added") or []
        known: dict[str, tuple[str, Optional[str]]] = {}
        for i, digest in enumerate(hashes):
            if digest and digest not in known:
                known[digest] = (self.personal.sources[i].split("#tile")[0], added[i] if added else None)
        return known

    def delete(self, ids: Sequence[int], expected: Optional[dict[int, str]] = None) -> int:
        """Delete patches of the personal gallery by their stable ids, atomically on disk. Returns how many.

        An id names one image for good: deletes never renumber ids and an id is never given again,
        so a stale list can only name an image that is still the same one, or one already gone.

        Args:
            ids: their ids (:attr:`PersonalRow.id`).
            expected: id -> the source shown for it; nothing is deleted if it differs now
                (:class:`~index_build.patch_index.IndexChangedError`).

        Raises:
            ValueError: an id that is not in the personal gallery (the message lists a few and a count).
            IndexBusyError: another process kept writing to the personal gallery too long.
        """
        from index_build.patch_index import IndexChangedError

        with self._lock, index_lock(self.personal_dir):
            self.refresh()
            if self.personal is None:
                raise ValueError("your personal gallery is empty: nothing to delete")
            personal = self.personal
            rows = {row_id: row for row, row_id in enumerate(personal.row_ids)}
            wanted = sorted({int(i) for i in ids})
            missing = [i for i in wanted if i not in rows]
            if missing:
                shown = ", ".join(map(str, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                raise ValueError(
                    f"no image with id {shown} in your personal gallery (deleted already?); nothing was deleted"
                )
            changed = [i for i, source in (expected or {}).items() if i in rows and personal.sources[rows[i]] != source]
            if changed:
                raise IndexChangedError(
                    f"the gallery changed since it was shown (id {changed[0]}); nothing was deleted: reload the list"
                )
            # the pixel hashes read now guard the rows against any writer between here and the delete
            return personal.remove([rows[i] for i in wanted], {rows[i]: personal.fingerprint(rows[i]) for i in wanted})


def migrate_legacy(legacy: Path, target: Path, embedder: Embedder) -> bool:
    """Move a personal gallery of an earlier version (kept per model in ``legacy``) to ``target``.

    The rows are committed to ``target`` atomically (recording ``migrated_from``), then the legacy
    manifest is renamed ``manifest.json.migrated`` so that no other index takes the gallery too. A
    migration killed in between is finished by the next start (of any index: the copy stays with
    the index that made it). Returns whether the gallery went to ``target``.
    """
    from index_build.patch_index import PatchIndex, write_index

    if not has_index(legacy):
        return False
    with index_lock(legacy):
        if not has_index(legacy):  # another process migrated it meanwhile
            return False
        source = str(legacy.resolve())
        taken = _migrated_to(legacy, source)
        if taken is None:  # one commit: a migration killed before it leaves the legacy gallery as it was
            old = PatchIndex.load(legacy, embedder)
            info = {**(old.manifest.get("dataset") or {}), "migrated_from": source}
            write_index(target, old.reconstruct_all(), old.metadata_table(), embedder, dataset_info=info)
            taken = target
        # Killed after that commit: the rename is finished by the next start, of whichever index.
        os.replace(legacy / MANIFEST_FILE, legacy / (MANIFEST_FILE + MIGRATED_SUFFIX))
        if taken != target:
            return False
    logger.warning("moved the personal gallery of this model from %s to %s (it now extends this index)", legacy, target)
    return True


def _migrated_to(legacy: Path, source: str) -> Optional[Path]:
    """The personal gallery (of some index) that a legacy gallery was already copied to, if any."""
    import json

    for manifest in sorted(legacy.glob(f"index-*/{MANIFEST_FILE}")):
        try:
            dataset = json.loads(manifest.read_text()).get("dataset") or {}
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(dataset, dict) and dataset.get("migrated_from") == source:
            return manifest.parent
    return None


def open_galleries(
    model: Optional[str],
    index: Optional[str],
    data_dir: Optional[Union[str, Path]],
    device: Optional[str] = None,
    index_revision: Optional[str] = None,
    embedder: Optional[Embedder] = None,
    model_revision: Optional[str] = None,
    default_data_dir: Union[str, Path] = "~/.cache/lgffem",
) -> tuple[Galleries, Optional[str]]:
    """Everything a search service loads at start-up: the model, the main gallery and the personal one.

    Args:
        model: ``None``/``"default"``, a local model folder or a Hub id (ignored when ``embedder`` is given).
        index: a local index folder or a Hub dataset repo id; ``None``: ``$LGFFEM_INDEX``, else the starter.
        data_dir: cache for the starter and personal galleries (default ``$LGFFEM_DATA_DIR``, else
            ``default_data_dir``).
        device: torch device; default CUDA when available.
        index_revision: Hub revision of the index repo.
        embedder: an already loaded model (tests).
        model_revision: branch, tag or commit of a Hub model (its code runs here: pin a commit);
            ``None``: ``$LGFFEM_MODEL_REVISION``, else the commit the index records for this model.

    Returns:
        The galleries and the main index as given or taken from ``$LGFFEM_INDEX`` (``None``: the
        starter gallery).

    Raises:
        StartupError: the model or index cannot be loaded, or they do not match.
    """
    from index_build.models import load_model
    from index_build.sources import env_model_revision, is_default_model, resolve_index_dir
    from index_build.storage import recorded_model_revision

    data_dir = Path(data_dir or os.environ.get("LGFFEM_DATA_DIR") or default_data_dir).expanduser()
    index = index or os.environ.get("LGFFEM_INDEX") or None
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StartupError(f"cannot create the data directory {data_dir}: {err}") from err
    try:
        index_dir = resolve_index_dir(index, index_revision) if index is not None else None  # fail fast
    except OSError as err:
        raise StartupError(str(err)) from err
    model_revision = model_revision or env_model_revision()
    if model_revision is None and index_dir is not None and not is_default_model(model):
        model_revision = recorded_model_revision(index_dir, model)
        if model_revision is not None:
            logger.info("loading model %s at revision %s, the one the index was built with", model, model_revision)
    try:
        embedder = embedder or load_model(model, device=device, revision=model_revision)
    except (OSError, ValueError) as err:
        raise StartupError(f"could not load the model {model or 'default'!r}: {err}") from err
    try:
        return Galleries.open(embedder, index_dir, data_dir), index
    except PersonalGalleryError as err:
        raise StartupError(str(err)) from err
    except IndexLoadError as err:
        raise StartupError(f"the index {index or 'starter gallery'!r} cannot be used with this model: {err}") from err
