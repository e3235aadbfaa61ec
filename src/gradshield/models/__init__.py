"""Models by name: gradshield's architectures and torchvision/timm/RobustBench models. Every model
takes [0, 1] images and normalises inside."""

from gradshield.models import (  # noqa: F401  (registers the architectures and families)
    cifar,
    compact,
    robustbench_zoo,
    speedrun,
    timm_zoo,
    torchvision_zoo,
)
from gradshield.models.registry import (
    Family,
    ModelConfig,
    NormalizedClassifier,
    build_model,
    create_model,
    list_models,
    load_model_weights,
    model_config,
    register_family,
    register_model,
    split_name,
)

__all__ = ["Family", "ModelConfig", "NormalizedClassifier", "build_model", "create_model",
           "list_models", "load_model_weights", "model_config", "register_family", "register_model",
           "split_name"]
