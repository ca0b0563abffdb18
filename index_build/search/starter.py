"""The built-in starter gallery: tiles of scikit-image's bundled IHC image, labelled by a stain rule.

Used when no index is given, so that search works offline on a fresh machine. The gallery is
built once per model and cached in ``<data_dir>/starter/<model key>/``; a few example queries cut
from the same image are written next to it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from index_build.models import Embedder
    from index_build.patch_index import PatchIndex

logger = logging.getLogger(__name__)

STARTER_TILE = 64
STARTER_STRIDE = 32
STARTER_DAB_OD = 0.06  # DAB optical density (after colour deconvolution) counted as stained
STARTER_WHITE = 215  # a pixel whose darkest channel is above this is bare glass
STARTER_RULE = (
    f"each {STARTER_TILE}×{STARTER_TILE} px tile (stride {STARTER_STRIDE} px) is `background` when at least 65% "
    f"of its pixels are bare glass (all channels > {STARTER_WHITE}); otherwise `DAB-positive` when at least 50% "
    f"of its pixels have a DAB optical density above {STARTER_DAB_OD} (colour deconvolution, "
    "`skimage.color.rgb2hed`), `haematoxylin-dominant` when at most 15% do; tiles in between are left out"
)

__all__ = [
    "STARTER_RULE",
    "ensure_starter_index",
    "images_dataset",
    "model_key",
    "starter_description",
    "starter_tiles",
    "write_starter_examples",
]


def starter_tiles() -> tuple[list[Image.Image], list[str], list[str]]:
    """Tiles of ``skimage.data.immunohistochemistry()`` with labels by :data:`STARTER_RULE`.

    Returns:
        ``(images, labels, sources)``; sources name the array slice of each tile.
    """
    from skimage import data
    from skimage.color import rgb2hed

    ihc = data.immunohistochemistry()
    dab = rgb2hed(ihc)[..., 2] > STARTER_DAB_OD
    glass = ihc.min(axis=-1) > STARTER_WHITE
    images, labels, sources = [], [], []
    last = ihc.shape[0] - STARTER_TILE
    for y in range(0, last + 1, STARTER_STRIDE):
        for x in range(0, ihc.shape[1] - STARTER_TILE + 1, STARTER_STRIDE):
            window = np.s_[y : y + STARTER_TILE, x : x + STARTER_TILE]
            if glass[window].mean() >= 0.65:
                label = "background"
            elif dab[window].mean() >= 0.5:
                label = "DAB-positive"
            elif dab[window].mean() <= 0.15:
                label = "haematoxylin-dominant"
            else:
                continue
            images.append(Image.fromarray(ihc[window]))
            labels.append(label)
            sources.append(f"skimage.data.immunohistochemistry()[{y}:{y + STARTER_TILE}, {x}:{x + STARTER_TILE}]")
    return images, labels, sources


def images_dataset(images: Sequence[Image.Image], labels: Sequence[str], sources: Sequence[str]):
    """A ``datasets.Dataset`` with the columns ``build_index`` reads (image, label, source)."""
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.Value("string"), "source": datasets.Value("string")}
    )
    return datasets.Dataset.from_dict(
        {"image": list(images), "label": list(labels), "source": list(sources)}, features=features
    )


def model_key(embedder: Embedder) -> str:
    """Folder name tying a cached index to the exact model (config hash and weights)."""
    return f"{embedder.config_hash}-{embedder.fingerprint}"


def ensure_starter_index(embedder: Embedder, data_dir: Path) -> PatchIndex:
    """Load the starter gallery for this model from ``data_dir``, building it on first use."""
    from index_build.embedding import build_index
    from index_build.patch_index import PatchIndex
    from index_build.storage import has_index

    path = Path(data_dir) / "starter" / model_key(embedder)
    if has_index(path):
        return PatchIndex.load(path, embedder)
    images, labels, sources = starter_tiles()
    logger.info("building the starter gallery (%d tiles of skimage's IHC image) in %s", len(images), path)
    return build_index(images_dataset(images, labels, sources), path, embedder, num_workers=0)


def starter_description(count: int, counts: Counter, size: int, how_to_load: str = "") -> str:
    """Markdown describing a starter gallery of ``count`` patches (``counts`` per label) for a ``size`` px model."""
    per_label = ", ".join(f"{n} `{lab}`" for lab, n in sorted(counts.items()))
    return (
        "**This page runs on its built-in starter gallery, not on a diagnostic reference collection.**\n\n"
        f"It holds {count} patches ({per_label}) cut from the one real tissue image that ships with "
        "scikit-image: `skimage.data.immunohistochemistry()`, a 512×512 px immunohistochemistry image (brown "
        f"DAB stain, blue haematoxylin counterstain), upsampled to the model's {size} px input. Labels follow a "
        f"simple stain rule, not a diagnosis: {STARTER_RULE}. It only shows how the search works; "
        f"H&E queries will find the nearest IHC texture. {how_to_load}"
    ).rstrip()


def write_starter_examples(folder: Path) -> list[str]:
    """Example queries cut from the starter image (written once): a DAB-rich crop, a stroma crop and
    the whole 512 px image (which is tiled). Returns their paths."""
    from skimage import data

    ihc = data.immunohistochemistry()
    crops = {
        "ihc_dab_epithelium_224.png": ihc[0:224, 0:224],
        "ihc_stroma_224.png": ihc[180:404, 288:512],
        "ihc_whole_512.png": ihc,
    }
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, array in crops.items():
        path = folder / name
        if not path.is_file():
            Image.fromarray(array).save(path)
        paths.append(str(path))
    return paths
