"""The optimised neck equals the neck written straight from the specification (``reference_lgffem``)."""

from __future__ import annotations

import pytest
import reference_lgffem as ref
import torch
import torch.nn.functional as F

from modeling_lgffem import (
    GRN,
    Fuse,
    GlobalAggregator,
    LgffemConfig,
    LgffemModel,
    LocalAggregator,
    grn,
    layer_norm_2d,
    upsample2_depthwise,
    weighted_fuse,
)

PAPER = dict(backbone="convnextv2_base", out_indices=(0, 1, 2, 3), neck_channels=512, neck_layers=3)


def randomise_special_params(model: torch.nn.Module, seed: int = 0) -> None:
    """Give the zero/one-initialised parameters (GRN, gate alpha, fusion weights) non-trivial values,
    so that every term of the optimised formulas is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, GRN):
                module.gamma.copy_(torch.randn(module.gamma.shape, generator=gen) * 0.5)
                module.beta.copy_(torch.randn(module.beta.shape, generator=gen) * 0.5)
            elif isinstance(module, (LocalAggregator, GlobalAggregator)):
                module.alpha.copy_(torch.rand(1, generator=gen) * 0.8 + 0.1)
            elif isinstance(module, Fuse):
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)


def embed(model: LgffemModel, x: torch.Tensor, reference: bool) -> torch.Tensor:
    with torch.inference_mode():
        return ref.embed(model, x) if reference else model(x, normalize=False).embeddings


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_layer_norm_2d_matches_layer_norm_any_layout():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, 7, generator=gen) * 3 + 1
    w, b = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    expected = F.layer_norm(x.permute(0, 2, 3, 1), (6,), w, b, 1e-6).permute(0, 3, 1, 2)
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        out = layer_norm_2d(inp, w, b, 1e-6)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_upsample2_depthwise_equals_conv_transpose():
    gen = torch.Generator().manual_seed(1)
    up = torch.nn.ConvTranspose2d(4, 4, kernel_size=2, stride=2, groups=4)
    x = torch.randn(2, 4, 3, 5, generator=gen)
    expected = up(x).detach()
    with torch.inference_mode():
        fast = upsample2_depthwise(x, up.weight, up.bias)
    torch.testing.assert_close(fast, expected, rtol=0, atol=1e-6)
    # hand-computed corner: out[0, 0, 1, 0] = x[0, 0, 0, 0] * w[0, 0, 1, 0] + b[0]
    assert fast[0, 0, 1, 0].item() == pytest.approx((x[0, 0, 0, 0] * up.weight[0, 0, 1, 0] + up.bias[0]).item())
    # autograd path gives the same values and the transposed convolution's gradients
    xg = x.clone().requires_grad_()
    upsample2_depthwise(xg, up.weight, up.bias).square().sum().backward()
    grad_fast = (xg.grad.clone(), up.weight.grad.clone())
    xg.grad, up.weight.grad = None, None
    up(xg).square().sum().backward()
    torch.testing.assert_close(grad_fast[0], xg.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_fast[1], up.weight.grad, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="depthwise 2x2 kernel"):
        upsample2_depthwise(x, torch.zeros(4, 1, 3, 3), None)


def test_grn_and_fuse_fast_forms_equal_formulas():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, 4, generator=gen)
    gamma, beta = torch.randn(1, 3, 1, 1, generator=gen), torch.randn(1, 3, 1, 1, generator=gen)
    g = torch.sqrt((x**2).sum(dim=(2, 3), keepdim=True))
    nx = g / (g.mean(dim=1, keepdim=True) + 1e-6)
    expected = gamma * (x * nx) + beta + x
    torch.testing.assert_close(grn(x, gamma, beta), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ref.grn(x, gamma, beta), expected, rtol=1e-6, atol=1e-6)
    # w = (1, 3) -> normalised (0.25, 0.75) up to eps: 0.25 * 4 + 0.75 * 8 = 7
    out = weighted_fuse([torch.full((2, 2), 4.0), torch.full((2, 2), 8.0)], torch.tensor([1.0, 3.0]), eps=0.0)
    torch.testing.assert_close(out, torch.full((2, 2), 7.0))


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (LocalAggregator, {}),
        (LocalAggregator, {"upsample": True}),
        (GlobalAggregator, {}),
        (GlobalAggregator, {"downsample": True}),
    ],
)
def test_aggregator_forward_and_grads_match_reference(cls, kwargs):
    torch.manual_seed(3)
    agg = cls(8, **kwargs)
    randomise_special_params(agg)
    x = torch.randn(2, 8, 6, 6)
    results = {}
    for reference in (True, False):
        xg = x.clone().requires_grad_()
        out = ref.aggregator(agg, xg) if reference else agg(xg)
        out.square().mean().backward()
        grads = [p.grad.clone() for p in agg.parameters()]
        agg.zero_grad()
        with torch.inference_mode():
            inference_out = ref.aggregator(agg, x) if reference else agg(x)
        results[reference] = (out.detach(), inference_out, xg.grad, grads)
    slow, fast = results[True], results[False]
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast[1], slow[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast[2], slow[2], rtol=1e-4, atol=1e-6)
    for gf, gr in zip(fast[3], slow[3]):
        torch.testing.assert_close(gf, gr, rtol=1e-4, atol=1e-6)


def test_gate_in_place_only_without_autograd():
    agg = LocalAggregator(4)
    with torch.no_grad():
        agg.alpha.fill_(0.25)
    x, s = torch.full((1, 4, 2, 2), 2.0), torch.full((1, 4, 2, 2), 0.5)
    # (1 - 0.25) * 2 * 0.5 + 0.25 * 2 = 1.25
    assert torch.equal(agg.gate(x, s.clone()), torch.full((1, 4, 2, 2), 1.25))
    with torch.no_grad():
        s_in = s.clone()
        out = agg.gate(x, s_in)
    assert out.data_ptr() == s_in.data_ptr()  # reused the gate buffer
    s_in = s.clone()
    out = agg.gate(x, s_in)  # autograd on (alpha requires grad): no in-place
    assert out.data_ptr() != s_in.data_ptr() and torch.equal(s_in, s)


def test_paper_config_fast_path_equals_reference():
    """Paper configuration (convnextv2_base, C=512, L=3), batch 1: relative error below 1e-4,
    in NCHW and in channels_last memory format."""
    torch.manual_seed(0)
    model = LgffemModel(LgffemConfig(**PAPER))
    randomise_special_params(model)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    reference = embed(model, x, reference=True)
    assert reference.shape == (1, 2048)
    fast = embed(model, x, reference=False)
    assert rel_err(fast, reference) < 1e-4
    model_cl = model.to(memory_format=torch.channels_last)
    fast_cl = embed(model_cl, x.contiguous(memory_format=torch.channels_last), reference=False)
    assert rel_err(fast_cl, reference) < 1e-4


def test_default_config_fast_path_equals_reference_and_trains(tiny_config):
    torch.manual_seed(0)
    model = LgffemModel(tiny_config)
    randomise_special_params(model)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    assert rel_err(embed(model, x, reference=False), embed(model, x, reference=True)) < 1e-5
    # train mode with autograd: the same loss and neck gradients on both paths
    model.train()
    grads = {}
    for reference in (True, False):
        torch.manual_seed(7)  # same dropout mask
        model.zero_grad()
        out = ref.embed(model, x) if reference else model(x, normalize=False).embeddings
        torch.nn.functional.normalize(out, dim=-1).square().sum().backward()
        grads[reference] = [p.grad.clone() for p in model.neck.parameters()]
    for gf, gr in zip(grads[False], grads[True]):
        torch.testing.assert_close(gf, gr, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_compiled_model_equals_reference(tiny_config):
    """``torch.compile`` traces the fast path's out-of-place forms (slow: compiles)."""
    torch.manual_seed(0)
    model = LgffemModel(tiny_config)
    randomise_special_params(model)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    reference = embed(model, x, reference=True)
    with torch.inference_mode():
        compiled = torch.compile(model)(x, normalize=False).embeddings
    assert rel_err(compiled, reference) < 1e-4
