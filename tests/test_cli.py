"""Every command line answers a bad argument with ``error: ...`` and exit status 2, before loading a model."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (command, the part of the message that names the problem)
MISSING_PATHS = [
    (["-m", "index_build", "./no_such_dir", "--out", "OUT"], "dataset path not found: ./no_such_dir"),
    (["-m", "index_build", "./no_such.parquet", "--out", "OUT"], "dataset path not found"),
    (["-m", "index_build", "DATA", "--out", "OUT", "--model", "./no_such_model"], "model directory not found"),
    (["-m", "index_build", "DATA", "--out", "OUT", "--index-type", "annoy"], "unknown index type 'annoy'"),
    (["-m", "index_build", "DATA", "--out", "OUT", "--append"], "--append: no index in"),
    (["-m", "index_build.evaluate", "--gallery", "./no_such_dir", "--leave-one-out"], "gallery path not found"),
    (["-m", "index_build.evaluate", "--gallery", "DATA", "--queries", "/no/such/dir"], "queries path not found"),
    (["-m", "index_build.evaluate", "--gallery", "DATA"], "give --queries, or --leave-one-out"),
    (["-m", "index_build.shard", "merge", "./no_such_shard", "--out", "OUT"], "shard directory not found"),
    (["-m", "index_build.shard", "build", "./no_such_dir", "--out-root", "OUT"], "dataset path not found"),
    (["app.py", "--index", "./no_such_index"], "index directory not found: ./no_such_index"),
    (["app.py", "--model", "./no_such_model"], "model directory not found: ./no_such_model"),
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("cli") / "data"
    (root / "a").mkdir(parents=True)
    Image.new("RGB", (40, 40), (200, 0, 0)).save(root / "a" / "0.png")
    return root


@pytest.mark.parametrize("argv, message", MISSING_PATHS, ids=[" ".join(a[:3]) for a, _ in MISSING_PATHS])
def test_bad_argument_is_error_and_status_2(argv, message, data_dir, tmp_path):
    argv = [str(data_dir) if a == "DATA" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120, env=_env(tmp_path)
    )
    seconds = time.perf_counter() - start
    assert out.returncode == 2, out.stderr
    assert "error: " in out.stderr and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert seconds < 30  # argument checks come before any model (or dataset) is loaded


def _env(tmp_path: Path) -> dict:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "LGFFEM_DATA_DIR": str(tmp_path / "data-dir")}


def test_no_model_is_loaded_for_a_bad_path(monkeypatch, tmp_path, capsys):
    """In process: the model loader is never called when a path argument is wrong."""
    import app
    import index_build.models as models
    from index_build.__main__ import main as build_main
    from index_build.evaluate import main as evaluate_main
    from index_build.shard import main as shard_main

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", no_model)
    calls = [
        lambda: build_main(["./no_such_dir", "--out", str(tmp_path / "o")]),
        lambda: evaluate_main(["--gallery", "./no_such_dir", "--leave-one-out"]),
        lambda: shard_main(["merge", "./no_such_shard", "--out", str(tmp_path / "o")]),
        lambda: app.main(["--index", "./no_such_index", "--data-dir", str(tmp_path)]),
    ]
    for call in calls:
        with pytest.raises(SystemExit) as err:
            call()
        assert err.value.code == 2
        assert "error: " in capsys.readouterr().err


def test_one_rule_for_the_default_model_and_the_pinned_revision(monkeypatch):
    from index_build.sources import env_model_revision, is_default_model

    assert [is_default_model(s) for s in (None, "", "default", "untrained", "org/model", "./default")] == [
        True,
        True,
        True,
        False,
        False,
        False,
    ]
    monkeypatch.delenv("LGFFEM_MODEL_REVISION", raising=False)
    assert env_model_revision() is None
    monkeypatch.setenv("LGFFEM_MODEL_REVISION", "")
    assert env_model_revision() is None
    monkeypatch.setenv("LGFFEM_MODEL_REVISION", "0123abc")
    assert env_model_revision() == "0123abc"
