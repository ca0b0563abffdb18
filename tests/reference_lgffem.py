"""The LGFFEM neck written straight from the specification, for the tests only.

The model file keeps only its optimised forms (channels-last LayerNorm, in-place gates, the
broadcast upsampling); these functions compute the same values with the literal formulas of
``shared/docs/lgffem-architecture.md`` from a model's own parameters, so the tests can compare
the two, values and gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from modeling_lgffem import FusionLayer, GlobalAggregator, LgffemModel, LgffemNeck, LocalAggregator


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    """LN over the channel axis: permute to channels-last, ``F.layer_norm``, permute back."""
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), norm.weight, norm.bias, norm.eps).permute(0, 3, 1, 2)


def grn(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    g = torch.sqrt((x**2).sum(dim=(2, 3), keepdim=True))
    nx = g / (g.mean(dim=1, keepdim=True) + eps)
    return gamma * (x * nx) + beta + x


def gate(x: torch.Tensor, s: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return (1.0 - alpha) * (x * s) + alpha * x


def local_aggregator(agg: LocalAggregator, x: torch.Tensor) -> torch.Tensor:
    if agg.upsample is not None:
        norm, up = agg.upsample
        x = up(layer_norm(x, norm))  # the module's own ConvTranspose2d
    s = torch.sigmoid(agg.fc2(F.gelu(agg.fc1(layer_norm(x, agg.norm)))))
    return gate(x, s, agg.alpha)


def global_aggregator(agg: GlobalAggregator, x: torch.Tensor) -> torch.Tensor:
    if agg.downsample is not None:
        conv, norm = agg.downsample
        x = layer_norm(conv(x), norm)
    hidden = F.gelu(agg.fc1(layer_norm(agg.dwconv(x), agg.norm)))
    s = torch.sigmoid(agg.fc2(grn(hidden, agg.grn.gamma, agg.grn.beta, agg.grn.eps)))
    return gate(x, s, agg.alpha)


def aggregator(agg, x: torch.Tensor) -> torch.Tensor:
    return local_aggregator(agg, x) if isinstance(agg, LocalAggregator) else global_aggregator(agg, x)


def fuse(node, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    w = node.weight / (node.weight.sum() + node.eps)
    return sum(w[i] * x for i, x in enumerate(inputs))


def fusion_layer(layer: FusionLayer, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    p1_0, p2_0, p3_0, p4_0 = feats
    a = aggregator
    p3_1 = fuse(layer.p3_1_fuse, [a(layer.p3_1_ga, p3_0), a(layer.p3_1_la_up, p4_0)])
    p2_1 = fuse(layer.p2_1_fuse, [a(layer.p2_1_ga, p2_0), a(layer.p2_1_la_up, p3_1)])
    p1_2 = fuse(layer.p1_2_fuse, [a(layer.p1_2_ga, p1_0), a(layer.p1_2_la_up, p2_1)])
    p2_2 = fuse(layer.p2_2_fuse, [a(layer.p2_2_la0, p2_0), a(layer.p2_2_la1, p2_1), a(layer.p2_2_ga_down, p1_2)])
    p3_2 = fuse(layer.p3_2_fuse, [a(layer.p3_2_la0, p3_0), a(layer.p3_2_la1, p3_1), a(layer.p3_2_ga_down, p2_2)])
    p4_2 = fuse(layer.p4_2_fuse, [a(layer.p4_2_la0, p4_0), a(layer.p4_2_ga_down, p3_2)])
    return [p1_2, p2_2, p3_2, p4_2]


def neck(module: LgffemNeck, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for proj, f in zip(module.proj, feats):
        conv_in, norm, _, conv_out = proj
        out.append(conv_out(F.gelu(layer_norm(conv_in(f), norm))))
    for layer in module.layers:
        out = fusion_layer(layer, out)
    return out


def embed(model: LgffemModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """Un-normalised descriptors through the literal neck (backbone and head are the model's)."""
    with torch.no_grad():
        feats = model.backbone(pixel_values)
    return model.head(neck(model.neck, feats)).float()
