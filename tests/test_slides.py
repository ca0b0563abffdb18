"""Whole-slide reading, MPP rule, tissue tiling (index_build.slides) on the real SVS and synthetic TIFFs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from benchmarks.synthetic_slides import class_patches, write_synthetic_slide
from index_build.slides import (
    SlideError,
    find_slides,
    open_slide,
    read_tile,
    slide_tissue_mask,
    tile_size0,
    tile_slide,
)
from index_build.tissue import tissue_fraction


@pytest.fixture(scope="module")
def svs(shared_data):
    return shared_data / "slides" / "cmu_small_region.svs"


@pytest.fixture(scope="module")
def pyramid(shared_data, tmp_path_factory):
    """A 2000 x 1500 three-level synthetic slide at 0.5 µm/px, lung_aca patches on glass."""
    path = tmp_path_factory.mktemp("slides") / "aca.tif"
    patches = class_patches(shared_data / "lc25000_lung" / "gallery" / "lung_aca")[:20]
    layout = write_synthetic_slide(path, patches, size=(2000, 1500), tissue=0.4, levels=3, seed=0)
    return path, layout


def test_svs_size_mpp_and_levels(svs):
    with open_slide(svs) as slide:
        assert (slide.width, slide.height) == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499)
        assert slide.mpp_from == "slide"
        assert slide.level_count == 1
        assert slide.backend == "openslide"
        assert tile_size0(slide, 0.5, 224) == 224  # 224 * 0.5 / 0.499 = 224.4


def test_synthetic_tiff_has_pyramid_and_mpp(pyramid):
    path, _ = pyramid
    with open_slide(path) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert slide.mpp == pytest.approx(0.5)
        assert slide.level_downsamples == (1.0, 2.0, 4.0)


@pytest.mark.parametrize(("out", "level"), [((500, 375), 2), ((1000, 750), 1), ((700, 525), 1), ((2000, 1500), 0)])
def test_read_region_uses_the_coarsest_sufficient_level(pyramid, out, level):
    path, _ = pyramid
    with open_slide(path) as slide:
        image = slide.read_region(0, 0, 2000, 1500, *out)
        assert image.size == out and image.mode == "RGB"
        assert slide.last_level == level


def test_read_region_matches_the_patch_placed_there(pyramid, shared_data):
    path, layout = pyramid
    patches = class_patches(shared_data / "lc25000_lung" / "gallery" / "lung_aca")[:20]
    r, c = map(int, np.argwhere(layout >= 0)[0])
    with open_slide(path) as slide:
        tile = np.asarray(slide.read_region(c * 224, r * 224, 224, 224, 224, 224), dtype=np.float32)
        assert slide.last_level == 0
    expected = np.asarray(Image.open(patches[layout[r, c]]).convert("RGB"), dtype=np.float32)
    assert np.abs(tile - expected).mean() < 2.0  # zlib is lossless: only the patch's own JPEG decode differs


def test_outside_the_slide_is_white_glass(pyramid):
    path, _ = pyramid
    with open_slide(path) as slide:
        image = np.asarray(slide.read_region(1900, 1400, 200, 200, 200, 200))
    assert (image[150:, 150:] == 255).all()


def test_missing_mpp_is_a_clear_error_and_mpp_source_fixes_it(shared_data):
    png = shared_data / "slides" / "target_image.png"
    with open_slide(png) as slide:
        assert slide.mpp is None and slide.backend == "pil"
        with pytest.raises(SlideError, match="--mpp-source"):
            tile_slide(slide)
    with open_slide(png, mpp_source=0.25) as slide:
        assert slide.mpp == 0.25 and slide.mpp_from == "mpp_source"
        assert tile_size0(slide, 0.5, 224) == 448
        tissue, background = tile_slide(slide)
        assert len(tissue) + len(background) == 4  # 1000 px // 448 = 2 per side


def test_slide_mpp_wins_over_mpp_source(svs):
    with open_slide(svs, mpp_source=0.25) as slide:
        assert slide.mpp == pytest.approx(0.499) and slide.mpp_from == "slide"


def test_plain_image_over_max_pixels_is_refused(shared_data):
    with pytest.raises(SlideError, match=r"\(1,000,000 pixels\), over the limit of 999,999 pixels"):
        open_slide(shared_data / "slides" / "target_image.png", max_pixels=999_999)
    with pytest.raises(SlideError, match="not found"):
        open_slide(shared_data / "slides" / "missing.svs")
    with pytest.raises(SlideError, match="positive"):
        open_slide(shared_data / "slides" / "target_image.png", mpp_source=-1)


def test_svs_tiles_on_the_level0_grid_with_tissue(svs):
    with open_slide(svs) as slide:
        mask, scale = slide_tissue_mask(slide)
        assert mask.shape == (2048, 1532)
        assert scale == pytest.approx(2220 / 1532)
        tissue, background = tile_slide(slide, mask=(mask, scale))
        assert len(tissue) + len(background) == (2220 // 224) * (2967 // 224)
        assert (len(tissue), len(background)) == (59, 58)
        for tile in tissue + background:
            assert tile.size0 == 224 and tile.x % 224 == 0 and tile.y % 224 == 0
            assert tile.x + 224 <= 2220 and tile.y + 224 <= 2967
        assert min(t.tissue for t in tissue) >= 0.2 > max(t.tissue for t in background)
        # the tiles read at full resolution agree: tissue tiles are mostly stained, background mostly glass
        assert np.mean([tissue_fraction(read_tile(slide, t, 224)) for t in tissue[::6]]) > 0.5
        assert np.mean([tissue_fraction(read_tile(slide, t, 224)) for t in background[::6]]) < 0.1


def test_region_tiles_start_at_the_region(svs):
    with open_slide(svs) as slide:
        tissue, background = tile_slide(slide, region=(1000, 1500, 500, 700))
    tiles = tissue + background
    assert sorted({t.x for t in tiles}) == [1000, 1224]
    assert sorted({t.y for t in tiles}) == [1500, 1724, 1948]


def test_find_slides_skips_mirax_data_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "s1.svs").write_bytes(b"")
    (tmp_path / "b.mrxs").write_bytes(b"")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "Data0000.dat").write_bytes(b"")
    (tmp_path / "b" / "Slidedat.ini").write_bytes(b"")
    (tmp_path / "notes.txt").write_bytes(b"")
    assert [str(p) for p in find_slides(tmp_path)] == ["a/s1.svs", "b.mrxs"]


# Tiles of cmu_small_region.svs labelled by eye (grid column, row of 224-px level-0 tiles), from
# crops viewed at full resolution. "tissue": stained tissue, even a thin strand of cells (1,4);
# "glass": blank glass, or glass with only debris / a fragment in a corner (the tile's tissue
# fraction at full resolution is below 0.1). Ambiguous edge tiles (about 15-20% tissue: 6,1 7,3
# 8,6 8,8) are left out.
HAND_LABELS = {
    "tissue": [(4, 0), (5, 1), (4, 4), (5, 5), (6, 9), (3, 10), (7, 11), (2, 11), (8, 10), (5, 12)]
    + [(1, 4), (2, 4), (3, 4), (3, 6), (8, 5), (8, 9)],  # sparse: a strand of cells, fragments at an edge
    "glass": [(0, 0), (1, 1), (2, 2), (0, 3), (1, 6), (0, 8), (1, 9), (2, 10), (0, 12), (8, 0), (8, 2), (7, 0)]
    + [(6, 0), (8, 3), (1, 12), (0, 10), (2, 7), (8, 12), (7, 2), (8, 4), (3, 0), (0, 5)],
}


def test_indexed_tiles_are_not_blank_glass_against_a_hand_labelled_sample(svs):
    with open_slide(svs) as slide:
        tissue, background = tile_slide(slide)
    indexed = {(t.x // 224, t.y // 224) for t in tissue}
    skipped = {(t.x // 224, t.y // 224) for t in background}
    hand_tissue, hand_glass = set(HAND_LABELS["tissue"]), set(HAND_LABELS["glass"])
    assert hand_tissue | hand_glass <= indexed | skipped
    assert hand_tissue <= indexed  # every tissue tile of the sample is indexed
    assert not hand_glass & indexed  # share of the sample's indexed tiles that are glass: 0 of 16
    assert hand_glass <= skipped


def test_plain_tiff_mpp_from_its_resolution_tags_and_png_dpi_ignored(tmp_path):
    image = Image.new("RGB", (300, 200), (200, 120, 160))
    image.save(tmp_path / "strips.tif", dpi=(50800, 50800))  # 50,800 px per inch = 0.5 µm/px
    image.save(tmp_path / "screen.png", dpi=(72, 72))  # 352.8 µm/px: not a microscope resolution
    with open_slide(tmp_path / "strips.tif") as slide:
        assert slide.backend == "pil" and slide.mpp == pytest.approx(0.5) and slide.mpp_from == "slide"
        assert slide.read_region(250, 150, 100, 100, 50, 50).getpixel((40, 40)) == (255, 255, 255)
        assert slide.read_region(250, 150, 100, 100, 50, 50).getpixel((10, 10)) == (200, 120, 160)
    with open_slide(tmp_path / "screen.png") as slide:
        assert slide.mpp is None
