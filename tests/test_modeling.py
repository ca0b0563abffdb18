"""LGFFEM model, config, image processor and the transformers round trip."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from modeling_lgffem import (
    LgffemConfig,
    LgffemImageProcessor,
    LgffemModel,
    efficientnet_lite_state_dict,
    gem,
    grn,
    layer_norm_2d,
    to_rgb_uint8,
    weighted_fuse,
)

ROOT = Path(__file__).resolve().parents[1]


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- parity with the paper


@pytest.mark.parametrize(
    "backbone, neck_params",
    [("convnextv2_base", 12_452_308), ("convnextv2_tiny", 12_024_308)],
)
def test_paper_parameter_counts(backbone: str, neck_params: int) -> None:
    config = LgffemConfig(backbone=backbone, out_indices=(0, 1, 2, 3), neck_channels=512, neck_layers=3)
    model = LgffemModel(config)
    assert n_params(model.neck) == neck_params
    assert n_params(model.head) == 2_105_348
    with torch.inference_mode():
        out = model(torch.randn(2, 3, 64, 64)).embeddings
    assert out.shape == (2, 2048)
    assert out.dtype == torch.float32


def test_efficientnet_lite_mapping_predicts_espresso() -> None:
    skimage_data = pytest.importorskip("skimage.data")
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    net.load_state_dict(efficientnet_lite_state_dict("tf_efficientnet_lite0"))
    net.eval()
    pixels = LgffemImageProcessor()(Image.fromarray(skimage_data.coffee()))["pixel_values"]
    with torch.inference_mode():
        top = net(pixels).argmax(-1).item()
    assert top == 967  # ImageNet "espresso"


def test_default_model_backbone_holds_pretrained_weights_after_post_init() -> None:
    model = LgffemModel.from_backbone_weights(LgffemConfig())
    mapped = efficientnet_lite_state_dict("tf_efficientnet_lite0")
    backbone = model.backbone.state_dict()
    checked = [k for k in backbone if not k.endswith("num_batches_tracked")]
    assert len(checked) == 240  # every weight and BN statistic of the features-only Lite0
    for key in checked:
        torch.testing.assert_close(backbone[key], mapped[key], rtol=0, atol=0)


def test_default_config_is_offline_lite0() -> None:
    config = LgffemConfig()
    assert (config.backbone, config.neck_channels, config.neck_layers) == ("tf_efficientnet_lite0", 128, 3)
    assert config.embedding_dim == 512
    assert config.image_mean == [0.5, 0.5, 0.5] and config.image_std == [0.5, 0.5, 0.5]


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"out_indices": (1, 2, 3)}, "out_indices"),
        ({"out_indices": (1, 1, 2, 3)}, "out_indices"),
        ({"neck_channels": 15}, "neck_channels"),
        ({"neck_layers": 0}, "neck_layers"),
        ({"gem_p": 0.0}, "gem_p"),
        ({"gem_eps": -1.0}, "gem_eps"),
        ({"head_dropout": 1.0}, "head_dropout"),
        ({"image_size": 100}, "image_size"),
        ({"image_mean": (0.5, 0.5)}, "image_mean"),
        ({"image_std": (0.5, 0.0, 0.5)}, "image_std"),
        ({"backbone": ""}, "backbone"),
    ],
)
def test_invalid_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        LgffemConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"out_indices": (0, 1, 2, 3)}, r"strides \[2, 4, 8, 16\], need \[4, 8, 16, 32\]"),
        ({"out_indices": (2, 3, 4, 5)}, r"out_indices \[2, 3, 4, 5\] out of range"),
        ({"backbone": "no_such_net"}, "'no_such_net' is not a timm model name"),
    ],
)
def test_backbone_choice_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LgffemModel(LgffemConfig(**kwargs, neck_channels=16, neck_layers=1))


# ---------------------------------------------------------------- model behaviour


def test_backbone_is_frozen_and_stays_in_eval_mode(tiny_config: LgffemConfig) -> None:
    model = LgffemModel(tiny_config)
    assert not model.training  # a new model starts in eval mode
    model.train()
    assert model.neck.training and model.head.training
    assert not model.backbone.training
    assert all(not m.training for m in model.backbone.modules())
    assert all(not p.requires_grad for p in model.backbone.parameters())
    out = model(torch.randn(4, 3, 64, 64)).embeddings
    out.sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.neck.parameters())
    assert all(p.grad is not None for p in model.head.parameters())


def test_embeddings_shape_and_normalisation(tiny_config: LgffemConfig) -> None:
    model = LgffemModel(tiny_config)
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        unit = model(x).embeddings
        raw = model(x, normalize=False).embeddings
    assert unit.shape == raw.shape == (3, 64)
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(3))
    assert not torch.allclose(raw.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(unit, torch.nn.functional.normalize(raw, dim=1))
    assert isinstance(model(x, return_dict=False), tuple)


@pytest.mark.parametrize("shape", [(2, 3, 64, 70), (2, 1, 64, 64), (3, 64, 64)])
def test_forward_rejects_bad_pixel_values(tiny_config: LgffemConfig, shape: tuple) -> None:
    with pytest.raises(ValueError, match="pixel_values|multiples of 32"):
        LgffemModel(tiny_config)(torch.zeros(shape))


def test_initialisation_follows_the_paper(tiny_config: LgffemConfig) -> None:
    model = LgffemModel(tiny_config)
    layer = model.neck.layers[0]
    assert layer.p3_1_ga.alpha.item() == 0.0 and layer.p2_2_la0.alpha.item() == 0.0
    assert torch.equal(layer.p2_2_fuse.weight, torch.ones(3))
    assert torch.equal(layer.p3_1_ga.grn.gamma, torch.zeros(1, 8, 1, 1))
    assert [round(b.pool.p.item(), 4) for b in model.head.branches] == [4.6] * 4


# ---------------------------------------------------------------- functional ops


def test_gem_matches_hand_computation() -> None:
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    # p = 2: sqrt((1 + 4 + 9 + 16) / 4) = sqrt(7.5)
    assert gem(x, torch.tensor(2.0)).item() == pytest.approx(7.5**0.5)
    # p = 1 is the mean; values below eps are clamped to eps
    assert gem(torch.tensor([[[[-5.0, 2.0]]]]), torch.tensor(1.0), eps=1.0).item() == pytest.approx(1.5)


def test_grn_matches_hand_computation() -> None:
    x = torch.tensor([[[[3.0, 4.0]], [[0.0, 10.0]]]])  # channel norms 5 and 10, mean 7.5
    gamma = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
    beta = torch.tensor([0.5, 0.0]).view(1, 2, 1, 1)
    out = grn(x, gamma, beta, eps=0.0)
    expected = torch.tensor([[[[3 * 5 / 7.5 + 0.5 + 3, 4 * 5 / 7.5 + 0.5 + 4]], [[0.0, 2 * 10 * 10 / 7.5 + 10]]]])
    torch.testing.assert_close(out, expected)


def test_weighted_fuse_normalises_weights() -> None:
    a, b = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), 8.0)
    out = weighted_fuse([a, b], torch.tensor([1.0, 3.0]), eps=0.0)
    assert out.item() == pytest.approx(0.25 * 2 + 0.75 * 8)


def test_layer_norm_2d_equals_layer_norm_over_permuted_channels() -> None:
    x = torch.randn(2, 6, 5, 7)
    weight, bias = torch.randn(6), torch.randn(6)
    expected = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (6,), weight, bias, 1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(layer_norm_2d(x, weight, bias), expected, rtol=1e-5, atol=1e-6)


def test_config_holds_no_weights_source_and_drops_the_legacy_key(tmp_path: Path) -> None:
    config = LgffemConfig(neck_channels=16, backbone_weights="/home/someone/weights.pth")
    assert not hasattr(config, "backbone_weights")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "backbone_weights" not in saved and not any("/" in str(v) for k, v in saved.items() if k != "auto_map")


def test_forward_rejects_unknown_arguments(tiny_config: LgffemConfig) -> None:
    model = LgffemModel(tiny_config)
    with pytest.raises(TypeError, match="normalise"):
        model(torch.zeros(1, 3, 64, 64), normalise=False)


def test_model_file_has_no_global_switch_or_context_variable() -> None:
    source = (ROOT / "modeling_lgffem.py").read_text()
    assert "contextvars" not in source and "ContextVar" not in source
    assert ".reference" not in source


# ---------------------------------------------------------------- image processor


def _pixels(image, size: int = 32) -> np.ndarray:
    return LgffemImageProcessor(image_size=size)(image)["pixel_values"].numpy()


@pytest.mark.parametrize(
    "image, expected",
    [
        (Image.new("RGB", (50, 40), (255, 0, 51)), (1.0, -1.0, -0.6)),
        (Image.new("L", (20, 20), 51), (-0.6, -0.6, -0.6)),
        (Image.new("RGBA", (20, 20), (0, 0, 0, 0)), (1.0, 1.0, 1.0)),  # transparent -> white
        (Image.new("RGBA", (20, 20), (0, 0, 0, 255)), (-1.0, -1.0, -1.0)),
        (Image.new("I;16", (20, 20), 65535), (1.0, 1.0, 1.0)),
        (np.full((10, 10), 65535, dtype=np.uint16), (1.0, 1.0, 1.0)),
        (np.full((10, 10, 3), 0.2, dtype=np.float32), (-0.6, -0.6, -0.6)),
        (np.zeros((3, 10, 10), dtype=np.uint8), (-1.0, -1.0, -1.0)),  # channels-first
        (np.full((10, 10, 1), 255, dtype=np.uint8), (1.0, 1.0, 1.0)),
    ],
)
def test_processor_converts_every_mode(image, expected: tuple) -> None:
    pixels = _pixels(image)
    assert pixels.shape == (1, 3, 32, 32) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels[0].mean(axis=(1, 2)), expected, atol=1e-6)


def test_processor_batches_and_uses_config_normalisation() -> None:
    processor = LgffemImageProcessor(image_size=64, image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0))
    out = processor([Image.new("RGB", (10, 10), (255, 255, 255)), np.zeros((300, 200, 3), np.uint8)])
    assert tuple(out["pixel_values"].shape) == (2, 3, 64, 64)
    assert out["pixel_values"][0].min().item() == 1.0 and out["pixel_values"][1].max().item() == 0.0


@pytest.mark.parametrize("bad", [np.zeros((6, 6, 5), np.uint8), np.zeros((2, 2, 2, 2, 2)), np.zeros((4, 4), np.int8)])
def test_processor_rejects_bad_arrays(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        to_rgb_uint8(bad)


def test_processor_rejects_non_images() -> None:
    with pytest.raises(TypeError, match="PIL image or numpy array"):
        to_rgb_uint8("not an image")  # type: ignore[arg-type]


# ---------------------------------------------------------------- backbone weights


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_backbone_weights_from_file(tmp_path: Path, tiny_config: LgffemConfig, suffix: str) -> None:
    donor = LgffemModel(tiny_config)
    state = {f"backbone.{k}": v.clone() for k, v in donor.backbone.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    model = LgffemModel.from_backbone_weights(tiny_config, str(path))
    for key, value in donor.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value)


def test_backbone_weights_file_missing_tensors(tmp_path: Path, tiny_config: LgffemConfig) -> None:
    path = tmp_path / "partial.pth"
    torch.save({"conv_stem.weight": torch.zeros(32, 3, 3, 3)}, path)
    with pytest.raises(ValueError, match="lack"):
        LgffemModel.from_backbone_weights(tiny_config, str(path))
    with pytest.raises(FileNotFoundError, match="not found"):
        LgffemModel.from_backbone_weights(tiny_config, str(tmp_path / "none.pth"))


def test_timm_weights_are_requested_only_by_the_explicit_call(tmp_path: Path, tiny_config: LgffemConfig) -> None:
    real_create = timm.create_model
    calls: list[bool] = []

    def fake_create(name, pretrained=False, **kwargs):
        calls.append(pretrained)
        return real_create(name, pretrained=False, **kwargs)  # no network here

    with mock.patch.object(timm, "create_model", side_effect=fake_create):
        model = LgffemModel.from_backbone_weights(tiny_config, "timm")
        model.save_pretrained(tmp_path)
        LgffemModel.from_pretrained(tmp_path)
        LgffemModel(tiny_config)
    assert calls == [False, True, False, False]  # architecture, weights; loading and __init__ never download


# ---------------------------------------------------------------- save / load round trip

_LOAD_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel
    model_dir, images_npz, out = sys.argv[1:4]
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True)
    processor = AutoImageProcessor.from_pretrained(model_dir, trust_remote_code=True)
    images = [Image.fromarray(a) for a in np.load(images_npz, allow_pickle=False).values()]
    with torch.inference_mode():
        emb = model(**processor(images, return_tensors="pt")).embeddings
    np.save(out, emb.numpy())
    print(type(model).__module__, type(processor).__name__)
    """
)


def _test_images(shared_data_dir: Path | None) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8), rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)]
    if shared_data_dir is not None:
        files = sorted((shared_data_dir / "lc25000_lung" / "query").rglob("*.jpg"))[:2]
        files += sorted((shared_data_dir / "crc_samples").rglob("*.tif"))[:1]
        images += [np.asarray(Image.open(f).convert("RGB")) for f in files]
    return images


@pytest.mark.parametrize("use_real", [False, True], ids=["synthetic", "real-tissue"])
def test_round_trip_in_fresh_process(tmp_path: Path, use_real: bool, request: pytest.FixtureRequest) -> None:
    data_dir = request.getfixturevalue("shared_data") if use_real else None
    torch.manual_seed(0)
    model = LgffemModel(LgffemConfig())  # the default, with pretrained backbone
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "config.json",
        "model.safetensors",
        "modeling_lgffem.py",
        "preprocessor_config.json",
    ]
    config = json.loads((model_dir / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "modeling_lgffem.LgffemConfig",
        "AutoModel": "modeling_lgffem.LgffemModel",
    }
    preprocessor = json.loads((model_dir / "preprocessor_config.json").read_text())
    assert preprocessor["auto_map"] == {"AutoImageProcessor": "modeling_lgffem.LgffemImageProcessor"}

    images = _test_images(data_dir)
    np.savez(tmp_path / "images.npz", *images)
    processor = LgffemImageProcessor.from_config(model.config)
    with torch.inference_mode():
        expected = model(**processor([Image.fromarray(a) for a in images], return_tensors="pt")).embeddings.numpy()

    # A fresh process with no weights package import path and the Hub offline.
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, str(model_dir), str(tmp_path / "images.npz"), str(tmp_path / "e.npy")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transformers_modules" in result.stdout and "LgffemImageProcessor" in result.stdout
    got = np.load(tmp_path / "e.npy")
    assert got.shape == (len(images), 512)
    assert np.abs(got - expected).max() < 1e-6


def test_loading_needs_neither_weights_file_nor_package(tmp_path: Path, tiny_config: LgffemConfig) -> None:
    weights = tmp_path / "backbone.pth"
    donor = LgffemModel(tiny_config)
    torch.save(donor.backbone.state_dict(), weights)
    model = LgffemModel.from_backbone_weights(tiny_config, str(weights))
    model.save_pretrained(tmp_path / "m")
    weights.unlink()  # loading must fill the backbone from model.safetensors only
    with mock.patch("modeling_lgffem.efficientnet_lite_state_dict", side_effect=AssertionError("no package")):
        loaded = LgffemModel.from_pretrained(tmp_path / "m")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_image_feature_extraction_pipeline(tmp_path: Path, tiny_config: LgffemConfig) -> None:
    from transformers import pipeline

    model = LgffemModel(tiny_config)
    model.save_pretrained(tmp_path)
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (90, 90, 3), dtype=np.uint8))
    extractor = pipeline("image-feature-extraction", model=str(tmp_path), trust_remote_code=True)
    got = np.asarray(extractor(image))
    with torch.inference_mode():
        expected = model(**LgffemImageProcessor.from_config(tiny_config)(image)).embeddings.numpy()
    assert got.shape == (1, 64)
    np.testing.assert_allclose(got, expected, atol=1e-6)
