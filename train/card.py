"""The model card (``README.md``) of a trained LGFFEM folder: Hub metadata, usage, training, evaluation."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from huggingface_hub import EvalResult, ModelCardData

from train.config import TrainConfig

logger = logging.getLogger(__name__)

BASE_TAGS = ("lgffem", "histopathology", "pathology", "image-retrieval", "metric-learning", "sub-center-arcface")
PAPER = (
    "Nuñez-Fernández, Farias, Solar, *Content-Based Histopathological Image Retrieval*, "
    "Sensors 2025, 25(5):1350, doi:10.3390/s25051350"
)


def _is_hub_id(source: Optional[str]) -> bool:
    return bool(source) and not os.path.exists(source) and source.count("/") == 1 and not source.startswith((".", "/"))


def _dataset_name(source: Optional[str]) -> str:
    if not source:
        return "evaluation set"
    if _is_hub_id(source):
        return source
    path = Path(source.rstrip("/"))
    # "lc25000_lung/gallery" says more than "gallery"
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name or source


def card_metadata(cfg: TrainConfig, history: Sequence[dict[str, Any]]) -> ModelCardData:
    """Hub metadata: library, pipeline tag, tags, datasets, licence and the final evaluation."""
    datasets = list(cfg.card_datasets) or [s for s in (*cfg.dataset, cfg.eval_gallery) if _is_hub_id(s)]
    tags = list(dict.fromkeys([*BASE_TAGS, *cfg.tags]))
    final = next((row for row in reversed(history) if row.get("recall@1") not in (None, "")), None)
    eval_results = None
    if final is not None:
        name = _dataset_name(cfg.eval_gallery)
        eval_results = [
            EvalResult(
                task_type="image-feature-extraction",
                task_name="Image retrieval",
                dataset_type=name,
                dataset_name=name,
                dataset_split=cfg.eval_queries_split or cfg.eval_gallery_split,
                metric_type=metric,
                metric_name=label,
                metric_value=round(float(final[key]), 4),
            )
            for key, metric, label in (
                ("recall@1", "recall_at_1", "Recall@1"),
                (f"mmv@{cfg.eval_k}", f"mmv_at_{cfg.eval_k}", f"mMV@{cfg.eval_k}"),
            )
            if final.get(key) not in (None, "")
        ]
    return ModelCardData(
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        license=cfg.license,
        tags=tags,
        datasets=datasets or None,
        model_name=cfg.model_name or "lgffem",
        eval_results=eval_results,
    )


def _evaluation_table(history: Sequence[dict[str, Any]], k: int) -> str:
    rows = [r for r in history if r.get("recall@1") not in (None, "")]
    if not rows:
        return "No retrieval evaluation was run during training (`--eval-gallery`)."
    lines = [f"| epoch | Recall@1 | Recall@{k} | mMV@{k} | mAP@{k} |", "|---|---|---|---|---|"]
    for r in rows:
        cells = [
            f"{float(r[c]):.4f}" if r.get(c) not in (None, "") else ""
            for c in ("recall@1", f"recall@{k}", f"mmv@{k}", f"map@{k}")
        ]
        name = "0 (before training)" if r["epoch"] == 0 else str(r["epoch"])
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_card(
    cfg: TrainConfig,
    classes: Sequence[str],
    history: Sequence[dict[str, Any]],
    model_config: dict,
    num_train_images: int,
    embedding_dim: Optional[int] = None,
) -> str:
    """The full ``README.md`` text (YAML front matter + body); ``embedding_dim``: the model's
    descriptor length (default ``4 * neck_channels``, the length without a global branch)."""
    dim = embedding_dim or 4 * model_config["neck_channels"]
    weight = float(model_config.get("global_weight") or 0)
    repo = cfg.model_name if cfg.model_name and "/" in cfg.model_name else "ORG/NAME"
    title = cfg.model_name or "LGFFEM"
    train_rows = [r for r in history if r.get("epoch", 0) > 0 and r.get("images_per_s") not in (None, "")]
    speed = (
        f"{sum(float(r['images_per_s']) for r in train_rows) / len(train_rows):.2f} images/s on average"
        if train_rows
        else "n/a"
    )
    eval_source = (
        f"queries `{_dataset_name(cfg.eval_queries)}` against gallery `{_dataset_name(cfg.eval_gallery)}`"
        if cfg.eval_queries
        else f"`{_dataset_name(cfg.eval_gallery)}`, leave-one-out"
    )
    hyper = [
        ("backbone (frozen)", f"`{model_config['backbone']}`, out_indices {model_config['out_indices']}"),
        ("neck", f"C = {model_config['neck_channels']}, L = {model_config['neck_layers']}"),
        (
            "descriptor",
            f"{dim} dims, L2-normalised"
            + (
                f": the trained {4 * model_config['neck_channels']} and the backbone's pooled last stage, "
                f"weight {weight:g} (`global_weight`)"
                if weight
                else ""
            ),
        ),
        (
            "input",
            f"{model_config['image_size']} px, mean {model_config['image_mean']}, std {model_config['image_std']}",
        ),
        ("loss", f"Sub-center ArcFace: margin {cfg.margin}°, scale {cfg.scale}, {cfg.sub_centers} sub-centres"),
        (
            "generality",
            f"relational distillation ({cfg.distill_mode}) from the backbone's GAP descriptor, "
            f"weight {cfg.distill_weight}"
            + (f", temperature {cfg.distill_temperature}" if cfg.distill_mode == "kl" else "")
            if cfg.distill_weight > 0
            else "none (class loss only)",
        ),
        (
            "backbone features",
            f"cached per image and flip/rotation ({cfg.feature_cache_dtype}); blur drawn once per pair"
            if cfg.feature_cache == "auto"
            else "computed on every step",
        ),
        ("optimiser (model)", f"AdamW lr {cfg.lr}, weight decay {cfg.weight_decay}, grad clip {cfg.grad_clip}"),
        ("optimiser (loss)", f"AdamW lr {cfg.loss_lr}, weight decay {cfg.loss_weight_decay}"),
        ("schedule", f"CosineAnnealingWarmRestarts T_0 = {cfg.t0}, T_mult = {cfg.t_mult}, eta_min {cfg.eta_min}"),
        ("epochs / batch", f"{cfg.epochs} / {cfg.batch_size} per device, seed {cfg.seed}"),
        (
            "augmentation",
            (
                f"h/v flips p={cfg.hflip_p}/{cfg.vflip_p}, rot90 p={cfg.rot90_p}, "
                f"Gaussian blur p={cfg.gaussian_blur_p} sigma {cfg.gaussian_sigma}, "
                f"median blur p={cfg.median_blur_p} sizes {cfg.median_sizes}"
            )
            if cfg.augment
            else "none",
        ),
        ("mixed precision", cfg.mixed_precision),
        (
            "training data",
            f"{' + '.join(f'`{_dataset_name(d)}`' for d in cfg.dataset)}, {num_train_images} images, "
            f"{len(classes)} classes",
        ),
        ("throughput", speed),
    ]
    meta = card_metadata(cfg, history).to_yaml()
    body = (
        f"""---
{meta}
---

# {title}

An **LGFFEM** (Local–Global Feature Fusion Embedding Model) image-embedding model for
content-based retrieval of histopathology patches: a frozen timm backbone, a local–global
fusion neck over four scales and one GeM head per scale give one
{dim}-dimensional descriptor per image; similar tissue has a high
cosine similarity. Architecture and training recipe: {PAPER}.

## Usage

```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

model = AutoModel.from_pretrained("{repo}", trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained("{repo}", trust_remote_code=True)

images = [Image.open("patch1.png"), Image.open("patch2.png")]
with torch.inference_mode():
    emb = model(**processor(images, return_tensors="pt")).embeddings
print(emb.shape)  # N x {dim}, unit-norm rows
print(emb @ emb.T)  # cosine similarities
```

Loading needs no network beyond this repository: the backbone is built without pretrained
weights and filled from `model.safetensors`. To search a collection, index it with FAISS
(`IndexFlatIP` on these normalised vectors) or with the `index_build` tool of LGFFEM Search.

## Training

Trained with `python -m train` (LGFFEM Search): only the neck and head are trained; the
backbone stays frozen in eval mode.

| setting | value |
|---|---|
"""
        + "\n".join(f"| {k} | {v} |" for k, v in hyper)
        + f"""

Classes ({len(classes)}): {", ".join(f"`{c}`" for c in classes)}.

## Evaluation

Retrieval on {eval_source} (cosine similarity, k = {cfg.eval_k}). Recall@1: the top result has
the query's class; mMV@{cfg.eval_k}: the majority class of the top {cfg.eval_k} is the query's.

{_evaluation_table(history, cfg.eval_k)}

The per-epoch log is in `metrics.csv`, the full settings in `training_args.json`.

## Citation

{PAPER}.
"""
    )
    return body


def write_model_card(
    out: Path,
    cfg: TrainConfig,
    classes: Sequence[str],
    history: Sequence[dict[str, Any]],
    num_train_images: int,
    embedding_dim: Optional[int] = None,
) -> Path:
    """Write ``out/README.md`` for the model saved in ``out`` (reads its ``config.json``)."""
    import json

    model_config = json.loads((Path(out) / "config.json").read_text())
    path = Path(out) / "README.md"
    text = model_card(cfg, classes, history, model_config, num_train_images, embedding_dim)
    path.write_text(text, encoding="utf-8")
    return path
