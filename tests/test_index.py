"""PatchIndex: build, round trip, resume, append, atomic writes, manifest checks, approximate types."""

from __future__ import annotations

import json
import os
from pathlib import Path

import faiss
import numpy as np
import pytest
from helpers import make_embedder, write_folder
from PIL import Image

from index_build import storage
from index_build.__main__ import main as build_main
from index_build.data import load_image_dataset
from index_build.index import (
    INDEX_FILE,
    MANIFEST_FILE,
    METADATA_FILE,
    IndexLoadError,
    PatchIndex,
    build_index,
    decode_thumbnail,
    make_faiss_index,
    write_index,
)
from index_build.models import Embedder


@pytest.fixture(scope="module")
def other_embedder() -> Embedder:
    """Same config, different weights (another seed)."""
    return make_embedder(seed=1)


@pytest.fixture(scope="module")
def dataset(folder):
    return load_image_dataset(str(folder))


def _build(dataset, out, embedder, **kwargs) -> PatchIndex:
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("progress", False)
    kwargs.setdefault("batch_size", 4)
    return build_index(dataset, out, embedder, **kwargs)


def test_round_trip(dataset, embedder, tmp_path):
    out = tmp_path / "idx"
    built = _build(dataset, out, embedder)
    # no temp files, no .partial; .lock is the writer lock, kept (removing a lock file races with its next user)
    assert sorted(os.listdir(out)) == [storage.LOCK_FILE, INDEX_FILE, MANIFEST_FILE, METADATA_FILE]
    index = PatchIndex.load(out, embedder)
    assert len(index) == 12
    assert index.labels == ["blue", "green", "red"]
    manifest = index.manifest
    assert manifest["count"] == 12 and manifest["embedding_dim"] == 64
    assert manifest["model"]["config_hash"] == embedder.config_hash
    assert manifest["model"]["weights_fingerprint"] == embedder.fingerprint
    assert manifest["index"]["type"] == "flat" and manifest["index"]["class"] == "IndexFlatIP"
    assert manifest["labels"] == {"blue": 4, "green": 4, "red": 4}
    assert manifest["preprocessing"]["image_size"] == 64
    assert manifest["packages"]["faiss-cpu"] == faiss.__version__ or manifest["packages"]["faiss-cpu"]
    # stored vectors equal a fresh embedding of the same images
    images = [row["image"] for row in dataset]
    expected = embedder.embed_images(images)
    np.testing.assert_allclose(index.reconstruct_all(), expected, atol=1e-5)
    np.testing.assert_allclose(built.reconstruct_all(), index.reconstruct_all(), atol=0)
    # each image finds itself first
    results = index.search(images=images, k=4)
    assert [r.ids[0] for r in results] == list(range(12))
    assert all(r.scores[0] == pytest.approx(1.0, abs=1e-4) for r in results)
    first = results[0]
    assert first.labels[0] == dataset[0]["label"] and first.sources[0] == dataset[0]["source"]
    assert first.scores == sorted(first.scores, reverse=True)
    assert first.votes[0][1] == max(c for _, c in first.votes)
    assert first.majority_label == first.votes[0][0]
    assert isinstance(first.thumbnails[0], Image.Image) and max(first.thumbnails[0].size) == 48
    # embeddings as queries give the same result as images
    again = index.search(embeddings=expected[:2], k=4)
    assert [r.ids for r in again] == [r.ids for r in results[:2]]


def test_label_filter(dataset, embedder, built_dir):
    index = PatchIndex.load(built_dir, embedder)
    results = index.search(images=[dataset[0]["image"]], k=10, label="green")
    assert results[0].labels == ["green"] * 4  # only 4 green patches exist; -1 padding dropped
    with pytest.raises(ValueError, match="not in the index"):
        index.search(images=[dataset[0]["image"]], k=3, label="purple")


def test_thumbnails_are_small_jpegs(embedder, index_dir):
    big = Image.new("RGB", (400, 300), (10, 20, 30))
    index = PatchIndex.load(index_dir, embedder)
    index.add([big], ["grey"], ["big.png"])
    raw = index._thumbnails[12].as_py()
    assert raw[:2] == b"\xff\xd8"  # JPEG
    assert decode_thumbnail(raw).size == (224, 168)  # the model's input side: shown as large as the model saw it
    assert index.thumbnail(0).size == (48, 48)  # a smaller source keeps its own size (no upsampling)


def test_index_with_old_128px_thumbnails_still_loads(embedder, dataset, tmp_path, monkeypatch):
    from index_build import embedding

    big = load_image_dataset(str(write_folder(tmp_path / "big", per_class=1, size=300)))
    monkeypatch.setattr(embedding, "THUMBNAIL_SIZE", 128)  # how indexes were written before
    _build(big, tmp_path / "old", embedder)
    monkeypatch.undo()
    old = PatchIndex.load(tmp_path / "old", embedder)
    assert [old.thumbnail(i).size for i in range(3)] == [(128, 128)] * 3
    result = old.search(images=[big[0]["image"]], k=2)[0]
    assert result.thumbnails[0].size == (128, 128)
    old.add([Image.new("RGB", (300, 300), (1, 2, 3))], ["grey"], ["new.png"])  # appended rows: 224 px
    assert old.thumbnail(3).size == (224, 224) and old.thumbnail(0).size == (128, 128)


def test_resume_after_interruption(dataset, embedder, built_dir, tmp_path, monkeypatch):
    reference = PatchIndex.load(built_dir).reconstruct_all()
    out = tmp_path / "idx"
    calls = {"n": 0}
    original = Embedder.embed_pixels

    def failing(self, pixels):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")
        return original(self, pixels)

    monkeypatch.setattr(Embedder, "embed_pixels", failing)
    # batches of 2, chunks of 4 rows: batches 1+2 -> chunk 0 on disk, batch 3 pending, batch 4 crashes
    with pytest.raises(RuntimeError, match="simulated crash"):
        _build(dataset, out, embedder, batch_size=2, chunk_size=4)
    assert not (out / MANIFEST_FILE).exists() and not (out / INDEX_FILE).exists()
    chunk = sorted(p.name for p in (out / ".partial").glob("chunk-*"))
    assert chunk == ["chunk-000000.npy", "chunk-000000.parquet", "chunk-000000.skipped.json"]
    with pytest.raises(IndexLoadError, match="missing"):
        PatchIndex.load(out)

    calls["n"] = -100  # no more crashes; count the batches of the resumed run
    resumed = _build(dataset, out, embedder, batch_size=2, chunk_size=4)
    assert calls["n"] == -100 + 4  # rows 4..11 only: 8 rows in batches of 2
    assert not (out / ".partial").exists()
    np.testing.assert_allclose(resumed.reconstruct_all(), reference, atol=1e-6)
    assert resumed.sources == list(dataset["source"])


def test_resume_discards_partial_build_of_other_model(dataset, embedder, other_embedder, tmp_path, monkeypatch):
    out = tmp_path / "idx"
    other = other_embedder
    original = Embedder.embed_pixels

    def failing(self, pixels):
        if self is other and failing.n >= 2:
            raise RuntimeError("crash")
        failing.n += self is other
        return original(self, pixels)

    failing.n = 0
    monkeypatch.setattr(Embedder, "embed_pixels", failing)
    with pytest.raises(RuntimeError):
        _build(dataset, out, other, batch_size=2, chunk_size=2)
    index = _build(dataset, out, embedder, batch_size=2, chunk_size=2)
    np.testing.assert_allclose(index.reconstruct_all(), embedder.embed_images([r["image"] for r in dataset]), atol=1e-5)


def test_existing_index_needs_append_or_overwrite(dataset, embedder, index_dir):
    out = index_dir
    with pytest.raises(ValueError, match="already exists"):
        _build(dataset, out, embedder)
    assert len(_build(dataset, out, embedder, overwrite=True)) == 12


def test_append(dataset, embedder, index_dir, tmp_path):
    out = index_dir
    extra_root = write_folder(tmp_path / "extra", per_class=1)
    extra = load_image_dataset(str(extra_root))
    appended = _build(extra, out, embedder, append=True)
    assert len(appended) == 15
    loaded = PatchIndex.load(out, embedder)
    assert len(loaded) == 15 and loaded.manifest["count"] == 15
    assert loaded.sources[12:] == list(extra["source"])
    assert loaded.manifest["labels"] == {"blue": 5, "green": 5, "red": 5}
    # the API used by the app: add images with a label, searchable after reload
    odd = Image.new("RGB", (48, 48), (250, 250, 0))
    ids = loaded.add([odd], ["yellow"], ["upload.png"])
    assert ids.tolist() == [15]
    reloaded = PatchIndex.load(out, embedder)
    hit = reloaded.search(images=[odd], k=1)[0]
    assert hit.ids == [15] and hit.labels == ["yellow"] and hit.sources == ["upload.png"]
    assert "yellow" in reloaded.labels
    with pytest.raises(ValueError, match="one label"):
        reloaded.add([odd, odd], ["x"])


def test_append_with_other_model_is_refused(dataset, other_embedder, index_dir):
    out = index_dir
    with pytest.raises(IndexLoadError, match="weights_fingerprint"):
        _build(dataset, out, other_embedder, append=True)


def test_manifest_mismatch(dataset, embedder, other_embedder, built_dir):
    out = built_dir
    with pytest.raises(IndexLoadError, match=r"embedding_dim 64 != 32.*config_hash"):
        PatchIndex.load(out, make_embedder(neck_channels=8))
    with pytest.raises(IndexLoadError, match=r"weights_fingerprint") as err:
        PatchIndex.load(out, other_embedder)
    assert "config_hash" not in str(err.value).split(":")[-1]
    assert "rebuild the index" in str(err.value)
    assert len(PatchIndex.load(out)) == 12  # without a model: embeddings-only search
    with pytest.raises(ValueError, match="without a model"):
        PatchIndex.load(out).search(images=[dataset[0]["image"]])


def test_index_of_the_model_without_its_global_branch_is_refused(built_dir):
    """The same trained weights with the global branch on (as the default now ships) give another
    descriptor (64 + 320 dimensions): an index built before is refused, with the message to rebuild it."""
    with pytest.raises(IndexLoadError, match=r"embedding_dim 64 != 384.*config_hash") as err:
        PatchIndex.load(built_dir, make_embedder(global_weight=1.0))
    assert "rebuild the index" in str(err.value)


def test_missing_and_corrupt_files(dataset, embedder, index_dir, tmp_path):
    out = index_dir
    good = {name: (out / name).read_bytes() for name in (INDEX_FILE, METADATA_FILE, MANIFEST_FILE)}

    def restore():
        for name, content in good.items():
            (out / name).write_bytes(content)

    with pytest.raises(IndexLoadError, match="not found"):
        PatchIndex.load(tmp_path / "nothing")
    for name in good:
        (out / name).unlink()
        with pytest.raises(IndexLoadError, match=f"missing {name}"):
            PatchIndex.load(out)
        restore()
    (out / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(IndexLoadError, match="corrupt manifest.json"):
        PatchIndex.load(out)
    restore()
    (out / INDEX_FILE).write_bytes(good[INDEX_FILE][:-10])  # truncated
    with pytest.raises(IndexLoadError, match=r"corrupt index.faiss.*bytes"):
        PatchIndex.load(out)
    flipped = bytearray(good[METADATA_FILE])
    flipped[len(flipped) // 2] ^= 0xFF  # same size, different content
    (out / INDEX_FILE).write_bytes(good[INDEX_FILE])
    (out / METADATA_FILE).write_bytes(bytes(flipped))
    with pytest.raises(IndexLoadError, match=r"corrupt metadata.parquet in .*: SHA-256"):
        PatchIndex.load(out)
    restore()
    (out / INDEX_FILE).write_bytes(b"\0" * len(good[INDEX_FILE]))  # garbage, checksum not verified
    with pytest.raises(IndexLoadError, match="corrupt index.faiss"):
        PatchIndex.load(out, verify=False)
    restore()
    assert len(PatchIndex.load(out, embedder)) == 12


def test_interrupted_commit_rolls_forward(embedder, index_dir, monkeypatch):
    out = index_dir
    index = PatchIndex.load(out, embedder)
    real_replace = os.replace
    state = {"renames": 0}

    def crash_after_first_rename(src, dst):
        if Path(dst).name in (INDEX_FILE, METADATA_FILE, MANIFEST_FILE):
            state["renames"] += 1
            if state["renames"] == 2:
                raise OSError("power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(storage.os, "replace", crash_after_first_rename)
    with pytest.raises(OSError, match="power cut"):
        index.add([Image.new("RGB", (48, 48), (0, 0, 0))], ["black"], ["x.png"])
    monkeypatch.setattr(storage.os, "replace", real_replace)
    # index.faiss is new, metadata and manifest old: the journal completes the write on open
    assert (out / ".commit.json").exists()
    loaded = PatchIndex.load(out, embedder)
    assert len(loaded) == 13 and loaded.row_labels[-1] == "black"
    assert not (out / ".commit.json").exists()


def test_failed_write_keeps_old_index(embedder, index_dir, monkeypatch):
    out = index_dir
    index = PatchIndex.load(out, embedder)

    def broken_write(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(storage.pq, "write_table", broken_write)
    with pytest.raises(RuntimeError, match="disk full"):
        index.add([Image.new("RGB", (48, 48), (0, 0, 0))], ["black"], ["x.png"])
    monkeypatch.undo()
    assert len(PatchIndex.load(out, embedder)) == 12


def _clustered(n: int, d: int = 32, clusters: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    assign = rng.integers(0, clusters, n)
    x = (centres[assign] + 0.35 * rng.normal(size=(n, d))).astype(np.float32)
    faiss.normalize_L2(x)
    return x, assign


@pytest.mark.parametrize(
    "index_type, params, min_recall",
    [("hnsw", None, 0.95), ("ivfpq", {"m": 32, "nbits": 6}, 0.9), ("factory:IVF32,Flat", {"nprobe": 8}, 0.9)],
)
def test_approximate_index_agrees_with_exact(index_type, params, min_recall):
    xb, assign = _clustered(3000)
    xq, q_assign = _clustered(100, seed=1)
    exact, _ = make_faiss_index(xb, "flat")
    _, truth = exact.search(xq, 10)
    approx, used = make_faiss_index(xb, index_type, params)
    _, found = approx.search(xq, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found)])
    assert recall >= min_recall
    # class-level retrieval (what the metrics measure) is the same
    assert (assign[found[:, 0]] == assign[truth[:, 0]]).mean() >= 0.95


def test_default_ivfpq_parameters():
    xb, _ = _clustered(3000)
    index, used = make_faiss_index(xb, "ivfpq")
    assert used == {"nlist": 76, "m": 8, "nbits": 6, "nprobe": 16, "train_size": 3000}
    assert faiss.extract_index_ivf(index).nprobe == 16
    with pytest.raises(ValueError, match="unknown parameters"):
        make_faiss_index(xb, "ivfpq", {"nprobes": 3})
    with pytest.raises(ValueError, match="unknown index type"):
        make_faiss_index(xb, "annoy")


def test_ivfpq_directory_round_trip(tmp_path, embedder):
    """An approximate index written and loaded through the directory format keeps its nprobe."""
    xb, _ = _clustered(600, d=64)
    import pyarrow as pa

    metadata = pa.table(
        {
            "id": pa.array(np.arange(600, dtype=np.int64)),
            "label": pa.array([str(i % 3) for i in range(600)]),
            "source": pa.array([f"s{i}" for i in range(600)]),
            "thumbnail": pa.array([b""] * 600, pa.binary()),
        }
    )
    write_index(tmp_path / "ivf", xb, metadata, embedder, "ivfpq", {"nprobe": 4})
    loaded = PatchIndex.load(tmp_path / "ivf", embedder)
    assert loaded.index_type == "ivfpq" and faiss.extract_index_ivf(loaded.index).nprobe == 4
    scores, ids = loaded.search_embeddings(xb[:5], 3)
    assert ids.shape == (5, 3) and (ids >= 0).all()
    filtered = loaded.search(embeddings=xb[:2], k=5, label="1")
    assert all(set(r.labels) == {"1"} for r in filtered)
    assert filtered[0].thumbnails == [None] * 5  # stored without thumbnails


def test_cli_build_and_append(folder, tmp_path, monkeypatch, embedder):
    import index_build.models as models

    monkeypatch.setattr(models, "load_model", lambda model=None, device=None, revision=None: embedder)
    out = tmp_path / "cli-idx"
    index = build_main(
        [
            str(folder),
            "--out",
            str(out),
            "--batch-size",
            "5",
            "--num-workers",
            "0",
            "--no-progress",
            "--index-type",
            "hnsw",
            "--index-param",
            "ef_search=32",
        ]
    )
    assert len(index) == 12 and index.manifest["index"]["params"]["ef_search"] == 32
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["dataset"]["source"] == folder.name and manifest["index"]["class"] == "IndexHNSWFlat"
    index = build_main([str(folder), "--out", str(out), "--append", "--num-workers", "0", "--no-progress"])
    assert len(index) == 12  # the same images again: appending is idempotent, nothing is added
    with pytest.raises(SystemExit):
        build_main([str(folder), "--out", str(out), "--bogus"])


def test_worker_processes(dataset, embedder, tmp_path):
    """Preprocessing in a DataLoader worker process gives the vectors of in-process embedding."""
    index = _build(dataset, tmp_path / "a", embedder, num_workers=1)
    expected = embedder.embed_images([row["image"] for row in dataset])
    np.testing.assert_allclose(index.reconstruct_all(), expected, atol=1e-5)
    assert index.sources == list(dataset["source"])


def _labelled_metadata(n: int, classes: int = 3):
    import pyarrow as pa

    return pa.table(
        {
            "id": pa.array(np.arange(n, dtype=np.int64)),
            "label": pa.array([str(i % classes) for i in range(n)]),
            "source": pa.array([f"s{i}" for i in range(n)]),
            "thumbnail": pa.array([b""] * n, pa.binary()),
        }
    )


# Every index type the CLI accepts; factory strings without search parameters included
# (an IVF factory index searched with a plain SearchParameters failed inside FAISS).
ALL_INDEX_TYPES = [
    ("flat", None),
    ("ivfpq", {"nlist": 8, "m": 16, "nbits": 4}),
    ("hnsw", None),
    ("factory:IVF16,Flat", None),
    ("factory:IVF16,SQ8", {"nprobe": 16}),
    ("factory:HNSW16,Flat", None),
    ("factory:PCA32,IVF8,Flat", None),
]


@pytest.mark.parametrize("index_type, params", ALL_INDEX_TYPES, ids=[t for t, _ in ALL_INDEX_TYPES])
def test_label_filter_on_every_index_type(tmp_path, embedder, index_type, params):
    """Filtered search returns only the label, on the written index and after a reload, and the
    flat index's filtered results equal a brute-force search over that label's vectors."""
    xb, _ = _clustered(600, d=64)
    written = write_index(tmp_path / "idx", xb, _labelled_metadata(600), embedder, index_type, params)
    loaded = PatchIndex.load(tmp_path / "idx", embedder)
    for index in (written, loaded):
        results = index.search(embeddings=xb[:4], k=5, label="1")
        assert all(r.labels and set(r.labels) == {"1"} for r in results)
    if index_type == "flat":
        ones = np.flatnonzero(np.arange(600) % 3 == 1)
        expected = ones[np.argsort(-(xb[:4] @ xb[ones].T), axis=1)[:, :5]]
        assert [r.ids for r in results] == expected.tolist()


def test_search_is_explicit_about_images_and_embeddings(embedder, built_dir):
    """A 64 x 64 float grayscale image on a 64-d index is one image, never 64 embeddings."""
    index = PatchIndex.load(built_dir, embedder)
    assert index.dim == 64
    grey = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    assert len(index.search(images=grey, k=3)) == 1
    assert len(index.search(images=[grey, grey], k=3)) == 2
    xq = embedder.embed_images([grey])
    assert index.search(embeddings=xq, k=3)[0].ids == index.search(images=grey, k=3)[0].ids
    with pytest.raises(ValueError, match="exactly one"):
        index.search(images=grey, embeddings=xq)
    with pytest.raises(ValueError, match="exactly one"):
        index.search(k=3)
    with pytest.raises(TypeError):
        index.search(grey)  # no guessing from a positional array
    with pytest.raises(ValueError, match="Nq x 64"):
        index.search(embeddings=np.zeros((2, 63), np.float32))
