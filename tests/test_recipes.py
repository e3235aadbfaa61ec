"""Training recipes: they plug into the one training loop unchanged and reduce their loss; the
training adversary respects its budget, the model's mode and BatchNorm statistics; options and
units are checked."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from gradshield.defenses.recipes import (
    PAPER_FGR_LAMBDA,
    RECIPES,
    ADTRecipe,
    FGRRecipe,
    make_recipe,
    training_adversary,
)
from gradshield.defenses.regularizers import fgr_penalty, flow_random_start
from gradshield.errors import GradshieldError
from gradshield.models import create_model
from gradshield.perturbations import Additive, Flow
from gradshield.training import TrainConfig, train

FAST = {"at": {"steps": 2}, "adt": {"steps": 2}, "fgr_adt": {"steps": 2}}


def recipe_loss(model, recipe, x, y) -> float:
    model.train()
    return float(recipe(model, x, y, torch.Generator().manual_seed(0)).detach())


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_plugs_into_the_training_loop_and_reduces_its_loss(name, cifar, tmp_path):
    torch.manual_seed(0)
    model = create_model("compact", width=0.25)
    data = cifar[0].subset(64, seed=1)  # 4 epochs x 2 steps on the same 64 images
    x, y = data.as_float()
    recipe = make_recipe(name, **FAST.get(name, {}))
    before = recipe_loss(copy.deepcopy(model), recipe, x, y)
    config = TrainConfig(epochs=4, batch_size=32, lr=0.05, warmup_epochs=0.5, amp="off",
                         augment=False)
    history = train(model, data, None, config, tmp_path / name, recipe=recipe, progress=False)
    after = recipe_loss(model, recipe, x, y)
    assert len(history) == 4 and torch.isfinite(torch.tensor(history[-1]["train_loss"]))
    assert after < before - 0.05, f"{name}: loss {before:.3f} -> {after:.3f}"


def test_fgr_trains_under_bf16_autocast(cifar, tmp_path):
    """The double backward runs under the loop's bf16 autocast and gives finite losses."""
    torch.manual_seed(0)
    model = create_model("compact", width=0.25)
    config = TrainConfig(epochs=1, batch_size=32, lr=0.05, amp="bf16", augment=False)
    history = train(model, cifar[0].subset(64, seed=1), None, config, tmp_path, progress=False,
                    recipe=make_recipe("fgr", lam=0.05))
    assert torch.isfinite(torch.tensor(history[0]["train_loss"]))


def test_fgr_recipe_is_the_penalty_on_the_random_start(trained_model, test_batch):
    x, y = test_batch[0][:8], test_batch[1][:8]
    recipe = FGRRecipe(lam=0.3, sigma=0.02)
    got = recipe(trained_model, x, y, torch.Generator().manual_seed(5))
    x0 = flow_random_start(x, 0.02, torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, fgr_penalty(trained_model, x0, y).total(0.3))
    assert FGRRecipe().lam == PAPER_FGR_LAMBDA == 300 / 128**2


@pytest.mark.parametrize("space", [Additive("linf", 8 / 255), Flow("linf", 0.155)],
                         ids=["additive", "flow"])
def test_training_adversary_raises_the_loss_within_budget(space, trained_model, test_batch):
    x, y = test_batch[0][:32], test_batch[1][:32]
    model = trained_model.train()
    bn_before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    x_adv = training_adversary(model, x, y, space, steps=3, step_size=space.eps / 2,
                               random_start=isinstance(space, Additive),
                               generator=torch.Generator().manual_seed(0))
    assert model.training and all(m.training for m in model.modules())  # mode restored
    for key, value in bn_before.items():  # eval-mode attack: running statistics untouched
        assert torch.equal(model.state_dict()[key], value), key
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    if isinstance(space, Additive):
        assert float((x_adv - x).abs().max()) <= 8 / 255 + 1e-6
    model.eval()
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y)
        adv = F.cross_entropy(model(x_adv), y)
    assert adv > clean + 0.1


def test_adt_normalized_budget_is_converted_to_pixels(trained_model, test_batch):
    x, y = test_batch[0][:16], test_batch[1][:16]
    gen = torch.Generator
    a = ADTRecipe(eps=0.01, steps=3).adversarial(trained_model, x, y, gen().manual_seed(0))
    b = ADTRecipe(eps=0.155, steps=3, unit="pixels").adversarial(trained_model, x, y,
                                                                 gen().manual_seed(0))
    torch.testing.assert_close(a, b)
    with pytest.raises(GradshieldError, match="pixels"):
        ADTRecipe().adversarial(trained_model, x[..., :16], y, gen())


def test_make_recipe_options_and_errors():
    for name in RECIPES:
        recipe = make_recipe(name)
        assert recipe.name == name
        options = {k: v for k, v in recipe.describe().items() if k != "name"}
        assert make_recipe(name, **options) == recipe  # describe() rebuilds the recipe
    assert make_recipe("fgr", lam=0.1, unit="pixels").describe()["unit"] == "pixels"
    with pytest.raises(GradshieldError, match="unknown defense"):
        make_recipe("nope")
    with pytest.raises(GradshieldError, match="bad options"):
        make_recipe("fgr", lambda_=1)
    with pytest.raises(GradshieldError, match="lam"):
        make_recipe("igr", lam=-1)
    with pytest.raises(GradshieldError, match="unit"):
        make_recipe("adt", unit="px")
    with pytest.raises(GradshieldError, match="steps"):
        make_recipe("at", steps=0)
    with pytest.raises(GradshieldError, match="attack_mode"):
        make_recipe("at", attack_mode="both")
