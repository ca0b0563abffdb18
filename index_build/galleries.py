"""The galleries one server searches: a main index and a personal gallery that grows, searched together.

The personal gallery is an ordinary index directory in ``<data_dir>/personal/<model key>/``,
created on the first :meth:`Galleries.add` and appended to (atomically) afterwards, so it is kept
across restarts. A lock serialises additions against searches.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
from PIL import Image

from index_build.query import TiledResult, tiled_search
from index_build.starter import ensure_starter_index, images_dataset, model_key
from index_build.storage import IndexLoadError, has_index, index_lock

if TYPE_CHECKING:
    import torch

    from index_build.models import Embedder
    from index_build.patch_index import PatchIndex

logger = logging.getLogger(__name__)

MAIN, PERSONAL = "index", "personal"

__all__ = ["MAIN", "PERSONAL", "Galleries", "PersonalGalleryError"]


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
        personal_dir = data_dir / "personal" / model_key(embedder)
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

    def labels(self) -> list[str]:
        """Every label of both galleries, sorted."""
        labels = set(self._main_labels)
        with self._lock:
            if self.personal is not None:
                labels |= set(self.personal.labels)
        return sorted(labels)

    def search(
        self,
        image: Image.Image,
        k: int,
        label: Optional[str] = None,
        tile_large: bool = True,
        embed: Optional[Callable[[torch.Tensor], np.ndarray]] = None,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> TiledResult:
        """:func:`~index_build.query.tiled_search` over both galleries (hits name ``"index"`` or ``"personal"``)."""
        with self._lock:
            galleries = [(MAIN, self.main)] + ([(PERSONAL, self.personal)] if self.personal is not None else [])
        return tiled_search(
            image, self.embedder, galleries, k, label, tile_large, embed, guard=self._lock, progress=progress
        )

    def add(self, images: Sequence[Image.Image], labels: Sequence[str], sources: Sequence[str]) -> int:
        """Embed patches and append them to the personal gallery on disk. Returns its new size.

        Raises:
            IndexBusyError: another process kept writing to the personal gallery too long.
        """
        from index_build.embedding import build_index
        from index_build.patch_index import PatchIndex

        # The directory lock orders this against other processes sharing the data directory:
        # the gallery may have been created (or grown) by another server since this one opened it.
        with self._lock, index_lock(self.personal_dir):
            if self.personal is None and has_index(self.personal_dir):
                self.personal = PatchIndex.load(self.personal_dir, self.embedder)
            if self.personal is None:
                dataset = images_dataset(images, labels, sources)
                self.personal = build_index(dataset, self.personal_dir, self.embedder, num_workers=0, progress=False)
            else:
                self.personal.add(images, labels, sources)
            return len(self.personal)


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
    from index_build.sources import resolve_index_dir
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
    model_revision = model_revision or os.environ.get("LGFFEM_MODEL_REVISION") or None
    if model_revision is None and index_dir is not None and model not in (None, "", "default"):
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
