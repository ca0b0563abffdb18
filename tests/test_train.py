"""python -m train: recipe defaults, augmentations, data order, a tiny end-to-end run, exact resume, export."""

from __future__ import annotations

import csv
import json
import math

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from train.config import TrainConfig, parse_args
from train.data import AugmentConfig, EpochSampler, TrainDataset, augment, label_names, seeded_subset
from train.trainer import build_loss, list_checkpoints, train

TINY = dict(neck_channels=16, neck_layers=1, image_size=64, backbone_weights="none")
COLORS = {"red": (200, 60, 60), "green": (60, 200, 60), "blue": (60, 60, 200)}


def synthetic_dataset(per_class: int = 8, size: int = 64, seed: int = 0) -> datasets.Dataset:
    """Noisy images whose class is their colour: survives flips, rotations and blur."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for name, rgb in COLORS.items():
        for _ in range(per_class):
            noise = rng.normal(0, 40, (size, size, 3))
            images.append(Image.fromarray(np.clip(np.asarray(rgb) + noise, 0, 255).astype(np.uint8)))
            labels.append(name)
    rows = {"image": images, "label": labels, "source": [f"synthetic:{i}" for i in range(len(images))]}
    return datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())


def tiny_cfg(out, **kw) -> TrainConfig:
    args = dict(
        dataset="synthetic",
        output_dir=str(out),
        epochs=2,
        batch_size=8,
        num_workers=0,
        progress=False,
        cpu=True,
        **TINY,
    )
    args.update(kw)
    return TrainConfig(**args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run: 4 epochs, evaluated (leave-one-out) before training and after every epoch."""
    ds = synthetic_dataset()
    out = tmp_path_factory.mktemp("train") / "model"
    cfg = tiny_cfg(
        out,
        epochs=4,
        eval_before=True,
        eval_gallery="synthetic-colours",
        model_name="org/lgffem-tiny",
        card_datasets=["org/colours"],
    )
    return train(cfg, ds, eval_gallery=ds), ds


# --------------------------------------------------------------------------------------
# Recipe and command line
# --------------------------------------------------------------------------------------


def test_defaults_are_the_papers_recipe():
    cfg = parse_args(["--dataset", "d", "--output-dir", "o"])
    assert (cfg.margin, cfg.scale, cfg.sub_centers) == (17.5, 64.0, 6)
    assert (cfg.lr, cfg.weight_decay, cfg.loss_lr) == (1e-2, 1e-5, 1e-4)
    assert (cfg.t0, cfg.t_mult, cfg.eta_min, cfg.grad_clip) == (3, 1, 1e-4, 1.0)
    assert (cfg.hflip_p, cfg.vflip_p, cfg.rot90_p) == (0.5, 0.5, 0.5)
    assert cfg.gaussian_blur_p > 0 and cfg.median_blur_p > 0 and cfg.augment
    assert cfg.model == "untrained" and cfg.model_overrides() == {}
    assert cfg.checkpoints.endswith("o/checkpoints")


def test_loss_margin_is_in_degrees():
    loss = build_loss(TrainConfig(dataset="d", output_dir="o"), num_classes=3, embedding_size=32)
    assert loss.margin == pytest.approx(math.radians(17.5))
    assert loss.scale == 64
    assert tuple(loss.W.shape) == (32, 3 * 6)  # 6 sub-centres per class


def test_cli_overrides_and_rejections(capsys):
    cfg = parse_args(
        [
            "--dataset",
            "d",
            "--output-dir",
            "o",
            "--backbone",
            "convnextv2_base.fcmae",
            "--out-indices",
            "0",
            "1",
            "2",
            "3",
        ]
        + ["--neck-channels", "512", "--backbone-weights", "timm", "--image-mean", "0.485", "0.456", "0.406"]
    )
    assert cfg.model_overrides() == {
        "backbone": "convnextv2_base.fcmae",
        "out_indices": [0, 1, 2, 3],
        "neck_channels": 512,
        "image_mean": [0.485, 0.456, 0.406],
        "backbone_weights": "timm",
    }
    assert parse_args(["--dataset", "d", "--output-dir", "o", "--backbone-weights", "none"]).model_overrides() == {
        "backbone_weights": None
    }
    with pytest.raises(SystemExit):
        parse_args(["--dataset", "d", "--output-dir", "o", "--no-such-option", "1"])
    with pytest.raises(SystemExit):
        parse_args(["--dataset", "d", "--output-dir", "o", "--model", "some/dir", "--neck-channels", "64"])
    assert "fresh model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--dataset", "d", "--output-dir", "o", "--batch-size", "1"])


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("margin", 95.0, "margin"),
        ("hflip_p", 1.5, "hflip_p"),
        ("median_sizes", [4], "median_sizes"),
        ("mixed_precision", "fp8", "mixed_precision"),
        ("epochs", 0, "epochs"),
        ("eval_queries", "q", "eval_gallery"),
    ],
)
def test_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(dataset="d", output_dir="o", **{field: value})


# --------------------------------------------------------------------------------------
# Augmentations and data order
# --------------------------------------------------------------------------------------


def _image() -> Image.Image:
    return Image.fromarray(np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3))


@pytest.mark.parametrize(
    "cfg, expected",
    [
        (AugmentConfig(1.0, 0.0, 0.0, 0.0, (0.1, 2.0), 0.0, (3,)), lambda a: a[:, ::-1]),
        (AugmentConfig(0.0, 1.0, 0.0, 0.0, (0.1, 2.0), 0.0, (3,)), lambda a: a[::-1]),
        (AugmentConfig(1.0, 1.0, 0.0, 0.0, (0.1, 2.0), 0.0, (3,)), lambda a: a[::-1, ::-1]),
        (AugmentConfig.off(), lambda a: a),
    ],
)
def test_flips(cfg, expected):
    src = np.asarray(_image())
    out = np.asarray(augment(_image(), np.random.default_rng(0), cfg))
    np.testing.assert_array_equal(out, expected(src))


def test_rotation_is_a_multiple_of_90_degrees():
    cfg = AugmentConfig(0.0, 0.0, 1.0, 0.0, (0.1, 2.0), 0.0, (3,))
    src = np.asarray(_image())
    rotations = [np.rot90(src, k) for k in (1, 2, 3)]
    seen = set()
    for seed in range(20):
        out = np.asarray(augment(_image(), np.random.default_rng(seed), cfg))
        seen.add(next(k for k, r in zip((1, 2, 3), rotations) if np.array_equal(out, r)))
    assert seen == {1, 2, 3}


def test_median_blur_removes_an_isolated_pixel_and_gaussian_blur_spreads_it():
    spot = np.zeros((9, 9, 3), np.uint8)
    spot[4, 4] = 255
    median = AugmentConfig(0.0, 0.0, 0.0, 0.0, (0.1, 2.0), 1.0, (3,))
    assert np.asarray(augment(Image.fromarray(spot), np.random.default_rng(0), median)).max() == 0
    gauss = AugmentConfig(0.0, 0.0, 0.0, 1.0, (1.0, 1.0), 0.0, (3,))
    out = np.asarray(augment(Image.fromarray(spot), np.random.default_rng(0), gauss)).astype(int)
    assert 0 < out[4, 4, 0] < 255 and out[4, 5, 0] > 0 and out[0, 0, 0] == 0


def test_epoch_sampler_is_a_seeded_permutation_per_epoch():
    sampler = EpochSampler(10, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(10)) and list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(10)) and second != first
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_train_dataset_labels_and_per_epoch_augmentation():
    from modeling_lgffem import LgffemImageProcessor

    ds = synthetic_dataset(per_class=2)
    classes = label_names(ds)
    assert classes == ["blue", "green", "red"]
    train_ds = TrainDataset(ds, classes, LgffemImageProcessor(image_size=32), AugmentConfig(), seed=0)
    assert train_ds.targets.tolist() == [2, 2, 1, 1, 0, 0]
    x0, y0 = train_ds[1]
    assert tuple(x0.shape) == (3, 32, 32) and x0.dtype == torch.float32 and int(y0) == 2
    torch.testing.assert_close(train_ds[1][0], x0, rtol=0, atol=0)  # same epoch: same draws
    changed = False
    for epoch in range(1, 6):
        train_ds.set_epoch(epoch)
        changed |= not torch.equal(train_ds[1][0], x0)
    assert changed
    with pytest.raises(ValueError, match="not among the classes"):
        TrainDataset(ds, ["red"], LgffemImageProcessor(image_size=32), None, seed=0)


def test_seeded_subset():
    ds = synthetic_dataset(per_class=4)
    sub = seeded_subset(ds, 5, seed=1)
    assert len(sub) == 5 and sub["source"] == seeded_subset(ds, 5, seed=1)["source"]
    assert seeded_subset(ds, None, seed=1) is ds and seeded_subset(ds, 100, seed=1) is ds


# --------------------------------------------------------------------------------------
# Training end to end, resume, export
# --------------------------------------------------------------------------------------


def test_tiny_training_run_learns(trained):
    result, _ = trained
    history = result.history
    assert [row["epoch"] for row in history] == [0, 1, 2, 3, 4]
    losses = [row["loss"] for row in history[1:]]
    assert losses[-1] < losses[0] * 0.5, losses
    assert all(row["images"] == 24 and row["images_per_s"] > 0 for row in history[1:])
    assert history[-1]["recall@1"] == 1.0 and history[-1]["mmv@5"] == 1.0
    assert result.classes == ["blue", "green", "red"]
    with open(result.output_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert rows[0]["loss"] == "" and float(rows[4]["loss"]) == pytest.approx(losses[-1])
    # the backbone never moved, the neck did
    from modeling_lgffem import LgffemConfig, LgffemModel

    torch.manual_seed(0)
    start = LgffemModel(LgffemConfig(**{k: v for k, v in TINY.items() if k != "backbone_weights"}))
    for name, tensor in start.backbone.state_dict().items():
        torch.testing.assert_close(result.model.backbone.state_dict()[name], tensor, rtol=0, atol=0)
    assert not torch.equal(start.neck.proj[0][0].weight, result.model.neck.proj[0][0].weight)
    # the frozen backbone never took part in autograd: no gradients, nothing to step
    assert all(p.grad is None and not p.requires_grad for p in result.model.backbone.parameters())
    assert all(p.grad is not None for p in result.model.neck.parameters())


def test_checkpoints_are_kept_per_epoch(trained):
    result, _ = trained
    found = list_checkpoints(result.output_dir / "checkpoints")
    assert [p.name for p in found] == ["checkpoint-epoch-003", "checkpoint-epoch-004"]  # keep_checkpoints=2
    names = sorted(p.name for p in found[-1].iterdir())
    assert names == [
        "loss.safetensors",
        "loss_optimizer.pt",
        "model.safetensors",
        "optimizer.pt",
        "rng_state_0.pt",
        "scheduler.pt",
        "trainer_state.json",
    ]
    state = json.loads((found[-1] / "trainer_state.json").read_text())
    assert (state["epoch"], state["global_step"], state["classes"]) == (4, 12, ["blue", "green", "red"])


def test_exported_folder_loads_with_automodel(trained):
    from transformers import AutoImageProcessor, AutoModel

    result, ds = trained
    out = result.output_dir
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "modeling_lgffem.py", "README.md"):
        assert (out / name).is_file(), name
    assert "AutoModel" in json.loads((out / "config.json").read_text())["auto_map"]
    model = AutoModel.from_pretrained(str(out), trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(str(out), trust_remote_code=True)
    pixels = processor([ds[i]["image"] for i in (0, 9, 20)], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        expected = result.model(pixels).embeddings
        got = model(pixels).embeddings
    assert got.shape == (3, 64)
    assert (got - expected).abs().max().item() < 1e-6


def test_model_card_metadata_and_table(trained):
    from huggingface_hub import ModelCard

    result, _ = trained
    card = ModelCard.load(result.output_dir / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "image-feature-extraction"
    assert data["license"] == "apache-2.0" and data["datasets"] == ["org/colours"]
    assert {"lgffem", "histopathology", "image-retrieval"} <= set(data["tags"])
    results = data["model-index"][0]["results"][0]
    assert results["dataset"]["name"] == "synthetic-colours"
    metrics = {m["type"]: m["value"] for m in results["metrics"]}
    assert metrics == {"recall_at_1": 1.0, "mmv_at_5": 1.0}
    text = card.text
    assert 'AutoModel.from_pretrained("org/lgffem-tiny", trust_remote_code=True)' in text
    assert "| 0 (before training) |" in text and "| 4 | 1.0000 | 1.0000 | 1.0000 | 1.0000 |" in text
    assert "margin 17.5°, scale 64.0, 6 sub-centres" in text


def _run(out, epochs, evaluate=False, **kw):
    ds = synthetic_dataset(per_class=4)
    return train(tiny_cfg(out, epochs=epochs, **kw), ds, eval_gallery=ds if evaluate else None)


def test_resume_equals_uninterrupted_run(tmp_path):
    # the uninterrupted run also evaluates after every epoch: evaluation must not change training
    full = _run(tmp_path / "full", epochs=3, evaluate=True)
    _run(tmp_path / "part", epochs=1)
    resumed = _run(tmp_path / "part", epochs=3, resume="latest")
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    assert all("recall@1" in r for r in full.history) and not any("recall@1" in r for r in resumed.history)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(resumed.loss_state["W"], full.loss_state["W"], rtol=0, atol=0)
    # a changed trajectory setting is refused
    with pytest.raises(ValueError, match="lr"):
        _run(tmp_path / "part", epochs=4, resume="latest", lr=0.5)


def test_resume_with_the_feature_cache_is_bit_identical_on_real_tissue(shared_data, tmp_path):
    """With one thread, a backbone batch's composition changes the last bits of some cached maps: a run
    resumed with an empty cache (filled by the pairs of its first epoch only) drifted from the
    uninterrupted run (found by benchmarks/bench_faults.py). It now refills the cache as that run did."""
    import shutil

    from index_build.data import load_image_dataset

    folder = tmp_path / "lung"
    for name in ("lung_aca", "lung_n", "lung_scc"):
        (folder / name).mkdir(parents=True)
        for image in sorted((shared_data / "lc25000_lung" / "gallery" / name).iterdir())[:16]:
            shutil.copyfile(image, folder / name / image.name)
    ds = load_image_dataset(str(folder))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full = train(tiny_cfg(tmp_path / "full", epochs=2), ds)
        train(tiny_cfg(tmp_path / "part", epochs=1), ds)
        resumed = train(tiny_cfg(tmp_path / "part", epochs=2, resume="latest"), ds)
    finally:
        torch.set_num_threads(threads)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert [name for name in a if not torch.equal(a[name], b[name])] == []
    torch.testing.assert_close(resumed.loss_state["W"], full.loss_state["W"], rtol=0, atol=0)


def test_resume_without_a_complete_checkpoint_starts_from_scratch(tmp_path, caplog):
    # killed during epoch 1, or while its checkpoint was written: only the temporary folder is there
    checkpoints = tmp_path / "part" / "checkpoints"
    (checkpoints / "checkpoint-epoch-001.tmp").mkdir(parents=True)
    (checkpoints / "checkpoint-epoch-001.tmp" / "model.safetensors").write_bytes(b"half written")
    caplog.set_level("WARNING", logger="train.trainer")
    resumed = _run(tmp_path / "part", epochs=1, resume="latest")
    assert f"--resume: no complete checkpoint in {checkpoints}; starting from scratch" in caplog.text
    fresh = _run(tmp_path / "fresh", epochs=1)
    assert [r["epoch"] for r in resumed.history] == [1]
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in fresh.history]
    assert [p.name for p in list_checkpoints(checkpoints)] == ["checkpoint-epoch-001"]
    with pytest.raises(FileNotFoundError, match="is not a checkpoint folder"):  # a folder named explicitly
        _run(tmp_path / "none", epochs=1, resume=str(tmp_path / "none" / "checkpoint-epoch-001"))


def test_cli_end_to_end_on_an_image_folder(tmp_path):
    from train.__main__ import main

    folder = tmp_path / "images"
    ds = synthetic_dataset(per_class=3)
    for i, row in enumerate(ds):
        (folder / row["label"]).mkdir(parents=True, exist_ok=True)
        row["image"].save(folder / row["label"] / f"{i}.png")
    out = tmp_path / "model"
    argv = ["--dataset", str(folder), "--output-dir", str(out), "--epochs", "1", "--batch-size", "4"]
    argv += ["--neck-channels", "16", "--neck-layers", "1", "--image-size", "64", "--backbone-weights", "none"]
    argv += ["--num-workers", "0", "--no-progress", "--cpu", "--eval-gallery", str(folder), "--eval-k", "3"]
    assert main(argv) == 0
    args = json.loads((out / "training_args.json").read_text())
    assert args["classes"] == ["blue", "green", "red"] and args["num_train_images"] == 9
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "epoch", "step", "loss", "lr", "loss_lr", "images", "seconds", "images_per_s",
        "recall@1", "recall@3", "mmv@3", "map@3",
    ]  # fmt: skip
    assert rows[0]["step"] == "2" and rows[0]["images"] == "8" and rows[0]["recall@1"] != ""


# ---------------------------------------------------------------- cached backbone features


def test_dihedral_views_are_the_eight_symmetries_of_the_square():
    from train.features import NUM_VIEWS, compose_view, dihedral

    a = np.arange(9).reshape(3, 3)
    views = [dihedral(a, v) for v in range(NUM_VIEWS)]
    assert len({v.tobytes() for v in views}) == 8
    np.testing.assert_array_equal(dihedral(a, 0), a)
    np.testing.assert_array_equal(dihedral(a, 1), np.rot90(a))
    np.testing.assert_array_equal(dihedral(a, 4), a.T)
    # "hflip, vflip, rotate" of train.data.augment map onto the same elements
    assert compose_view(False, False, 0) == 0
    assert compose_view(True, True, 0) == 2  # both flips = rotation by 180 degrees
    np.testing.assert_array_equal(dihedral(a, compose_view(True, False, 0)), a[:, ::-1])
    np.testing.assert_array_equal(dihedral(a, compose_view(False, True, 1)), np.rot90(a[::-1]))
    with pytest.raises(ValueError, match="0..7"):
        dihedral(a, 8)


def test_epoch_views_follow_the_recipe_probabilities():
    from train.features import draw_views

    cfg = AugmentConfig()
    views = draw_views(8000, seed=0, epoch=0, cfg=cfg)
    counts = np.bincount(views, minlength=8) / len(views)
    # with flips and rotations at p = 0.5 every element of D4 occurs
    assert counts.min() > 0.05 and set(np.unique(views)) == set(range(8))
    np.testing.assert_array_equal(views, draw_views(8000, seed=0, epoch=0, cfg=cfg))
    assert not np.array_equal(views, draw_views(8000, seed=0, epoch=1, cfg=cfg))
    assert not draw_views(50, seed=0, epoch=3, cfg=None).any()


def test_feature_cache_fills_once_and_serves_the_backbone_maps():
    from modeling_lgffem import LgffemConfig, LgffemImageProcessor, LgffemModel
    from train.features import FeatureCache

    torch.manual_seed(0)
    model = LgffemModel(LgffemConfig(**{k: v for k, v in TINY.items() if k != "backbone_weights"}))
    processor = LgffemImageProcessor.from_config(model.config)
    ds = synthetic_dataset(per_class=2)
    with torch.no_grad():
        shapes = [tuple(m.shape[1:]) for m in model.backbone_features(torch.zeros(1, 3, 64, 64))]
    cache = FeatureCache(len(ds), shapes, torch.float32)
    assert cache.missing([0, 1, 1, 2], [0, 3, 3, 0]) == [(0, 0), (1, 3), (2, 0)]
    cache.fill(model, ds, [(0, 0), (1, 3), (2, 0)], processor, None, seed=0, device=torch.device("cpu"), batch_size=2)
    assert cache.missing([0, 1, 1, 2], [0, 3, 3, 0]) == []
    got = cache.get(torch.tensor([1]), torch.tensor([3]), torch.device("cpu"))
    pixels = processor(Image.fromarray(np.ascontiguousarray(np.rot90(np.asarray(ds[1]["image"]), 3))))
    with torch.no_grad():
        expected = model.backbone_features(pixels["pixel_values"])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="never filled"):
        cache.get(torch.tensor([5]), torch.tensor([0]), torch.device("cpu"))


def test_cached_training_equals_the_plain_path_without_augmentation(tmp_path):
    """Same data, same order, no augmentation, float32 cache: the cached path trains the same model."""
    ds = synthetic_dataset(per_class=4)
    runs = {}
    for cache in ("off", "auto"):
        torch.manual_seed(0)
        cfg = tiny_cfg(tmp_path / cache, epochs=2, augment=False, feature_cache=cache, feature_cache_dtype="float32")
        runs[cache] = train(cfg, train_dataset=ds)
    plain, cached = runs["off"], runs["auto"]
    assert [r["loss"] for r in cached.history] == pytest.approx([r["loss"] for r in plain.history], rel=1e-4)
    for name, tensor in plain.model.state_dict().items():
        torch.testing.assert_close(cached.model.state_dict()[name], tensor, rtol=1e-3, atol=1e-4, msg=name)


def test_relational_distillation_is_zero_for_the_teacher_and_positive_otherwise():
    from train.features import relational_distillation

    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(6, 5, generator=gen)
    for mode in ("kl", "mse"):
        assert relational_distillation(teacher * 3.0, teacher, 0.1, mode).item() == pytest.approx(0.0, abs=1e-6)
        assert relational_distillation(torch.randn(6, 8, generator=gen), teacher, 0.1, mode).item() > 0.01
    # mse: the mean squared difference of the off-diagonal cosines; two orthogonal vs two equal -> 1
    pair = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert relational_distillation(pair, torch.tensor([[1.0, 0.0], [1.0, 0.0]]), 0.1, "mse").item() == 1.0
    with pytest.raises(ValueError, match="'kl' or 'mse'"):
        relational_distillation(pair, pair, 0.1, "l1")


def test_several_datasets_are_concatenated_with_their_class_names(tmp_path):
    from train.trainer import load_training_data

    for name, colours in (("a", ("red", "green")), ("b", ("blue",))):
        for colour in colours:
            folder = tmp_path / name / colour
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), COLORS[colour]).save(folder / f"{i}.png")
    cfg = TrainConfig(dataset=[str(tmp_path / "a"), str(tmp_path / "b")], output_dir="o")
    ds = load_training_data(cfg)
    assert len(ds) == 6 and label_names(ds) == ["blue", "green", "red"]
