"""A small slide index for the Whole slide tab's tests: the tissue tiles of a slide, with ``slides.json``
and the stored thumbnail and mask, written the way the slide build writes them (issue 11's agreed format)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from index_build import starter
from index_build.slides import (
    SLIDES_DIR,
    SLIDES_FILE,
    open_slide,
    read_tile,
    slide_key,
    slide_tissue_mask,
    tile_slide,
)


def write_slide_index(
    slide_path: Path,
    out: Path,
    embedder,
    mpp: float = 0.5,
    root: Path | None = None,
    label_rows: int = 2,
    region: tuple[int, int, int, int] | None = None,
) -> dict:
    """Index every tissue tile of ``slide_path`` (sources ``"<name>@<x>,<y>"``) into ``out``.

    Labels: ``"band0"``, ``"band1"``, ... by horizontal band of the slide (``label_rows`` bands), so
    that the index has more than one label. ``root`` is recorded as the slides folder (default the
    slide's folder; another folder makes the slide unreadable "on this server"). ``region``: only
    the tiles of this level-0 box (on the grid from (0, 0), as the slide build tiles).

    Returns:
        ``{"tiles": [SlideTile], "labels": [...], "size0": int}``.
    """
    from index_build.index import build_index

    tile_size = int(embedder.processor.image_size)
    name = slide_path.name
    with open_slide(slide_path) as slide:
        mask, mask_scale = slide_tissue_mask(slide)
        tissue, _ = tile_slide(slide, mpp, tile_size, mask=(mask, mask_scale))
        if region is not None:
            rx, ry, rw, rh = region
            tissue = [
                t for t in tissue if rx <= t.x and t.x + t.size0 <= rx + rw and ry <= t.y and t.y + t.size0 <= ry + rh
            ]
        images = [read_tile(slide, tile, tile_size) for tile in tissue]
        thumb = slide.thumbnail(1024)
        width, height, slide_mpp = slide.width, slide.height, slide.mpp
    labels = [f"band{min(label_rows - 1, tile.y * label_rows // height)}" for tile in tissue]
    sources = [f"{name}@{tile.x},{tile.y}" for tile in tissue]
    build_index(starter.images_dataset(images, labels, sources), out, embedder, num_workers=0, progress=False)
    (out / SLIDES_DIR).mkdir(exist_ok=True)
    thumb.save(out / SLIDES_DIR / f"{slide_key(name)}.thumb.png")
    Image.fromarray(mask.astype("uint8") * 255).resize(thumb.size).save(
        out / SLIDES_DIR / f"{slide_key(name)}.mask.png"
    )
    catalog = {
        "slides": {
            name: {
                "width": width,
                "height": height,
                "mpp": slide_mpp,
                "thumb_scale": width / thumb.width,
                "label": None,
            }
        },
        "root": str(root if root is not None else slide_path.parent),
        "mpp": mpp,
        "tile_size": tile_size,
    }
    (out / SLIDES_FILE).write_text(json.dumps(catalog))
    return {"tiles": tissue, "labels": labels, "size0": tissue[0].size0 if tissue else None}
