"""Reliability: untrusted index folders, idempotent appends, concurrent writers, worker clean-up,
manifest validation, unique result files, pinned model revisions."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from helpers import make_embedder, write_folder

from index_build import storage
from index_build.data import load_image_dataset
from index_build.embedding import build_index
from index_build.patch_index import PatchIndex
from index_build.storage import INDEX_FILE, JOURNAL_FILE, MANIFEST_FILE, METADATA_FILE, IndexLoadError

FOLDER_PER_CLASS = 2  # the shared `folder` fixture (conftest.py) writes 2 patches per class here


# -- 1. a commit journal may only rename staged index files inside the folder -----------------


@pytest.mark.parametrize(
    "renames",
    [
        [["payload.txt", "{victim}"]],
        [["{secret}", "stolen.txt"]],
        [[".index.faiss.tmp-1", "../victim.txt"]],
        [[".index.faiss.tmp-1", "sub/index.faiss"]],
        [["payload.txt", "index.faiss"]],
        [[".notes.tmp-1", "notes"]],
        [[".metadata.parquet.tmp-1", "index.faiss"]],
        [["../payload.txt", "manifest.json"]],
        "not a list",
        [["only one"]],
    ],
)
def test_malicious_journal_is_refused(index_dir, tmp_path, renames):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    (index_dir / "payload.txt").write_text("evil")
    if isinstance(renames, list):
        renames = [[part.format(victim=victim, secret=secret) for part in entry] for entry in renames]
    (index_dir / JOURNAL_FILE).write_text(json.dumps({"renames": renames}))
    before = sorted(p.name for p in index_dir.iterdir())
    with pytest.raises(IndexLoadError, match="journal"):
        PatchIndex.load(index_dir)
    assert victim.read_text() == "precious" and secret.read_text() == "secret"
    assert sorted(p.name for p in index_dir.iterdir()) == before


def test_journal_symlink_pointing_out_is_refused(index_dir, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    staged = index_dir / ".index.faiss.tmp-7"
    staged.symlink_to(secret)
    (index_dir / JOURNAL_FILE).write_text(json.dumps({"renames": [[staged.name, INDEX_FILE]]}))
    with pytest.raises(IndexLoadError, match="not a regular file"):
        PatchIndex.load(index_dir)
    assert staged.is_symlink() and secret.read_text() == "secret"


def _interrupted_commit(index_dir: Path, embedder) -> None:
    """Leave ``index_dir`` as a crash after writing the journal of an add (no rename done)."""
    index = PatchIndex.load(index_dir, embedder)
    real_replace = os.replace

    def crash(src, dst):
        if Path(dst).name in (INDEX_FILE, METADATA_FILE, MANIFEST_FILE):
            raise OSError("power cut")
        return real_replace(src, dst)

    storage.os.replace = crash
    try:
        with pytest.raises(OSError, match="power cut"):
            index.add_embeddings(np.ones((1, index.dim), np.float32), ["x"], ["x.png"], [b""])
    finally:
        storage.os.replace = real_replace
    assert (index_dir / JOURNAL_FILE).exists()


def test_read_only_load_writes_nothing(index_dir, embedder):
    _interrupted_commit(index_dir, embedder)
    snapshot = {p.name: p.read_bytes() for p in index_dir.iterdir()}
    loaded = PatchIndex.load(index_dir, embedder, read_only=True)
    assert len(loaded) == 7  # the committed (journalled) state is read where it lies
    assert {p.name: p.read_bytes() for p in index_dir.iterdir()} == snapshot
    if os.geteuid() != 0:  # a folder without write permission is read the same way
        index_dir.chmod(0o555)
        try:
            assert len(PatchIndex.load(index_dir, embedder)) == 7
        finally:
            index_dir.chmod(0o755)
        assert {p.name: p.read_bytes() for p in index_dir.iterdir()} == snapshot
    assert len(PatchIndex.load(index_dir, embedder)) == 7  # writable: rolled forward
    assert not (index_dir / JOURNAL_FILE).exists()


# -- 2. appends are idempotent ------------------------------------------------------------------


def _append(folder: Path, out: Path, embedder) -> PatchIndex:
    return build_index(
        load_image_dataset(str(folder)), out, embedder, append=True, num_workers=0, progress=False, batch_size=8
    )


def test_append_twice_adds_once(index_dir, tmp_path, embedder, caplog):
    extra = write_folder(tmp_path / "extra", per_class=1, size=40)
    assert len(_append(extra, index_dir, embedder)) == 9
    caplog.set_level("INFO", logger="index_build.search.patch_index")
    assert len(_append(extra, index_dir, embedder)) == 9
    assert "skipped 3 of 3 rows already in" in caplog.text
    assert PatchIndex.load(index_dir).manifest["count"] == 9


def test_append_killed_after_commit_is_not_repeated(index_dir, tmp_path, embedder, monkeypatch):
    extra = write_folder(tmp_path / "extra", per_class=1, size=40)
    real_rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):  # the process dies after the commit, before removing .partial-append
        raise KeyboardInterrupt

    monkeypatch.setattr("index_build.embedding.shutil.rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        _append(extra, index_dir, embedder)
    monkeypatch.setattr("index_build.embedding.shutil.rmtree", real_rmtree)
    assert (index_dir / ".partial-append").is_dir() and len(PatchIndex.load(index_dir)) == 9
    assert len(_append(extra, index_dir, embedder)) == 9
    assert not (index_dir / ".partial-append").exists()


# -- 3. concurrent writers ------------------------------------------------------------------------

WRITER = """
import sys, time
from pathlib import Path
import numpy as np
from index_build.patch_index import PatchIndex

path, name, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
index = PatchIndex.load(path)  # both writers load the same (soon stale) state
(path.parent / f"ready-{name}").touch()
while not go.exists():
    time.sleep(0.01)
rng = np.random.default_rng(abs(hash(name)) % 1000)
for i in range(12):
    index.add_embeddings(rng.normal(size=(1, index.dim)), [name], [f"{name}:{i}"], [b""])
"""


def test_two_processes_adding_keep_every_row(index_dir, tmp_path):
    import subprocess
    import sys
    import time

    go = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(index_dir), name, str(go)], env=env) for name in ("a", "b")
    ]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready-{n}").exists() for n in "ab") and time.time() < deadline:
        time.sleep(0.05)
    go.touch()
    assert [p.wait(timeout=180) for p in procs] == [0, 0]
    loaded = PatchIndex.load(index_dir)
    assert len(loaded) == 6 + 24 and loaded.manifest["count"] == 30
    assert sorted(loaded.sources[6:]) == sorted(f"{n}:{i}" for n in "ab" for i in range(12))


def test_second_writer_times_out_with_a_clear_error(index_dir):
    from concurrent.futures import ThreadPoolExecutor

    from index_build.storage import IndexBusyError, index_lock

    index = PatchIndex.load(index_dir)
    with ThreadPoolExecutor(1) as pool, index_lock(index_dir):  # held by this thread; another one waits

        def add():
            with index_lock(index_dir, timeout=0.2):
                pass

        with pytest.raises(IndexBusyError, match="another process is writing"):
            pool.submit(add).result()
    assert len(index.add_embeddings(np.ones((1, index.dim)), ["x"], ["x"], [b""])) == 1


def test_app_started_before_the_personal_gallery_existed_can_add(built_dir, tmp_path, embedder):
    from PIL import Image

    from index_build.galleries import Galleries

    main = PatchIndex.load(built_dir, embedder)
    first, second = (Galleries(embedder, main, tmp_path / "personal") for _ in range(2))
    image = Image.new("RGB", (64, 64), (10, 200, 30))
    assert first.add([image], ["mine"], ["a.png"]) == 1
    assert second.add([image], ["mine"], ["b.png"]) == 2  # was: "an index already exists ..."
    assert first.add([image], ["mine"], ["c.png"]) == 3  # appends to what the other server wrote
    assert PatchIndex.load(tmp_path / "personal").sources == ["a.png", "b.png", "c.png"]


# -- 4. DataLoader workers die with their parent -----------------------------------------------------

linux_only = pytest.mark.skipif(not os.sys.platform.startswith("linux"), reason="prctl is Linux only")


def _pdeathsig_after_init(queue) -> None:
    import ctypes

    from index_build.embedding import die_with_parent

    die_with_parent(0, parent=os.getppid())
    value = ctypes.c_int(-1)
    ctypes.CDLL(None).prctl(2, ctypes.byref(value), 0, 0, 0)  # PR_GET_PDEATHSIG
    queue.put(value.value)


@linux_only
def test_worker_init_sets_pdeathsig():
    import multiprocessing
    import signal

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_pdeathsig_after_init, args=(queue,))
    child.start()
    assert queue.get(timeout=30) == signal.SIGKILL
    child.join(timeout=30)
    assert child.exitcode == 0


def _trainer_killed_while_its_worker_starts(folder: str) -> None:
    """The trainer makes a DataLoader's worker_init_fn, forks a worker and dies before the worker runs it."""
    import time

    from train.features import worker_init_fn

    init, trainer = worker_init_fn(), os.getpid()
    if os.fork() == 0:  # the worker
        Path(folder, "forked").touch()
        while os.getppid() == trainer:  # wait until the trainer is gone
            time.sleep(0.01)
        init(0)
        Path(folder, "survived").touch()
        os._exit(0)
    os._exit(0)  # the trainer dies


@linux_only
def test_training_worker_exits_when_the_trainer_died_before_its_init(tmp_path):
    """bench_faults --kill main: a training killed while its DataLoader started a worker left the worker running."""
    import multiprocessing
    import time

    trainer = multiprocessing.get_context("fork").Process(
        target=_trainer_killed_while_its_worker_starts, args=(str(tmp_path),)
    )
    trainer.start()
    trainer.join(timeout=60)
    deadline = time.time() + 30
    while not (tmp_path / "forked").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(2)  # the worker's init has run by now
    assert (tmp_path / "forked").exists() and not (tmp_path / "survived").exists()


KILLED_BUILD = """
import sys, time
import torch
from index_build import embedding

class Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 4
    def __getitem__(self, i):
        import os
        print(os.getpid(), flush=True)
        time.sleep(600)
        return i

loader = torch.utils.data.DataLoader(Slow(), num_workers=1, worker_init_fn=embedding.die_with_parent)
next(iter(loader))
"""


@linux_only
def test_worker_dies_when_the_build_is_killed():
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    parent = subprocess.Popen([sys.executable, "-c", KILLED_BUILD], env=env, stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(timeout=30)
    deadline = time.time() + 30
    while time.time() < deadline:
        status = Path(f"/proc/{worker}/status")
        if not status.exists() or "\nState:\tZ" in status.read_text():  # gone, or dead and not yet reaped
            break
        time.sleep(0.1)
    else:
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the DataLoader worker outlived its killed parent")


# -- 5. manifest types and vectors are checked on load ----------------------------------------------


def _edit_manifest(index_dir: Path, edit) -> None:
    manifest = json.loads((index_dir / MANIFEST_FILE).read_text())
    edit(manifest)
    (index_dir / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda m: m.update(format_version="1"), "format_version"),
        (lambda m: m.update(format_version=True), "format_version"),
        (lambda m: m.update(files=[]), "files"),
        (lambda m: m["files"].pop("index.faiss"), "files.index.faiss"),
        (lambda m: m["files"]["metadata.parquet"].update(bytes="12"), "files.metadata.parquet.bytes"),
        (lambda m: m.update(model="default"), "model"),
        (lambda m: m["model"].update(embedding_dim=64.0), "model.embedding_dim"),
        (lambda m: m.update(index={}), "index.type"),
        (lambda m: m["index"].update(type="bogus"), "index.type"),
        (lambda m: m["index"].update(params=[]), "index.params"),
        (lambda m: m["index"].update(type="hnsw"), "index.type"),
        (lambda m: m["index"].update(type="hnsw", **{"class": "IndexHNSWFlat"}), "index.type"),
        (lambda m: m.update(count=None), "count"),
        (lambda m: m.pop("count"), "count"),
        (lambda m: m.update(labels=[]), "labels"),
        (lambda m: m.update(close_match={"threshold": "high"}), "close_match.threshold"),
        (lambda m: m.clear(), "format_version"),
    ],
)
def test_bad_manifest_is_an_index_load_error(index_dir, edit, field):
    _edit_manifest(index_dir, edit)
    with pytest.raises(IndexLoadError, match=f"manifest.json.*'{field}'"):
        PatchIndex.load(index_dir)


def _tamper_vectors(index_dir: Path, change) -> None:
    """Rewrite index.faiss with changed vectors and make the manifest's sizes and checksums agree."""
    import faiss

    index = faiss.read_index(str(index_dir / INDEX_FILE))
    xb = change(index.reconstruct_n(0, index.ntotal))
    tampered = faiss.IndexFlatIP(index.d)
    tampered.add(np.ascontiguousarray(xb, dtype=np.float32))
    faiss.write_index(tampered, str(index_dir / INDEX_FILE))
    entry = {"bytes": (index_dir / INDEX_FILE).stat().st_size, "sha256": storage.sha256_file(index_dir / INDEX_FILE)}
    _edit_manifest(index_dir, lambda m: m["files"].update({INDEX_FILE: entry}))


def _with_nan(xb):
    xb[2, 3] = np.nan
    return xb


@pytest.mark.parametrize("change", [_with_nan, lambda xb: xb * 100, lambda xb: np.zeros_like(xb)])
def test_vectors_that_are_not_unit_vectors_are_refused(index_dir, change):
    _tamper_vectors(index_dir, change)
    with pytest.raises(IndexLoadError, match="not finite unit vectors"):
        PatchIndex.load(index_dir)


def test_app_prints_one_error_line_for_a_bad_manifest(index_dir, tmp_path, capsys, monkeypatch):
    import app

    _edit_manifest(index_dir, lambda m: m.update(model="default"))
    monkeypatch.setattr("index_build.models.load_model", lambda *args, **kwargs: make_embedder())
    assert app.main(["--index", str(index_dir), "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'model' must be an object, got a string" in errors[0] and "Traceback" not in err


# -- 7. remote model code runs at a pinned revision ------------------------------------------------------


def test_app_loads_the_model_commit_the_index_records(tmp_path, monkeypatch):
    import app
    from index_build.models import Embedder

    tiny = make_embedder()
    hub = Embedder(model=tiny.model, processor=tiny.processor, model_id="org/lgffem", revision="0123abcd")
    folder = write_folder(tmp_path / "patches", per_class=1)
    build_index(load_image_dataset(str(folder)), tmp_path / "idx", hub, num_workers=0, progress=False)
    assert json.loads((tmp_path / "idx" / MANIFEST_FILE).read_text())["model"]["revision"] == "0123abcd"
    asked = []

    def fake_load_model(model=None, device=None, revision=None):
        asked.append((model, revision))
        return hub

    monkeypatch.setattr("index_build.models.load_model", fake_load_model)
    monkeypatch.delenv("LGFFEM_MODEL_REVISION", raising=False)
    common = ["--model", "org/lgffem", "--index", str(tmp_path / "idx"), "--data-dir", str(tmp_path / "data")]
    args = app.parse_args(common)
    app.SearchApp.create(model=args.model, index=args.index, data_dir=args.data_dir, model_revision=args.model_revision)
    args = app.parse_args([*common, "--model-revision", "v2"])
    app.SearchApp.create(model=args.model, index=args.index, data_dir=args.data_dir, model_revision=args.model_revision)
    monkeypatch.setenv("LGFFEM_MODEL_REVISION", "v3")
    args = app.parse_args(common)
    app.SearchApp.create(model=args.model, index=args.index, data_dir=args.data_dir, model_revision=args.model_revision)
    assert asked == [("org/lgffem", "0123abcd"), ("org/lgffem", "v2"), ("org/lgffem", "v3")]


def test_cli_model_revision_option_and_env(monkeypatch):
    from index_build.__main__ import build_parser
    from index_build.evaluate import build_parser as evaluate_parser

    monkeypatch.delenv("LGFFEM_MODEL_REVISION", raising=False)
    assert build_parser().parse_args(["src", "--out", "o", "--model-revision", "abc"]).model_revision == "abc"
    monkeypatch.setenv("LGFFEM_MODEL_REVISION", "def")
    assert build_parser().parse_args(["src", "--out", "o"]).model_revision == "def"
    assert evaluate_parser().parse_args(["--gallery", "g"]).model_revision == "def"


# -- should fix: bad images are skipped, not fatal ---------------------------------------------------


def _bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A 1-pixel PNG whose header claims ``width`` x ``height`` pixels (Pillow refuses it as a decompression bomb)."""
    import io
    import struct
    import zlib

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    header = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return bytes(data)


def _add_bad_images(folder: Path) -> list[dict]:
    """A text file named .png, an empty JPEG, a truncated JPEG and a bomb; returns their expected manifest entries."""
    from PIL import Image

    notes, empty, half, bomb = (
        folder / "red/notes.png",
        folder / "green/empty.jpg",
        folder / "blue/half.jpg",
        folder / "blue/bomb.png",
    )
    notes.write_text("not an image\n")
    empty.write_bytes(b"")
    jpeg = (folder / "blue" / "blue_0.jpg").read_bytes()
    half.write_bytes(jpeg[: len(jpeg) // 2])
    bomb.write_bytes(_bomb_png())
    with pytest.raises(OSError) as truncated:
        Image.open(half).load()
    return [
        {"source": str(notes), "reason": f"UnidentifiedImageError: cannot identify image file {str(notes)!r}"},
        {"source": str(empty), "reason": f"UnidentifiedImageError: cannot identify image file {str(empty)!r}"},
        {"source": str(half), "reason": f"OSError: {truncated.value}"},
        {
            "source": str(bomb),
            "reason": "DecompressionBombError: Image size (400000000 pixels) exceeds limit of "
            f"{2 * Image.MAX_IMAGE_PIXELS} pixels, could be decompression bomb DOS attack.",  # the app lowers it
        },
    ]


def _build(folder: Path, out: Path, embedder, **kwargs) -> PatchIndex:
    kwargs = {"num_workers": 0, "progress": False, "batch_size": 3, "chunk_size": 4, **kwargs}
    return build_index(load_image_dataset(str(folder)), out, embedder, **kwargs)


def _by_source(entries: list[dict]) -> list[dict]:
    return sorted(entries, key=lambda entry: entry["source"])


def test_unreadable_images_are_skipped_logged_and_listed(tmp_path, embedder, caplog):
    clean = write_folder(tmp_path / "clean", per_class=2)
    source = write_folder(tmp_path / "source", per_class=2)
    expected = _add_bad_images(source)
    caplog.set_level("WARNING", logger="index_build.search.embedding")
    index = _build(source, tmp_path / "idx", embedder, num_workers=1)  # decoded in a DataLoader worker
    reference = _build(clean, tmp_path / "ref", embedder)
    assert len(index) == 6 and index.manifest["count"] == 6
    assert [Path(s).relative_to(source) for s in index.sources] == [
        Path(s).relative_to(clean) for s in reference.sources
    ]
    np.testing.assert_allclose(index.reconstruct_all(), reference.reconstruct_all(), rtol=0, atol=1e-6)
    manifest = json.loads((tmp_path / "idx" / MANIFEST_FILE).read_text())
    assert _by_source(manifest["skipped"]) == _by_source(expected)
    assert _by_source(PatchIndex.load(tmp_path / "idx").manifest["skipped"]) == _by_source(expected)  # valid schema
    assert reference.manifest["skipped"] == []
    for entry in expected:
        assert f"({entry['source']}): {entry['reason']}" in caplog.text
    assert "skipped 4 unreadable images of 10 (listed in the manifest under 'skipped')" in caplog.text


def test_strict_build_stops_at_a_bomb_and_names_the_file(tmp_path, embedder):
    source = write_folder(tmp_path / "source", per_class=1)
    (source / "blue" / "bomb.png").write_bytes(_bomb_png())
    bomb = re.escape(str(source / "blue" / "bomb.png"))
    pattern = rf"cannot read image at row \d+ \({bomb}\): DecompressionBombError: Image size"
    with pytest.raises(ValueError, match=pattern):
        _build(source, tmp_path / "idx", embedder, strict=True)
    assert not storage.has_index(tmp_path / "idx")


def test_cli_strict_option(tmp_path, embedder, monkeypatch):
    from index_build.__main__ import main

    monkeypatch.setattr("index_build.models.load_model", lambda *args, **kwargs: embedder)
    source = write_folder(tmp_path / "source", per_class=1)
    (source / "red" / "notes.png").write_text("not an image\n")
    args = [str(source), "--out", str(tmp_path / "idx"), "--num-workers", "0", "--no-progress"]
    with pytest.raises(
        ValueError, match=rf"\({re.escape(str(source / 'red' / 'notes.png'))}\): UnidentifiedImageError"
    ):
        main([*args, "--strict"])
    index = main(args)
    assert len(index) == 3 and [entry["source"] for entry in index.manifest["skipped"]] == [
        str(source / "red/notes.png")
    ]


def test_build_killed_between_chunks_resumes_with_its_skipped_images(tmp_path, embedder, monkeypatch, caplog):
    from index_build import embedding

    source = write_folder(tmp_path / "source", per_class=2)
    expected = _add_bad_images(source)
    real = embedding._write_chunk

    def killed(work, chunk, *args):
        if chunk == 1:
            raise KeyboardInterrupt
        real(work, chunk, *args)

    monkeypatch.setattr(embedding, "_write_chunk", killed)
    with pytest.raises(KeyboardInterrupt):
        _build(source, tmp_path / "idx", embedder, batch_size=2)  # batches line up with chunks: same sums
    monkeypatch.setattr(embedding, "_write_chunk", real)
    caplog.set_level("INFO", logger="index_build.search.embedding")
    index = _build(source, tmp_path / "idx", embedder, batch_size=2)
    assert f"resuming: 4 of 10 rows already embedded in {tmp_path / 'idx' / '.partial'}" in caplog.text
    whole = _build(source, tmp_path / "whole", embedder, batch_size=2)
    assert index.sources == whole.sources and len(index) == 6
    np.testing.assert_array_equal(index.reconstruct_all(), whole.reconstruct_all())
    assert index.manifest["skipped"] == whole.manifest["skipped"] and _by_source(
        whole.manifest["skipped"]
    ) == _by_source(expected)


def test_manifest_skipped_entries_are_checked(index_dir):
    _edit_manifest(index_dir, lambda m: m.update(skipped=[{"source": "a.png", "reason": 3}]))
    with pytest.raises(IndexLoadError, match=r"manifest.json.*'skipped\[0\].reason' must be a string, got an integer"):
        PatchIndex.load(index_dir)


# -- should fix: resume messages and reruns after a kill -----------------------------------------------


def test_resume_after_every_chunk_was_embedded_counts_rows_right(tmp_path, embedder, monkeypatch, caplog):
    source = write_folder(tmp_path / "source", per_class=2)  # 6 rows, chunks of 4: the last one is short

    def killed(*args, **kwargs):  # killed after embedding everything, before the index was written
        raise KeyboardInterrupt

    monkeypatch.setattr("index_build.embedding.write_index", killed)
    with pytest.raises(KeyboardInterrupt):
        _build(source, tmp_path / "idx", embedder)
    monkeypatch.undo()
    caplog.set_level("INFO", logger="index_build.search.embedding")
    assert len(_build(source, tmp_path / "idx", embedder)) == 6
    assert f"resuming: 6 of 6 rows already embedded in {tmp_path / 'idx' / '.partial'}" in caplog.text  # was 8 of 6


def test_rerun_of_a_build_killed_after_its_commit_succeeds(tmp_path, embedder, monkeypatch, caplog):
    from index_build.__main__ import main

    monkeypatch.setattr("index_build.models.load_model", lambda *args, **kwargs: embedder)
    source, out = write_folder(tmp_path / "source", per_class=1), tmp_path / "idx"
    args = [str(source), "--out", str(out), "--num-workers", "0", "--no-progress"]
    real_rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):  # the process dies after the commit, before removing .partial
        raise KeyboardInterrupt

    monkeypatch.setattr("index_build.embedding.shutil.rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    monkeypatch.setattr("index_build.embedding.shutil.rmtree", real_rmtree)
    assert storage.has_index(out) and (out / ".partial").is_dir()
    caplog.set_level("INFO", logger="index_build.search.embedding")
    index = main(args)  # was: "an index already exists in ...; pass --append or --overwrite"
    assert len(index) == 3 and not (out / ".partial").exists()
    assert f"{out} already holds this build (it was interrupted after writing the index); removed" in caplog.text
    with pytest.raises(SystemExit):  # nothing left to finish: the same command is refused again
        main(args)


def test_partial_build_of_other_data_does_not_pass_for_the_index(tmp_path, embedder, monkeypatch):
    first, second = write_folder(tmp_path / "first", per_class=1), write_folder(tmp_path / "second", per_class=2)
    _build(first, tmp_path / "idx", embedder)

    def killed(*args, **kwargs):  # an --overwrite with other data, killed before its commit
        raise KeyboardInterrupt

    monkeypatch.setattr("index_build.embedding.write_index", killed)
    with pytest.raises(KeyboardInterrupt):
        _build(second, tmp_path / "idx", embedder, overwrite=True)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="an index already exists"):
        _build(second, tmp_path / "idx", embedder)
    assert len(PatchIndex.load(tmp_path / "idx")) == 3


KILLED_COMMIT = """
import os, signal, sys
from pathlib import Path
import numpy as np
from index_build import storage
from index_build.patch_index import PatchIndex

index = PatchIndex.load(Path(sys.argv[1]))
real_replace = os.replace

def replace(src, dst):
    if Path(dst).name == storage.JOURNAL_FILE:  # staged files written, journal not yet committed
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)

storage.os.replace = replace
index.add_embeddings(np.ones((1, index.dim)), ["x"], ["x.png"], [b""])
"""


def test_temporary_files_of_a_killed_writer_are_removed_at_the_next_write(index_dir):
    import signal
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    killed = subprocess.run([sys.executable, "-c", KILLED_COMMIT, str(index_dir)], env=env, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    leftovers = sorted(p.name for p in index_dir.iterdir() if ".tmp-" in p.name)
    assert [name.rsplit("-", 1)[0] for name in leftovers] == [
        "..commit.json.tmp",
        ".index.faiss.tmp",
        ".manifest.json.tmp",
        ".metadata.parquet.tmp",
    ]
    assert (index_dir / leftovers[1]).stat().st_size > 0
    live = index_dir / f".index.faiss.tmp-{os.getppid()}"  # a writer that is still running keeps its file
    live.write_bytes(b"in progress")
    index = PatchIndex.load(index_dir)
    assert len(index) == 6  # the killed add never committed
    index.add_embeddings(np.ones((1, index.dim)), ["y"], ["y.png"], [b""])
    assert sorted(p.name for p in index_dir.iterdir() if ".tmp-" in p.name) == [live.name]
    assert len(PatchIndex.load(index_dir)) == 7


# -- should fix: messages that say what is wrong ---------------------------------------------------


def _images(root: Path, *paths: str) -> Path:
    from PIL import Image

    for path in paths:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (200, 40, 40)).save(root / path)
    return root


@pytest.mark.parametrize(
    ("paths", "message"),
    [
        (
            ["1.png", "2.png", "3.png"],
            "{root} has its 3 images directly in the folder, without class sub-folders: put each class's images "
            "directly in its own sub-folder ({root}/<class>/*.png)",
        ),
        (
            ["a/1.png", "b/deep/2.png", "b/deeper/3.png"],
            "{root} has images in nested sub-folders (b/deep, b/deeper), so no class can be told from the folders: "
            "put each class's images directly in its own sub-folder ({root}/<class>/*.png)",
        ),
        (
            ["a/1.png", "b/2.png", "3.png"],
            "{root} has images outside its class sub-folders (3.png): put each class's images directly in its own "
            "sub-folder ({root}/<class>/*.png)",
        ),
    ],
)
def test_image_folder_layout_problems_are_named(tmp_path, paths, message):
    root = _images(tmp_path / "images", *paths)
    with pytest.raises(ValueError) as err:
        load_image_dataset(str(root))
    assert str(err.value) == message.format(root=root)


def test_a_single_class_folder_is_that_class(tmp_path):
    """One class sub-folder (e.g. ``--append more/new_class``): every image gets that folder's name."""
    root = _images(tmp_path / "images", "tumour/1.png", "tumour/2.png")
    ds = load_image_dataset(str(root))
    assert ds["label"] == ["tumour", "tumour"]
    assert [Path(s).name for s in ds["source"]] == ["1.png", "2.png"]


def test_empty_labels_are_refused(tmp_path, embedder, index_dir):
    import datasets
    from PIL import Image

    image = Image.new("RGB", (8, 8))
    rows = {"image": [image] * 4, "label": ["tumour", "", "  ", "stroma"]}
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).to_parquet(tmp_path / "rows.parquet")
    with pytest.raises(ValueError, match=r"label column 'label' has an empty label in 2 rows \(\[1, 2\]\)"):
        load_image_dataset(str(tmp_path / "rows.parquet"))
    index = PatchIndex.load(index_dir)
    with pytest.raises(ValueError, match=r"rows \[1\] have an empty one"):
        index.add_embeddings(np.ones((2, index.dim)), ["x", ""], ["a", "b"], [b"", b""])
    assert len(PatchIndex.load(index_dir)) == 6


def test_many_bad_zip_members_are_summarised(tmp_path):
    import zipfile

    from index_build.uploads import list_errors, upload_batch

    with zipfile.ZipFile(tmp_path / "many.zip", "w") as archive:
        for i in range(1900):
            archive.writestr(f"notes/{i:04d}.png", "not an image")
    batch = upload_batch([str(tmp_path / "many.zip")], 64)
    patches, skipped = batch.patches, batch.skipped
    assert patches == [] and len(skipped) == 1900
    reason = "not an image file (format not recognised); upload PNG, JPEG or TIFF"
    listed = "\n".join(f"- many.zip/{i:04d}.png: {reason}" for i in range(5))
    assert list_errors(skipped) == f"{listed}\n- … and 1895 more (1900 files skipped in all)"
    assert list_errors(skipped[:2]) == "\n".join(f"- {message}" for message in skipped[:2])


# -- deleting rows: atomic, under the writer lock, right results -----------------------------------


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_remove_rows_keeps_search_and_metadata_right(tmp_path, index_type):
    from index_build.patch_index import IndexChangedError, write_index
    from index_build.storage import metadata_table

    embedder = make_embedder()
    xb = np.random.default_rng(0).normal(size=(6, embedder.dim)).astype(np.float32)
    extra = {"added": [f"t{i}" for i in range(6)], "sha256": [f"h{i}" for i in range(6)]}
    meta = metadata_table(np.arange(6), list("aabbcc"), [f"s{i}" for i in range(6)], [b""] * 6, extra)
    index = write_index(tmp_path / "idx", xb, meta, embedder, index_type=index_type)
    with pytest.raises(IndexChangedError, match="row 1 is now 's1'"):
        index.remove([1], expected={1: "h2"})  # the guard compares the stored pixel SHA-256
    assert index.remove([1, 4], expected={1: "h1", 4: "h4"}) == 2
    loaded = PatchIndex.load(tmp_path / "idx", embedder)
    assert len(loaded) == 4 and loaded.manifest["count"] == 4 and loaded.manifest["labels"] == {"a": 1, "b": 2, "c": 1}
    assert loaded.sources == ["s0", "s2", "s3", "s5"] and loaded.extra["sha256"] == ["h0", "h2", "h3", "h5"]
    assert loaded.manifest["index"]["type"] == index_type
    scores, ids = loaded.search_embeddings(xb[[0, 2, 3, 5, 1]], 1)  # each kept vector finds its new id
    assert ids[:4, 0].tolist() == [0, 1, 2, 3] and np.allclose(scores[:4, 0], 1, atol=1e-5)
    assert scores[4, 0] < 0.999  # the deleted vector is gone
    assert loaded.search(embeddings=xb[[1]], k=4, label="a")[0].sources == ["s0"]
    with pytest.raises(ValueError, match="no row with id 9"):
        loaded.remove([9])


def test_remove_keeps_rows_another_writer_added(index_dir):
    stale, other = PatchIndex.load(index_dir), PatchIndex.load(index_dir)
    other.add_embeddings(np.ones((1, other.dim)), ["x"], ["added-by-other"], [b""])
    first = stale.sources[0]
    assert stale.remove([0], expected={0: first}) == 1  # deletes from what is on disk now
    loaded = PatchIndex.load(index_dir)
    assert len(loaded) == 6 and loaded.sources[-1] == "added-by-other" and first not in loaded.sources


KILLED_DELETE = """
import os, signal, sys
from pathlib import Path
from index_build import storage
from index_build.patch_index import PatchIndex

index = PatchIndex.load(Path(sys.argv[1]))
real_replace = os.replace

def replace(src, dst):
    if Path(dst).name == sys.argv[2]:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)

storage.os.replace = replace
index.remove([0, 1])
"""


@pytest.mark.parametrize(
    "killed_at, count",
    [
        (JOURNAL_FILE, 6),  # files staged, journal not committed: the old state
        (INDEX_FILE, 4),  # journal committed, first rename not done: rolled forward to the new state
        (MANIFEST_FILE, 4),  # index and metadata renamed, manifest not: rolled forward
    ],
)
def test_a_killed_delete_leaves_the_old_or_the_new_state(index_dir, killed_at, count):
    import signal
    import subprocess
    import sys

    sources = PatchIndex.load(index_dir).sources
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    killed = subprocess.run([sys.executable, "-c", KILLED_DELETE, str(index_dir), killed_at], env=env, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    loaded = PatchIndex.load(index_dir)
    assert len(loaded) == loaded.manifest["count"] == count
    assert loaded.sources == sources[6 - count :]


def test_extra_columns_of_slides_and_personal_rows_live_together(tmp_path):
    """Slide columns and personal-gallery columns in one index: appends fill the other's with nulls,
    deletes keep them all, and a known column with the wrong type is refused at load."""
    from index_build.patch_index import write_index
    from index_build.storage import check_metadata_schema, metadata_table

    embedder = make_embedder()
    xb = np.random.default_rng(1).normal(size=(5, embedder.dim)).astype(np.float32)
    slides = {"slide": ["a.svs"] * 3, "x": [0, 224, 448], "y": [0, 0, 0]}
    meta = metadata_table(np.arange(3), list("aab"), ["a.svs@0,0", "a.svs@224,0", "a.svs@448,0"], [b""] * 3, slides)
    assert meta.schema.field("x").type == pa.int64()
    index = write_index(tmp_path / "idx", xb[:3], meta, embedder)
    index.add_embeddings(xb[3:], ["c", "c"], ["u1", "u2"], [b"", b""], extra={"sha256": ["h1", "h2"]})
    loaded = PatchIndex.load(tmp_path / "idx", embedder)
    assert loaded.extra_columns == ["slide", "x", "y", "sha256"]
    assert loaded.column("x") == [0, 224, 448, None, None]
    assert loaded.extra["sha256"] == [None, None, None, "h1", "h2"]
    assert loaded.remove([1]) == 1
    loaded = PatchIndex.load(tmp_path / "idx", embedder)
    assert loaded.column("slide") == ["a.svs", "a.svs", None, None] and loaded.column("x") == [0, 448, None, None]
    assert loaded.extra["sha256"] == [None, None, "h1", "h2"]
    bad = metadata_table(np.arange(1), ["a"], ["s"], [b""], pa.table({"added": pa.array([1], pa.int64())}))
    assert check_metadata_schema(meta.schema) and not check_metadata_schema(bad.schema)
    with pytest.raises(ValueError, match="3 rows but 2 rows"):
        metadata_table(np.arange(3), list("aab"), list("xyz"), [b""] * 3, {"slide": ["a", "b"]})
