"""The personal gallery ("Add your own images"): labels visible to every session at request time,
partial failures listed file by file, duplicates skipped by content hash, the management table
with atomic deletes, galleries keyed to the index they extend (and the migration of old ones),
zip entries without their directories. Handlers called directly; tiny model, CPU only."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import app
from app import SearchApp
from index_build import starter, storage
from index_build.patch_index import PatchIndex

torch.set_num_threads(2)

FIXED_TIME = "2026-12-01T18:30:05+00:00"
REASON = "not an image file (format not recognised); upload PNG, JPEG or TIFF"


@pytest.fixture(scope="module")
def tiny(tiny_embedder):
    return tiny_embedder


def _index(path: Path, embedder, images, labels) -> Path:
    from index_build.index import build_index

    sources = [f"g{i}.png" for i in range(len(images))]
    build_index(starter.images_dataset(images, labels, sources), path, embedder, num_workers=0, progress=False)
    return path


@pytest.fixture(scope="module")
def index_a(tmp_path_factory, tiny):
    images, labels, _ = starter.starter_tiles()
    return _index(tmp_path_factory.mktemp("a") / "index", tiny, images[::9], labels[::9])


@pytest.fixture(scope="module")
def index_b(tmp_path_factory, tiny):
    images, labels, _ = starter.starter_tiles()
    return _index(tmp_path_factory.mktemp("b") / "index", tiny, images[1::9], labels[1::9])


@pytest.fixture()
def fixed_time(monkeypatch):
    monkeypatch.setattr("index_build.galleries.now", lambda: FIXED_TIME)


def noise(seed: int, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8))


def save(image: Image.Image, path: Path, **kwargs) -> str:
    image.save(path, **kwargs)
    return str(path)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# -- 4. labels come from the galleries at request time ---------------------------------------------


def test_a_label_added_in_one_session_is_a_choice_in_every_other(tmp_path, tiny, index_a):
    first = SearchApp.create(index=str(index_a), data_dir=tmp_path, embedder=tiny)
    other = SearchApp.create(index=str(index_a), data_dir=tmp_path, embedder=tiny)  # another worker process
    assert "CRC muscle (MUS)" not in other.label_choices()
    out = first.add_images([save(noise(1), tmp_path / "mus.png")], "CRC muscle (MUS)")
    assert out.status.startswith("✅ Added 1 patch labelled **CRC muscle (MUS)**")
    # The other server sees it on its next request, without a restart: choices, page load and search.
    assert other.label_choices() == [app.ANY_LABEL, "CRC muscle (MUS)", *sorted(set(other.index.row_labels))]
    loaded = other.refresh_page()
    assert "CRC muscle (MUS)" in loaded.label_filter["choices"] and "CRC muscle (MUS)" in loaded.add_label["choices"]
    res = other.search(save(noise(1), tmp_path / "q.png"), 3, "CRC muscle (MUS)")
    assert [row[1] for row in res.table] == ["CRC muscle (MUS)"] and res.table[0][4] == "your images"
    with pytest.warns(UserWarning, match="'no such label' is not in the gallery"):
        bad = other.search(str(tmp_path / "q.png"), 3, "no such label")
    assert bad.summary.startswith("⚠️")


def test_label_boxes_accept_labels_that_were_not_there_when_the_page_was_built(tmp_path, tiny, index_a):
    page_app = SearchApp.create(index=str(index_a), data_dir=tmp_path, embedder=tiny)
    demo = app.build_demo(page_app)
    api = {fn.api_name: fn for fn in demo.fns.values()}
    search_label = api["search"].inputs[2]
    add_label = api["add_images"].inputs[1]
    assert search_label.allow_custom_value and add_label.allow_custom_value  # the API takes any label
    assert [type(c).__name__ for c in api["add_images"].outputs] == ["Markdown", "Dropdown", "Dropdown"] + [
        "Dataframe",
        "Markdown",
    ]
    assert [type(c).__name__ for c in api["delete_images"].inputs] == [
        "Textbox",
        "JSON",
    ]  # the optional guard accepts None
    assert "personal_images" in api  # page load: labels, table and banner as they are now


# -- 5. partial failures: a warning and one line per file ------------------------------------------


def test_a_batch_with_failures_is_a_warning_with_one_line_per_file(tmp_path, tiny, index_a):
    fresh = SearchApp.create(index=str(index_a), data_dir=tmp_path / "data", embedder=tiny)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty.png").write_bytes(b"")
    save(noise(2, 20), tmp_path / "tiny.png")
    with zipfile.ZipFile(tmp_path / "z.zip", "w") as archive:
        archive.writestr("deep/er/cut.png", png_bytes(noise(3))[:200])
        archive.writestr("x*y.png", "not an image")
    files = [save(noise(4), tmp_path / "good.png"), *(str(tmp_path / n) for n in ("notes.txt", "empty.png"))]
    files += [str(tmp_path / "tiny.png"), str(tmp_path / "z.zip")]
    with pytest.warns(UserWarning) as warned:
        out = fresh.add_images(files, "mine")
    assert str(warned[0].message) == (  # the toast: plain text, the lists are on the page
        "Added 1 patch labelled mine to your personal gallery (1 in all); they are searched together with the "
        "gallery from now on, also after a restart. 5 files skipped: see the list on the page."
    )
    head, listed = out.status.split("\n\n**5 files skipped:**\n\n")
    assert head.startswith("⚠️ Added 1 patch labelled **mine** to your personal gallery (1 in all)")
    lines = listed.split("\n")
    assert lines[0] == f"- notes.txt: {REASON}"
    assert lines[1] == "- empty.png: the file is empty"
    assert lines[2] == "- tiny.png: image too small (20×20 px); at least 32 px on each side is needed"
    assert lines[3].startswith("- z.zip/cut.png: corrupt or truncated image (")
    assert lines[4] == rf"- z.zip/x\*y.png: {REASON}"  # Markdown characters of file names are escaped
    assert len(lines) == 5 and "✅" not in out.status


def test_a_huge_failure_list_is_summarised_after_five_lines(tmp_path, tiny, index_a):
    fresh = SearchApp.create(index=str(index_a), data_dir=tmp_path / "data", embedder=tiny)
    with zipfile.ZipFile(tmp_path / "many.zip", "w") as archive:
        archive.writestr("ok.png", png_bytes(noise(5)))
        for i in range(300):
            archive.writestr(f"notes/{i:03d}.png", "not an image")
    with pytest.warns(UserWarning):
        out = fresh.add_images([str(tmp_path / "many.zip")], "mine")
    listed = "\n".join(f"- many.zip/{i:03d}.png: {REASON}" for i in range(5))
    assert out.status.endswith(f"**300 files skipped:**\n\n{listed}\n- … and 295 more (300 files skipped in all)"), (
        out.status
    )
    assert out.status.startswith("⚠️ Added 1 patch")


# -- 6. duplicates: by the hash of the decoded pixels ----------------------------------------------


def test_duplicates_are_skipped_and_named(tmp_path, tiny, index_a, fixed_time):
    fresh = SearchApp.create(index=str(index_a), data_dir=tmp_path / "data", embedder=tiny)
    a, big = noise(6), noise(7, 128)  # 128 px > 1.5 x 64: four tiles
    out = fresh.add_images([save(a, tmp_path / "a.png"), save(big, tmp_path / "big.png")], "mine")
    assert out.status.startswith("✅ Added 5 patches") and len(fresh.personal) == 5
    assert fresh.personal.extra["added"] == [FIXED_TIME] * 5
    assert len(set(fresh.personal.extra["sha256"])) == 2  # the four tiles share their image's hash

    with zipfile.ZipFile(tmp_path / "again.zip", "w") as archive:
        archive.writestr("dir/a_copy.png", png_bytes(a))
    files = [
        save(a, tmp_path / "a.tif"),  # same pixels, other format: a duplicate
        save(big, tmp_path / "big2.png"),
        str(tmp_path / "again.zip"),
        save(noise(8), tmp_path / "new.png"),
        save(noise(8), tmp_path / "new_again.png"),  # within the batch
    ]
    with pytest.warns(UserWarning, match="Added 1 patch"):
        out = fresh.add_images(files, "mine")
    assert out.status == (
        "⚠️ Added 1 patch labelled **mine** to your personal gallery (6 in all); they are searched together "
        "with the gallery from now on, also after a restart.\n\n**4 duplicates skipped:** "
        "a.tif (already added on 2026-12-01 18:30 UTC as upload:a.png), "
        "big2.png (already added on 2026-12-01 18:30 UTC as upload:big.png), "
        "a_copy.png (same image as a.tif in this batch), "
        "new_again.png (same image as new.png in this batch)"
    )
    assert len(fresh.personal) == 6
    res = fresh.search(str(tmp_path / "a.png"), 8)
    exact = [row for row in res.table if row[4] == "your images" and float(row[2]) > 0.9999]
    assert [row[5] for row in exact] == ["upload:a.png"]  # one copy in the results

    with pytest.warns(UserWarning, match="Nothing added"):
        out = fresh.add_images([str(tmp_path / "a.png")], "mine")
    assert out.status == (
        "⚠️ Nothing added.\n\n**1 duplicate skipped:** a.png (already added on 2026-12-01 18:30 UTC as upload:a.png)"
    )


def test_image_hash_is_of_the_pixels():
    from index_build.uploads import image_hash

    a = noise(9)
    assert image_hash(a) == image_hash(a.copy())
    assert image_hash(a) != image_hash(a.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    assert image_hash(Image.new("RGB", (2, 8))) != image_hash(Image.new("RGB", (8, 2)))  # size counts


# -- 7. management: table, delete, banner ----------------------------------------------------------


def test_table_delete_and_banner(tmp_path, tiny, index_a, fixed_time):
    data_dir = tmp_path / "data"
    fresh = SearchApp.create(index=str(index_a), data_dir=data_dir, embedder=tiny)
    assert fresh.personal_table() == [] and "personal image" not in fresh.banner()
    images = [noise(10 + i) for i in range(4)]
    fresh.add_images([save(im, tmp_path / f"p{i}.png") for i, im in enumerate(images)], "mine")
    fresh.add_images([save(noise(20), tmp_path / "other.png")], "theirs")
    table = fresh.personal_table()
    assert [row[0] for row in table] == [0, 1, 2, 3, 4]
    assert [row[2:] for row in table] == [
        *(["mine", f"upload:p{i}.png", "2026-12-01 18:30 UTC"] for i in range(4)),
        ["theirs", "upload:other.png", "2026-12-01 18:30 UTC"],
    ]
    assert re.fullmatch(r'<img src="data:image/jpeg;base64,[A-Za-z0-9+/=]+" alt="0" .*>', table[0][1])
    assert fresh.banner().endswith(
        "**+ 5 personal images** added on this page (searched with it; see *Add your own images*)."
    )

    out = fresh.delete_images("1, 3-4", table)
    assert out.status == "Deleted 3 images (ids 1, 3, 4) from your personal gallery."
    assert [row[0] for row in out.table] == [0, 2] and [row[3] for row in out.table] == [
        "upload:p0.png",
        "upload:p2.png",
    ]  # ids are stable: the kept rows keep theirs
    assert "**+ 2 personal images**" in out.banner
    assert "theirs" not in out.label_filter["choices"] and "theirs" not in fresh.label_choices()
    # The search sees the delete: the deleted image is no longer found, the kept one still is.
    res = fresh.search(save(images[1], tmp_path / "q1.png"), 8)
    assert not any(row[4] == "your images" and float(row[2]) > 0.9999 for row in res.table)
    res = fresh.search(save(images[2], tmp_path / "q2.png"), 8)
    assert res.table[0][4:6] == ["your images", "upload:p2.png"] and float(res.table[0][2]) > 0.9999
    # On disk: counts, ids, extra columns and the manifest agree, also after a restart.
    reloaded = PatchIndex.load(fresh.personal_dir, tiny)
    assert len(reloaded) == 2 and reloaded.manifest["count"] == 2 and reloaded.manifest["labels"] == {"mine": 2}
    assert reloaded.sources == ["upload:p0.png", "upload:p2.png"] and reloaded.extra["added"] == [FIXED_TIME] * 2
    assert reloaded.row_ids == [0, 2] and reloaded.manifest["next_row_id"] == 5
    restarted = SearchApp.create(index=str(index_a), data_dir=data_dir, embedder=tiny)
    assert [row[3] for row in restarted.personal_table()] == ["upload:p0.png", "upload:p2.png"]

    # The deleted image can be added again (its hash went with it).
    again = fresh.add_images([str(tmp_path / "p1.png")], "mine")
    assert again.status.startswith("✅ Added 1 patch") and len(fresh.personal) == 3
    assert [row[0] for row in fresh.personal_table()] == [0, 2, 5]  # a new id: 1, 3 and 4 are never given again

    # Deleting everything leaves an empty gallery that searches and counts right.
    out = fresh.delete_images([0, 2, 5], fresh.personal_table())
    assert out.status.startswith("Deleted 3 images") and out.table == [] and "personal image" not in out.banner
    assert len(fresh.search(str(tmp_path / "q2.png"), 3).table) == 3
    assert len(PatchIndex.load(fresh.personal_dir, tiny)) == 0


def test_delete_refuses_rows_another_session_changed(tmp_path, tiny, index_a):
    first = SearchApp.create(index=str(index_a), data_dir=tmp_path, embedder=tiny)
    first.add_images([save(noise(30 + i), tmp_path / f"s{i}.png") for i in range(3)], "mine")
    shown = first.personal_table()
    other = SearchApp.create(index=str(index_a), data_dir=tmp_path, embedder=tiny)
    assert other.delete_images("0", other.personal_table()).status.startswith("Deleted 1 image")
    out = first.delete_images("1", shown)  # the stale table's id 1 is still s1.png: ids never move
    assert out.status == "Deleted 1 image (id 1) from your personal gallery."
    assert [(row[0], row[3]) for row in out.table] == [(2, "upload:s2.png")]
    with pytest.warns(UserWarning):
        gone = first.delete_images("0", None)  # deleted by the other session: refused, nothing else goes
    assert gone.status == "⚠️ no image with id 0 in your personal gallery (deleted already?); nothing was deleted"
    first.add_images([save(noise(33), tmp_path / "s3.png")], "mine")  # gets id 3, not a freed one
    assert [row[0] for row in first.personal_table()] == [2, 3]
    for ids, message in [("7", "no image with id 7"), ("x", "ids must be numbers"), ("", "no ids"), ("3-1", "ranges")]:
        with pytest.warns(UserWarning):
            bad = first.delete_images(ids, None)
        assert bad.status.startswith("⚠️") and message in bad.status, ids
    assert len(first.personal) == 2


def test_two_images_of_one_name_are_told_apart_by_a_stale_delete(tmp_path, tiny, index_a):
    """Client B deletes id 1, then client A (whose table still shows that first a.png as id 1) deletes
    id 1: the second, different a.png stays (ids named rows, and once freed are never given again)."""
    a = SearchApp.create(index=str(index_a), data_dir=tmp_path, embedder=tiny)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    a.add_images([save(noise(50), tmp_path / "x.png")], "mine")
    a.add_images([save(noise(51), tmp_path / "one" / "a.png")], "mine")
    shown = a.personal_table()
    b = SearchApp.create(index=str(index_a), data_dir=tmp_path, embedder=tiny)
    assert b.delete_images("1", None).status == "Deleted 1 image (id 1) from your personal gallery."
    b.add_images([save(noise(52), tmp_path / "two" / "a.png")], "mine")  # same name, other pixels
    with pytest.warns(UserWarning):
        stale = a.delete_images("1", shown)
    assert stale.status.startswith("⚠️ no image with id 1 in your personal gallery")
    assert [(row[0], row[3]) for row in stale.table] == [(0, "upload:x.png"), (2, "upload:a.png")]
    digest = PatchIndex.load(a.personal_dir, tiny).extra["sha256"][1]
    from index_build.uploads import image_hash

    assert digest == image_hash(noise(52)) != image_hash(noise(51))


def test_a_gallery_without_row_ids_keeps_its_row_numbers_as_ids(tmp_path, tiny, index_a):
    """A personal gallery written before row ids: its rows get their row numbers once, on the next add."""
    import pyarrow.parquet as pq

    first = SearchApp.create(index=str(index_a), data_dir=tmp_path, embedder=tiny)
    first.add_images([save(noise(60 + i), tmp_path / f"o{i}.png") for i in range(3)], "mine")
    old = PatchIndex.load(first.personal_dir, tiny)
    from index_build.patch_index import write_index

    table = old.metadata_table().drop_columns(["row_id"])
    write_index(first.personal_dir, old.reconstruct_all(), table, tiny, normalized=True)
    assert "row_id" not in pq.read_schema(first.personal_dir / "metadata.parquet").names
    again = SearchApp.create(index=str(index_a), data_dir=tmp_path, embedder=tiny)
    assert [row[0] for row in again.personal_table()] == [0, 1, 2]
    again.add_images([save(noise(63), tmp_path / "o3.png")], "mine")
    assert again.delete_images("1", None).status == "Deleted 1 image (id 1) from your personal gallery."
    again.add_images([save(noise(64), tmp_path / "o4.png")], "mine")
    assert [(row[0], row[3]) for row in again.personal_table()] == [
        (0, "upload:o0.png"),
        (2, "upload:o2.png"),
        (3, "upload:o3.png"),
        (4, "upload:o4.png"),
    ]


def test_parse_ids_and_row_selection():
    import gradio as gr

    assert app.parse_ids("3, 5-7;9") == [3, 5, 6, 7, 9]
    assert app.parse_ids(4.0) == [4] and app.parse_ids([2, "0-1"]) == [0, 1, 2] and app.parse_ids(None) == []
    click = gr.SelectData(None, {"index": [1, 2], "value": "mine", "row_value": [5, "<img>", "mine", "s", "d"]})
    assert SearchApp.select_row("1, 7", click) == "1, 5, 7"
    assert SearchApp.select_row("1, 5, 7", click) == "1, 7"  # a second click unselects


# -- 8. scope: a personal gallery belongs to the index it extends ------------------------------------


def test_personal_images_are_kept_per_index(tmp_path, tiny, index_a, index_b):
    on_a = SearchApp.create(index=str(index_a), data_dir=tmp_path, embedder=tiny)
    on_a.add_images([save(noise(40), tmp_path / "a.png")], "only_on_a")
    on_b = SearchApp.create(index=str(index_b), data_dir=tmp_path, embedder=tiny)  # same model, same data dir
    assert on_b.personal is None and "only_on_a" not in on_b.label_choices() and on_b.personal_table() == []
    assert on_a.personal_dir.parent == on_b.personal_dir.parent != on_a.personal_dir != on_b.personal_dir
    copy = Path(tmp_path / "copy")  # a copy of index a (e.g. downloaded again) is the same index
    import shutil

    shutil.copytree(index_a, copy)
    assert SearchApp.create(index=str(copy), data_dir=tmp_path, embedder=tiny).personal_table()[0][2] == "only_on_a"


def test_a_personal_gallery_of_an_earlier_version_is_moved_to_the_first_index_served(tmp_path, tiny, index_a, index_b):
    from index_build.embedding import build_index

    legacy = tmp_path / "personal" / starter.model_key(tiny)
    images = [noise(50), noise(51)]
    build_index(starter.images_dataset(images, ["old", "old"], ["upload:x.png", "upload:y.png"]), legacy, tiny,
                num_workers=0, progress=False)  # fmt: skip
    on_a = SearchApp.create(index=str(index_a), data_dir=tmp_path, embedder=tiny)
    assert [row[2:] for row in on_a.personal_table()] == [["old", "upload:x.png", "—"], ["old", "upload:y.png", "—"]]
    assert not (legacy / "manifest.json").exists() and (legacy / "manifest.json.migrated").is_file()
    assert on_a.personal.manifest["dataset"]["migrated_from"] == str(legacy.resolve())
    res = on_a.search(save(images[1], tmp_path / "q.png"), 1)
    assert res.table[0][4:6] == ["your images", "upload:y.png"]
    assert on_a.add_images([save(images[0], tmp_path / "x.png")], "old").status.startswith("✅")  # no hash recorded
    on_b = SearchApp.create(index=str(index_b), data_dir=tmp_path, embedder=tiny)
    assert on_b.personal is None  # the old gallery went to index a only
    assert len(SearchApp.create(index=str(index_a), data_dir=tmp_path, embedder=tiny).personal) == 3


def test_a_migration_killed_after_its_commit_is_finished_and_stays_with_its_index(tmp_path, tiny, index_a, index_b):
    from index_build.embedding import build_index
    from index_build.galleries import migrate_legacy, personal_dir_for

    legacy = tmp_path / "personal" / starter.model_key(tiny)
    build_index(starter.images_dataset([noise(60)], ["old"], ["upload:z.png"]), legacy, tiny, num_workers=0,
                progress=False)  # fmt: skip
    main_a, main_b = PatchIndex.load(index_a, tiny), PatchIndex.load(index_b, tiny)
    target_a, target_b = (personal_dir_for(tmp_path, tiny, m) for m in (main_a, main_b))
    real_replace = storage.os.replace
    calls = []

    def killed_before_the_rename(src, dst):  # the copy is committed, the legacy manifest not yet renamed
        if str(dst).endswith(".migrated"):
            calls.append(dst)
            raise KeyboardInterrupt
        return real_replace(src, dst)

    import index_build.galleries as galleries

    galleries.os.replace = killed_before_the_rename
    try:
        with pytest.raises(KeyboardInterrupt):
            migrate_legacy(legacy, target_a, tiny)
    finally:
        galleries.os.replace = real_replace
    assert calls and storage.has_index(legacy) and storage.has_index(target_a)
    # Index b starts next: it finishes the rename, but the gallery stays with index a.
    assert not migrate_legacy(legacy, target_b, tiny) and not storage.has_index(target_b)
    assert not storage.has_index(legacy) and not migrate_legacy(legacy, target_a, tiny)
    assert PatchIndex.load(target_a).sources == ["upload:z.png"]


# -- 9. zip entries keep their file name only -------------------------------------------------------


def test_zip_entry_names_lose_their_directories(tmp_path, tiny, index_a):
    fresh = SearchApp.create(index=str(index_a), data_dir=tmp_path / "data", embedder=tiny)
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as archive:
        archive.writestr("../../evil.png", png_bytes(noise(70)))
        archive.writestr("..\\..\\win.png", png_bytes(noise(71)))
        archive.writestr("/abs/path/root.png", png_bytes(noise(72)))
        archive.writestr("../../bad.png", "not an image")
    with pytest.warns(UserWarning):
        out = fresh.add_images([str(tmp_path / "evil.zip")], "mine")
    assert fresh.personal.sources == ["upload:evil.png", "upload:win.png", "upload:root.png"]
    assert out.status.endswith(f"**1 file skipped:**\n\n- evil.zip/bad.png: {REASON}")
    assert ".." not in out.status and "abs" not in out.status
    assert not (tmp_path / "evil.png").exists() and not (tmp_path.parent / "evil.png").exists()


def test_the_page_asks_before_it_deletes(tmp_path, tiny, index_a):
    """The page's Delete… names the images that would go and deletes nothing; unknown ids are refused."""
    page = SearchApp.create(index=str(index_a), data_dir=tmp_path, embedder=tiny)
    page.add_images([save(noise(40 + i), tmp_path / f"d{i}.png") for i in range(3)], "mine")
    question, row = page.ask_delete("0, 2")
    assert question == (
        "**Delete 2 images from your personal gallery?** This cannot be undone.\n\n"
        "- id 0: mine, upload:d0.png\n- id 2: mine, upload:d2.png"
    )
    assert row["visible"] is True and [r[0] for r in page.personal_table()] == [0, 1, 2]
    with pytest.warns(UserWarning):
        question, row = page.ask_delete("1, 7")
    assert question == "⚠️ no personal image has id 7 (the table shows the ids there are)" and row["visible"] is False
    with pytest.warns(UserWarning):
        question, row = page.ask_delete("")
    assert question.startswith("⚠️ no ids") and row["visible"] is False
