"""Data layer: the bundled archive, subsets, batch augmentation, and clear errors on bad data."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from gradshield.data import (
    CIFAR10_CLASSES,
    ImageData,
    decode_archive,
    iterate_batches,
    load_archive,
    load_dataset,
    load_image_folder,
    random_crop_flip,
)
from gradshield.errors import GradshieldError


def test_bundled_archive_is_full_cifar10(cifar):
    train, test = cifar
    assert train.images.shape == (50_000, 3, 32, 32) and test.images.shape == (10_000, 3, 32, 32)
    assert train.images.dtype == torch.uint8
    assert train.classes == CIFAR10_CLASSES
    assert torch.bincount(train.labels).tolist() == [5000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    # real images, not constant blocks: per-image pixel spread
    assert float(test.images[:100].float().std(dim=(1, 2, 3)).mean()) > 20


def test_subset_is_deterministic_by_seed(cifar):
    test = cifar[1]
    a, b, c = test.subset(300, seed=1), test.subset(300, seed=1), test.subset(300, seed=2)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.labels, c.labels)
    assert len(a) == 300 and test.subset(None) is test


def test_random_crop_flip_is_a_shifted_padded_copy():
    gen = torch.Generator().manual_seed(0)
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    flipped = random_crop_flip(images, gen, padding=0, flip=True)
    for original, out in zip(images, flipped, strict=True):
        assert torch.equal(out, original) or torch.equal(out, original.flip(2))
    cropped = random_crop_flip(images, torch.Generator().manual_seed(3), padding=2, flip=False)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, r:r + 8, c:c + 8] for r in range(5) for c in range(5)]
        assert any(torch.equal(cropped[i], w) for w in windows)


def _examples(images: torch.Tensor, labels: torch.Tensor) -> Counter:
    """The multiset of (image bytes digest, label) pairs of uint8 images."""
    return Counter((hashlib.sha256(image.contiguous().numpy().tobytes()).hexdigest(), int(label))
                   for image, label in zip(images, labels, strict=True))


def test_iterate_batches_covers_every_example_once(cifar):
    """Every (image, label) pair exactly once: comparing labels alone would pass a batch that
    repeats one image and drops another of the same class, or pairs images with wrong labels."""
    data = cifar[1].subset(250, seed=0)
    gen = torch.Generator().manual_seed(0)
    batches = list(iterate_batches(data, 64, shuffle=True, generator=gen))
    x = torch.cat([b[0] for b in batches])
    seen = torch.cat([b[1] for b in batches])
    assert x.dtype == torch.float32 and float(x.min()) >= 0 and float(x.max()) <= 1
    as_uint8 = (x * 255).round().to(torch.uint8)
    assert torch.equal(as_uint8.float() / 255, x)  # exactly the stored 8-bit values
    assert _examples(as_uint8, seen) == _examples(data.images, data.labels)
    assert len(_examples(data.images, data.labels)) == len(data)  # the subset holds no duplicates
    first, _ = next(iterate_batches(data, 64))
    assert torch.equal(first, data.images[:64].float() / 255)  # unshuffled: in order


def _write_tar(path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))


def _jpeg(color) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), color, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_small_archive_roundtrip(tmp_path):
    path = tmp_path / "tiny.tar.gz"
    _write_tar(path, {"train/a/1.png": _jpeg(10), "train/b/1.png": _jpeg(200),
                      "test/a/1.png": _jpeg(10), "test/b/2.png": _jpeg(200)})
    splits = load_archive(path, cache=tmp_path / "cache")
    assert splits["train"].classes == ("a", "b")
    assert splits["test"].labels.tolist() == [0, 1]
    assert int(splits["test"].images[1].float().mean()) == 200
    again = load_archive(path, cache=tmp_path / "cache")  # from the cache
    assert torch.equal(again["train"].images, splits["train"].images)


def test_missing_archive_says_how_to_point_at_it(tmp_path):
    with pytest.raises(GradshieldError, match="--data-dir"):
        load_dataset("cifar10-jpeg", tmp_path, tmp_path)


def test_truncated_archive_is_reported_as_corrupt(tmp_path):
    path = tmp_path / "cut.tar.gz"
    _write_tar(path, {f"train/a/{i}.png": _jpeg(i) for i in range(50)})
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(GradshieldError, match="corrupt or truncated"):
        decode_archive(path)
    path.write_bytes(b"not a gzip file at all")
    with pytest.raises(GradshieldError, match="corrupt or truncated"):
        decode_archive(path)


def test_corrupt_image_is_named(tmp_path):
    path = tmp_path / "bad.tar.gz"
    _write_tar(path, {"train/a/ok.png": _jpeg(1), "train/a/broken.jpg": b"\xff\xd8garbage"})
    with pytest.raises(GradshieldError, match=r"broken\.jpg"):
        decode_archive(path)


def test_image_folder_and_mixed_sizes(tmp_path):
    for cls, color in (("cat", 30), ("dog", 90)):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "x.png").write_bytes(_jpeg(color))
    data = load_image_folder(tmp_path)
    assert data.classes == ("cat", "dog") and data.images.shape == (2, 3, 4, 4)
    Image.new("RGB", (5, 5)).save(tmp_path / "dog" / "big.png")
    with pytest.raises(GradshieldError, match="image_size"):
        load_image_folder(tmp_path)
    assert load_image_folder(tmp_path, size=(4, 4)).images.shape == (3, 3, 4, 4)


def test_imagedata_rejects_wrong_types():
    with pytest.raises(GradshieldError, match="uint8"):
        ImageData(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), ("a",))
