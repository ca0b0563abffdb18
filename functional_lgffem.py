"""Functional ops of LGFFEM's neck and head (GeM, channel LayerNorm, depthwise x2 upsampling, GRN, fusion).

Hub remote code beside ``modeling_lgffem.py``, which builds its modules on them (torch only).
Each docstring gives the formula its op computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F


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


def eager_inference() -> bool:
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
    if not eager_inference():
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


__all__ = ["eager_inference", "gem", "grn", "layer_norm_2d", "upsample2_depthwise", "weighted_fuse"]
