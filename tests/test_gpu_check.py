"""benchmarks/gpu_check.py: its CPU-side logic (the GPU run itself needs a CUDA machine)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_check  # noqa: E402
from gpu_check import Row, Sizes, format_table, loss_decreased, main, run_checks  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """The training check makes a bf16 Accelerator; accelerate keeps that state per process, and a
    later Accelerator with other settings (the trainer's tests) would be refused: reset it after."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def test_loss_decreased():
    assert loss_decreased([5.0] * 10 + [4.0] * 10)
    assert not loss_decreased([4.0] * 10 + [5.0] * 10)
    assert not loss_decreased([5.0] * 20)  # flat is not decreasing
    assert not loss_decreased([5.0] * 10 + [float("nan")] + [1.0] * 9)
    assert not loss_decreased([5.0, float("inf"), 1.0, 0.5])
    assert loss_decreased([3.0, 2.0, 1.0])  # short runs compare halves: 3.0 vs 1.0
    assert not loss_decreased([1.0])


def test_format_table():
    rows = [Row("embed x fp32", 1234.5, "images/s", True, "batch 64"), Row("train", math.nan, "steps/s", False, "e")]
    assert format_table(rows, "NVIDIA H100").splitlines() == [
        "device: NVIDIA H100",
        "",
        "| check | value | unit | pass | note |",
        "|---|---|---|---|---|",
        "| embed x fp32 | 1,234.50 | images/s | yes | batch 64 |",
        "| train | nan | steps/s | NO | e |",
    ]


def test_without_cuda_exits_non_zero(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([]) == 1
    assert "error: CUDA is not available" in capsys.readouterr().err
    assert main(["--device", "cpu"]) == 2  # the CPU only for dry runs
    assert "only for --dry-run" in capsys.readouterr().err


def _fake_checks(monkeypatch, fail_train: bool):
    monkeypatch.setattr(gpu_check, "default_architecture", lambda sizes: "default")
    monkeypatch.setattr(gpu_check, "paper_architecture", lambda sizes: "paper")
    monkeypatch.setattr(gpu_check, "embedding_throughput", lambda model, device, bf16, b, i: 100.0 + bf16)

    def training_run(model, device, steps, batch):
        if fail_train:
            raise RuntimeError("CUDA out of memory")
        return [3.0, 2.0, 1.0, 0.5], 7.0

    monkeypatch.setattr(gpu_check, "training_run", training_run)
    monkeypatch.setattr(gpu_check, "search_latency", lambda embedder, n, q, workdir: 12.5)
    monkeypatch.setattr(gpu_check, "make_embedder", lambda model, device: "embedder")


def test_run_checks_rows_and_failures(monkeypatch):
    """Every check gives one row; a check that raises is a failed row, the others still run."""
    _fake_checks(monkeypatch, fail_train=False)
    rows = run_checks(torch.device("cpu"), Sizes.dry(), log=lambda msg: None)
    assert [(r.check, r.value, r.passed) for r in rows] == [
        ("embed default model fp32", 100.0, True),
        ("embed default model bf16", 101.0, True),
        ("embed paper convnextv2_base (random) fp32", 100.0, True),
        ("embed paper convnextv2_base (random) bf16", 101.0, True),
        ("train 6 steps bf16 (accelerate)", 7.0, True),
        ("app search (model on device)", 12.5, True),
    ]
    assert rows[4].note == "loss 2.500 -> 0.750"
    _fake_checks(monkeypatch, fail_train=True)
    rows = run_checks(torch.device("cpu"), Sizes.dry(), log=lambda msg: None)
    assert [r.passed for r in rows] == [True, True, True, True, False, True]
    assert rows[4].note == "error: RuntimeError: CUDA out of memory" and math.isnan(rows[4].value)


def test_main_exit_status_follows_the_checks(monkeypatch, capsys):
    _fake_checks(monkeypatch, fail_train=False)
    assert main(["--device", "cpu", "--dry-run"]) == 0
    assert "6/6 checks passed" in capsys.readouterr().out
    _fake_checks(monkeypatch, fail_train=True)
    assert main(["--device", "cpu", "--dry-run"]) == 1
    assert "5/6 checks passed" in capsys.readouterr().out


def test_training_run_on_cpu_tiny():
    """The real accelerate loop, 4 steps of a 64 px model: finite losses, a positive rate."""
    torch.set_num_threads(2)
    losses, rate = gpu_check.training_run(gpu_check.default_architecture(Sizes.dry()), torch.device("cpu"), 4, 4)
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses) and rate > 0


@pytest.mark.slow
def test_dry_run_end_to_end():
    """All checks for real at dry-run sizes on the CPU (a few minutes on two shared cores)."""
    assert main(["--device", "cpu", "--dry-run"]) == 0
