"""Sharded index builds: shards + merge == a single-machine build."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import free_port
from PIL import Image

from index_build.__main__ import main as build_main
from index_build.index import IndexLoadError, PatchIndex
from index_build.shard import load_shards, shard_dir_name
from index_build.shard import main as shard_main
from modeling_lgffem import LgffemConfig, LgffemModel

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}
COMMON = ["--num-workers", "0", "--no-progress", "--batch-size", "4"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A tiny random LGFFEM saved as a model folder (what --model takes)."""
    torch.set_num_threads(2)
    config = LgffemConfig(neck_channels=16, neck_layers=1, image_size=64)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model")
    LgffemModel(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> str:
    """13 noisy class-coloured patches in an image folder (13 does not split evenly into 3 shards)."""
    root = tmp_path_factory.mktemp("patches")
    rng = np.random.default_rng(0)
    for c, (label, colour) in enumerate(COLOURS.items()):
        (root / label).mkdir()
        for i in range(4 + (c == 0)):
            array = np.clip(np.asarray(colour) + rng.integers(-60, 60, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(array).save(root / label / f"{label}_{i}.png")
    return str(root)


def build_shards(collection: str, model_dir: str, root: Path, count: int, common: list[str] = COMMON) -> list[str]:
    dirs = []
    for i in range(count):
        out = root / shard_dir_name(i, count)
        build_main([collection, "--shard", f"{i}/{count}", "--out", str(out), "--model", model_dir, *common])
        dirs.append(str(out))
    return dirs


def assert_same_search(a: PatchIndex, b: PatchIndex, xq: np.ndarray, k: int) -> None:
    da, ia = a.search_embeddings(xq, k)
    db, ib = b.search_embeddings(xq, k)
    np.testing.assert_array_equal(ia, ib)
    # Scores agree to float32 rounding: the merge re-normalises vectors read back from the shards.
    np.testing.assert_allclose(da, db, rtol=0, atol=1e-6)
    assert a.row_labels == b.row_labels and a.sources == b.sources
    assert [a.thumbnail(i).size for i in range(len(a))] == [b.thumbnail(i).size for i in range(len(b))]


@pytest.mark.parametrize(
    "index_type,params,batch_size,shards",
    [("flat", [], "4", 3), ("ivfpq", ["--index-param", "nprobe=2"], "1", 2)],
)
def test_sharded_build_equals_single_build(collection, model_dir, tmp_path, index_type, params, batch_size, shards):
    """Same ids in the same order for every query, scores equal to float32 rounding. Shard
    boundaries change which images share a batch, which can change the last bit of an
    embedding (BLAS blocking); the IVF-PQ case embeds one image per batch so that the k-means
    training input is the same to the bit in both builds."""
    common = [*COMMON[:-1], batch_size]
    single = build_main(
        [
            collection,
            "--out",
            str(tmp_path / "single"),
            "--model",
            model_dir,
            "--index-type",
            index_type,
            *params,
            *common,
        ]
    )
    dirs = build_shards(collection, model_dir, tmp_path / "shards", shards, common)
    sizes = [len(PatchIndex.load(d)) for d in dirs]
    assert sizes == ([5, 4, 4] if shards == 3 else [7, 6])  # contiguous shards of 13 rows
    assert json.loads((Path(dirs[1]) / "manifest.json").read_text())["dataset"]["shard"] == [1, shards]
    merged_path = tmp_path / "merged"
    merged = shard_main(
        ["merge", *reversed(dirs), "--out", str(merged_path), "--model", model_dir, "--index-type", index_type, *params]
    )
    assert len(merged) == len(single) == 13
    assert merged.manifest["index"] == single.manifest["index"]
    assert merged.manifest["dataset"]["merged_from"] == dirs
    rng = np.random.default_rng(1)
    xq = np.concatenate([single.index.reconstruct_n(0, 5), rng.standard_normal((4, single.dim))]).astype(np.float32)
    reloaded = PatchIndex.load(merged_path)
    assert_same_search(reloaded, PatchIndex.load(tmp_path / "single"), xq, k=13)


def test_merge_refuses_incomplete_or_repeated_shards(collection, model_dir, tmp_path):
    dirs = build_shards(collection, model_dir, tmp_path / "shards", 2)
    with pytest.raises(IndexLoadError, match=r"missing shard\(s\) \[1\] of 2"):
        load_shards(dirs[:1])
    with pytest.raises(IndexLoadError, match="given twice"):
        load_shards([dirs[0], dirs[0], dirs[1]])
    single = tmp_path / "single"
    build_main([collection, "--out", str(single), "--model", model_dir, *COMMON])
    with pytest.raises(IndexLoadError, match="not a shard index"):
        load_shards([str(single)])


def test_merge_refuses_approximate_shards(collection, model_dir, tmp_path):
    out = tmp_path / shard_dir_name(0, 1)
    build_main([collection, "--shard", "0/1", "--out", str(out), "--model", model_dir, "--index-type", "hnsw", *COMMON])
    with pytest.raises(IndexLoadError, match="must be exact"):
        load_shards([str(out)])


@pytest.mark.parametrize("bad", ["3/3", "1", "a/b", "-1/2"])
def test_bad_shard_flag_is_a_usage_error(collection, tmp_path, bad, capsys):
    with pytest.raises(SystemExit) as exc:
        build_main([collection, "--shard", bad, "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert "shard" in capsys.readouterr().err


def test_shard_build_takes_rank_from_environment(collection, model_dir, tmp_path, monkeypatch):
    """Without --shard, ``build`` uses this process's rank and world size (as under accelerate launch)."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    import index_build.shard as shard_module

    monkeypatch.setattr(shard_module, "_rank_and_world", lambda: (1, 2, "cpu"))
    index = shard_main(["build", collection, "--out-root", str(tmp_path), "--model", model_dir, *COMMON])
    assert index.path == tmp_path / "shard-1-of-2"
    assert len(index) == 6 and index.manifest["dataset"]["shard"] == [1, 2]
    with pytest.raises(SystemExit):
        shard_main(["build", collection, "--out-root", str(tmp_path), "--out", "x"])
    with pytest.raises(SystemExit):
        shard_main(["merge", "a", "--out", "b", "--bogus"])


def test_rank_and_world_single_process():
    from index_build.shard import _rank_and_world

    assert _rank_and_world() == (0, 1, "cpu")


def test_accelerate_launch_two_processes_equals_single_build(collection, model_dir, tmp_path):
    """Two real processes under ``accelerate launch`` (CPU, gloo), then the merge: the same index as one process.

    ``accelerate launch --cpu --num_processes 2`` starts a single process unless an MPI hostfile
    is given (accelerate 1.x), so the test uses ``--multi_gpu``, which starts the processes
    through torchrun on any machine; without CUDA the shard builder joins them in a gloo group.
    One image per batch and one thread make the embeddings of both builds the same.
    """
    import os
    import shutil
    import subprocess
    import sys

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate CLI not installed")
    common = [*COMMON[:-1], "1"]
    root = tmp_path / "shards"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    command = [*launch, "-m", "index_build.shard", "build", collection, "--out-root", str(root), "--model", model_dir]
    done = subprocess.run(
        [*command, *common], cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    dirs = sorted(str(p) for p in root.iterdir())
    assert [Path(d).name for d in dirs] == ["shard-0-of-2", "shard-1-of-2"]
    assert [len(PatchIndex.load(d)) for d in dirs] == [7, 6]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the launched processes (OMP_NUM_THREADS=1): the same BLAS blocking
    try:
        single = build_main([collection, "--out", str(tmp_path / "single"), "--model", model_dir, *common])
    finally:
        torch.set_num_threads(threads)
    merged = shard_main(["merge", *dirs, "--out", str(tmp_path / "merged"), "--model", model_dir])
    # the merge stores the shards' vectors bit for bit (checked last); the launched
    # processes' embeddings differ from the in-process build's in the last float32 bits (about 1e-8)
    np.testing.assert_allclose(merged.reconstruct_all(), single.reconstruct_all(), rtol=0, atol=1e-6)
    stored = np.concatenate([PatchIndex.load(d).reconstruct_all() for d in dirs])
    assert np.array_equal(merged.reconstruct_all(), stored)
    assert merged.row_labels == single.row_labels and merged.sources == single.sources
    assert merged.manifest["index"] == single.manifest["index"]
    assert merged.manifest["close_match"] == single.manifest["close_match"]
    xq = single.reconstruct_all()[:5]
    assert_same_search(PatchIndex.load(tmp_path / "merged"), PatchIndex.load(tmp_path / "single"), xq, k=13)


@pytest.mark.parametrize("index_type", ["ivfpq", "factory:IVF2,SQ8"])
def test_on_disk_merge_equals_in_memory_merge(collection, model_dir, tmp_path, index_type):
    """``merge --on-disk`` holds one shard at a time and writes the inverted lists to index.ivfdata;
    the training sample (8 of 13 rows, drawn across shards), the codes, the calibration and every
    search result are those of the in-memory merge."""
    dirs = build_shards(collection, model_dir, tmp_path / "shards", 3)
    params = ["--index-type", index_type, "--index-param", "train_size=8", "--index-param", "nprobe=2"]
    shard_main(["merge", *dirs, "--out", str(tmp_path / "memory"), "--model", model_dir, *params])
    shard_main(["merge", *dirs, "--out", str(tmp_path / "disk"), "--model", model_dir, *params, "--on-disk"])
    assert (tmp_path / "disk" / "index.ivfdata").is_file() and not (tmp_path / "memory" / "index.ivfdata").exists()
    assert sorted(p.name for p in (tmp_path / "disk").iterdir() if p.name.startswith(".blocks")) == []
    memory, disk = PatchIndex.load(tmp_path / "memory"), PatchIndex.load(tmp_path / "disk")
    assert disk.manifest["index"] == memory.manifest["index"]
    assert disk.manifest["close_match"] == memory.manifest["close_match"]
    assert disk.manifest["count"] == 13
    rng = np.random.default_rng(2)
    xq = np.concatenate([PatchIndex.load(dirs[0]).reconstruct_all(), rng.standard_normal((4, disk.dim))])
    da, ia = memory.search_embeddings(xq.astype(np.float32), 13)
    db, ib = disk.search_embeddings(xq.astype(np.float32), 13)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(da, db)
    moved = tmp_path / "moved"
    (tmp_path / "disk").rename(moved)  # the lists are found next to the index file, wherever it is
    np.testing.assert_array_equal(PatchIndex.load(moved).search_embeddings(xq.astype(np.float32), 13)[1], ia)


def test_on_disk_merge_needs_an_inverted_file_index(collection, model_dir, tmp_path):
    dirs = build_shards(collection, model_dir, tmp_path / "shards", 2)
    with pytest.raises(ValueError, match="--on-disk needs an inverted-file index"):
        shard_main(["merge", *dirs, "--out", str(tmp_path / "m"), "--model", model_dir, "--on-disk"])
