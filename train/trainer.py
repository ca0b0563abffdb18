"""The training loop: frozen backbone, neck + head trained with Sub-center ArcFace, via accelerate.

One script for every device set-up: ``python -m train`` on a CPU or one GPU, and
``accelerate launch -m train ...`` on several GPUs or machines. The backbone runs under
``no_grad`` inside :meth:`LgffemModel.backbone_features`, so none of its activations are kept.

Checkpoints (one folder per epoch, written atomically) hold the full model as safetensors,
the loss's class centres as safetensors, the optimizer, scheduler and grad-scaler states and
every process's torch RNG state; ``--resume`` continues from one and gives exactly the weights
an uninterrupted run would have.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from accelerate import Accelerator
from pytorch_metric_learning.losses import SubCenterArcFaceLoss
from safetensors.torch import load_file, save_file
from torch.optim.lr_scheduler import CosineAnnealingWarmRestarts
from tqdm.auto import tqdm

from configuration_lgffem import LgffemConfig
from image_processing_lgffem import LgffemImageProcessor
from index_build.backbone_weights import default_source, fresh_model
from index_build.storage import write_atomic
from modeling_lgffem import LgffemModel
from train.config import TRAJECTORY_FIELDS, TrainConfig
from train.data import AugmentConfig, EpochSampler, TrainDataset, label_names, seeded_subset
from train.features import FeatureCache, draw_views, gap_descriptor, relational_distillation, worker_init_fn

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-epoch-(\d+)$")
TRAIN_COLUMNS = ("epoch", "step", "loss", "lr", "loss_lr", "images", "seconds", "images_per_s")


def metric_columns(k: int) -> tuple[str, ...]:
    """Columns of ``metrics.csv``: training figures, then the retrieval metrics at depth ``k``."""
    return (*TRAIN_COLUMNS, "recall@1", f"recall@{k}", f"mmv@{k}", f"map@{k}")


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        output_dir: the Hub-ready model folder.
        history: one dict per epoch (the rows of ``metrics.csv``); epoch 0 is the evaluation
            before training when ``eval_before`` was set.
        classes: class names, in class-id order.
        model: the trained model (unwrapped, eval mode).
        loss_state: the loss's state dict (class centres).
    """

    output_dir: Path
    history: list[dict[str, Any]]
    classes: list[str]
    model: LgffemModel
    loss_state: dict[str, torch.Tensor] = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


def build_model(cfg: TrainConfig) -> LgffemModel:
    """A fresh model (``LgffemConfig()`` plus the command-line overrides, on a pretrained
    backbone) or a saved one (``default``, a folder or a Hub id).

    Seed the global torch RNG first: the neck and head initialisation draws from it.
    """
    if cfg.model in ("", "untrained"):
        overrides = cfg.model_overrides()
        config = LgffemConfig(**{k: v for k, v in overrides.items() if k != "backbone_weights"})
        return fresh_model(config, overrides.get("backbone_weights", default_source(config.backbone)))
    from index_build.models import load_model

    return load_model(cfg.model, device="cpu").model


def build_loss(cfg: TrainConfig, num_classes: int, embedding_size: int) -> SubCenterArcFaceLoss:
    """Sub-center ArcFace; pytorch-metric-learning takes the margin in degrees."""
    if num_classes < 2:
        raise ValueError(f"training needs at least 2 classes, got {num_classes}")
    return SubCenterArcFaceLoss(
        num_classes=num_classes,
        embedding_size=embedding_size,
        margin=cfg.margin,
        scale=cfg.scale,
        sub_centers=cfg.sub_centers,
    )


def load_dataset_arg(source: str, split: Optional[str], cfg: TrainConfig):
    """Load a training / evaluation dataset through the retrieval core's loader."""
    from index_build.data import load_image_dataset

    return load_image_dataset(
        source, split=split, image_column=cfg.image_column, label_column=cfg.label_column, revision=cfg.revision
    )


def load_training_data(cfg: TrainConfig):
    """The ``--dataset`` sources, concatenated, with string labels (class names stay distinct)."""
    import datasets

    from index_build.data import label_strings

    parts = []
    for source in cfg.dataset:
        ds = load_dataset_arg(source, cfg.split, cfg)
        if len(cfg.dataset) > 1:
            names = label_strings(ds, source=source)
            ds = ds.remove_columns([c for c in ds.column_names if c == "label"]).add_column("label", names)
        parts.append(ds)
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def evaluate_model(
    model: LgffemModel,
    device: torch.device,
    gallery,
    queries,
    k: int,
    batch_size: int,
    num_workers: int = 0,
    progress: bool = True,
) -> dict:
    """Retrieval metrics of ``model`` (queries vs gallery, or leave-one-out on the gallery)."""
    from index_build.evaluate import evaluate
    from index_build.models import Embedder

    was_training = model.training
    model.eval()
    try:
        embedder = Embedder(
            model=model, processor=LgffemImageProcessor.from_config(model.config), model_id="training", device=device
        )
        return evaluate(
            embedder,
            gallery,
            queries,
            k=k,
            leave_one_out=queries is None,
            batch_size=batch_size,
            num_workers=num_workers,
            progress=progress,
        )
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders under ``folder``, oldest epoch first."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = CHECKPOINT_RE.match(child.name)
        if m and child.is_dir() and (child / "trainer_state.json").is_file():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def _resolve_resume(cfg: TrainConfig) -> Optional[Path]:
    """The checkpoint to resume from: ``None`` without ``--resume``, or when ``--resume`` (latest) finds none.

    Raises:
        FileNotFoundError: ``--resume PATH`` names a folder that is not a complete checkpoint.
    """
    if cfg.resume is None:
        return None
    if cfg.resume == "latest":
        found = list_checkpoints(cfg.checkpoints)
        if not found:  # e.g. killed during epoch 1 or while its first checkpoint was written
            logger.warning("--resume: no complete checkpoint in %s; starting from scratch", cfg.checkpoints)
            return None
        return found[-1]
    path = Path(cfg.resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--resume: {path} is not a checkpoint folder (no trainer_state.json)")
    return path


def _check_resumable(cfg: TrainConfig, state: dict, classes: list[str], num_processes: int) -> None:
    saved = state["config"]
    diff = [
        f"{k}: {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in TRAJECTORY_FIELDS if saved.get(k) != getattr(cfg, k)
    ]
    if diff:
        raise ValueError("cannot resume: these settings differ from the checkpoint's: " + "; ".join(diff))
    if state["classes"] != classes:
        raise ValueError(f"cannot resume: the checkpoint's classes {state['classes']} differ from the data's {classes}")
    if state["num_processes"] != num_processes:
        logger.warning(
            "resuming with %d processes, the checkpoint was written by %d: batches differ from an uninterrupted run",
            num_processes,
            state["num_processes"],
        )


def _state_to_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_checkpoint(
    folder: Path,
    accelerator: Accelerator,
    model: LgffemModel,
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_optimizer: torch.optim.Optimizer,
    scheduler: CosineAnnealingWarmRestarts,
    state: dict[str, Any],
) -> None:
    """Write one checkpoint folder atomically (temporary folder, then rename)."""
    rank = accelerator.process_index
    tmp = folder.with_name(folder.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng_state_{rank}.pt")
    if accelerator.is_main_process:
        save_file(_state_to_cpu(model.state_dict()), tmp / "model.safetensors")
        save_file(_state_to_cpu(loss_fn.state_dict()), tmp / "loss.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(loss_optimizer.state_dict(), tmp / "loss_optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        _write_json_atomic(tmp / "trainer_state.json", state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    accelerator.wait_for_everyone()


def load_checkpoint(
    folder: Path,
    accelerator: Accelerator,
    model: LgffemModel,
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_optimizer: torch.optim.Optimizer,
    scheduler: CosineAnnealingWarmRestarts,
) -> None:
    """Restore everything :func:`save_checkpoint` wrote (RNG state last)."""
    device = accelerator.device
    model.load_state_dict(load_file(folder / "model.safetensors", device=str(device)))
    loss_fn.load_state_dict(load_file(folder / "loss.safetensors", device=str(device)))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=device, weights_only=True))
    loss_optimizer.load_state_dict(torch.load(folder / "loss_optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    if accelerator.scaler is not None and (folder / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
    rng_file = folder / f"rng_state_{accelerator.process_index}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:
        logger.warning("%s has no RNG state for process %d", folder, accelerator.process_index)


def _prune_checkpoints(folder: str, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old)


def write_metrics_csv(path: Path, history: list[dict[str, Any]], k: int = 5) -> None:
    """Rewrite ``metrics.csv`` (one row per epoch) atomically."""
    columns = metric_columns(k)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in columns})
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def train(cfg: TrainConfig, train_dataset=None, eval_gallery=None, eval_queries=None) -> TrainResult:
    """Train LGFFEM's neck and head and export a Hub-ready folder to ``cfg.output_dir``.

    Args:
        cfg: the run's settings.
        train_dataset: a ``datasets.Dataset`` with ``image`` and ``label`` columns; loaded
            from ``cfg.dataset`` when ``None``.
        eval_gallery: evaluation gallery dataset; loaded from ``cfg.eval_gallery`` when ``None``.
        eval_queries: evaluation query dataset; loaded from ``cfg.eval_queries`` when ``None``.
            Without queries the gallery is evaluated leave-one-out.

    Returns:
        :class:`TrainResult`.
    """
    if not cfg.output_dir:
        raise ValueError("output_dir is required")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu)
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)

    # ---- data
    if train_dataset is None:
        if not cfg.dataset:
            raise ValueError("no training data: give --dataset")
        train_dataset = load_training_data(cfg)
    train_dataset = seeded_subset(train_dataset, cfg.max_samples, cfg.seed)
    classes = label_names(train_dataset)
    if eval_gallery is None and cfg.eval_gallery:
        eval_gallery = load_dataset_arg(cfg.eval_gallery, cfg.eval_gallery_split, cfg)
    if eval_queries is None and cfg.eval_queries:
        eval_queries = load_dataset_arg(cfg.eval_queries, cfg.eval_queries_split, cfg)

    # ---- model, loss, optimisers (seeded: the neck/head and class-centre init draw from torch's RNG)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    model.train()
    loss_fn = build_loss(cfg, len(classes), model.config.embedding_dim).to(accelerator.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_optimizer = torch.optim.AdamW(loss_fn.parameters(), lr=cfg.loss_lr, weight_decay=cfg.loss_weight_decay)
    scheduler = CosineAnnealingWarmRestarts(optimizer, T_0=cfg.t0, T_mult=cfg.t_mult, eta_min=cfg.eta_min)

    processor = LgffemImageProcessor.from_config(model.config)
    augment_cfg = (
        AugmentConfig(
            cfg.hflip_p,
            cfg.vflip_p,
            cfg.rot90_p,
            cfg.gaussian_blur_p,
            tuple(cfg.gaussian_sigma),
            cfg.median_blur_p,
            tuple(cfg.median_sizes),
        )
        if cfg.augment
        else None
    )
    dataset = TrainDataset(train_dataset, classes, processor, augment_cfg, cfg.seed)
    sampler = EpochSampler(len(dataset), cfg.seed)
    cache = None
    if cfg.feature_cache == "auto" and accelerator.num_processes > 1:
        logger.info(
            "feature cache off: it serves one process; %d processes run the backbone", accelerator.num_processes
        )
    elif cfg.feature_cache == "auto":
        with torch.no_grad():
            probe = model.backbone_features(torch.zeros(1, 3, model.config.image_size, model.config.image_size))
        dtype = getattr(torch, cfg.feature_cache_dtype)
        cache = FeatureCache(len(dataset), [tuple(m.shape[1:]) for m in probe], dtype)
    loader = torch.utils.data.DataLoader(
        IndexDataset(dataset.targets) if cache is not None else dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=0 if cache is not None else cfg.num_workers,
        pin_memory=accelerator.device.type == "cuda",
        worker_init_fn=worker_init_fn(),  # workers die with the trainer, even when it is killed
    )
    # The loss is not prepared: accelerate would run its forward under autocast, and the
    # ArcFace logits need float32. Its gradients are averaged across processes by hand.
    model, optimizer, loss_optimizer, loader = accelerator.prepare(model, optimizer, loss_optimizer, loader)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(dataset)} training images give no full batch of {cfg.batch_size} per process "
            f"({accelerator.num_processes} processes): lower --batch-size"
        )
    raw_model = accelerator.unwrap_model(model)

    # ---- resume
    start_epoch, global_step, history = 0, 0, []
    resume_from = _resolve_resume(cfg)
    if resume_from is not None:
        state = json.loads((resume_from / "trainer_state.json").read_text())
        _check_resumable(cfg, state, classes, accelerator.num_processes)
        load_checkpoint(resume_from, accelerator, raw_model, loss_fn, optimizer, loss_optimizer, scheduler)
        start_epoch, global_step, history = state["epoch"], state["global_step"], state["history"]
        logger.info("resumed from %s (epoch %d, step %d)", resume_from, start_epoch, global_step)

    logger.info(
        "training %s: %d images, %d classes, %d steps/epoch x %d epochs, device %s x %d, mixed precision %s, "
        "feature cache %s",
        cfg.model,
        len(dataset),
        len(classes),
        steps_per_epoch,
        cfg.epochs,
        accelerator.device,
        accelerator.num_processes,
        cfg.mixed_precision,
        cfg.feature_cache_dtype if cache is not None else "off",
    )

    def embed_batch(batch, views) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Un-normalised descriptors of a batch, and the backbone's GAP descriptor (teacher)."""
        if cache is not None:
            indices, _ = batch
            maps = cache.get(indices.cpu(), torch.from_numpy(views[indices.cpu().numpy()]), accelerator.device)
        elif accelerator.num_processes == 1:
            maps = raw_model.backbone_features(batch[0])
        else:  # the wrapped model's forward keeps the gradients synchronised across processes
            pixels = batch[0]
            embeddings = model(pixels, normalize=False).embeddings.float()
            teacher = gap_descriptor(raw_model.backbone_features(pixels)) if cfg.distill_weight > 0 else None
            return embeddings, teacher
        # channels-last on both paths (same arithmetic, same model): the neck's 1x1 convolutions and
        # elementwise gates run about 10% faster under autograd on that layout than on NCHW
        maps = [m.contiguous(memory_format=torch.channels_last) for m in maps]
        with accelerator.autocast():
            embeddings, _ = raw_model.embed_features(maps, normalize=False)
        return embeddings.float(), gap_descriptor(maps) if cfg.distill_weight > 0 else None

    def evaluate_now() -> dict:
        if eval_gallery is None or not accelerator.is_main_process:
            return {}
        with torch.random.fork_rng(devices=[]):  # the eval DataLoader draws from torch's RNG
            return evaluate_model(
                raw_model,
                accelerator.device,
                eval_gallery,
                eval_queries,
                cfg.eval_k,
                cfg.eval_batch_size,
                cfg.num_workers,
                cfg.progress,
            )

    if cfg.eval_before and start_epoch == 0 and eval_gallery is not None:
        metrics = evaluate_now()
        history.append({"epoch": 0, "step": 0, **_eval_columns(metrics, cfg.eval_k)})
        logger.info("before training: %s", _fmt_eval(metrics, cfg.eval_k))

    def fill_cache(epoch: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Draw the epoch's views and fill the cache with the (image, view) pairs it lacks."""
        views = draw_views(len(dataset), cfg.seed, epoch, augment_cfg)
        pairs = cache.missing(range(len(dataset)), views)
        cache.fill(
            raw_model,
            dataset.dataset,
            pairs,
            processor,
            augment_cfg,
            cfg.seed,
            accelerator.device,
            batch_size=cfg.eval_batch_size,
            num_workers=cfg.num_workers,
            progress=cfg.progress and accelerator.is_local_main_process,
            autocast=accelerator.autocast,
        )
        return views, pairs

    if cache is not None and start_epoch > 0:
        # A backbone batch's composition can change the last bits of its maps, so a resumed run
        # refills the cache exactly as the uninterrupted run did, epoch by epoch, batch by batch:
        # its maps, and so its weights, are then bit-identical.
        replay_start = time.perf_counter()
        for epoch in range(start_epoch):
            fill_cache(epoch)
        logger.info(
            "resume: refilled the feature cache of epochs 1-%d (%d (image, view) pairs) in %.1f s",
            start_epoch,
            int(cache.filled.sum()),
            time.perf_counter() - replay_start,
        )

    ckpt_root = Path(cfg.checkpoints)
    for epoch in range(start_epoch, cfg.epochs):
        # accelerate's loader re-sets its sampler's epoch from its own counter, which starts at 0
        # in a resumed process: give it the true epoch.
        loader.set_epoch(epoch)
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        views, fill_seconds = None, 0.0
        if cache is not None:
            fill_start = time.perf_counter()
            views, pairs = fill_cache(epoch)
            fill_seconds = time.perf_counter() - fill_start
            logger.info(
                "epoch %d: backbone features for %d new (image, view) pairs in %.1f s; cache holds %.2f GB",
                epoch + 1,
                len(pairs),
                fill_seconds,
                cache.nbytes_filled / 1e9,
            )
        model.train()
        loss_sum = torch.zeros((), device=accelerator.device)
        bar = tqdm(
            loader,
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not (cfg.progress and accelerator.is_local_main_process),
            dynamic_ncols=True,
        )
        start = time.perf_counter()
        for i, batch in enumerate(bar):
            labels = batch[1]
            embeddings, teacher = embed_batch(batch, views)
            loss = loss_fn(embeddings, labels)
            if teacher is not None:
                loss = loss + cfg.distill_weight * relational_distillation(
                    embeddings, teacher, cfg.distill_temperature, cfg.distill_mode
                )
            optimizer.zero_grad(set_to_none=True)
            loss_optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if accelerator.num_processes > 1:
                for p in loss_fn.parameters():
                    if p.grad is not None:
                        p.grad = accelerator.reduce(p.grad, reduction="mean")
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(trainable, cfg.grad_clip)
            optimizer.step()
            loss_optimizer.step()
            scheduler.step(epoch + (i + 1) / steps_per_epoch)
            global_step += 1
            loss_sum += loss.detach()
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        seconds = time.perf_counter() - start + fill_seconds  # the backbone's share counts too
        bar.close()
        images = steps_per_epoch * cfg.batch_size * accelerator.num_processes
        mean_loss = accelerator.reduce(loss_sum, reduction="mean").item() / steps_per_epoch
        row = {
            "epoch": epoch + 1,
            "step": global_step,
            "loss": round(mean_loss, 6),
            "lr": optimizer.param_groups[0]["lr"],
            "loss_lr": loss_optimizer.param_groups[0]["lr"],
            "images": images,
            "seconds": round(seconds, 3),
            "images_per_s": round(images / seconds, 3),
        }
        history.append(row)
        logger.info("epoch %d/%d: loss %.4f, %.2f images/s", epoch + 1, cfg.epochs, mean_loss, images / seconds)
        # Checkpoint first, so a failing evaluation never loses the epoch; the evaluation runs
        # on a forked RNG, so evaluating or not leaves the training trajectory unchanged.
        folder = ckpt_root / f"checkpoint-epoch-{epoch + 1:03d}"
        state = {
            "epoch": epoch + 1,
            "global_step": global_step,
            "classes": classes,
            "num_processes": accelerator.num_processes,
            "num_train_images": len(dataset),
            "config": cfg.to_dict(),
            "model_config": raw_model.config.to_dict(),
            "history": history,
        }
        save_checkpoint(folder, accelerator, raw_model, loss_fn, optimizer, loss_optimizer, scheduler, state)
        if accelerator.is_main_process:
            _prune_checkpoints(cfg.checkpoints, cfg.keep_checkpoints)
            write_metrics_csv(out / "metrics.csv", history, cfg.eval_k)
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            metrics = evaluate_now()
            if metrics:
                row.update(_eval_columns(metrics, cfg.eval_k))
                logger.info("epoch %d/%d: %s", epoch + 1, cfg.epochs, _fmt_eval(metrics, cfg.eval_k))
                _write_json_atomic(folder / "trainer_state.json", state)
                write_metrics_csv(out / "metrics.csv", history, cfg.eval_k)

    # ---- export
    accelerator.wait_for_everyone()
    final = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    final.eval()
    if accelerator.is_main_process:
        from train.card import write_model_card

        final.save_pretrained(out)
        write_metrics_csv(out / "metrics.csv", history, cfg.eval_k)
        (out / "training_args.json").write_text(
            json.dumps({**cfg.to_dict(), "classes": classes, "num_train_images": len(dataset)}, indent=2)
        )
        write_model_card(out, cfg, classes, history, len(dataset), embedding_dim=final.embedding_dim)
        logger.info("wrote %s", out)
    accelerator.wait_for_everyone()
    return TrainResult(
        output_dir=out, history=history, classes=classes, model=final, loss_state=_state_to_cpu(loss_fn.state_dict())
    )


def _write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2)))


class IndexDataset(torch.utils.data.Dataset):
    """Rows -> (row index, class id): the cached path's batches name images, not pixels."""

    def __init__(self, targets: torch.Tensor) -> None:
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return int(i), self.targets[int(i)]


def _eval_columns(metrics: dict, k: int) -> dict:
    if not metrics:
        return {}
    return {c: float(metrics[c]) for c in ("recall@1", f"recall@{k}", f"mmv@{k}", f"map@{k}")}


def _fmt_eval(metrics: dict, k: int) -> str:
    if not metrics:
        return "no evaluation"
    return f"Recall@1 {metrics['recall@1']:.4f}, mMV@{k} {metrics[f'mmv@{k}']:.4f}"
