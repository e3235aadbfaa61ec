"""BPDA and transfer attacks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradshield.attacks import bpda, fgsm, pgd, transfer_attack
from gradshield.errors import GradshieldError


class SinLayer(nn.Module):
    """A parameter-free layer ``x + eps * sin(w * x)`` whose gradient is huge and random-signed."""

    def __init__(self, eps: float = 1.0, w: float = 1e6) -> None:
        super().__init__()
        self.eps, self.w = eps, w

    def forward(self, x):
        return x + self.eps * torch.sin(self.w * x)


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(SinLayer(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Sequential(SinLayer(0.01), nn.Linear(4 * 64, 10)))


def test_bpda_keeps_forward_and_replaces_backward():
    net = small_net().double()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    wrapped = bpda(net, lambda m: isinstance(m, SinLayer))
    assert isinstance(net[0], SinLayer)  # the original is untouched
    out, ref = wrapped(x), net(x)
    assert torch.equal(out, ref)
    (grad,) = torch.autograd.grad(out.sum(), x)
    # without the sin layers the network is conv-relu-linear: the BPDA gradient must equal it
    with torch.no_grad():
        relu_mask = net[1](net[0](x)) > 0  # BPDA differentiates through the *actual* forward activations
    xd = x.detach().requires_grad_(True)
    pre = net[1](xd)
    h = torch.where(relu_mask, pre, torch.zeros_like(pre)).flatten(1)
    h2 = net[4][0](h).detach() + (h - h.detach())
    (want,) = torch.autograd.grad(net[4][1](h2).sum(), xd)
    torch.testing.assert_close(grad, want)
    (raw,) = torch.autograd.grad(net(x).sum(), x)
    assert raw.abs().max() > 1e3 * grad.abs().max()  # the unwrapped gradient is the exploded one


def test_bpda_with_a_differentiable_approximation():
    layer = nn.Sequential(SinLayer(eps=0.5, w=3.0))
    x = torch.rand(5, 7, dtype=torch.float64, requires_grad=True)
    wrapped = bpda(layer, lambda m: isinstance(m, SinLayer), approximation=lambda t: 2 * t)
    assert torch.equal(wrapped(x), layer(x))
    (grad,) = torch.autograd.grad(wrapped(x).sum(), x)
    torch.testing.assert_close(grad, torch.full_like(x, 2.0))
    root = bpda(SinLayer(), lambda m: isinstance(m, SinLayer))
    (grad,) = torch.autograd.grad(root(x).sum(), x)
    torch.testing.assert_close(grad, torch.ones_like(x))


def test_bpda_errors():
    with pytest.raises(GradshieldError, match="no sub-module"):
        bpda(small_net(), lambda m: isinstance(m, nn.BatchNorm2d))
    wrapped = bpda(nn.Sequential(nn.Flatten()), lambda m: isinstance(m, nn.Flatten))
    with pytest.raises(GradshieldError, match="shape"):
        wrapped(torch.rand(2, 3, 4, 4, requires_grad=True))


def test_bpda_restores_a_masked_attack(trained_model, test_batch):
    """A sin layer with w = 1e6 in front of the real model masks PGD; BPDA recovers the attack."""
    images, labels = test_batch
    index = torch.arange(64) * 8
    x, y = images[index], labels[index]
    masked = nn.Sequential(SinLayer(eps=1e-4, w=1e6), trained_model).eval()
    plain = pgd(trained_model, x, y, eps=2 / 255, steps=5)
    assert pgd(masked, x, y, eps=2 / 255, steps=5).success_rate < 0.7 * plain.success_rate
    adaptive = pgd(bpda(masked, lambda m: isinstance(m, SinLayer)), x, y, eps=2 / 255, steps=5)
    with torch.no_grad():
        assert (masked(adaptive.adversarial).argmax(1) != y).float().mean() > 0.5 * plain.success_rate
    assert adaptive.success_rate > 0.9 * plain.success_rate


def test_transfer_attack_scores_on_the_target(trained_model, test_batch):
    images, labels = test_batch
    index = torch.arange(48) * 10
    x, y = images[index], labels[index]
    torch.manual_seed(0)
    target = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()
    result = transfer_attack(fgsm, trained_model, target, x, y, eps=8 / 255)
    with torch.no_grad():
        assert torch.equal(result.success, target(result.adversarial).argmax(1) != y)
    assert (result.queries == 1).all()
    assert torch.equal(result.info["surrogate_success"], fgsm(trained_model, x, y, eps=8 / 255).success)


def test_bpda_default_sees_through_every_gcm_placement_and_only_marked_modules(trained_model,
                                                                               test_batch):
    """A defense marks what BPDA replaces; the evaluation names no defense. With GCM at the
    front and after two blocks, BPDA's gradient is the undefended model's; an unmarked model
    gets None (no silent no-op)."""
    import warnings

    from gradshield.attacks.adaptive import bpda_default, undefended
    from gradshield.defenses.concealment import ConcealmentWarning, conceal

    x, y = test_batch[0][:8], test_batch[1][:8]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConcealmentWarning)
        concealed = conceal(trained_model, at=["front", "net.block1", "net.block2"])
    assert bpda_default(trained_model) is None and undefended(trained_model) is None
    seen = bpda_default(concealed)

    def grad(model):
        z = x.clone().requires_grad_(True)
        return torch.autograd.grad(torch.nn.functional.cross_entropy(model(z), y), z)[0]

    plain = undefended(concealed)
    # GCM moves activations by <= eps = 1e-8, so the gradients agree to float32 noise, not bits
    through, reference = grad(seen), grad(trained_model)
    assert (through - reference).norm() <= 1e-3 * reference.norm()
    assert torch.equal(seen(x), concealed(x))          # forward values unchanged
    assert torch.equal(plain(x), trained_model(x))      # the undefended copy has no GCM hook left
    assert not torch.isfinite(grad(concealed)).all() or grad(concealed).abs().max() > 1e6
