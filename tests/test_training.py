"""The training loop: learning on real data, exact resume after a kill, metrics, recipes, errors."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import torch

from gradshield.checkpoint import load_model, read_checkpoint
from gradshield.data import ImageData
from gradshield.errors import GradshieldError
from gradshield.models import create_model
from gradshield.training import CHECKPOINT_NAME, METRICS_NAME, TrainConfig, learning_rate, train
from tests.conftest import class_balanced, data_dir

SMALL = TrainConfig(epochs=3, batch_size=64, lr=0.1, seed=3)


def _fresh(seed=0):
    torch.manual_seed(seed)
    return create_model("compact", width=0.5)


def _weights_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_learning_rate_schedule():
    lrs = [learning_rate(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[9] == 1.0 and lrs[0] == pytest.approx(0.1) and lrs[-1] < 0.02
    assert all(a <= b for a, b in itertools.pairwise(lrs[:10]))


def test_training_learns_on_real_cifar10(cifar, tmp_path):
    """Three epochs on 2048 images. The bounds are what learning means, not one machine's model:
    a prediction that ignores the image has a cross-entropy of at least the entropy of the label
    distribution (~ln 10), and is right on each of 1000 class-balanced test images with
    probability 0.1, so its accuracy exceeds 0.1 + 5 standard deviations of that binomial
    (5 * sqrt(0.1 * 0.9 / 1000) = 0.047) with probability below 1e-6."""
    train_data, test_data = cifar[0].subset(2048, seed=0), class_balanced(cifar[1], 100, seed=0)
    model = _fresh()
    history = train(model, train_data, test_data, SMALL, tmp_path, progress=False)
    assert [r["epoch"] for r in history] == [0, 1, 2]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    frequencies = torch.bincount(train_data.labels, minlength=10).double() / len(train_data)
    label_entropy = float(-(frequencies * frequencies.log()).sum())
    assert history[-1]["train_loss"] < label_entropy
    chance, n = 1 / 10, len(test_data)
    assert history[-1]["test_acc"] > chance + 5 * math.sqrt(chance * (1 - chance) / n)
    lines = (tmp_path / METRICS_NAME).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]
    assert not model.training


def test_resume_mid_epoch_gives_identical_weights(cifar, tmp_path):
    data = cifar[0].subset(1024, seed=1)
    reference = _fresh()
    train(reference, data, None, SMALL, tmp_path / "ref", progress=False)

    interrupted = _fresh()
    steps_per_epoch = 1024 // 64
    train(interrupted, data, None, SMALL, tmp_path / "cut", progress=False,
          stop_after_steps=steps_per_epoch + 5)  # dies 5 steps into the second epoch
    assert read_checkpoint(tmp_path / "cut" / CHECKPOINT_NAME)["epoch"] == 0
    resumed = _fresh(seed=99)  # different init: everything must come from the checkpoint
    history = train(resumed, data, None, SMALL, tmp_path / "cut", progress=False)
    assert [r["epoch"] for r in history] == [0, 1, 2]
    assert _weights_equal(resumed, reference)


def test_resume_refuses_a_run_with_other_settings(cifar, tmp_path):
    data = cifar[0].subset(256, seed=0)
    train(_fresh(), data, None, TrainConfig(epochs=1, batch_size=64), tmp_path, progress=False)
    with pytest.raises(GradshieldError, match="different settings"):
        train(_fresh(), data, None, TrainConfig(epochs=1, batch_size=32), tmp_path,
              progress=False)


def test_labels_out_of_range_and_wrong_size_images(cifar, tmp_path):
    data = cifar[0].subset(64, seed=0)
    model = create_model("compact", num_classes=5, width=0.25)
    with pytest.raises(GradshieldError, match="number of classes"):
        train(model, data, None, SMALL, tmp_path, progress=False)
    big = ImageData(torch.zeros(4, 3, 40, 40, dtype=torch.uint8), torch.zeros(4, dtype=torch.long),
                    data.classes)
    with pytest.raises(GradshieldError, match="expects"):
        train(_fresh(), big, None, SMALL, tmp_path, progress=False)


@dataclass(frozen=True)
class _ScaledRecipe:
    """A user-defined recipe: the loop must accept it unchanged."""

    scale: float = 0.5
    name: str = "scaled"

    def __call__(self, model, x, y, generator):
        noise = torch.rand(x.shape, generator=generator) * 0.01
        return self.scale * torch.nn.functional.cross_entropy(model((x + noise).clamp(0, 1)), y)

    def describe(self):
        return {"name": self.name, "scale": self.scale}


def test_custom_recipe_plugs_in(cifar, tmp_path):
    data = cifar[0].subset(512, seed=0)
    history = train(_fresh(), data, None, TrainConfig(epochs=2, batch_size=64), tmp_path,
                    recipe=_ScaledRecipe(), progress=False)
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert read_checkpoint(tmp_path / CHECKPOINT_NAME)["recipe"]["name"] == "scaled"


def test_cli_train_survives_sigkill_and_evaluate_needs_only_the_file(tmp_path):
    def command(out):
        return [sys.executable, "-m", "gradshield", "train", "--train-limit", "3072",
                "--test-limit", "200", "--epochs", "3", "--batch-size", "128", "--width", "0.5",
                "--seed", "5", "--quiet", "--out", str(out)]

    env = {**os.environ, "GRADSHIELD_DATA": str(data_dir())}
    subprocess.run(command(tmp_path / "ref"), check=True, env=env, capture_output=True)

    victim = subprocess.Popen(command(tmp_path / "cut"), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "cut" / CHECKPOINT_NAME
    deadline = time.time() + 300
    while victim.poll() is None and time.time() < deadline and not checkpoint.is_file():
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)  # the first epoch is saved and the second one has begun
    victim.wait()
    assert victim.returncode == -signal.SIGKILL  # it was still running when killed
    assert read_checkpoint(checkpoint)["epoch"] == 0  # killed mid-run: one of three epochs saved
    assert len((tmp_path / "cut" / METRICS_NAME).read_text().splitlines()) == 1
    done = subprocess.run(command(tmp_path / "cut"), check=True, env=env, capture_output=True,
                          text=True)
    assert json.loads(done.stdout.strip().splitlines()[-1])["epochs"] == 3
    ref, _ = load_model(tmp_path / "ref" / CHECKPOINT_NAME)
    cut, _ = load_model(tmp_path / "cut" / CHECKPOINT_NAME)
    assert _weights_equal(ref, cut)

    evaluated = subprocess.run([sys.executable, "-m", "gradshield", "evaluate", "--checkpoint",
                                str(tmp_path / "cut" / CHECKPOINT_NAME), "--test-limit", "200"],
                               check=True, env=env, capture_output=True, text=True)
    result = json.loads(evaluated.stdout)
    assert result["examples"] == 200 and 0.2 < result["clean_accuracy"] <= 1.0


def test_bias_lr_scale_splits_the_learning_rate_and_decay():
    """1-d parameters get lr x scale and weight decay / scale, so their decay per step is unchanged."""
    from gradshield.training import _param_groups

    model = _fresh()
    config = TrainConfig(lr=0.1, weight_decay=1e-3, bias_lr_scale=64.0)
    weights, shifts = _param_groups(model, config)
    assert all(p.ndim > 1 for p in weights["params"]) and all(p.ndim == 1 for p in shifts["params"])
    assert len(weights["params"]) + len(shifts["params"]) == len(list(model.parameters()))
    assert shifts["lr_scale"] * shifts["weight_decay"] == pytest.approx(config.weight_decay)
    assert len(_param_groups(model, TrainConfig())) == 1
    with pytest.raises(GradshieldError, match="bias_lr_scale"):
        TrainConfig(bias_lr_scale=0.0).validate()


def test_lookahead_averages_and_ends_on_the_average(cifar, tmp_path):
    """The update is a lerp of the running average toward the weights, then the weights are set
    to it; the decay grows as (step / total)^3 to 0.95^5; a run ends on the average and resumes
    after a kill to the same weights."""
    from gradshield.training import Lookahead

    assert Lookahead.decay(0, 100) == 0 and Lookahead.decay(100, 100) == pytest.approx(0.95 ** 5)
    model = _fresh()
    lookahead = Lookahead(model)
    before = {k: v.clone() for k, v in lookahead.average.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    lookahead.update(model, 0.75)
    key = next(k for k, _ in model.named_parameters())
    expected = before[key] + 0.25
    torch.testing.assert_close(lookahead.average[key], expected)
    torch.testing.assert_close(dict(model.named_parameters())[key].detach(), expected)

    data = cifar[0].subset(1024, seed=1)
    config = TrainConfig(epochs=2, batch_size=64, lr=0.1, seed=3, lookahead=True, bias_lr_scale=8.0)
    reference = _fresh()
    train(reference, data, None, config, tmp_path / "ref", progress=False)
    blob = read_checkpoint(tmp_path / "ref" / CHECKPOINT_NAME)
    for k, v in blob["lookahead_state"].items():
        torch.testing.assert_close(reference.state_dict()[k], v)
    interrupted = _fresh()
    train(interrupted, data, None, config, tmp_path / "cut", progress=False,
          stop_after_steps=1024 // 64 + 7)
    resumed = _fresh(seed=99)
    train(resumed, data, None, config, tmp_path / "cut", progress=False)
    assert _weights_equal(resumed, reference)


def test_alternating_flips_mirror_each_image_once_every_two_epochs():
    from gradshield.data.memory import random_crop_flip
    from gradshield.training import _alternating_flips

    config = TrainConfig(seed=4, flip="alternating")
    first, second, third = (_alternating_flips(config, epoch, 101) for epoch in range(3))
    assert int(first.sum()) == 50 and torch.equal(first ^ second, torch.ones(101, dtype=torch.bool))
    assert torch.equal(first, third)
    assert _alternating_flips(TrainConfig(), 0, 101) is None
    images = torch.randint(0, 256, (101, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(images, torch.Generator().manual_seed(0), padding=0, flips=first)
    assert torch.equal(out[first], images[first].flip(3)) and torch.equal(out[~first], images[~first])
    with pytest.raises(GradshieldError, match="flip"):
        TrainConfig(flip="sometimes").validate()
