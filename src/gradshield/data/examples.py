"""What an evaluation runs on: labelled examples that yield their images batch by batch.

:func:`gradshield.evaluation.run_suite` reads images only through :meth:`Examples.batches`, so
the same run works on tensors held in memory (:class:`TensorExamples`) and on a data set streamed
from files (:class:`gradshield.data.folders.FileExamples`): ImageNet's 50,000 validation images
never need to fit in memory. An :class:`Examples` has

- ``labels``: (N,) int64, all of them (small);
- ``classes``: class names in label order, or None;
- ``image_shape``: (C, H, W) of every image;
- ``fingerprint``: a stable digest of what the examples are (a resumed run must see the same);
- ``description``: a JSON-able dict saying where they come from (stored with results);
- ``batches(ranges)``: float32 images in [0, 1], one (n, C, H, W) tensor per ``(start, stop)``
  in ``ranges``, in that order (a streamed source decodes the next ones while the caller works).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol, runtime_checkable

import torch

from gradshield.errors import GradshieldError


@runtime_checkable
class Examples(Protocol):
    labels: torch.Tensor
    classes: tuple[str, ...] | None

    @property
    def image_shape(self) -> tuple[int, int, int]: ...

    @property
    def fingerprint(self) -> str: ...

    @property
    def description(self) -> dict: ...

    def __len__(self) -> int: ...

    def batches(self, ranges: Iterable[tuple[int, int]]) -> Iterator[torch.Tensor]: ...


@dataclass(frozen=True, eq=False)
class TensorExamples:
    """Images (N, C, H, W) float in [0, 1] and labels (N,) held in memory; the fingerprint is the
    sha256 of both tensors' bytes."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...] | None = None
    description: dict = field(default_factory=lambda: {"dataset": "in-memory tensors", "split": ""})

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @cached_property
    def fingerprint(self) -> str:
        from gradshield.evaluation.store import tensor_digest

        return tensor_digest(self.images, self.labels)

    def batches(self, ranges: Iterable[tuple[int, int]]) -> Iterator[torch.Tensor]:
        for start, stop in ranges:
            yield self.images[start:stop]


def as_examples(images: torch.Tensor | Examples, labels: torch.Tensor | None = None,
                classes: Sequence[str] | None = None) -> Examples:
    """``Examples`` from tensors (checked: float images in [0, 1], integer labels), or the
    ``Examples`` given (then ``labels`` must be None)."""
    from gradshield.validation import check_images, check_labels

    if isinstance(images, torch.Tensor):
        if labels is None:
            raise GradshieldError("labels are missing: pass run_suite(model, images, labels, ...) "
                                  "(or an Examples object and labels=None)")
        check_images(images)
        check_labels(labels, images.shape[0])
        return TensorExamples(images, labels, tuple(classes) if classes is not None else None)
    if not isinstance(images, Examples):
        raise GradshieldError(f"images must be a tensor (N, C, H, W) or an Examples object (e.g. "
                              f"gradshield.data.image_folder_split), got {type(images).__name__}")
    if labels is not None:
        raise GradshieldError("an Examples object carries its labels: pass labels=None")
    return images


def take(examples: Examples, start: int, stop: int) -> torch.Tensor:
    """The images [start, stop) as one tensor (for small parts: figures, diagnostics)."""
    return next(iter(examples.batches([(start, stop)])))
