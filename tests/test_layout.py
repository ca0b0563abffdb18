"""The package layout: the retrieval core imports without Gradio, and the former flat module names
still import (the same module objects) and still run with ``python -m``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from index_build import _layout

CORE_MODULES = sorted(v for v in _layout.MOVED.values() if v.startswith("index_build.")) + [
    "index_build.index",
    "index_build.models",
    "index_build.__main__",
]


def test_the_retrieval_core_imports_with_gradio_uninstalled():
    # sys.modules["gradio"] = None makes every `import gradio` fail as if it were not installed
    code = "import sys; sys.modules['gradio'] = None\n" + "".join(f"import {m}\n" for m in CORE_MODULES)
    code += "print(sorted(m for m, v in sys.modules.items() if v is not None and m.split('.')[0] in ('gradio', 'ui')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(("old", "new"), sorted(_layout.MOVED.items()))
def test_a_former_flat_name_is_the_module_at_its_new_place(old, new):
    import importlib

    module = importlib.import_module(f"index_build.{old}")
    assert module is importlib.import_module(new)
    assert module.__spec__.name == new and module.__name__ == new


@pytest.mark.parametrize("old", ["evaluate", "shard", "slide_search"])
def test_python_dash_m_runs_a_command_under_its_former_name(old):
    out = subprocess.run(
        [sys.executable, "-m", f"index_build.{old}", "--help"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage: ")


def test_sub_packages_re_export_their_public_names_lazily():
    from index_build import search, store, wsi
    from index_build.search.patch_index import PatchIndex
    from index_build.store.storage import IndexLoadError
    from index_build.wsi.reading import open_slide

    assert (search.PatchIndex, store.IndexLoadError, wsi.open_slide) == (PatchIndex, IndexLoadError, open_slide)
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        search.nothing  # noqa: B018
