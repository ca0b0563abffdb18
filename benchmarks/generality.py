"""The generality protocol: does a model hold on tissue, labs and magnifications it never saw?

One table for the bare backbone (GAP), the untrained neck and head, the shipped default and each
candidate recipe (issue 19). Every number is exact cosine search; Recall@1 and mMV@5.

- **Leave one organ out.** Models trained on the lung gallery alone and on the colon gallery alone
  (``--lung-only`` / ``--colon-only``: Hub folders or neck-and-head files made with the same
  recipe) are evaluated on the organ they never saw (colon queries against the colon gallery, lung
  queries against the lung gallery) and on ``crc_samples`` (leave-one-out). A recipe generalises
  when the model that never saw an organ is still at or above GAP on it.
- **Seen organs.** Lung and colon queries against their galleries, ``crc_samples`` leave-one-out.
- **Stain, scanner and magnification shift** (no new labels): the lung and colon queries under HED
  stain jitter (``hed``: each of the three stain channels of ``skimage.color.rgb2hed`` scaled by
  ``1 ± 0.05``, seeded per image; ``hed+shift``: also shifted by ``± 0.05`` of its range), JPEG
  quality 50, Gaussian blur (radius 1 px), and rescaled by
  0.5x (reflection-padded back to 224 px) and 2x (centre crop), searched against the unperturbed
  gallery. The table gives the drop in Recall@1 from the clean queries.
- **Crop localisation on unseen tissue.** The skin slide ``slides/cmu_small_region.svs`` tiled at
  0.5 µm/px (224 px tiles, the tissue rule of ``index_build.wsi``); every tissue tile's crop shifted
  by a quarter and by half a tile (both axes) is searched against the tiles; a hit is a rank-1 tile
  that overlaps the crop.
- **Out-of-domain separation.** AUROC of the best similarity against the lung + colon gallery,
  lung + colon queries against photo crops (``score_separation.photo_crops``).

A candidate ``name+g=W`` is the model's descriptor with the global branch of ``LgffemConfig``
(``global_weight = W``): the L2-normalised trained descriptor concatenated with ``W`` times the
L2-normalised GAP of the backbone's last stage, renormalised. The backbone is shared and frozen, so
one backbone pass per image serves every model and weight.

    .venv/bin/python benchmarks/generality.py --data ../shared/data \\
        --lung-only artifacts/lung-only --colon-only artifacts/colon-only --weights 0 0.5 1
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from score_separation import folder, photo_crops  # noqa: E402

from index_build.metrics import auroc, majority_vote_at_k, recall_at_k  # noqa: E402
from index_build.models import default_model, load_neck_head, untrained_model  # noqa: E402

SHIFTS = ("hed", "hed+shift", "jpeg50", "blur", "scale0.5", "scale2")
K = 5


# -- perturbations ---------------------------------------------------------------------------------


def hed_jitter(image: Image.Image, rng: np.random.Generator, amount: float = 0.05, shift: bool = False) -> Image.Image:
    """Scale each HED stain channel by ``1 ± amount`` (and, with ``shift``, move it by ``± amount``
    of the image's range of that channel: a stronger perturbation, reported beside)."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(np.asarray(image, dtype=np.float64) / 255.0)
    span = hed.reshape(-1, 3).max(0) - hed.reshape(-1, 3).min(0)
    alpha = rng.uniform(1 - amount, 1 + amount, 3)
    beta = rng.uniform(-amount, amount, 3) * span * shift
    rgb = hed2rgb(hed * alpha + beta)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8))


def jpeg(image: Image.Image, quality: int = 50) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def rescale(image: Image.Image, factor: float, side: int = 224) -> Image.Image:
    """``factor`` x magnification, brought back to ``side`` px: centre crop (zoom in) or reflection pad."""
    w, h = image.size
    scaled = image.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.BICUBIC)
    a = np.asarray(scaled)
    if a.shape[0] < side:
        ph, pw = side - a.shape[0], side - a.shape[1]
        a = np.pad(a, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode="reflect")
    y0, x0 = (a.shape[0] - side) // 2, (a.shape[1] - side) // 2
    return Image.fromarray(np.ascontiguousarray(a[y0 : y0 + side, x0 : x0 + side]))


def shifted(image: Image.Image, shift: str, seed: int) -> Image.Image:
    if shift in ("hed", "hed+shift"):
        return hed_jitter(image, np.random.default_rng(seed), shift=shift == "hed+shift")
    if shift == "jpeg50":
        return jpeg(image, 50)
    if shift == "blur":
        return image.filter(ImageFilter.GaussianBlur(radius=1))
    if shift == "scale0.5":
        return rescale(image, 0.5)
    if shift == "scale2":
        return rescale(image, 2.0)
    raise ValueError(shift)


# -- descriptors -------------------------------------------------------------------------------------


class Descriptors:
    """One backbone pass per image; the trained descriptor of each model and the GAP descriptor.

    With ``cache``, each model's descriptors of each set are kept under
    ``cache/<state fingerprint>/<set>.npy`` (``gap``: under the backbone's fingerprint), so a
    second run embeds only what a new candidate needs.
    """

    def __init__(self, models: dict[str, torch.nn.Module], cache: Path | None = None, batch_size: int = 32) -> None:
        from index_build.models import LgffemImageProcessor, state_fingerprint

        self.models = models
        self.base = next(iter(models.values()))
        self.batch_size = batch_size
        self.processor = LgffemImageProcessor.from_config(self.base.config)
        self.cache = cache
        self.keys = {name: state_fingerprint(m) for name, m in models.items()}
        self.keys["gap"] = "gap-" + state_fingerprint(self.base.backbone)

    def _file(self, name: str, key: str) -> Path | None:
        return self.cache / self.keys[name] / f"{key.replace('/', '_').replace(':', '_')}.npy" if self.cache else None

    @torch.inference_mode()
    def __call__(self, key: str, make_images) -> dict[str, np.ndarray]:
        done = {}
        for name in [*self.models, "gap"]:
            path = self._file(name, key)
            if path is not None and path.is_file():
                done[name] = np.load(path)
        todo = [name for name in [*self.models, "gap"] if name not in done]
        if not todo:
            return done
        images = make_images()
        out: dict[str, list[np.ndarray]] = {name: [] for name in todo}
        for i in range(0, len(images), self.batch_size):
            pixels = self.processor(images[i : i + self.batch_size], return_tensors="pt")["pixel_values"]
            maps = self.base.backbone_features(pixels)
            for name in todo:
                if name == "gap":
                    out[name].append(F.normalize(maps[-1].float().mean(dim=(-2, -1)), dim=-1).numpy())
                else:
                    out[name].append(self.models[name].embed_features(maps, normalize=True)[0].numpy())
        for name, parts in out.items():
            done[name] = np.concatenate(parts)
            path = self._file(name, key)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, done[name])
        return done


def combine(trained: np.ndarray, gap: np.ndarray, weight: float) -> np.ndarray:
    """The global-branch descriptor: ``normalize([t, weight * g])`` (``weight = 0``: ``t``)."""
    if weight == 0:
        return trained
    x = np.concatenate([trained, weight * gap], axis=1)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def retrieval(xq, yq, xb, yb, leave_one_out: bool = False) -> tuple[float, float]:
    sims = xq @ xb.T
    if leave_one_out:
        np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :K]
    retrieved = np.asarray(yb, dtype=object)[order]
    return recall_at_k(yq, retrieved, 1), majority_vote_at_k(yq, retrieved, K)


# -- the slide -----------------------------------------------------------------------------------------


def slide_crops(path: Path, tile_size: int = 224) -> tuple[list[Image.Image], list[tuple[int, int]], dict]:
    """The slide's tissue tiles and, per shift, crops shifted from each tile (inside the slide)."""
    from index_build.wsi.reading import open_slide, read_tile, tile_slide

    slide = open_slide(path)
    tiles, _ = tile_slide(slide, tile_size=tile_size)
    images = [read_tile(slide, t, tile_size) for t in tiles]
    boxes = [(t.x, t.y) for t in tiles]
    size0 = tiles[0].size0
    crops = {}
    for name, fraction in (("1/4", 0.25), ("1/2", 0.5)):
        d = round(size0 * fraction)
        inside = [(x + d, y + d) for x, y in boxes if x + d + size0 <= slide.width and y + d + size0 <= slide.height]
        crops[name] = (
            [slide.read_region(x, y, size0, size0, tile_size, tile_size) for x, y in inside],
            inside,
        )
    return images, boxes, {"size0": size0, **crops}


def localisation(xq, crops_at, xb, boxes, size0) -> float:
    """Share of crops whose rank-1 tile overlaps them."""
    best = np.argmax(xq @ xb.T, axis=1)
    hits = [abs(boxes[j][0] - cx) < size0 and abs(boxes[j][1] - cy) < size0 for j, (cx, cy) in zip(best, crops_at)]
    return float(np.mean(hits))


# -- the protocol ------------------------------------------------------------------------------------


def load(path: Path) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in path]


def load_candidate(path: str) -> torch.nn.Module:
    p = Path(path)
    if p.is_file():
        return load_neck_head(p)
    if (p / "neck_head.safetensors").is_file():
        return load_neck_head(p / "neck_head.safetensors")
    from index_build.models import load_model

    return load_model(str(p), device="cpu").model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--lung-only", help="model trained on the lung gallery alone (same recipe)")
    parser.add_argument("--colon-only", help="model trained on the colon gallery alone (same recipe)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH", help="more candidates")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.5, 1.0], help="global-branch weights")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path("artifacts/generality"), help="descriptor cache")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    models = {"untrained": untrained_model(), "default": default_model()}
    for name, path in (("lung-only", args.lung_only), ("colon-only", args.colon_only)):
        if path:
            models[name] = load_candidate(path)
    for spec in args.model:
        name, _, path = spec.partition("=")
        models[name] = load_candidate(path)
    describe = Descriptors(models, cache=args.cache)

    d = args.data
    sets = {key: folder(d / rel) for key, rel in [
        ("lung_g", "lc25000_lung/gallery"), ("lung_q", "lc25000_lung/query"),
        ("colon_g", "lc25000_colon/gallery"), ("colon_q", "lc25000_colon/query"),
        ("crc", "crc_samples"),
    ]}  # fmt: skip
    emb, labels = {}, {}
    for key, (paths, ys) in sets.items():
        labels[key] = ys
        emb[key] = describe(key, lambda paths=paths: load(paths))
        if key.endswith("_q"):
            for shift in SHIFTS:
                emb[f"{key}:{shift}"] = describe(
                    f"{key}:{shift}",
                    lambda paths=paths, shift=shift: [shifted(im, shift, i) for i, im in enumerate(load(paths))],
                )
        print(f"embedded {key}: {len(paths)} images (+ shifts) at {time.perf_counter() - start:.0f} s", flush=True)
    emb["photos"] = describe("photos", photo_crops)
    tiles, boxes, crops = slide_crops(d / "slides" / "cmu_small_region.svs")
    emb["skin"] = describe("skin", lambda: tiles)
    for shift in ("1/4", "1/2"):
        emb[f"skin:{shift}"] = describe(f"skin:{shift}", lambda shift=shift: crops[shift][0])
    print(f"embedded the skin slide: {len(tiles)} tissue tiles at {time.perf_counter() - start:.0f} s", flush=True)

    def vectors(key: str, model: str, weight: float) -> np.ndarray:
        e = emb[key]
        return e["gap"] if model == "gap" else combine(e[model], e["gap"], weight)

    candidates = [("gap", 0.0)] + [(m, w) for m in models for w in args.weights if not (m == "untrained" and w)]
    header = ["candidate", "lung", "colon", "crc", *[f"Δ{s}" for s in SHIFTS], "skin 1/4", "skin 1/2", "AUROC"]
    rows = []
    for model, weight in candidates:
        name = model if model == "gap" or weight == 0 else f"{model}+g={weight:g}"
        v = {key: vectors(key, model, weight) for key in emb}
        lung = retrieval(v["lung_q"], labels["lung_q"], v["lung_g"], labels["lung_g"])
        colon = retrieval(v["colon_q"], labels["colon_q"], v["colon_g"], labels["colon_g"])
        crc = retrieval(v["crc"], labels["crc"], v["crc"], labels["crc"], leave_one_out=True)
        drops = []
        for shift in SHIFTS:
            lung_s = retrieval(v[f"lung_q:{shift}"], labels["lung_q"], v["lung_g"], labels["lung_g"])[0]
            colon_s = retrieval(v[f"colon_q:{shift}"], labels["colon_q"], v["colon_g"], labels["colon_g"])[0]
            drops.append(f"{lung[0] - lung_s:+.3f}/{colon[0] - colon_s:+.3f}")
        loc = [localisation(v[f"skin:{s}"], crops[s][1], v["skin"], boxes, crops["size0"]) for s in ("1/4", "1/2")]
        gallery = np.concatenate([v["lung_g"], v["colon_g"]])
        inside = np.concatenate([v["lung_q"], v["colon_q"]])
        sep = auroc((inside @ gallery.T).max(1), (v["photos"] @ gallery.T).max(1))
        rows.append(
            [
                name,
                *(f"{a:.3f} / {b:.3f}" for a, b in (lung, colon, crc)),
                *drops,
                *(f"{x:.3f}" for x in loc),
                f"{sep:.3f}",
            ]  # fmt: skip
        )
    print(f"\n{len(tiles)} skin tiles; Δshift = Recall@1 drop lung/colon; {time.perf_counter() - start:.0f} s in all\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
