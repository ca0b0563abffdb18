"""LGFFEM: Local-Global Feature Fusion Embedding Model for histopathology image retrieval.

Nuñez-Fernández, Farias, Solar, "Content-Based Histopathological Image Retrieval",
Sensors 2025, 25(5):1350. A frozen timm backbone gives four feature scales
(strides 4/8/16/32); a neck of ``neck_layers`` local-global fusion layers of width
``neck_channels`` mixes them; one GeM head per scale pools them; the four pooled
vectors are concatenated into a ``4 * neck_channels`` descriptor. An optional global branch
(``global_weight``, not in the paper) appends the backbone's own pooled last stage.

This file, with ``configuration_lgffem.py`` (the config), ``functional_lgffem.py`` (the ops the
modules are built on) and ``image_processing_lgffem.py`` (the image processor), is the Hub remote
code (torch, timm and public transformers API only): ``save_pretrained`` copies the four next to
the weights, and ``AutoModel.from_pretrained(repo, trust_remote_code=True)`` loads them.
Pretrained backbone weights for a fresh model are the project's business
(``index_build.backbone_weights``), not part of the Hub code.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import timm
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

try:  # Hub remote code: the files sit in one package (transformers_modules.<repo>)
    from .configuration_lgffem import LgffemConfig
    from .functional_lgffem import eager_inference, gem, grn, layer_norm_2d, upsample2_depthwise, weighted_fuse
    from .image_processing_lgffem import LgffemImageProcessor
except ImportError:  # the project's checkout, where they are top-level modules
    if __package__:
        raise
    from configuration_lgffem import LgffemConfig
    from functional_lgffem import eager_inference, gem, grn, layer_norm_2d, upsample2_depthwise, weighted_fuse
    from image_processing_lgffem import LgffemImageProcessor

try:  # transformers >= 5: initialisers that leave weights loaded from a checkpoint alone
    from transformers import initialization as hf_init
except ImportError:  # pragma: no cover - older transformers
    hf_init = nn.init

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
        if not eager_inference():
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
# Pretrained base and model
# --------------------------------------------------------------------------------------


@dataclass
class LgffemOutput(ModelOutput):
    """Output of :class:`LgffemModel`.

    Args:
        embeddings: N x :attr:`LgffemModel.embedding_dim` float32 descriptors (L2-normalised if requested).
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
    checkpoint through ``from_pretrained``, or, for a fresh model to train, from the project's
    ``index_build.backbone_weights.fresh_model``.
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
        self.global_channels = int(channels[-1]) if config.global_weight > 0 else 0
        self.post_init()
        # An embedding model is mostly used for inference: start in eval mode (dropout and
        # BatchNorm statistics off), as from_pretrained does; training calls .train().
        self.eval()

    @property
    def embedding_dim(self) -> int:
        """Length of the descriptor: ``4 * C``, plus the last stage's channels with a global branch."""
        return self.config.embedding_dim + self.global_channels

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

        The trained descriptor only (what training optimises; :meth:`describe_features` adds the
        global branch).

        Returns:
            The N x (4 * C) float32 descriptors and the neck's four output maps.
        """
        maps = self.neck(features)
        embeddings = self.head(maps).float()
        if self.config.normalize_embeddings if normalize is None else normalize:
            embeddings = F.normalize(embeddings, dim=-1)
        return embeddings, maps

    def describe_features(
        self, features: Sequence[torch.Tensor], normalize: Optional[bool] = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The model's descriptor over precomputed backbone maps: :meth:`embed_features`, and the
        global branch when ``config.global_weight > 0`` (see :class:`LgffemConfig`)."""
        normalize = self.config.normalize_embeddings if normalize is None else normalize
        if not self.global_channels:
            return self.embed_features(features, normalize)
        trained, maps = self.embed_features(features, normalize=True)
        pooled = F.normalize(features[-1].float().mean(dim=(-2, -1)), dim=-1)
        embeddings = torch.cat([trained, self.config.global_weight * pooled], dim=1)
        if normalize:
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
        embeddings, maps = self.describe_features(self.backbone_features(pixel_values), normalize)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = LgffemOutput(embeddings=embeddings, feature_maps=tuple(maps) if output_feature_maps else None)
        return out if return_dict else out.to_tuple()


LgffemModel.register_for_auto_class("AutoModel")

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
    "gem",
    "grn",
    "layer_norm_2d",
    "upsample2_depthwise",
    "weighted_fuse",
]
