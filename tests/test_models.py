"""Model registry, [0, 1] inputs with normalisation inside, checkpoints and their errors."""

from __future__ import annotations

import pytest
import torch

from gradshield.checkpoint import load_model, read_checkpoint, save_checkpoint
from gradshield.errors import GradshieldError
from gradshield.models import ModelConfig, create_model, list_models


@pytest.mark.parametrize("arch,width", [("compact", 1.0), ("compact", 0.5), ("vgg11", 0.125),
                                        ("resnet18", 0.125)])
def test_cifar_architectures_forward(arch, width):
    model = create_model(arch, num_classes=7, width=width).eval()
    out = model(torch.rand(3, 3, 32, 32))
    assert out.shape == (3, 7) and torch.isfinite(out).all()


def test_width_multiplier_scales_parameters():
    small = sum(p.numel() for p in create_model("resnet18", width=0.25).parameters())
    full = sum(p.numel() for p in create_model("resnet18", width=0.5).parameters())
    assert 3.5 < full / small < 4.1  # conv parameters grow with width squared


def test_normalisation_is_inside_the_model():
    model = create_model("compact")
    assert torch.allclose(model.normalize(torch.full((1, 3, 1, 1), 0.5)).flatten(),
                          (0.5 - torch.tensor(model.config.mean)) / torch.tensor(model.config.std))


def test_torchvision_architecture_by_name_without_download(tmp_path):
    model = create_model("torchvision:resnet18", num_classes=5, input_size=(64, 64))
    assert model.config.mean == (0.485, 0.456, 0.406) and model.config.std == (0.229, 0.224, 0.225)
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 5)
    weights = tmp_path / "w.pth"
    torch.save(model.net.state_dict(), weights)
    again = create_model("torchvision:resnet18", num_classes=5, weights=weights)
    assert torch.equal(again.net.fc.weight, model.net.fc.weight)
    with pytest.raises(GradshieldError, match="not found"):
        create_model("torchvision:resnet18", weights=tmp_path / "none.pth")
    with pytest.raises(GradshieldError, match="now torchvision:<name>"):
        create_model("tv-resnet18")


def test_unknown_model_lists_the_choices():
    with pytest.raises(GradshieldError, match="compact"):
        create_model("resnet1000")
    assert {"compact", "vgg11", "resnet18"} <= set(list_models())


def _save(model, path):
    return save_checkpoint(path, {"model_config": model.config.to_dict(),
                                  "model_state": model.state_dict()})


def test_checkpoint_roundtrip_rebuilds_the_model(tmp_path):
    model = create_model("compact", width=0.5).eval()
    path = _save(model, tmp_path / "m.pt")
    loaded, blob = load_model(path)
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(loaded(x), model(x)) and blob["format"] == "gradshield-checkpoint"
    assert loaded.config == model.config


def test_checkpoint_of_another_architecture(tmp_path):
    path = _save(create_model("compact", width=0.5), tmp_path / "m.pt")
    with pytest.raises(GradshieldError, match="expected"):
        load_model(path, expect=ModelConfig("compact", width=1.0))
    blob = read_checkpoint(path)
    blob["model_config"]["width"] = 1.0  # metadata says one thing, weights another
    torch.save(blob, tmp_path / "lying.pt")
    with pytest.raises(GradshieldError, match="does not fit"):
        load_model(tmp_path / "lying.pt")


def test_truncated_and_foreign_checkpoints(tmp_path):
    path = _save(create_model("compact"), tmp_path / "m.pt")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(GradshieldError, match="truncated or corrupt"):
        load_model(tmp_path / "cut.pt")
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(GradshieldError, match="not a gradshield checkpoint"):
        load_model(tmp_path / "foreign.pt")
    with pytest.raises(GradshieldError, match="not found"):
        load_model(tmp_path / "absent.pt")
