"""Kill and rerun: SIGKILL index builds, appends and trainings at random points, rerun them, compare.

Three scenarios, each a real command line run as a subprocess in its own session:

- **build**: ``python -m index_build SRC --out IDX``;
- **append**: ``python -m index_build SRC2 --out IDX --append`` onto the finished build of SRC;
- **train**: ``python -m train --dataset SRC ...`` (checkpoint every epoch); reruns add ``--resume``.

Each scenario first runs once uninterrupted (the reference; its duration T is measured). A trial
starts the command, SIGKILLs it after a delay drawn from a seeded RNG uniformly over (0, 0.95 T),
and may kill the rerun too (1 to ``--max-kills-per-trial`` kills in a row), then reruns it to
completion. The trial is then checked against the reference:

- builds and appends: the index loads (read-only, so the check repairs nothing); each reference row
  is there exactly once (rows keyed by label, source file and the SHA-256 of the source file's
  bytes: "lost" and "duplicated" count the differences); vectors (float32) and metadata rows (label,
  source, thumbnail bytes) are bit-identical to the reference's, in the same order. An append is
  then rerun once more and must add nothing (its extra rows count as duplicated);
- training: every tensor of the exported ``model.safetensors`` and of the last checkpoint's
  ``loss.safetensors`` (the class centres) is bit-identical to the reference's; ``metrics.csv``
  lists each epoch once (a missing epoch is "lost", a repeated one "duplicated") with the
  reference's loss;
- leftovers: files or folders in the output that the reference's output does not have
  (``.tmp-<pid>`` staging files, ``.partial`` work folders, ``*.tmp`` checkpoints, ...);
- orphans: processes of the killed session still alive after the kill (DataLoader workers
  included). ``--kill group`` (default) SIGKILLs the whole process group; ``--kill main`` only
  the main process, as ``kill -9 PID`` or the OOM killer does, so its workers must die by
  themselves.

The table's "kill points" column says what each kill interrupted, read from what the killed run
left on disk. The script exits with status 1 if any trial lost, duplicated or changed anything,
left files or processes behind, or failed to rerun.

Usage::

    python benchmarks/bench_faults.py                          # 60 kills: 20 per scenario, seed 0
    python benchmarks/bench_faults.py --kills 6 --seed 1        # a quick check
    python benchmarks/bench_faults.py --scenarios build append --kill main
"""

from __future__ import annotations

import argparse
import collections
import csv
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from index_build.storage import JOURNAL_FILE, MANIFEST_FILE, WORK_DIR  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "lc25000_lung" / "gallery"
SCENARIOS = ("build", "append", "train")
KILL_TARGETS = ("group", "main")
ORPHAN_GRACE_S = 5.0  # how long processes of a killed session may take to disappear


# -- data ----------------------------------------------------------------------------------------


def copy_images(data: Path, out: Path, start: int, per_class: int, classes: int) -> Path:
    """Copy images ``start .. start + per_class`` (sorted by name) of the first ``classes`` class
    folders of ``data`` into ``out/<class>/``."""
    for folder in sorted(p for p in data.iterdir() if p.is_dir())[:classes]:
        (out / folder.name).mkdir(parents=True, exist_ok=True)
        for image in sorted(p for p in folder.iterdir() if p.is_file())[start : start + per_class]:
            shutil.copyfile(image, out / folder.name / image.name)
    return out


def synthetic_images(out: Path, start: int, per_class: int, classes: int, size: int = 96) -> Path:
    """Noisy PNGs whose class is their colour (``c0``, ``c1``, ...), seeded by class and number."""
    from PIL import Image

    for c in range(classes):
        (out / f"c{c}").mkdir(parents=True, exist_ok=True)
        rgb = np.array([(200, 60, 60), (60, 200, 60), (60, 60, 200), (200, 200, 60)][c % 4])
        for i in range(start, start + per_class):
            noise = np.random.default_rng([c, i]).normal(0, 40, (size, size, 3))
            Image.fromarray(np.clip(rgb + noise, 0, 255).astype(np.uint8)).save(out / f"c{c}" / f"{i:04d}.png")
    return out


def make_sources(data: Optional[Path], work: Path, per_class: int, append_per_class: int, classes: int):
    """The build folder ``SRC`` and the append folder ``SRC2`` (other images of the same classes)."""
    src, src2 = work / "src", work / "src2"
    for folder, start, n in ((src, 0, per_class), (src2, per_class, append_per_class)):
        if data is not None:
            copy_images(data, folder, start, n, classes)
        else:
            synthetic_images(folder, start, n, classes)
    return src, src2


# -- processes -----------------------------------------------------------------------------------


def session_processes(sid: int) -> list[int]:
    """Pids of the live (not zombie) processes of session ``sid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def reap_session(sid: int, grace: float = ORPHAN_GRACE_S) -> int:
    """Wait up to ``grace`` s for session ``sid`` to be gone; SIGKILL and count what is still alive."""
    deadline = time.monotonic() + grace
    while (alive := session_processes(sid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in alive:
        logger.error("orphan: process %d of killed session %d is still alive", pid, sid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(alive)


@dataclass
class Run:
    """One subprocess run: ``killed`` (and what it left alive), or its exit status."""

    seconds: float
    returncode: int
    killed: bool = False
    orphans: int = 0


def run(
    argv: list[str],
    env: dict,
    log: Path,
    kill_after: Optional[float] = None,
    kill: str = "group",
    grace: float = ORPHAN_GRACE_S,
) -> Run:
    """Run ``argv`` in a new session, logging to ``log``; SIGKILL it after ``kill_after`` s if still running.

    ``kill="group"`` kills the process group, ``"main"`` the main process only. Either way every
    process of the session must be gone within ``grace`` seconds afterwards (else counted and
    killed); a run that ends by itself must leave nothing behind either.
    """
    with open(log, "ab") as out:
        out.write(f"=== {time.strftime('%H:%M:%S')} {' '.join(argv)} (kill after {kill_after} s)\n".encode())
        out.flush()
        start = time.monotonic()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=kill_after)
            killed = False
        except subprocess.TimeoutExpired:
            if kill == "group":
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed = True
        seconds = time.monotonic() - start
        out.write(f"=== {time.strftime('%H:%M:%S')} {'killed' if killed else 'exit'} {proc.returncode}\n".encode())
    return Run(seconds, proc.returncode, killed, reap_session(proc.pid, grace))


# -- scenarios -----------------------------------------------------------------------------------


@dataclass
class Check:
    """What one finished trial holds, against the reference."""

    rows_expected: int
    rows_found: int
    lost: int
    duplicated: int
    identical: bool
    leftovers: list[str]
    notes: list[str] = field(default_factory=list)


def tree(folder: Path) -> set[str]:
    """Every path under ``folder`` (files and folders), relative to it."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def multiset_diff(expected: list, found: list) -> tuple[int, int]:
    """``(lost, duplicated)``: rows of ``expected`` missing from ``found``, rows of ``found`` beyond ``expected``."""
    want, got = collections.Counter(expected), collections.Counter(found)
    return sum((want - got).values()), sum((got - want).values())


@dataclass
class Scenario:
    """A command, how to reset its output for a trial, what a kill interrupted, and how to check it."""

    name: str
    first: list[str]  # the command of a trial's first run
    rerun: list[str]  # the command of every later run (train: with --resume)
    out: Path  # the trial's output folder
    reset: Callable[[], None]  # a fresh output folder for a trial
    phase: Callable[[], str]  # what the run just killed was doing, read from the disk
    check: Callable[[], Check]  # compare the finished output with the reference
    reference: list[str]  # the uninterrupted reference run
    reference_reset: Callable[[], None]
    reference_seconds: float = 0.0
    # A run killed after it had finished everything may have its rerun refused with this message
    # (python -m index_build refuses an existing index before loading a model): the trial is done.
    refused_when_finished: Optional[str] = None


def _file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def index_rows(folder: Path) -> tuple[list[tuple], list[tuple], np.ndarray]:
    """Rows of an index folder, loaded read-only: ``(by content, exact, vectors)``.

    ``by content`` keys each row by (label, source, SHA-256 of the source file); ``exact`` by
    (label, source, SHA-256 of the stored thumbnail), in index order."""
    from index_build.patch_index import PatchIndex

    index = PatchIndex.load(folder, read_only=True)
    if index.manifest["count"] != len(index):
        raise ValueError(f"manifest count {index.manifest['count']} != {len(index)} vectors")
    hashes: dict[str, str] = {}
    content = [
        (label, src, hashes.setdefault(src, _file_sha256(src))) for label, src in zip(index.row_labels, index.sources)
    ]
    exact = [index.row_key(i) for i in range(len(index))]
    return content, exact, index.reconstruct_all()


def check_index(out: Path, reference: Path) -> Check:
    """Compare the index in ``out`` with the one in ``reference`` (see the module docstring)."""
    ref_content, ref_exact, ref_xb = index_rows(reference)
    leftovers = sorted(tree(out) - tree(reference))
    try:
        content, exact, xb = index_rows(out)
    except Exception as err:  # noqa: BLE001 - any failure to load is a finding, reported in the table
        return Check(len(ref_content), 0, len(ref_content), 0, False, leftovers, [f"load failed: {err!r}"])
    lost, duplicated = multiset_diff(ref_content, content)
    identical = exact == ref_exact and xb.dtype == ref_xb.dtype and np.array_equal(xb, ref_xb)
    return Check(len(ref_content), len(content), lost, duplicated, identical, leftovers)


def build_phase(out: Path, work: Path, base_count: Optional[int] = None) -> str:
    """What a killed build (``base_count is None``) or append (``base_count`` rows before) was doing:
    start-up, embedding, commit, after commit (its work folder not yet removed) or finished."""
    committed = (out / MANIFEST_FILE).is_file()
    if committed and base_count is not None:
        try:
            committed = json.loads((out / MANIFEST_FILE).read_text())["count"] > base_count
        except (OSError, ValueError, KeyError):
            committed = False
    if committed:
        return "after commit" if work.exists() else "finished"
    if (out / JOURNAL_FILE).exists() or any(".tmp-" in p.name for p in out.glob(".*.tmp-*")):
        return "commit"
    if any(work.glob("chunk-*.npy")):
        return "embedding"
    return "start-up"


def train_phase(out: Path) -> str:
    """What a killed training was doing: start-up (no checkpoint yet), training, export or finished
    (the model card, written last, is there)."""
    if (out / "README.md").exists():
        return "finished"
    if (out / "config.json").exists() or (out / "model.safetensors").exists():
        return "export"
    checkpoints = out / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        return "training"
    return "start-up"


def _metrics(folder: Path) -> list[dict]:
    with open(folder / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _tensors(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path))


def check_training(out: Path, reference: Path) -> Check:
    """Compare a finished training folder with the reference: weights, class centres, metrics."""
    from train.trainer import list_checkpoints

    ref_rows = _metrics(reference)
    leftovers = sorted(tree(out) - tree(reference))
    notes: list[str] = []
    try:
        rows = _metrics(out)
        weights, ref_weights = _tensors(out / "model.safetensors"), _tensors(reference / "model.safetensors")
        last, ref_last = list_checkpoints(out / "checkpoints")[-1], list_checkpoints(reference / "checkpoints")[-1]
        centres, ref_centres = _tensors(last / "loss.safetensors"), _tensors(ref_last / "loss.safetensors")
    except Exception as err:  # noqa: BLE001 - a missing or unreadable output is a finding
        return Check(len(ref_rows), 0, len(ref_rows), 0, False, leftovers, [f"output unreadable: {err!r}"])
    lost, duplicated = multiset_diff([r["epoch"] for r in ref_rows], [r["epoch"] for r in rows])
    identical = True
    for name, (got, want) in {"model": (weights, ref_weights), "loss": (centres, ref_centres)}.items():
        differ = [
            k for k in want if k not in got or got[k].dtype != want[k].dtype or not np.array_equal(got[k], want[k])
        ]
        if differ or got.keys() != want.keys():
            identical = False
            notes.append(f"{name}: {len(differ)} tensors differ (e.g. {differ[:3]})")
    if [r["loss"] for r in rows] != [r["loss"] for r in ref_rows]:
        identical = False
        notes.append("metrics.csv losses differ")
    return Check(len(ref_rows), len(rows), lost, duplicated, identical, leftovers, notes)


def make_scenarios(
    work: Path, src: Path, src2: Path, batch_size: int, chunk_size: int, workers: int, threads: int, epochs: int
) -> dict[str, Scenario]:
    """The three scenarios, writing under ``work`` (references in ``work/ref``, trials in ``work/trial``)."""
    py = sys.executable
    env = _env(work, threads)
    build_opts = ["--batch-size", str(batch_size), "--chunk-size", str(chunk_size)]
    build_opts += ["--num-workers", str(workers), "--device", "cpu", "--no-progress"]
    build_ref, append_ref, train_ref = work / "ref" / "build", work / "ref" / "append", work / "ref" / "model"
    out_build, out_append, out_model = work / "trial" / "build", work / "trial" / "append", work / "trial" / "model"

    def fresh(out: Path, base: Optional[Path] = None) -> Callable[[], None]:
        def reset() -> None:
            shutil.rmtree(out, ignore_errors=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            if base is not None:
                shutil.copytree(base, out)

        return reset

    def build_cmd(out: Path) -> list[str]:
        return [py, "-m", "index_build", str(src), "--out", str(out), *build_opts]

    def append_cmd(out: Path) -> list[str]:
        return [py, "-m", "index_build", str(src2), "--out", str(out), "--append", *build_opts]

    def train_cmd(out: Path) -> list[str]:
        return [
            py, "-m", "train", "--dataset", str(src), "--output-dir", str(out), "--epochs", str(epochs),
            "--batch-size", "8", "--keep-checkpoints", "2", "--seed", "0", "--cpu",
            "--num-workers", str(workers), "--threads", str(threads), "--no-progress",
            "--neck-channels", "16", "--neck-layers", "1", "--image-size", "64", "--backbone-weights", "none",
        ]  # fmt: skip

    def append_phase() -> str:
        base = json.loads((build_ref / MANIFEST_FILE).read_text())["count"]
        return build_phase(out_append, out_append / f"{WORK_DIR}-append", base)

    def check_append() -> Check:
        result = check_index(out_append, append_ref)
        if result.rows_found:  # rerunning an append that finished must add nothing
            again = run(append_cmd(out_append), env, out_append.parent / "append-again.log")
            if again.returncode != 0 or again.orphans:
                result.notes.append(f"rerun of the finished append: exit {again.returncode}, {again.orphans} orphans")
                result.identical = False
            after = check_index(out_append, append_ref)
            result.duplicated += max(0, after.rows_found - result.rows_found)
            result.identical &= after.identical
            result.leftovers = sorted(set(result.leftovers) | set(after.leftovers))
        return result

    return {
        "build": Scenario(
            "build",
            build_cmd(out_build),
            build_cmd(out_build),
            out_build,
            fresh(out_build),
            lambda: build_phase(out_build, out_build / WORK_DIR),
            lambda: check_index(out_build, build_ref),
            build_cmd(build_ref),
            fresh(build_ref),
            refused_when_finished=f"error: an index already exists in {out_build}; pass --append or --overwrite",
        ),
        "append": Scenario(
            "append",
            append_cmd(out_append),
            append_cmd(out_append),
            out_append,
            fresh(out_append, build_ref),
            append_phase,
            check_append,
            append_cmd(append_ref),
            fresh(append_ref, build_ref),
        ),
        "train": Scenario(
            "train",
            train_cmd(out_model),
            [*train_cmd(out_model), "--resume"],
            out_model,
            fresh(out_model),
            lambda: train_phase(out_model),
            lambda: check_training(out_model, train_ref),
            train_cmd(train_ref),
            fresh(train_ref),
        ),
    }


def _env(work: Path, threads: int) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(work / "hf-datasets"),  # killed runs may leave it half written: part of the test
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }


# -- trials --------------------------------------------------------------------------------------


@dataclass
class Trial:
    """One kill-and-rerun trial of a scenario."""

    scenario: str
    kills: int = 0
    reruns: int = 0
    orphans: int = 0
    phases: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    check: Optional[Check] = None

    @property
    def ok(self) -> bool:
        c = self.check
        return (
            not self.failures
            and not self.orphans
            and c is not None
            and c.identical
            and not (c.lost or c.duplicated or c.leftovers or c.notes)
            and c.rows_found == c.rows_expected
        )


def run_reference(scenario: Scenario, env: dict, log: Path, repeats: int = 1) -> float:
    """Run the scenario's reference uninterrupted ``repeats`` times (the first ones warm the caches:
    the data set's Arrow cache, the page cache); returns the duration of the last run in seconds."""
    for _ in range(repeats):
        scenario.reference_reset()
        result = run(scenario.reference, env, log)
        if result.returncode != 0 or result.orphans:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"reference {scenario.name} run failed (exit {result.returncode}):\n{tail}")
    scenario.reference_seconds = result.seconds
    return result.seconds


def last_output(log: Path) -> str:
    """What the last run wrote to ``log`` (after its ``===`` start line)."""
    text = log.read_text(errors="replace")
    markers = [m.start() for m in re.finditer(r"^=== ", text, re.MULTILINE)]  # each run: start and end line
    return text[markers[-2] :] if len(markers) >= 2 else text


def refused_as_finished(scenario: Scenario, trial: Trial, log: Path) -> bool:
    """Whether the last kill came after the run had finished and the rerun refused with the expected message."""
    message = scenario.refused_when_finished
    return bool(message and trial.phases and trial.phases[-1] == "finished" and message in last_output(log))


def run_trial(
    scenario: Scenario, env: dict, rng: np.random.Generator, kills: int, log: Path, kill: str = "group"
) -> Trial:
    """Start the scenario, SIGKILL it up to ``kills`` times in a row at random points, rerun it to
    completion, and check the result against the reference (:attr:`Scenario.reference_seconds` set)."""
    if scenario.reference_seconds <= 0:
        raise ValueError(f"run the {scenario.name} reference first")
    scenario.reset()
    trial = Trial(scenario.name)
    finished = False
    for attempt in range(kills):
        delay = float(rng.uniform(0.0, 0.95)) * scenario.reference_seconds
        result = run(scenario.first if attempt == 0 else scenario.rerun, env, log, kill_after=delay, kill=kill)
        trial.reruns += attempt > 0
        trial.orphans += result.orphans
        if not result.killed:  # it finished before the kill came
            finished = True
            if result.returncode != 0 and not refused_as_finished(scenario, trial, log):
                trial.failures.append(f"run {attempt + 1} exited {result.returncode} (log {log})")
            break
        trial.kills += 1
        trial.phases.append(scenario.phase())
    if not finished:
        limit = 20 * scenario.reference_seconds + 120
        result = run(scenario.rerun, env, log, kill_after=limit, kill="group")
        trial.reruns += 1
        trial.orphans += result.orphans
        if result.killed:
            trial.failures.append(f"the rerun did not finish in {limit:.0f} s (log {log})")
        elif result.returncode != 0 and not refused_as_finished(scenario, trial, log):
            trial.failures.append(f"the rerun exited {result.returncode} (log {log})")
    trial.check = scenario.check()
    if not trial.ok:
        logger.error("%s trial failed: %s %s (log %s)", scenario.name, trial.failures, trial.check, log)
    return trial


def summary_row(name: str, trials: list[Trial]) -> list[str]:
    """One table row for a scenario's trials."""
    checks = [t.check for t in trials if t.check is not None]
    phases = collections.Counter(p for t in trials for p in t.phases)
    points = ", ".join(f"{p} {n}" for p, n in sorted(phases.items(), key=lambda kv: -kv[1]))
    failed = sum(not t.ok for t in trials)
    return [
        name,
        str(len(trials)),
        str(sum(t.kills for t in trials)),
        str(sum(t.reruns for t in trials)),
        str(sum(c.rows_expected for c in checks)),
        str(sum(c.rows_found for c in checks)),
        str(sum(c.lost for c in checks)),
        str(sum(c.duplicated for c in checks)),
        f"{sum(c.identical for c in checks)}/{len(trials)}",
        str(sum(len(c.leftovers) for c in checks)),
        str(sum(t.orphans for t in trials)),
        points or "-",
        str(failed),
    ]


HEADER = [
    "scenario", "trials", "kills", "reruns", "rows expected", "rows found", "lost", "duplicated",
    "bit-identical", "leftovers", "orphans", "kill points", "failed trials",
]  # fmt: skip


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def split_kills(total: int, names: list[str]) -> dict[str, int]:
    """``total`` kills split evenly over the scenarios (the first ones get the remainder)."""
    return {name: total // len(names) + (i < total % len(names)) for i, name in enumerate(names)}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=60, help="total kills, split over the scenarios")
    parser.add_argument("--max-kills-per-trial", type=int, default=3, help="kills in a row before the final rerun")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill delays and kills per trial")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument(
        "--kill", choices=KILL_TARGETS, default="group", help="SIGKILL the process group or the main process"
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="image folder (class/*.jpg) to copy from")
    parser.add_argument("--synthetic", action="store_true", help="generated images instead of --data")
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--images", type=int, default=16, help="images per class built (and trained on)")
    parser.add_argument("--append-images", type=int, default=6, help="other images per class appended")
    parser.add_argument("--batch-size", type=int, default=4, help="index_build --batch-size")
    parser.add_argument("--chunk-size", type=int, default=4, help="index_build --chunk-size (a multiple of the batch)")
    parser.add_argument("--num-workers", type=int, default=1, help="DataLoader workers of builds and trainings")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (OMP_NUM_THREADS) of every run")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    args = parser.parse_args(argv)
    if args.kills < 1 or args.max_kills_per_trial < 1:
        parser.error("--kills and --max-kills-per-trial must be at least 1")
    if min(args.classes, args.images, args.append_images, args.batch_size, args.chunk_size, args.epochs) < 1:
        parser.error("--classes, --images, --append-images, --batch-size, --chunk-size and --epochs must be >= 1")
    if args.chunk_size % args.batch_size:
        parser.error("--chunk-size must be a multiple of --batch-size (a resumed build then batches the same rows)")
    data = None if args.synthetic else args.data
    if data is not None and not data.is_dir():
        parser.error(f"image folder not found: {data} (pass --synthetic for generated images)")
    if not sys.platform.startswith("linux"):
        parser.error("needs Linux (/proc, process sessions)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    try:
        src, src2 = make_sources(data, work / "data", args.images, args.append_images, args.classes)
        scenarios = make_scenarios(
            work, src, src2, args.batch_size, args.chunk_size, args.num_workers, args.threads, args.epochs
        )
        env = _env(work, args.threads)
        names = [name for name in SCENARIOS if name in args.scenarios]
        for name in [n for n in SCENARIOS if n in names or (n == "build" and "append" in names)]:
            repeats = 2 if name == "build" else 1  # the first build also writes the data set cache
            seconds = run_reference(scenarios[name], env, logs / f"reference-{name}.log", repeats)
            logger.info("reference %s: %.1f s", name, seconds)
        rng = np.random.default_rng(args.seed)
        rows, failed = [], 0
        for name, budget in split_kills(args.kills, names).items():
            trials: list[Trial] = []
            while sum(t.kills for t in trials) < budget:
                left = budget - sum(t.kills for t in trials)
                kills = int(rng.integers(1, min(args.max_kills_per_trial, left) + 1))
                trial = run_trial(scenarios[name], env, rng, kills, logs / f"{name}-{len(trials):03d}.log", args.kill)
                trials.append(trial)
                logger.info(
                    "%s trial %d: %d kills (%s), %s", name, len(trials), trial.kills, ", ".join(trial.phases) or "-",
                    "ok" if trial.ok else "FAILED",
                )  # fmt: skip
            rows.append(summary_row(name, trials))
            failed += sum(not t.ok for t in trials)
        source = f"{args.images} + {args.append_images} images per class, {args.classes} classes, " + (
            "generated PNGs" if data is None else f"copied from {data}"
        )
        target = "process group" if args.kill == "group" else "main process"
        print(
            f"kill-and-rerun, seed {args.seed}, SIGKILL to the {target}; {source}; build/append: --batch-size "
            f"{args.batch_size} --chunk-size {args.chunk_size} --num-workers {args.num_workers}; train: "
            f"{args.epochs} epochs, tiny model; {args.threads} thread(s) per run"
        )
        print(
            "reference runs: "
            + ", ".join(
                f"{n} {scenarios[n].reference_seconds:.1f} s" for n in SCENARIOS if scenarios[n].reference_seconds
            )
            + f"; {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
        )
        print(markdown_table(rows))
        return 1 if failed else 0
    finally:
        if args.work is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"working folder kept: {work}")


if __name__ == "__main__":
    sys.exit(main())
