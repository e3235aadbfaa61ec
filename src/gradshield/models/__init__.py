"""Model registry and architectures. Every model takes [0, 1] images and normalises inside."""

from gradshield.models import cifar, compact, imagenet  # noqa: F401  (registers the architectures)
from gradshield.models.registry import (
    ModelConfig,
    NormalizedClassifier,
    build_model,
    create_model,
    list_models,
    register_model,
)

__all__ = ["ModelConfig", "NormalizedClassifier", "build_model", "create_model", "list_models",
           "register_model"]
