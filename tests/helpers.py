"""Small models and wrappers shared by several test files."""

from __future__ import annotations

import torch
from torch import nn


class OneAtATime(nn.Module):
    """Runs the wrapped model on one example at a time.

    Its arithmetic is then the same whatever the batch size, so a test of batch-size independence
    checks the attack or penalty under test, not which kernel the convolution library picks for
    each batch shape (oneDNN, AMX and bf16 give last-bit differences from one shape to another).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.model(x[i:i + 1]) for i in range(x.shape[0])])
