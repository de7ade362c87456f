"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations of each token, then ReLU."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from saelab.saes.base import SAE, register


@register
class TopKSAE(SAE):
    architecture = "topk"

    def __init__(self, d_model: int, n_latents: int, *, k: int, **kw: Any) -> None:
        super().__init__(d_model, n_latents, **kw)
        if not 0 < k < n_latents:
            raise ValueError(f"k must be in 1..n_latents-1, got k={k}, n_latents={n_latents}")
        self.k = k

    def hyperparameters(self) -> dict[str, Any]:
        return {"k": self.k}

    def activation(self, pre_BL: Tensor) -> Tensor:
        top_BK, idx_BK = pre_BL.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre_BL).scatter_(-1, idx_BK, torch.relu(top_BK))
