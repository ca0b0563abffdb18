"""An index folder is written by someone else: nothing in it may name or reach a file outside it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index_build.patch_index import PatchIndex, write_index
from index_build.slides import SLIDES_DIR, SLIDES_FILE, load_slide_catalog, slide_key
from index_build.sources import public_dataset_source
from index_build.storage import IndexLoadError, contained_path, make_thumbnail, metadata_table


@pytest.fixture(scope="module")
def clean_index(tmp_path_factory, tiny_embedder) -> Path:
    """A 3-row index with a slide catalog of one slide ``a/s.png`` (thumbnail and mask stored)."""
    path = tmp_path_factory.mktemp("clean") / "index"
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((3, tiny_embedder.dim)).astype(np.float32)
    thumbs = [make_thumbnail(np.full((8, 8, 3), 200, np.uint8))] * 3
    write_index(path, xb, metadata_table(range(3), ["a", "b", "a"], ["x", "y", "z"], thumbs), tiny_embedder)
    (path / SLIDES_DIR).mkdir()
    for kind in ("thumb", "mask"):
        Image.new("RGB", (4, 4), (10, 20, 30)).save(path / SLIDES_DIR / f"{slide_key('a/s.png')}.{kind}.png")
    catalog = {"slides": {"a/s.png": {"width": 40, "height": 40, "mpp": 0.5, "thumb_scale": 10.0}}, "root": "slides"}
    (path / SLIDES_FILE).write_text(json.dumps(catalog))
    return path


@pytest.fixture()
def crafted(clean_index, tmp_path) -> Path:
    copy = tmp_path / "index"
    shutil.copytree(clean_index, copy)
    return copy


@pytest.fixture()
def outside(tmp_path) -> Path:
    """A file of the server outside every index folder (its pixels must never be shown)."""
    secret = tmp_path / "secret" / "private.png"
    secret.parent.mkdir()
    Image.new("RGB", (4, 4), (255, 0, 255)).save(secret)
    return secret


def test_a_clean_index_loads(clean_index, tiny_embedder):
    assert len(PatchIndex.load(clean_index, tiny_embedder)) == 3
    assert load_slide_catalog(clean_index).thumbnail("a/s.png").getpixel((0, 0)) == (10, 20, 30)


@pytest.mark.parametrize("name", ["metadata.parquet", "index.faiss", "manifest.json"])
def test_an_index_file_that_links_out_is_refused(crafted, tmp_path, tiny_embedder, name):
    moved = tmp_path / "elsewhere" / name
    moved.parent.mkdir()
    shutil.move(crafted / name, moved)
    (crafted / name).symlink_to(moved)
    with pytest.raises(IndexLoadError) as err:
        PatchIndex.load(crafted, tiny_embedder)
    assert str(err.value) == f"refusing file {name!r} of the index index: it is a link that leaves the index folder"


def test_a_link_inside_the_folder_is_allowed(crafted, tiny_embedder):
    shutil.move(crafted / "metadata.parquet", crafted / "meta.bin")
    (crafted / "metadata.parquet").symlink_to("meta.bin")
    assert PatchIndex.load(crafted, tiny_embedder).sources == ["x", "y", "z"]


def test_a_hub_snapshot_may_link_to_its_blobs(crafted, tmp_path, tiny_embedder):
    repo = tmp_path / "datasets--org--idx"
    snapshot = repo / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for name in ("index.faiss", "metadata.parquet", "manifest.json"):
        shutil.move(crafted / name, repo / "blobs" / name)
        (snapshot / name).symlink_to(Path("../..") / "blobs" / name)
    assert len(PatchIndex.load(snapshot, tiny_embedder)) == 3


def test_a_thumbnail_that_links_out_is_refused(crafted, outside):
    thumb = crafted / SLIDES_DIR / f"{slide_key('a/s.png')}.thumb.png"
    thumb.unlink()
    thumb.symlink_to(outside)
    with pytest.raises(IndexLoadError, match="it is a link that leaves the index folder"):
        load_slide_catalog(crafted)  # every entry of slides/ is checked when the catalog loads
    with pytest.raises(IndexLoadError, match="it is a link that leaves the index folder"):
        contained_path(crafted, f"{SLIDES_DIR}/{thumb.name}")


def test_a_slides_folder_or_catalog_that_links_out_is_refused(crafted, tmp_path):
    shutil.move(crafted / SLIDES_FILE, tmp_path / "other.json")
    (crafted / SLIDES_FILE).symlink_to(tmp_path / "other.json")
    with pytest.raises(IndexLoadError, match="refusing file 'slides.json'"):
        load_slide_catalog(crafted)
    (crafted / SLIDES_FILE).unlink()
    shutil.move(tmp_path / "other.json", crafted / SLIDES_FILE)
    shutil.move(crafted / SLIDES_DIR, tmp_path / "thumbs")
    (crafted / SLIDES_DIR).symlink_to(tmp_path / "thumbs")
    with pytest.raises(IndexLoadError, match="refusing folder 'slides'"):
        load_slide_catalog(crafted)


@pytest.mark.parametrize("name", ["/etc/passwd", "../../secret/private.png", "a/../../x.png", "a\\..\\x.png", ""])
def test_a_slide_name_outside_the_slides_folder_is_refused(crafted, name):
    data = json.loads((crafted / SLIDES_FILE).read_text())
    data["slides"][name] = data["slides"]["a/s.png"]
    (crafted / SLIDES_FILE).write_text(json.dumps(data))
    with pytest.raises(IndexLoadError) as err:
        load_slide_catalog(crafted)
    assert str(err.value) == (
        f"corrupt slides.json in index: slide {name!r} is not a relative path inside the slides folder"
    )


def test_source_slides_are_read_only_from_the_operators_folder(crafted, tmp_path, outside):
    """The index's ``root`` is never used: an absolute root ("/") with a server file finds nothing."""
    data = json.loads((crafted / SLIDES_FILE).read_text())
    data["root"] = str(outside.parent)
    data["slides"]["private.png"] = data["slides"]["a/s.png"]
    (crafted / SLIDES_FILE).write_text(json.dumps(data))
    catalog = load_slide_catalog(crafted)
    assert catalog.source_path("private.png") is None  # no --slides-root: no source at all
    slides = tmp_path / "slides"
    (slides / "a").mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(slides / "a" / "s.png")
    assert catalog.source_path("a/s.png", slides) == (slides / "a" / "s.png").resolve()
    assert catalog.source_path("private.png", slides) is None  # not in the operator's folder
    (slides / "private.png").symlink_to(outside)  # a link in the folder that leaves it
    assert catalog.source_path("private.png", slides) is None
    assert catalog.source_path("../secret/private.png", slides) is None  # not a slide of the catalog


def test_manifests_name_no_builders_path(tmp_path):
    data = tmp_path / "home" / "me" / "data" / "colon"
    data.mkdir(parents=True)
    assert public_dataset_source(str(data)) == "colon"
    assert public_dataset_source(str(data) + "/") == "colon"
    assert public_dataset_source("org/kimia24c") == "org/kimia24c"
