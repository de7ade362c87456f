"""ReLU SAE (SAELens `standard`): z = ReLU(pre-activations)."""

from __future__ import annotations

import torch
from torch import Tensor

from saelab.saes.base import SAE, register


@register
class ReluSAE(SAE):
    architecture = "relu"

    def activation(self, pre_BL: Tensor) -> Tensor:
        return torch.relu(pre_BL)
