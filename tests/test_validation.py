"""Clear errors for bad tensors handed to the library."""

from __future__ import annotations

import pytest
import torch

from gradshield.errors import GradshieldError
from gradshield.metrics import accuracy, attack_robustness, robust_accuracy
from gradshield.models import create_model


@pytest.fixture(scope="module")
def model():
    return create_model("compact", width=0.25).eval()


@pytest.mark.parametrize("images,message", [
    (torch.rand(3, 32, 32), "add a batch dimension"),
    (torch.full((2, 3, 32, 32), 2.0), r"\[0, 1\]"),
    (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), "floating point"),
    (torch.full((2, 3, 32, 32), float("nan")), "NaN"),
])
def test_bad_images(model, images, message):
    with pytest.raises(GradshieldError, match=message):
        accuracy(model, images, torch.zeros(images.shape[0], dtype=torch.long))


@pytest.mark.parametrize("labels,message", [
    (torch.tensor([0, 10]), "number of classes"),
    (torch.tensor([0, -1]), ">= 0"),
    (torch.tensor([0.0, 1.0]), "integer"),
    (torch.tensor([0, 1, 2]), "shape"),
])
def test_bad_labels(model, labels, message):
    with pytest.raises(GradshieldError, match=message):
        accuracy(model, torch.rand(2, 3, 32, 32), labels)


def test_attack_robustness_counts_only_clean_correct():
    clean = torch.tensor([True, True, False, True])
    adv = torch.tensor([True, False, True, True])
    assert attack_robustness(clean, adv) == pytest.approx(2 / 3)
    assert robust_accuracy(clean, adv) == pytest.approx(2 / 4)
