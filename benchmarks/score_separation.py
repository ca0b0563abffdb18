"""What the best similarity of a search tells a user: in-domain queries against out-of-domain inputs.

For each model (``default``, ``untrained``, and the bare backbone ``gap``), embeds the LC25000 lung and
colon galleries and their query sets (never trained on), the ``crc_samples`` tiles (another dataset,
never trained on) and crops of scikit-image's photographs, then prints, per kind of input, the
distribution of the top-1 cosine similarity, the share that falls below the gallery's close-match
threshold (``index_build.calibration``; what ``python -m index_build`` writes into the manifest), and
the AUROC between in-domain queries and each out-of-domain set.

    python benchmarks/score_separation.py                       # default, untrained and gap
    python benchmarks/score_separation.py --models default --data ../shared/data
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from index_build.calibration import close_match_threshold  # noqa: E402
from index_build.evaluate import BackboneEmbedder  # noqa: E402
from index_build.metrics import auroc  # noqa: E402
from index_build.models import load_model  # noqa: E402
from index_build.sources import IMAGE_EXTENSIONS  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "camera", "coins", "brick")


def photo_crops(seed: int = 0, per_image: int = 5) -> list[Image.Image]:
    """Random square crops (a quarter to a half of the short side) of scikit-image's photographs, 224 px:
    inputs with no tissue (also used by ``tests/test_default_model.py``)."""
    import skimage.data as sd

    rng = np.random.default_rng(seed)
    out = []
    for name in PHOTOS:
        image = Image.fromarray(getattr(sd, name)()).convert("RGB")
        w, h = image.size
        for _ in range(per_image):
            side = int(rng.integers(min(w, h) // 4, min(w, h) // 2 + 1))
            x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            out.append(image.crop((x0, y0, x0 + side, y0 + side)).resize((224, 224)))
    return out


def folder(root: Path) -> tuple[list[Path], list[str]]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    return files, [p.parent.name for p in files]


def embed(embedder, paths: list[Path]) -> np.ndarray:
    return embedder.embed_images([Image.open(p).convert("RGB") for p in paths], batch_size=32)


def top1(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    return (queries @ gallery.T).max(axis=1)


def run(name: str, data: Path) -> list[tuple]:
    base = load_model("untrained" if name == "gap" else name, device="cpu")
    embedder = BackboneEmbedder(base, "gap") if name == "gap" else base
    sets = {}
    for key, path in {
        "lung_g": data / "lc25000_lung" / "gallery",
        "lung_q": data / "lc25000_lung" / "query",
        "colon_g": data / "lc25000_colon" / "gallery",
        "colon_q": data / "lc25000_colon" / "query",
        "crc": data / "crc_samples",
    }.items():
        files, labels = folder(path)
        sets[key] = (embed(embedder, files), np.array(labels))
    photos = embedder.embed_images(photo_crops(), batch_size=32)
    both = np.concatenate([sets["lung_g"][0], sets["colon_g"][0]])
    thresholds = {
        "lung": close_match_threshold(sets["lung_g"][0])["threshold"],
        "colon": close_match_threshold(sets["colon_g"][0])["threshold"],
        "lung+colon": close_match_threshold(both)["threshold"],
    }
    crc, crc_labels = sets["crc"]
    rows = [
        ("lung queries", "lung", top1(sets["lung_q"][0], sets["lung_g"][0])),
        ("colon queries", "colon", top1(sets["colon_q"][0], sets["colon_g"][0])),
        ("lung + colon queries", "lung+colon", top1(np.concatenate([sets["lung_q"][0], sets["colon_q"][0]]), both)),
        ("photo crops", "lung+colon", top1(photos, both)),
        ("crc_samples tiles (9 classes)", "lung+colon", top1(crc, both)),
        ("crc_samples LYM tiles", "lung", top1(crc[crc_labels == "LYM"], sets["lung_g"][0])),
    ]
    in_domain = rows[2][2]
    out = []
    for label, gallery, values in rows:
        threshold = thresholds[gallery]
        separation = "" if label.endswith("queries") else f"{auroc(in_domain, values):.3f}"
        out.append(
            (
                name,
                label,
                gallery,
                len(values),
                *np.percentile(values, [5, 50, 95]),
                threshold,
                float((values < threshold).mean()),
                separation,
            )
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["default", "untrained", "gap"])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    args = parser.parse_args()
    print(
        "| model | inputs | gallery | n | top-1 p5 | p50 | p95 | close-match threshold | below threshold "
        "| AUROC vs in-domain |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for row in run(name, Path(args.data)):
            model, label, gallery, n, p5, p50, p95, threshold, below, separation = row
            print(
                f"| {model} | {label} | {gallery} | {n} | {p5:.3f} | {p50:.3f} | {p95:.3f} | {threshold:.3f} "
                f"| {below:.0%} | {separation} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
