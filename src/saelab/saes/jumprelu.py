"""JumpReLU SAE (Rajamanoharan et al. 2024; Gemma Scope): z = pre * (pre > threshold).

BatchTopK SAEs (Bussmann et al. 2024) are JumpReLU SAEs at inference: one global threshold
estimated during training replaces the batch-level top-k, as SAELens saves them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from saelab.saes.base import SAE, register


@register
class JumpReluSAE(SAE):
    architecture = "jumprelu"

    def __init__(self, d_model: int, n_latents: int, **kw: Any) -> None:
        super().__init__(d_model, n_latents, **kw)
        self.threshold = nn.Parameter(torch.zeros(n_latents, dtype=self.W_dec.dtype,
                                                  device=self.W_dec.device))

    def activation(self, pre_BL: Tensor) -> Tensor:
        return pre_BL * (pre_BL > self.threshold) * (pre_BL > 0)
