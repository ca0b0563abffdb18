"""The galleries one server searches: a main index and a personal gallery that grows, searched together.

The personal gallery is an ordinary index directory in ``<data_dir>/personal/<model key>/``,
created on the first :meth:`Galleries.add` and appended to (atomically) afterwards, so it is kept
across restarts. A lock serialises additions against searches.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional

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


class Galleries:
    """A main gallery and the personal gallery of one model.

    Args:
        embedder: the model of both galleries.
        main: the main gallery.
        personal_dir: where the personal gallery lives (created on the first addition).
        personal: the personal gallery, when it already exists.
    """

    def __init__(
        self, embedder: Embedder, main: PatchIndex, personal_dir: Path, personal: Optional[PatchIndex] = None
    ) -> None:
        self.embedder = embedder
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
        return cls(embedder, main, personal_dir, personal)

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
    ) -> TiledResult:
        """:func:`~index_build.query.tiled_search` over both galleries (hits name ``"index"`` or ``"personal"``)."""
        with self._lock:
            galleries = [(MAIN, self.main)] + ([(PERSONAL, self.personal)] if self.personal is not None else [])
        return tiled_search(image, self.embedder, galleries, k, label, tile_large, embed, guard=self._lock)

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
