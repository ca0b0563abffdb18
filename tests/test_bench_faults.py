"""benchmarks/bench_faults.py: its process checks and index comparison (fast), one kill-and-rerun trial per
scenario (slow)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_faults  # noqa: E402
from helpers import make_embedder, write_folder  # noqa: E402

from index_build.data import load_image_dataset  # noqa: E402
from index_build.embedding import build_index  # noqa: E402
from index_build.patch_index import PatchIndex  # noqa: E402

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and sessions are Linux only")


@linux_only
@pytest.mark.parametrize(("kill", "orphans"), [("group", 0), ("main", 1)])
def test_a_background_child_outliving_its_killed_parent_is_an_orphan(tmp_path, kill, orphans):
    # sh starts a background sleep: killing only sh leaves it running, killing the group does not
    result = bench_faults.run(
        ["sh", "-c", "sleep 60 & echo started; wait"], {}, tmp_path / "log", kill_after=1.0, kill=kill, grace=0.5
    )
    assert result.killed and result.returncode == -9 and result.orphans == orphans
    assert "started" in (tmp_path / "log").read_text()


@linux_only
def test_a_run_that_ends_by_itself_reports_its_status(tmp_path):
    result = bench_faults.run(["sh", "-c", "exit 3"], {}, tmp_path / "log", kill_after=60)
    assert (result.killed, result.returncode, result.orphans) == (False, 3, 0) and result.seconds < 60


def test_multiset_diff_and_kill_split():
    assert bench_faults.multiset_diff(["a", "b", "b", "c"], ["a", "b", "c", "c", "d"]) == (1, 2)
    assert bench_faults.split_kills(8, ["build", "append", "train"]) == {"build": 3, "append": 3, "train": 2}


def test_check_index_counts_lost_duplicated_and_leftovers(tmp_path):
    embedder = make_embedder()
    folder = write_folder(tmp_path / "patches", per_class=2)
    ref = tmp_path / "ref"
    build_index(load_image_dataset(str(folder)), ref, embedder, num_workers=0, progress=False, batch_size=4)
    out = Path(shutil.copytree(ref, tmp_path / "out"))
    same = bench_faults.check_index(out, ref)
    assert (same.rows_expected, same.rows_found, same.lost, same.duplicated) == (6, 6, 0, 0)
    assert same.identical and same.leftovers == [] and same.notes == []

    index = PatchIndex.load(out)
    row = index.reconstruct_all()[:1]
    index.add_embeddings(
        row, index.row_labels[:1], index.sources[:1], [index.metadata_table().column("thumbnail")[0].as_py()]
    )
    (out / ".index.faiss.tmp-999999").write_bytes(b"left by a killed writer")
    (out / ".partial").mkdir()
    twice = bench_faults.check_index(out, ref)
    assert (twice.rows_found, twice.lost, twice.duplicated, twice.identical) == (7, 0, 1, False)
    assert twice.leftovers == [".index.faiss.tmp-999999", ".partial"]

    (out / "manifest.json").write_text("{")
    broken = bench_faults.check_index(out, ref)
    assert (broken.rows_found, broken.lost, broken.identical) == (0, 6, False)
    assert broken.notes[0].startswith("load failed: IndexLoadError")


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    src, src2 = bench_faults.make_sources(None, work / "data", per_class=4, append_per_class=2, classes=2)
    built = bench_faults.make_scenarios(work, src, src2, batch_size=2, chunk_size=2, workers=1, threads=1, epochs=3)
    return built, bench_faults._env(work, threads=1), work


@pytest.mark.slow
@linux_only
@pytest.mark.parametrize("name", ["build", "append", "train"])
def test_one_trial_per_scenario_resumes_to_the_reference(scenarios, name):
    built, env, work = scenarios
    if name == "append" and not built["build"].reference_seconds:
        bench_faults.run_reference(built["build"], env, work / "reference-build.log")
    bench_faults.run_reference(built[name], env, work / f"reference-{name}.log")
    rng = np.random.default_rng(0)
    trial = bench_faults.run_trial(built[name], env, rng, kills=2, log=work / f"{name}.log", kill="main")
    assert trial.ok, (trial, (work / f"{name}.log").read_text()[-3000:])
    assert trial.kills >= 1 and trial.check.rows_found == trial.check.rows_expected > 0


def test_a_rerun_refused_after_a_finished_build_is_accepted_only_then(tmp_path):
    log = tmp_path / "log"
    log.write_text(
        "=== 10:00:00 python -m index_build (kill after 3 s)\nINFO index ... 48 vectors\n=== 10:00:03 killed -9\n"
        "=== 10:00:03 python -m index_build (kill after None s)\n"
        "python -m index_build: error: an index already exists in /x; pass --append or --overwrite\n"
        "=== 10:00:04 exit 2\n"
    )
    assert bench_faults.last_output(log).startswith("=== 10:00:03 python -m index_build (kill after None s)")
    scenario = bench_faults.Scenario(
        "build", [], [], tmp_path, print, str, print, [], print,
        refused_when_finished="error: an index already exists in /x; pass --append or --overwrite",
    )  # fmt: skip
    finished, committed = (
        bench_faults.Trial("build", phases=["finished"]),
        bench_faults.Trial("build", phases=["after commit"]),
    )
    assert bench_faults.refused_as_finished(scenario, finished, log)
    assert not bench_faults.refused_as_finished(scenario, committed, log)  # that rerun must finish the build
