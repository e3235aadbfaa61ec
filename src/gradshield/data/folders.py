"""Image folders too large for memory (ImageNet): the file list, read batch by batch.

The layout is torchvision's ``ImageFolder`` (and ImageNet's usual one): ``<root>/<split>/<class>/
<image>``, classes in sorted folder order (for ImageNet, sorted WordNet ids ``n01440764`` ...
give the standard label indices 0..999). :class:`FileExamples` holds only the file names and
labels; images are decoded and preprocessed (:class:`~gradshield.data.preprocess.Preprocess`) in
``torch.utils.data.DataLoader`` worker processes while the caller works on the previous batch.
Subsets are deterministic: a seeded random ``subset`` or ``per_class`` choice of files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from gradshield.data.memory import IMAGE_SUFFIXES, per_class_index, subset_index
from gradshield.data.preprocess import Preprocess
from gradshield.errors import GradshieldError

LAYOUT = "<data-dir>/{split}/<class>/<image> (ImageNet: <data-dir>/val/n01440764/*.JPEG ...)"


def default_workers() -> int:
    """Decoding processes: the CPU cores this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def _images_in(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries
                      if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))


def scan_split(root: str | os.PathLike, split: str) -> tuple[list[str], list[int], tuple[str, ...]]:
    """(image paths relative to ``root/split``, labels, classes) of ``root/split/<class>/<image>``,
    with an error that names the fix when the folder is not in that layout."""
    root = Path(root)
    folder = root / split
    layout = LAYOUT.format(split=split)
    if not root.is_dir():
        raise GradshieldError(f"image folder not found: {root}; --dataset imagenet reads {layout}")
    if not folder.is_dir():
        subfolders = sorted(p.name for p in root.iterdir() if p.is_dir())
        hint = ""
        if subfolders and all(_images_in(root / s) for s in subfolders[:3]):
            hint = (f" {root} itself looks like a split (its sub-folders {subfolders[:2]} hold "
                    f"images): pass its parent folder as --data-dir")
        raise GradshieldError(f"{root} has no {split}/ folder; --dataset imagenet reads {layout}."
                              f"{hint}")
    classes = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir()))
    if not classes:
        flat = _images_in(folder)
        if flat:
            raise GradshieldError(
                f"{folder} holds {len(flat)} images but no class folders: the ILSVRC2012 validation "
                f"archive unpacks flat. Move each image into {split}/<wnid>/ (its class: the "
                "LOC_val_solution.csv labels, or the widely used valprep.sh script) and rerun")
        raise GradshieldError(f"{folder} has no class sub-folders; expected {layout}")
    files, labels = [], []
    for label, cls in enumerate(classes):
        names = _images_in(folder / cls)
        files += [f"{cls}/{name}" for name in names]
        labels += [label] * len(names)
    if not files:
        raise GradshieldError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders of "
                              f"{folder}; expected {layout}")
    return files, labels, classes


class _Decoded(Dataset):
    """Image i -> (uint8 (3, H, W), error message or "") (errors travel as data: a worker's
    exception would reach the caller wrapped in a traceback)."""

    def __init__(self, folder: Path, files: tuple[str, ...], preprocess: Preprocess) -> None:
        self.folder, self.files, self.preprocess = folder, files, preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        from PIL import Image, UnidentifiedImageError

        path = self.folder / self.files[i]
        try:
            with Image.open(path) as image:
                return self.preprocess(image), ""
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            return torch.zeros(3, *self.preprocess.crop, dtype=torch.uint8), f"{path}: {err}"


def _collate(items: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
    """The batch as float32 in [0, 1], made where the images were decoded; in a worker,
    ``default_collate`` stacks it straight into shared memory. Neither process then makes one
    large heap allocation per batch (a float copy of each batch made in the main process
    fragmented glibc's heap: the peak memory grew with the number of batches)."""
    images = default_collate([image.float().div_(255.0) for image, _ in items])
    return images, [e for _, e in items if e]


@dataclass(frozen=True, eq=False)
class FileExamples:
    """Labelled image files under ``folder`` (paths relative to it), decoded on demand.

    ``workers``: decoding processes (0: in this process). The fingerprint covers the file names,
    sizes, labels, classes and preprocessing, not the pixels: it is cheap for 50,000 files and
    survives moving the folder.
    """

    folder: Path
    files: tuple[str, ...]
    labels: torch.Tensor
    classes: tuple[str, ...]
    preprocess: Preprocess
    name: str = "image folder"
    workers: int = field(default_factory=default_workers)

    def __post_init__(self) -> None:
        if self.labels.shape != (len(self.files),):
            raise GradshieldError(f"{len(self.files)} files but labels of shape "
                                  f"{tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.files)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, *self.preprocess.crop)

    @cached_property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(json.dumps({"classes": list(self.classes),
                                            "preprocess": self.preprocess.to_dict()}).encode())
        for rel, label in zip(self.files, self.labels.tolist(), strict=True):
            size = (self.folder / rel).stat().st_size
            digest.update(f"{rel}\0{size}\0{label}\n".encode())
        return digest.hexdigest()

    @property
    def description(self) -> dict:
        return {"dataset": self.name, "folder": str(self.folder), "examples": len(self),
                "classes": len(self.classes), "preprocess": self.preprocess.to_dict()}

    def _select(self, index: torch.Tensor) -> FileExamples:
        return replace(self, files=tuple(self.files[i] for i in index.tolist()),
                       labels=self.labels[index])

    def subset(self, limit: int | None, seed: int = 0) -> FileExamples:
        """A seeded random subset of ``limit`` files (all if None), in index order."""
        return self if limit is None or limit >= len(self) else \
            self._select(subset_index(len(self), limit, seed))

    def per_class(self, count: int, seed: int = 0) -> FileExamples:
        """``count`` files of each class (all of a smaller class), chosen by ``seed``."""
        return self._select(per_class_index(self.labels, count, seed))

    def ordered(self, index: torch.Tensor) -> FileExamples:
        """These files in this order (e.g. a seeded permutation)."""
        return self._select(index)

    def with_preprocess(self, preprocess: Preprocess) -> FileExamples:
        return replace(self, preprocess=preprocess)

    def batches(self, ranges: Iterable[tuple[int, int]]) -> Iterator[torch.Tensor]:
        """Float32 images in [0, 1] for each (start, stop), decoded ahead by ``workers`` processes."""
        ranges = [(int(a), int(b)) for a, b in ranges]
        if not ranges:
            return
        for a, b in ranges:
            if not 0 <= a < b <= len(self):
                raise GradshieldError(f"batch [{a}, {b}) is outside the {len(self)} examples")
        loader = DataLoader(_Decoded(self.folder, self.files, self.preprocess),
                            batch_sampler=[range(a, b) for a, b in ranges], collate_fn=_collate,
                            num_workers=min(self.workers, len(ranges)),
                            prefetch_factor=2 if self.workers else None)
        for images, errors in loader:
            if errors:
                raise GradshieldError(f"could not decode image {errors[0]}. Replace or delete that "
                                      "file and rerun (a resumed run continues where it stopped)")
            yield images


def image_folder_split(root: str | os.PathLike, split: str, preprocess: Preprocess, *,
                       name: str = "imagenet", workers: int | None = None) -> FileExamples:
    """The split ``root/split/<class>/<image>`` as :class:`FileExamples` (nothing decoded yet)."""
    files, labels, classes = scan_split(root, split)
    folder = Path(root) / split
    return FileExamples(folder, tuple(files), torch.tensor(labels, dtype=torch.long), classes,
                        preprocess, name=name,
                        **({} if workers is None else {"workers": workers}))
