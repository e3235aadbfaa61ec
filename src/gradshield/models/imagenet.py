"""ImageNet-style architectures from torchvision by name (``tv-<name>``), weights from a local file.

Nothing is downloaded: pass ``options={"weights_path": "/path/to/state_dict.pth"}`` to load weights
(a plain torchvision state dict, read weights-only: the file never runs code). Use ImageNet
normalisation (``IMAGENET_MEAN``/``IMAGENET_STD``).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from gradshield.errors import GradshieldError
from gradshield.models.registry import register_model
from gradshield.safe_load import load_torch_file

TORCHVISION_ARCHS = ("resnet18", "resnet50", "vgg16_bn", "wide_resnet50_2", "mobilenet_v3_large")


def _torchvision_builder(arch: str):
    def build(num_classes: int = 1000, width: float = 1.0, weights_path: str | None = None
              ) -> nn.Module:
        from torchvision import models as tvm

        if width != 1.0:
            raise GradshieldError(f"tv-{arch} has a fixed width; pass width=1.0")
        net = getattr(tvm, arch)(weights=None, num_classes=num_classes)
        if weights_path is not None:
            path = Path(weights_path)
            if not path.is_file():
                raise GradshieldError(f"weights file not found: {path}; check the path "
                                      "(gradshield never downloads weights)")
            state = load_torch_file(  # weights-only: never runs code from the file
                path, what="weights file",
                remedy=f"download or copy it again (a torchvision state dict for {arch})")
            if not isinstance(state, dict):
                raise GradshieldError(
                    f"weights file {path} holds a {type(state).__name__}, not a state dict; save "
                    f"it with torch.save(model.state_dict(), path)")
            try:
                net.load_state_dict(state)
            except RuntimeError as err:
                raise GradshieldError(
                    f"could not load {path} into tv-{arch}: {str(err).splitlines()[0]} ... It must "
                    f"be a torchvision state dict for {arch} with {num_classes} classes") from err
        return net

    build.__doc__ = f"torchvision {arch} (ImageNet layout; local weights only)"
    return build


for _arch in TORCHVISION_ARCHS:
    register_model(f"tv-{_arch}")(_torchvision_builder(_arch))
