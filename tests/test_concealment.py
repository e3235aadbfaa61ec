"""GCM: forward is the identity to float32 precision, the gradient factor is ~1e12, half precision
is safe, conceal() copies and places correctly, stacked placements' overflow is reported."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from gradshield.defenses.concealment import (
    ConcealmentWarning,
    GradientConcealment,
    conceal,
    resolve_placements,
)
from gradshield.errors import GradshieldError
from gradshield.evaluation.diagnostics import gradient_health
from gradshield.metrics import predict
from gradshield.models import create_model


@pytest.fixture
def real_images(test_batch):
    x, y = test_batch
    return x[:64], y[:64]


def test_output_equals_input_float32(real_images):
    x, _ = real_images
    gcm = GradientConcealment()
    for z in (x, torch.rand(4096, generator=torch.Generator().manual_seed(0))):
        out = gcm(z)
        assert out.dtype == torch.float32
        # eps = 1e-8 plus at most one float32 rounding step (1.49e-8 below 0.25)
        assert float((out - z).abs().max()) <= 1.5e-8


def test_gradient_factor_magnitude():
    x = torch.rand(20_000, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    GradientConcealment(w=1e20, eps=1e-8)(x).sum().backward()
    g = x.grad
    expected = 1 + 1e-8 * 1e20 * torch.cos(x.detach() * 1e20)  # the same float32 product
    assert torch.allclose(g, expected, rtol=1e-5)
    assert float(g.abs().max()) <= 1e12 * (1 + 1e-6)
    # |cos| of pseudo-random angles: median ~ cos(pi/4) = 0.71, signs balanced
    assert 5e11 < float(g.abs().median()) < 9e11
    assert 0.45 < float((g > 0).float().mean()) < 0.55


def test_eps_zero_is_exact_identity():
    x = torch.rand(100).requires_grad_(True)
    out = GradientConcealment(eps=0.0)(x)
    assert torch.equal(out, x.detach())
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_half_precision_and_bf16_autocast_are_finite(real_images, trained_model):
    x, _ = real_images
    naive = x.half() + 1e-8 * torch.sin(x.half() * 1e20)  # what GCM must not do
    assert not torch.isfinite(naive).all()
    gcm = GradientConcealment()
    for dtype in (torch.float16, torch.bfloat16):
        out = gcm(x.to(dtype))
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert torch.equal(out, x.to(dtype))  # eps is far below half precision's resolution
    hidden = torch.randn(8, 16, dtype=torch.float16) * 100
    assert torch.isfinite(gcm(hidden)).all()
    concealed = conceal(trained_model, "front")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = concealed(x)
    assert torch.isfinite(logits).all()


def test_accuracy_unchanged(test_batch, trained_model):
    x, _ = test_batch
    x = x[:256]
    vanilla = predict(trained_model, x)
    for at in ("front", ["net.block1"], ["net.block2", "net.block3"]):
        same = (predict(conceal(trained_model, at), x) == vanilla).float().mean()
        assert float(same) >= 0.998, at


def test_conceal_leaves_the_model_untouched(trained_model):
    model = trained_model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    with pytest.warns(ConcealmentWarning):  # three stacked placements: ~1e36
        concealed = conceal(model, ["front", "net.block1", "net.block3"])
    assert all(not m._forward_hooks for m in model.modules())
    assert [m.training for m in model.modules()] == modes
    assert [m.training for m in concealed.model.modules()] == modes  # copy keeps the mode
    concealed.eval()(torch.rand(2, 3, 32, 32))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.training
    own = {p.data_ptr() for p in model.parameters()}
    assert not own & {p.data_ptr() for p in concealed.parameters()}
    # GCM adds no parameters and keeps the state-dict keys of the wrapped copy
    assert concealed.model.state_dict().keys() == model.state_dict().keys()
    assert sum(p.numel() for p in concealed.parameters()) == sum(p.numel() for p in model.parameters())


def test_placements_insert_where_they_should(trained_model):
    net = trained_model.net
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    # a visible GCM (w=1, eps=0.1) so the forward pass shows where it sits
    visible = GradientConcealment(w=1.0, eps=0.1)
    with torch.no_grad():
        front = conceal(trained_model, "front", w=1.0, eps=0.1)(x)
        assert torch.allclose(front, trained_model(visible(x)), atol=1e-6)
        after_block1 = conceal(trained_model, ["net.block1"], w=1.0, eps=0.1)(x)
        h = visible(net.block1(net.stem(trained_model.normalize(x))))
        manual = net.head(net.pool(net.block3(net.block2(h)))) * net.head_scale
        assert torch.allclose(after_block1, manual, atol=1e-5)
        after_norm = conceal(trained_model, ["normalize"], w=1.0, eps=0.1)(x)
        assert torch.allclose(after_norm, net(visible(trained_model.normalize(x))), atol=1e-5)
    with pytest.warns(ConcealmentWarning):
        everywhere = conceal(trained_model, "all")
    leaves = [n for n, m in trained_model.named_modules() if n and not list(m.children())]
    assert list(everywhere.placements) == leaves
    hooked = [n for n, m in everywhere.model.named_modules() if m._forward_hooks]
    assert hooked == leaves


def test_resnet_stage_placements():
    model = create_model("resnet18", width=0.125).eval()
    stages = [f"net.layer{i}" for i in range(1, 5)]
    assert resolve_placements(model, stages) == stages
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConcealmentWarning)
        out = conceal(model, ["net.layer1"])(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_bad_placements_are_clear_errors(trained_model):
    with pytest.raises(GradshieldError, match="did you mean"):
        conceal(trained_model, ["net.blok1"])
    with pytest.raises(GradshieldError, match="nowhere"):
        conceal(trained_model, [])
    with pytest.raises(GradshieldError, match="w must be"):
        GradientConcealment(w=float("inf"))
    with pytest.raises(GradshieldError, match="not a floating-point tensor"):
        conceal(nn.Sequential(nn.Flatten(), _ArgMax()), ["1"])(torch.rand(2, 3))


class _ArgMax(nn.Module):
    def forward(self, x):
        return x.argmax(1)


def test_stacked_placements_overflow_is_reported(test_batch, trained_model):
    x, y = test_batch
    x, y = x[:32], y[:32]
    single = conceal(trained_model, "front")
    assert not gradient_health(single, x, y).flagged
    with pytest.warns(ConcealmentWarning, match="overflow"):
        stacked = conceal(trained_model, ["front", "net.block1", "net.block2", "net.block3"])
    finding = gradient_health(stacked, x, y)
    assert finding.flagged
    assert finding.evidence["examples_non_finite"] > 0
    assert "inf/NaN" in finding.summary
    with pytest.warns(ConcealmentWarning):
        everywhere = conceal(trained_model, "all")
    assert gradient_health(everywhere, x, y).evidence["non_finite_fraction"] > 0.5


def test_bpda_sees_every_placement(test_batch, trained_model):
    from gradshield.attacks import bpda
    from gradshield.evaluation.plots import input_gradient

    x, y = test_batch
    x, y = x[:8], y[:8]
    vanilla = input_gradient(trained_model, x, y)
    for at in ("front", ["net.block1"], ["front", "net.block2"]):
        concealed = conceal(trained_model, at)
        masked = input_gradient(concealed, x, y)
        assert float((masked.sign() == vanilla.sign()).float().mean()) < 0.6  # ~coin flips
        adaptive = bpda(concealed, lambda m: isinstance(m, GradientConcealment))
        assert torch.allclose(input_gradient(adaptive, x, y), vanilla, rtol=1e-4, atol=1e-7), at


def test_half_precision_gradients_are_reported_not_hidden():
    gcm = GradientConcealment()
    x = torch.rand(1000, generator=torch.Generator().manual_seed(3))
    bf16 = x.bfloat16().requires_grad_(True)
    gcm(bf16).sum().backward()
    assert torch.isfinite(bf16.grad).all() and float(bf16.grad.abs().max()) > 1e11
    fp16 = x.half().requires_grad_(True)
    gcm(fp16).sum().backward()
    assert not torch.isfinite(fp16.grad).any()  # 1e12 does not fit in float16 (max 65504)


def test_undefended_gives_the_model_back(trained_model):
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    concealed = conceal(trained_model, ["front", "net.block1"], w=1.0, eps=0.1)  # visible GCM
    plain = concealed.undefended()
    assert not any(m._forward_hooks for m in plain.modules())
    assert any(m._forward_hooks for m in concealed.model.modules())  # the wrapper keeps its own
    with torch.no_grad():
        assert torch.equal(plain(x), trained_model(x))
        assert not torch.allclose(concealed(x), trained_model(x))


def test_conceal_starts_no_subprocess_and_compiles_nothing(monkeypatch, tmp_path):
    """A layer call must never start a compiler or any other process, nor write a cache."""
    import os
    import subprocess

    def refuse(*args, **kwargs):
        raise AssertionError(f"GCM started a process: {args[:1]}")

    for name in ("Popen", "run", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, refuse)
    for name in ("system", "fork", "posix_spawn", "posix_spawnp", "execv", "execvp"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, refuse)
    monkeypatch.setenv("GRADSHIELD_CACHE", str(tmp_path / "cache"))
    model = create_model("compact", width=0.25).eval()
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    concealed = conceal(model, at="front")
    concealed(x).sum().backward()
    assert x.grad is not None and x.grad.abs().max() > 1e6  # the ~1e12 factor was applied
    assert not (tmp_path / "cache").exists()
