"""Data sets small enough to hold in memory as uint8 tensors, and augmentation done on tensors in
batches. (Large ones, e.g. ImageNet, stream from files: :mod:`gradshield.data.folders`.)

Sources:
- the offline archive ``cifar10-jpeg.tar.gz`` (image-folder layout inside a .tar.gz), decoded once
  and cached as uint8 tensors in the cache directory;
- CIFAR-10 / CIFAR-100 through torchvision (downloaded only when ``download=True``);
- any image folder ``root/<split>/<class>/<image>``.

Images are kept as uint8 (N, C, H, W); :func:`iterate_batches` turns them into float32 in [0, 1].
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gradshield.errors import GradshieldError
from gradshield.paths import cache_dir as default_cache_dir
from gradshield.paths import data_dir as default_data_dir
from gradshield.safe_load import UnsafeFileError, load_torch_file
from gradshield.utils import draw_rows

ARCHIVE_NAME = "cifar10-jpeg.tar.gz"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class ImageData:
    """A labelled image set held in memory: uint8 images (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise GradshieldError(
                f"ImageData.images must be uint8 (N, C, H, W), got {self.images.dtype} "
                f"{tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise GradshieldError(
                f"ImageData has {self.images.shape[0]} images but labels of shape "
                f"{tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, limit: int | None, seed: int = 0) -> ImageData:
        """A deterministic random subset of ``limit`` examples (all of them if None), in index order."""
        if limit is None or limit >= len(self):
            return self
        index = subset_index(len(self), limit, seed)
        return ImageData(self.images[index], self.labels[index], self.classes)

    def per_class(self, count: int, seed: int = 0) -> ImageData:
        """``count`` examples of each class (all of a class that has fewer), chosen at random by
        ``seed``, in index order (the GCM paper's "20 images per category")."""
        index = per_class_index(self.labels, count, seed)
        return ImageData(self.images[index], self.labels[index], self.classes)

    def as_float(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images as float32 in [0, 1] and their labels."""
        return self.images.float().div_(255.0), self.labels


def subset_index(n: int, limit: int | None, seed: int) -> torch.Tensor:
    """Indices of a seeded random subset of ``limit`` of ``n`` examples, in index order."""
    if limit is None or limit >= n:
        return torch.arange(n)
    if limit < 1:
        raise GradshieldError(f"subset limit must be >= 1, got {limit}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:limit].sort().values


def per_class_index(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Indices of ``count`` examples per class (all of a smaller class), drawn with one seeded
    permutation, in index order."""
    if count < 1:
        raise GradshieldError(f"examples per class must be >= 1, got {count}")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(labels.shape[0], generator=gen)
    taken: dict[int, int] = {}
    chosen = []
    for i in order.tolist():
        label = int(labels[i])
        if taken.get(label, 0) < count:
            taken[label] = taken.get(label, 0) + 1
            chosen.append(i)
    return torch.tensor(sorted(chosen), dtype=torch.long)


# ----------------------------------------------------------------------------- sources

def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _decode_image(payload: bytes, where: str, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(payload)) as img:
            img = img.convert("RGB")
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise GradshieldError(
            f"could not decode image {where}: {err}. Replace or delete that file "
            "(or re-copy the archive) and try again") from err


def _stack(arrays: list[np.ndarray], labels: list[int], classes: tuple[str, ...],
           where: str) -> ImageData:
    if not arrays:
        raise GradshieldError(f"no images found in {where}")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise GradshieldError(
            f"images in {where} have different sizes {sorted(shapes)[:3]}...; "
            "pass image_size=(H, W) (CLI: --image-size) to resize them on load")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return ImageData(images, torch.tensor(labels, dtype=torch.long), classes)


def decode_archive(path: Path, size: tuple[int, int] | None = None) -> dict[str, ImageData]:
    """Decode a ``.tar.gz`` in image-folder layout (``<split>/<class>/<file>``), reading it in order."""
    records: dict[str, list[tuple[str, str, np.ndarray]]] = {}
    try:
        with tarfile.open(path, mode="r:gz") as archive:
            for member in archive:  # iterate in stored order: no backward seeks
                if not member.isfile() or not member.name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                parts = Path(member.name).parts
                if len(parts) < 3:
                    continue
                split, cls, fname = parts[-3], parts[-2], parts[-1]
                handle = archive.extractfile(member)
                payload = handle.read() if handle is not None else b""
                array = _decode_image(payload, f"{member.name} in {path}", size)
                records.setdefault(split, []).append((cls, fname, array))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise GradshieldError(
            f"the archive {path} is corrupt or truncated ({type(err).__name__}: {err}); "
            f"copy it again from its source (the bundled one is ../shared/datasets/{ARCHIVE_NAME})"
        ) from err
    if not records:
        raise GradshieldError(
            f"the archive {path} holds no images in the layout <split>/<class>/<image>")
    classes = tuple(sorted({cls for items in records.values() for cls, _, _ in items}))
    splits = {}
    for split, items in records.items():
        items.sort(key=lambda item: (item[0], item[1]))
        splits[split] = _stack([a for _, _, a in items], [classes.index(c) for c, _, _ in items],
                               classes, f"{path}:{split}")
    return splits


def load_archive(path: str | os.PathLike, cache: str | os.PathLike | None = None
                 ) -> dict[str, ImageData]:
    """Load an image-folder ``.tar.gz``; decoded tensors are cached by the archive's sha256."""
    path = Path(path)
    if not path.is_file():
        raise GradshieldError(
            f"data archive not found: {path}. Point --data-dir (or $GRADSHIELD_DATA) at the folder "
            f"that holds {ARCHIVE_NAME}, e.g. --data-dir ../shared/datasets")
    digest = sha256_file(path)
    cached = default_cache_dir(cache) / f"{path.name.split('.')[0]}-{digest[:16]}.pt"
    if cached.is_file():
        try:  # weights-only: a cache file is never trusted to run code
            blob = load_torch_file(cached, what="cached data file",
                                   remedy="delete it and rerun (it is rebuilt from the archive)")
            classes = tuple(blob["classes"])
            return {split: ImageData(blob[split]["images"], blob[split]["labels"], classes)
                    for split in blob["splits"]}
        except UnsafeFileError:
            raise  # not written by gradshield: say so rather than silently replace it
        except Exception:  # a damaged cache file is rebuilt
            cached.unlink(missing_ok=True)
    splits = decode_archive(path)
    classes = next(iter(splits.values())).classes
    blob = {"splits": list(splits), "classes": list(classes)}
    blob.update({s: {"images": d.images, "labels": d.labels} for s, d in splits.items()})
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    torch.save(blob, tmp)
    os.replace(tmp, cached)
    return splits


def load_image_folder(root: str | os.PathLike, size: tuple[int, int] | None = None) -> ImageData:
    """Load ``root/<class>/<image>``; classes are the sorted sub-folder names."""
    root = Path(root)
    if not root.is_dir():
        raise GradshieldError(f"image folder not found: {root}; --dataset folder reads "
                              "<data-dir>/train/<class>/<image> and <data-dir>/test/<class>/<image>")
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    if not classes:
        raise GradshieldError(f"{root} has no class sub-folders (expected {root}/<class>/<image>)")
    arrays, labels = [], []
    for label, cls in enumerate(classes):
        for file in sorted((root / cls).iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                arrays.append(_decode_image(file.read_bytes(), str(file), size))
                labels.append(label)
    return _stack(arrays, labels, classes, str(root))


def load_torchvision_cifar(name: str, root: Path, download: bool) -> dict[str, ImageData]:
    """CIFAR-10/100 from torchvision's python batches under ``root`` (downloaded only if asked)."""
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    out = {}
    for split, train in (("train", True), ("test", False)):
        try:
            ds = cls(str(root), train=train, download=download)
        except RuntimeError as err:
            raise GradshieldError(
                f"{name} not found under {root} ({err}). Pass --download to fetch it (needs "
                f"internet), or use the offline archive: --dataset cifar10 with --data-dir "
                f"pointing at the folder holding {ARCHIVE_NAME}") from err
        images = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        out[split] = ImageData(images, torch.tensor(ds.targets, dtype=torch.long),
                               tuple(ds.classes))
    return out


DATASETS = ("cifar10", "cifar10-jpeg", "cifar100", "folder")
#: data sets read from files as needed (:mod:`gradshield.data.folders`), never held in memory
STREAMED = ("imagenet",)


def load_dataset(name: str, data: str | os.PathLike | None = None,
                 cache: str | os.PathLike | None = None, *, download: bool = False,
                 image_size: tuple[int, int] | None = None) -> tuple[ImageData, ImageData]:
    """Return (train, test) for a named data set.

    ``cifar10`` uses the offline archive ``<data>/cifar10-jpeg.tar.gz`` when present, else
    torchvision's CIFAR-10 under ``<data>``. ``folder`` reads ``<data>/train`` and ``<data>/test``.
    """
    root = default_data_dir(data)
    if image_size is not None and name != "folder":
        raise GradshieldError(f"image_size (--image-size) resizes image folders on load; data set "
                              f"{name!r} has a fixed size, so drop it (or use --dataset folder)")
    if name == "cifar10-jpeg" or (name == "cifar10" and (root / ARCHIVE_NAME).is_file()):
        splits = load_archive(root / ARCHIVE_NAME, cache)
    elif name in ("cifar10", "cifar100"):
        splits = load_torchvision_cifar(name, root, download)
    elif name == "folder":
        splits = {s: load_image_folder(root / s, image_size) for s in ("train", "test")}
    elif name in STREAMED:
        raise GradshieldError(f"{name} is read from its files batch by batch, never held in "
                              "memory: use gradshield.data.image_folder_split (CLI: gradshield "
                              "evaluate --dataset imagenet); training reads in-memory data sets only")
    else:
        raise GradshieldError(f"unknown data set {name!r}; choose one of "
                              f"{', '.join(DATASETS + STREAMED)}")
    missing = {"train", "test"} - set(splits)
    if missing:
        raise GradshieldError(f"data set {name} at {root} lacks the split(s) {sorted(missing)}")
    return splits["train"], splits["test"]


# ----------------------------------------------------------------------------- batches

def random_crop_flip(images: torch.Tensor, generator: torch.Generator, *, padding: int = 4,
                     flip: bool = True, flips: torch.Tensor | None = None) -> torch.Tensor:
    """Random crop after zero padding by ``padding`` pixels, and random horizontal flip, per image
    (``flips``: which images to mirror, (N,) bool, instead of drawing it).

    One gather over the padded batch (N, C, H, W), any dtype: the crop offsets and the flip are
    folded into a single index, so the batch is read once. With a
    :class:`~gradshield.utils.ShardGenerator` the images are a rank's rows of the global batch and
    get the offsets and flips one process would give them.
    """
    n, c, h, w = images.shape
    hp, wp = h + 2 * padding, w + 2 * padding
    padded = torch.nn.functional.pad(images, (padding,) * 4) if padding > 0 else images
    dy = draw_rows(lambda k: torch.randint(0, 2 * padding + 1, (k,), generator=generator), n, generator)
    dx = draw_rows(lambda k: torch.randint(0, 2 * padding + 1, (k,), generator=generator), n, generator)
    cols = torch.arange(w).expand(n, w)
    if flips is not None:
        cols = torch.where(flips[:, None], cols.flip(1), cols)
    elif flip:
        flipped = draw_rows(lambda k: torch.rand(k, generator=generator), n, generator) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    index = (dy[:, None, None] + torch.arange(h)[None, :, None]) * wp + (dx[:, None] + cols)[:, None, :]
    flat = padded.reshape(n, c, hp * wp)
    return flat.gather(2, index.view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)


def iterate_batches(data: ImageData, batch_size: int, *, shuffle: bool = False,
                    generator: torch.Generator | None = None, augment: bool = False,
                    drop_last: bool = False, start_batch: int = 0, padding: int = 4,
                    flips: torch.Tensor | None = None
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (float32 images in [0, 1], labels) batches; augmentation happens on whole batches:
    a random crop after ``padding`` pixels of zero padding and a horizontal flip, random or, with
    ``flips`` ((len(data),) bool), of the images it marks.

    ``start_batch`` skips that many batches after drawing the same random order (for resuming).
    With a :class:`~gradshield.utils.ShardGenerator` (rows ``start:stop`` of ``total`` =
    ``batch_size``; ``drop_last``), each batch is that rank's rows of the batch one process would
    draw, augmented as one process would augment them.
    """
    if batch_size < 1:
        raise GradshieldError(f"batch_size must be >= 1, got {batch_size}")
    if (shuffle or augment) and generator is None:
        raise GradshieldError("shuffle/augment need a torch.Generator for reproducibility")
    rows = getattr(generator, "rows", None)
    if rows is not None and (rows[2] != batch_size or not drop_last):
        raise GradshieldError(f"a generator for rows {rows[0]}:{rows[1]} of batches of {rows[2]} "
                              f"needs batch_size={rows[2]} (got {batch_size}) and drop_last")
    n = len(data)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for i, begin in enumerate(range(0, stop, batch_size)):
        index = order[begin:begin + batch_size]
        if rows is not None:
            index = index[rows[0]:rows[1]]
        images = data.images[index]
        if augment:
            images = random_crop_flip(images, generator, padding=padding,
                                      flips=None if flips is None else flips[index])
        if i < start_batch:
            continue
        yield images.float().div_(255.0), data.labels[index]
