"""Slide indexes (python -m index_build SLIDES --out DIR) and slide-level search, on the SVS and synthetic slides."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from benchmarks.synthetic_slides import class_patches, write_synthetic_slide
from index_build.__main__ import main as build_main
from index_build.slide_index import is_slide_folder, read_labels_csv
from index_build.slide_search import search_slide, search_slide_details, slide_of_source
from index_build.slides import SLIDES_FILE, load_slide_catalog, open_slide, slide_key
from index_build.storage import THUMBNAIL_SIZE

QUIET = ["--num-workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def default_model():
    from index_build.models import load_model

    return load_model("default", device="cpu")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    import torch

    from modeling_lgffem import LgffemConfig, LgffemModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model")
    LgffemModel(LgffemConfig(neck_channels=16, neck_layers=1, image_size=64)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def svs_index(shared_data, tmp_path_factory):
    """The SVS in slides/skin/, indexed with the default model through the CLI."""
    root = tmp_path_factory.mktemp("svs")
    (root / "slides" / "skin").mkdir(parents=True)
    shutil.copy(shared_data / "slides" / "cmu_small_region.svs", root / "slides" / "skin" / "cmu.svs")
    index = build_main([str(root / "slides"), "--out", str(root / "index"), *QUIET])
    return index, root


def test_svs_index_holds_its_tissue_tiles_with_slide_metadata(svs_index):
    index, root = svs_index
    assert len(index) == 59 and index.labels == ["skin"]
    assert index.extra_columns == ["slide", "x", "y", "size0", "mpp"]
    assert set(index.column("slide")) == {"skin/cmu.svs"}
    assert set(index.column("size0")) == {224} and set(index.column("mpp")) == {0.499}
    xs, ys = index.column("x"), index.column("y")
    assert all(x % 224 == 0 and x + 224 <= 2220 for x in xs) and all(y % 224 == 0 and y + 224 <= 2967 for y in ys)
    assert index.sources[0] == f"skin/cmu.svs@{xs[0]},{ys[0]}"
    assert slide_of_source(index.sources[0]) == "skin/cmu.svs"
    with open_slide(root / "slides" / "skin" / "cmu.svs") as slide:  # the stored thumbnail is that tile's
        tile = np.asarray(slide.read_region(xs[5], ys[5], 224, 224, THUMBNAIL_SIZE, THUMBNAIL_SIZE), dtype=np.float32)
    assert np.abs(np.asarray(index.thumbnail(5), dtype=np.float32) - tile).mean() < 6  # JPEG
    manifest = index.manifest
    assert manifest["dataset"]["kind"] == "slides" and manifest["dataset"]["tile_size"] == 224


def test_svs_index_stores_catalog_thumbnail_and_mask(svs_index):
    index, root = svs_index
    catalog = load_slide_catalog(index.path)
    entry = catalog.slides["skin/cmu.svs"]
    assert (entry["width"], entry["height"], entry["label"]) == (2220, 2967, "skin")
    assert (entry["tissue_tiles"], entry["background_tiles"]) == (59, 58)
    assert catalog.mpp == 0.5 and catalog.tile_size == 224
    # one name, one meaning: the tiles' µm/px at the top, each slide's level-0 µm/px in its entry
    stored = json.loads((index.path / "slides.json").read_text())
    assert stored["tile_mpp"] == 0.5 and "mpp" not in stored
    assert entry["level0_mpp"] == pytest.approx(0.499, abs=1e-3) and "mpp" not in stored["slides"]["skin/cmu.svs"]
    thumb, mask = catalog.thumbnail("skin/cmu.svs"), catalog.mask("skin/cmu.svs")
    assert thumb.size == mask.size == (766, 1024)
    assert catalog.scale("skin/cmu.svs") == pytest.approx(2220 / 766)
    assert 0.2 < (np.asarray(mask) > 0).mean() < 0.6
    assert catalog.source_path("skin/cmu.svs") is None  # no --slides-root: nothing is read from outside the index
    assert catalog.source_path("skin/cmu.svs", root / "slides") == (root / "slides" / "skin" / "cmu.svs").resolve()
    assert catalog.root == "slides"  # the folder's name, not the builder's path
    manifest = json.loads((index.path / "manifest.json").read_text())
    assert manifest["dataset"]["source"] == "slides"
    assert (index.path / "slides" / f"{slide_key('skin/cmu.svs')}.thumb.png").is_file()
    assert load_slide_catalog(root) is None  # not an index


def _overlaps(source: str, x0: int, y0: int, side: int) -> bool:
    x, y = map(int, source.rsplit("@", 1)[1].split(","))
    return not (x + 224 <= x0 or x >= x0 + side or y + 224 <= y0 or y >= y0 + side)


def test_a_crop_searched_finds_the_tile_at_its_place(svs_index):
    index, root = svs_index
    with open_slide(root / "slides" / "skin" / "cmu.svs") as slide:
        # a crop at (1384, 1374): 40 / 30 px right of and below the tile at (1344, 1344)
        crop = slide.read_region(1384, 1374, 224, 224, 224, 224)
        top = index.search(images=crop, k=1)[0]
        assert _overlaps(top.sources[0], 1384, 1374, 224)  # measured: the tile at (1344, 1568)
        # 20 crops at random places near tissue tiles (up to a quarter tile off the grid): measured 19 of 20
        rng = np.random.default_rng(0)
        xs, ys = index.column("x"), index.column("y")
        boxes = []
        for i in rng.choice(len(index), 20, replace=False):
            dx, dy = rng.integers(-56, 57, 2)
            boxes.append((int(np.clip(xs[i] + dx, 0, 2220 - 224)), int(np.clip(ys[i] + dy, 0, 2967 - 224))))
        crops = [slide.read_region(x, y, 224, 224, 224, 224) for x, y in boxes]
    results = index.search(images=crops, k=1)
    hits = sum(_overlaps(r.sources[0], x, y, 224) for r, (x, y) in zip(results, boxes))
    assert hits >= 18


@pytest.fixture(scope="module")
def synthetic(shared_data, tmp_path_factory):
    """Gallery: 2 lung_aca + 2 lung_n slides (folders per class); queries: 1 of each from the query split."""
    root = tmp_path_factory.mktemp("synthetic")
    for split, count in (("gallery", 2), ("query", 1)):
        for c, label in enumerate(("lung_aca", "lung_n")):
            patches = class_patches(shared_data / "lc25000_lung" / split / label)
            for i in range(count):
                folder = root / split / label
                folder.mkdir(parents=True, exist_ok=True)
                chosen = patches[i * 12 : (i + 1) * 12]
                write_synthetic_slide(
                    folder / f"{label}_{i}.tif", chosen, size=896, tissue=0.5, levels=2, seed=10 * c + i
                )
    return root


def test_a_synthetic_folder_is_a_slide_folder(synthetic, shared_data):
    assert is_slide_folder(synthetic / "gallery")
    assert not is_slide_folder(shared_data / "crc_samples")  # TIFF patches, not slides
    assert not is_slide_folder(shared_data / "lc25000_lung" / "query")


def test_slide_search_ranks_a_same_class_slide_first(synthetic, default_model, tmp_path):
    index = build_main([str(synthetic / "gallery"), "--out", str(tmp_path / "index"), *QUIET])
    assert index.labels == ["lung_aca", "lung_n"]
    assert len(load_slide_catalog(index.path).slides) == 4
    for label in ("lung_aca", "lung_n"):
        query = synthetic / "query" / label / f"{label}_0.tif"
        hits = search_slide(index, default_model, query, mosaic_size=4)
        assert len(hits) == 4 and hits[0].label == label
        assert hits[0].score >= hits[-1].score
        assert sum(h.matched_tiles for h in hits) == 4
    details = search_slide_details(index, default_model, query, mosaic_size=4)
    assert len(details.mosaic) == 4 and details.tissue_tiles >= 4
    assert all(m.best_slide is not None and m.best_slide.startswith("lung_") for m in details.mosaic)


def test_labels_from_a_csv_and_append_merges_the_catalog(synthetic, tiny_model_dir, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted((synthetic / "gallery").rglob("*.tif")):
        (flat / path.name).symlink_to(path)
    csv = tmp_path / "labels.csv"
    csv.write_text("slide,label\nlung_aca_0.tif,ACA\nlung_aca_1.tif,ACA\nlung_n_0.tif,N\n")
    out = tmp_path / "index"
    common = ["--model", tiny_model_dir, "--slides", "--mpp", "1.75", *QUIET]
    with pytest.raises(SystemExit, match="1 slides have no label in .*labels.csv: lung_n_1.tif"):
        build_main([str(flat), "--out", str(out), "--labels", str(csv), *common])
    csv.write_text(csv.read_text() + "lung_n_1.tif,N\n")
    assert read_labels_csv(csv)["lung_n_1.tif"] == "N"
    (flat / "lung_n_1.tif").rename(tmp_path / "later.tif")
    index = build_main([str(flat), "--out", str(out), "--labels", str(csv), *common])
    assert index.labels == ["ACA", "N"]
    first = len(index)
    assert set(index.column("slide")) == {"lung_aca_0.tif", "lung_aca_1.tif", "lung_n_0.tif"}
    more = tmp_path / "more"
    more.mkdir()
    (tmp_path / "later.tif").rename(more / "lung_n_1.tif")
    index = build_main([str(more), "--out", str(out), "--labels", str(csv), "--append", *common])
    assert len(index) > first and index.column("slide")[-1] == "lung_n_1.tif"
    assert None not in index.column("x")
    slides = json.loads((out / SLIDES_FILE).read_text())["slides"]
    assert sorted(slides) == ["lung_aca_0.tif", "lung_aca_1.tif", "lung_n_0.tif", "lung_n_1.tif"]


def test_slides_without_mpp_need_mpp_source(shared_data, tiny_model_dir, tmp_path):
    root = tmp_path / "slides" / "he"
    root.mkdir(parents=True)
    (root / "target.png").symlink_to(shared_data / "slides" / "target_image.png")
    common = ["--model", tiny_model_dir, "--slides", *QUIET]
    with pytest.raises(SystemExit, match="1 slides record no resolution .*he/target.png.*--mpp-source"):
        build_main([str(tmp_path / "slides"), "--out", str(tmp_path / "a"), *common])
    index = build_main([str(tmp_path / "slides"), "--out", str(tmp_path / "b"), "--mpp-source", "0.25", *common])
    assert set(index.column("size0")) == {round(64 * 0.5 / 0.25)}  # the tiny model's 64 px input
    assert set(index.column("mpp")) == {0.25}


def test_an_interrupted_slide_build_resumes_and_commits_the_catalog_last(
    synthetic, tiny_model_dir, tmp_path, monkeypatch
):
    from index_build.models import Embedder

    out = tmp_path / "index"
    argv = [str(synthetic / "gallery"), "--out", str(out), "--model", tiny_model_dir, "--batch-size", "2"]
    argv += ["--chunk-size", "4", "--mpp", "1.75", *QUIET]  # the tiny model's 64 px at 1.75 µm/px: 224 level-0 px
    calls = {"n": 0}
    original = Embedder.embed_pixels

    def failing(self, pixels):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")
        return original(self, pixels)

    monkeypatch.setattr(Embedder, "embed_pixels", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_main(argv)
    assert not (out / SLIDES_FILE).exists() and not (out / "manifest.json").exists()
    assert sorted(p.name for p in (out / ".partial").glob("chunk-*.npy")) == ["chunk-000000.npy"]
    calls["n"] = -1000
    index = build_main(argv)
    rows = len(index)
    assert calls["n"] == -1000 + (rows - 4 + 1) // 2  # only the rows after the first chunk, in batches of 2
    assert not (out / ".partial").exists()
    assert sorted(load_slide_catalog(out).slides) == [
        "lung_aca/lung_aca_0.tif",
        "lung_aca/lung_aca_1.tif",
        "lung_n/lung_n_0.tif",
        "lung_n/lung_n_1.tif",
    ]
    assert sum(e["tissue_tiles"] for e in load_slide_catalog(out).slides.values()) == rows

    assert index.column("slide") == [s.rsplit("@", 1)[0] for s in index.sources]
    assert set(index.column("size0")) == {224}


def test_an_index_inside_the_slides_folder_is_not_read_as_slides(synthetic, tiny_model_dir, tmp_path):
    folder = tmp_path / "folder" / "lung_n"
    folder.mkdir(parents=True)
    for path in sorted((synthetic / "gallery" / "lung_n").glob("*.tif")):
        (folder / path.name).symlink_to(path)
    common = ["--model", tiny_model_dir, "--mpp", "1.75", *QUIET]
    first = build_main([str(tmp_path / "folder"), "--out", str(tmp_path / "folder" / "idx"), *common])
    assert list((first.path / "slides").glob("*.png"))  # PNGs a second build must not take for slides
    again = build_main([str(tmp_path / "folder"), "--out", str(first.path), "--overwrite", *common])
    assert len(again) == len(first) and sorted(load_slide_catalog(again.path).slides) == [
        "lung_n/lung_n_0.tif",
        "lung_n/lung_n_1.tif",
    ]


def test_a_catalog_written_before_the_keys_were_renamed_still_reads(tmp_path):
    """Older indexes stored both µm/px values as ``mpp``: the top-level one is the tiles', a slide's is its level 0."""
    from index_build.slides import SlideCatalog

    old = {"slides": {"a/s.svs": {"width": 40, "height": 40, "mpp": 0.25, "thumb_scale": 10.0}}, "mpp": 0.5}
    catalog = SlideCatalog(tmp_path, old)
    assert catalog.mpp == 0.5
    assert catalog.slides["a/s.svs"]["level0_mpp"] == 0.25 and "mpp" not in catalog.slides["a/s.svs"]
