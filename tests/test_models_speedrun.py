"""The speed-run net: its whitening stem decorrelates 2x2 patches, is set from the training data
by the loop, stays frozen, and is restored from the checkpoint on resume."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from gradshield.checkpoint import load_model
from gradshield.data import ImageData
from gradshield.errors import GradshieldError
from gradshield.models import create_model
from gradshield.models.speedrun import WHITEN_EPS
from gradshield.training import CHECKPOINT_NAME, TrainConfig, init_from_data, train

CONFIG = TrainConfig(epochs=2, batch_size=32, lr=0.05, seed=5)


def _correlated(n: int, seed: int = 0) -> torch.Tensor:
    """Images whose neighbouring pixels and channels are strongly correlated."""
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.rand(n, 1, 34, 34, generator=g), 3, 1)
    return (x + 0.1 * torch.rand(n, 3, 32, 32, generator=g)).clamp(0, 1)


def _data(n: int) -> ImageData:
    images = (_correlated(n) * 255).round().to(torch.uint8)
    labels = torch.arange(n) % 4
    return ImageData(images, labels, classes=tuple("abcd"))


def _speedrun(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("speedrun", num_classes=4, width=0.25)


def test_stem_whitens_the_patches_of_its_data():
    model = _speedrun()
    x = model.normalize(_correlated(400))
    patches = x.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
    eigenvalues = torch.linalg.eigvalsh(torch.cov(patches.T))
    assert eigenvalues.max() / eigenvalues.min() > 50  # the case is strongly correlated
    model.net.init_from_data(x)
    with torch.no_grad():
        out = model.net.stem(x).double()
    flat = out.permute(1, 0, 2, 3).reshape(24, -1)
    cov = torch.cov(flat[:12])
    expected = eigenvalues / (eigenvalues + WHITEN_EPS)  # unit variance but for the eps
    torch.testing.assert_close(cov.diag().sort().values, expected.sort().values, rtol=1e-3, atol=1e-4)
    assert (cov - torch.diag(cov.diag())).abs().max() < 1e-3
    torch.testing.assert_close(flat[12:], -flat[:12])  # each filter with its negative


def test_training_sets_the_stem_from_its_data_keeps_it_frozen_and_resumes(tmp_path):
    data = _data(256)
    model = _speedrun()
    train(model, data, None, CONFIG, tmp_path / "ref", progress=False)
    expected = _speedrun(seed=1)
    init_from_data(expected, data, CONFIG.seed)  # the same seeded images, an independent call
    torch.testing.assert_close(model.net.stem.weight, expected.net.stem.weight)
    assert not model.net.stem.weight.requires_grad

    interrupted = _speedrun()
    train(interrupted, data, None, CONFIG, tmp_path / "cut", progress=False,
          stop_after_steps=256 // 32 + 3)
    resumed = _speedrun(seed=7)  # another init: the stem must come from the checkpoint

    def not_again(x):
        raise AssertionError("a resumed run recomputed the stem from the data")

    resumed.net.init_from_data = not_again
    train(resumed, data, None, CONFIG, tmp_path / "cut", progress=False)
    for name, value in model.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    loaded, _ = load_model(tmp_path / "ref" / CHECKPOINT_NAME)
    x = data.images[:8].float() / 255
    torch.testing.assert_close(loaded(x), model(x))


def test_flip_tta_averages_the_mirror_in_eval_mode_only_and_training_records_both(tmp_path):
    torch.manual_seed(0)
    model = create_model("speedrun", num_classes=4, width=0.25, tta="flip")
    x = _correlated(6)
    bare = lambda z: model.net(model.normalize(z))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), (bare(x) + bare(x.flip(3))) / 2)
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(model(x), bare(x))
    assert model.config.to_dict()["tta"] == "flip"
    assert "tta" not in create_model("speedrun").config.to_dict()  # older fingerprints hold

    data = _data(128)
    history = train(model, data, data, TrainConfig(epochs=1, batch_size=32, seed=1), tmp_path,
                    progress=False)
    x, y = data.as_float()
    with torch.no_grad():
        tta = ((bare(x) + bare(x.flip(3))).argmax(1) == y).float().mean()
        plain = (bare(x).argmax(1) == y).float().mean()
    # the loop predicts in channels-last: at most one near-tie may round the other way
    assert abs(history[-1]["test_acc"] - float(tta)) <= 1 / 128
    assert abs(history[-1]["test_acc_plain"] - float(plain)) <= 1 / 128
    loaded, _ = load_model(tmp_path / CHECKPOINT_NAME)
    assert loaded.config.tta == "flip"


def test_flip_translate_tta_is_airbench_six_views_weighted():
    """Half the mirror mean of the image, a quarter each of the mirror means of the image shifted
    one pixel diagonally either way with reflected borders; the shifts built here with numpy."""
    import numpy as np

    torch.manual_seed(0)
    model = create_model("speedrun", num_classes=4, width=0.25, tta="flip-translate").eval()
    x = _correlated(5)
    z = model.normalize(x)
    padded = torch.from_numpy(np.pad(z.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect"))
    views = [z, padded[:, :, :32, :32], padded[:, :, 2:, 2:]]
    with torch.no_grad():
        mirror = [(model.net(v) + model.net(v.flip(3))) / 2 for v in views]
        expected = 0.5 * mirror[0] + 0.25 * mirror[1] + 0.25 * mirror[2]
        torch.testing.assert_close(model(x), expected)
        assert not torch.allclose(model(x), mirror[0])  # the shifted views do count
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net(z))


def test_results_files_tell_the_same_weights_with_another_tta_apart():
    """A stored run's model fingerprint covers the test-time augmentation, so a results file made
    with one is never resumed with another; a model without any keeps its earlier fingerprint."""
    import dataclasses

    from gradshield.evaluation.store import model_fingerprint

    torch.manual_seed(0)
    bare = create_model("speedrun", num_classes=4, width=0.25)
    prints = {model_fingerprint(bare)}
    for tta in ("flip", "flip-translate"):
        bare.config = dataclasses.replace(bare.config, tta=tta)
        prints.add(model_fingerprint(bare))
    assert len(prints) == 3
    assert "tta" not in repr(create_model("speedrun", num_classes=4, width=0.25))
    assert "tta=flip-translate" in repr(bare)


def test_an_unknown_tta_is_a_clear_error():
    with pytest.raises(GradshieldError, match="tta must be"):
        create_model("compact", tta="rotate")
