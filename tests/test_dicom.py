"""DICOM whole-slide images: a real conversion of the dev SVS (wsidicomizer) opens, tiles and indexes as the SVS."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from index_build.__main__ import main as build_main
from index_build.slides import SlideError, dicom_series, find_slides, open_slide

QUIET = ["--num-workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def converted(shared_data, tmp_path_factory) -> tuple[Path, Path]:
    """``(svs, dicom_folder)``: the dev SVS and its DICOM series (4 ``.dcm`` files) written by wsidicomizer."""
    wsidicomizer = pytest.importorskip("wsidicomizer")
    svs = shared_data / "slides" / "cmu_small_region.svs"
    out = tmp_path_factory.mktemp("dicom") / "series"
    out.mkdir()
    wsidicomizer.WsiDicomizer.convert(str(svs), str(out))
    return svs, out


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    import torch

    from modeling_lgffem import LgffemConfig, LgffemModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model")
    LgffemModel(LgffemConfig(neck_channels=16, neck_layers=1, image_size=64)).save_pretrained(path)
    return str(path)


def test_a_dicom_series_opens_as_the_svs_from_its_folder_or_any_file(converted):
    svs, series = converted
    files = sorted(series.glob("*.dcm"))
    assert len(files) == 4 and dicom_series(series) == [files]
    with open_slide(svs) as reference:
        expected = np.asarray(reference.read_region(0, 0, reference.width, reference.height, 555, 742))
    for path in (series, files[0], files[3]):
        with open_slide(path) as slide:
            assert (slide.width, slide.height, slide.mpp, slide.mpp_from) == (2220, 2967, 0.499, "slide")
            assert np.array_equal(np.asarray(slide.read_region(0, 0, 2220, 2967, 555, 742)), expected)


def test_each_dicom_series_of_a_folder_is_one_slide(converted, tmp_path):
    from wsidicomizer import WsiDicomizer

    svs, series = converted
    shutil.copytree(series, tmp_path / "a")
    WsiDicomizer.convert(str(svs), str(tmp_path / "b"))  # a second conversion: another Series Instance UID
    assert find_slides(tmp_path) == [Path("a"), Path("b")]
    mixed = tmp_path / "mixed"
    for copy in ("a", "b"):
        shutil.copytree(tmp_path / copy, mixed, dirs_exist_ok=True)
    groups = dicom_series(mixed)
    assert [len(group) for group in groups] == [4, 4]
    assert [p for p in find_slides(tmp_path) if p.parts[0] == "mixed"] == sorted(
        group[0].relative_to(tmp_path) for group in groups
    )
    with pytest.raises(SlideError, match="is a folder with 2 DICOM series"):
        open_slide(mixed)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlideError, match="is a folder with no DICOM"):
        open_slide(tmp_path / "empty")
    (tmp_path / "bad.dcm").write_bytes(b"not dicom")
    with pytest.raises(SlideError, match="not a DICOM whole-slide image"):
        open_slide(tmp_path / "bad.dcm")


def test_a_dicom_series_indexes_to_one_slide_with_the_svs_tiles(converted, tiny_model_dir, tmp_path):
    svs, series = converted
    (tmp_path / "svs" / "skin").mkdir(parents=True)
    (tmp_path / "svs" / "skin" / "cmu.svs").symlink_to(svs)
    (tmp_path / "dicom" / "skin").mkdir(parents=True)
    shutil.copytree(series, tmp_path / "dicom" / "skin" / "cmu")
    common = ["--model", tiny_model_dir, *QUIET]
    reference = build_main([str(tmp_path / "svs"), "--out", str(tmp_path / "svs-index"), *common])
    index = build_main([str(tmp_path / "dicom"), "--out", str(tmp_path / "dicom-index"), *common])
    assert len(reference) == len(index) == 650  # tiles of 64 px (the tiny model) at 0.5 µm/px
    assert set(index.column("slide")) == {"skin/cmu"} and index.labels == ["skin"]
    for column in ("x", "y", "size0", "mpp"):
        assert index.column(column) == reference.column(column)
    assert [s.split("@")[1] for s in index.sources] == [s.split("@")[1] for s in reference.sources]
    assert index.sources[0].startswith("skin/cmu@")
    assert np.array_equal(index.reconstruct_all(), reference.reconstruct_all())  # the very pixels of the SVS


def test_the_whole_slide_tab_opens_a_zipped_dicom_series_or_one_of_its_files(converted, tmp_path):
    import zipfile
    from types import SimpleNamespace

    from index_build.slide_page import SlidePage

    # uploading only opens, tiles and outlines the slide: galleries of a 224 px model, nothing searched
    galleries = SimpleNamespace(
        embedder=SimpleNamespace(processor=SimpleNamespace(image_size=224), embed_pixels=None), main=None
    )

    svs, series = converted
    archive = tmp_path / "cmu-dicom.zip"
    with zipfile.ZipFile(archive, "w") as out:
        for path in sorted(series.glob("*.dcm")):
            out.write(path, f"study/series/{path.name}")  # a zipped folder: members under sub-folders
    page = SlidePage(galleries, max_slide_mb=100)
    _, reference, svs_session = page.load(str(svs), 0, 2)
    for upload in (archive, sorted(series.glob("*.dcm"))[1]):
        thumb, status, session = page.load(str(upload), 0, 2)
        assert session is not None, status
        assert "2,220×2,967 px at level 0, 0.499 µm/px (from the file)" in status
        assert (session.region, session.size0) == (svs_session.region, svs_session.size0)
        assert thumb.size == (766, 1024)
    assert session.name.endswith(".dcm") and Path(page.load(str(archive), 0, 2)[2].path).name == "cmu-dicom"
    with zipfile.ZipFile(tmp_path / "none.zip", "w") as out:
        out.writestr("notes.txt", "hello")
    _, status, session = page.load(str(tmp_path / "none.zip"), 0, 2)
    assert session is None and status == "⚠️ none.zip: the zip holds no DICOM (.dcm) files; zip the series' folder"
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as out:
        out.writestr("big.dcm", bytes(3 * 2**20))  # a few kB zipped, 3 MB unpacked: refused before unpacking
    _, status, _ = SlidePage(galleries, max_slide_mb=1).load(str(tmp_path / "bomb.zip"), 0, 2)
    assert status == (
        "⚠️ bomb.zip: 3 MB of DICOM files unpacked; this server accepts slides up to 1 MB "
        "(option --max-slide-mb / LGFFEM_MAX_SLIDE_MB)"
    )
