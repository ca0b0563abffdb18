"""Where each module of ``index_build`` lives, and the old flat names that still import.

Until December 2026 ``index_build`` was one flat folder (``index_build.storage``,
``index_build.patch_index``, ``index_build.slides``, ...). Those names keep working, for scripts
and for ``python -m index_build.evaluate`` alike: :class:`FlatNames` answers an import of an old
name with the module at its new place (the same module object, so ``monkeypatch`` on either name
patches both).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Optional

# old name under index_build -> the module's full name now
MOVED = {
    "storage": "index_build.store.storage",
    "calibration": "index_build.search.calibration",
    "embedding": "index_build.search.embedding",
    "evaluate": "index_build.search.evaluate",
    "faiss_index": "index_build.search.faiss_index",
    "galleries": "index_build.search.galleries",
    "metrics": "index_build.search.metrics",
    "patch_index": "index_build.search.patch_index",
    "query": "index_build.search.query",
    "search_core": "index_build.search.search_core",
    "verdict": "index_build.search.verdict",
    "shard": "index_build.search.shard",
    "starter": "index_build.search.starter",
    "heatmap": "index_build.wsi.heatmap",
    "slides": "index_build.wsi.reading",
    "slide_index": "index_build.wsi.slide_index",
    "slide_search": "index_build.wsi.slide_search",
    "tissue": "index_build.wsi.tissue",
    "data": "index_build.inputs.data",
    "sources": "index_build.inputs.sources",
    "uploads": "index_build.inputs.uploads",
    "display": "ui.display",
    "slide_page": "ui.slide_tab",
}
_PREFIX = "index_build."


class FlatNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """A meta-path finder that maps ``index_build.<old>`` to the module's new full name."""

    def find_spec(self, fullname: str, path=None, target=None) -> Optional[importlib.machinery.ModuleSpec]:
        if not fullname.startswith(_PREFIX) or fullname[len(_PREFIX) :] not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec) -> ModuleType:
        module = importlib.import_module(MOVED[spec.name[len(_PREFIX) :]])
        spec.loader_state = module.__spec__  # the import machinery now sets the alias spec on it
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = module.__spec__.loader_state  # give the module back its own spec

    def get_code(self, fullname: str):
        """The new module's code, for ``python -m index_build.<old name>`` (runpy asks the loader)."""
        target = MOVED[fullname[len(_PREFIX) :]]
        return importlib.util.find_spec(target).loader.get_code(target)


def install() -> None:
    """Put :class:`FlatNames` on ``sys.meta_path`` once."""
    if not any(isinstance(finder, FlatNames) for finder in sys.meta_path):
        sys.meta_path.append(FlatNames())


def lazy_exports(package: str, names: dict[str, str]):
    """``__getattr__`` and ``__dir__`` for a sub-package that re-exports ``names`` (name -> module)
    without importing every module (and FAISS, torch) when the package is imported."""

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{names[name]}"), name)

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__
