"""The evaluation transform of an image file: resize the shorter side, center-crop, uint8 tensor.

The settings come from the model (:class:`gradshield.models.ModelConfig`: ``input_size`` is the
crop, ``preprocess`` the resize and interpolation, taken from timm's ``pretrained_cfg`` or
torchvision's weights transforms), as their own evaluation transforms do it: PIL resize
(antialiased) of the shorter side, center crop. Normalisation is not here: it is inside the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from gradshield.errors import GradshieldError

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


@dataclass(frozen=True)
class Preprocess:
    """``crop``: output (H, W) in pixels; ``resize``: the shorter side in pixels before the center
    crop (None: resize straight to ``crop``); ``interpolation``: nearest, bilinear or bicubic."""

    crop: tuple[int, int] = (224, 224)
    resize: int | None = 256
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if len(self.crop) != 2 or min(self.crop) < 1:
            raise GradshieldError(f"crop must be two positive pixel counts (H, W), got {self.crop}")
        if self.resize is not None and self.resize < max(self.crop):
            raise GradshieldError(f"resize ({self.resize} px) must be >= the crop {self.crop}")
        if self.interpolation not in INTERPOLATIONS:
            raise GradshieldError(f"interpolation must be one of {INTERPOLATIONS}, got "
                                  f"{self.interpolation!r}")

    def to_dict(self) -> dict:
        return {**asdict(self), "crop": list(self.crop)}

    def __call__(self, image) -> torch.Tensor:
        """A PIL image -> uint8 tensor (3, H, W)."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        mode = InterpolationMode(self.interpolation)
        image = image.convert("RGB")
        if self.resize is None:
            image = F.resize(image, list(self.crop), interpolation=mode)
        else:
            image = F.center_crop(F.resize(image, self.resize, interpolation=mode), list(self.crop))
        return F.pil_to_tensor(image)


def preprocess_for(config, image_size: tuple[int, int] | None = None) -> Preprocess:
    """The model's evaluation transform (its ``ModelConfig``); ``image_size`` (H, W) changes the
    crop and scales the resize with it (e.g. a small test input)."""
    crop = tuple(int(v) for v in config.input_size)
    resize = config.preprocess.get("resize")
    interpolation = config.preprocess.get("interpolation", "bilinear")
    if image_size is not None and tuple(image_size) != crop:
        if resize is not None:
            resize = max(max(image_size), round(resize * min(image_size) / min(crop)))
        crop = tuple(int(v) for v in image_size)
    return Preprocess(crop=crop, resize=resize, interpolation=interpolation)
