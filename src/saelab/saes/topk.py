"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations of each token, then ReLU.

Loss: mean_b ||x - x_hat||^2 + (1/32) AuxK, where AuxK = mean_b ||e - e_hat||^2 asks the
top k_aux = d_model / 2 pre-activations of the dead latents to reconstruct the residual
e = x - x_hat the live latents leave, which pulls dead latents back towards the data.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from saelab.saes.base import SAE, LossOutput, fvu, register

AUXK_WEIGHT = 1 / 32


def auxk_loss(sae: SAE, pre_BL: Tensor, residual_BD: Tensor, dead_L: Tensor | None) -> Tensor:
    """Squared error of the residual (detached) rebuilt from the dead latents' top
    pre-activations, mean over the batch; 0 when no latent is dead."""
    if dead_L is None or not dead_L.any():
        return pre_BL.new_zeros(())
    k_aux = min(sae.d_model // 2, int(dead_L.sum()))
    dead_pre_BL = torch.where(dead_L, pre_BL, -torch.inf)
    top_BK, idx_BK = dead_pre_BL.topk(k_aux, dim=1, sorted=False)
    e_hat_BD = torch.einsum("bk,bkd->bd", torch.relu(top_BK), sae.W_dec[idx_BK])
    return (residual_BD.detach() - e_hat_BD).pow(2).sum(dim=1).mean()


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

    def loss(self, x: Tensor, *, sparsity_coef: float = 0.0, dead_L: Tensor | None = None
             ) -> LossOutput:
        pre_BL = self.pre_acts(x)
        codes_BL = self.activation(pre_BL)
        x_hat_BD = self.decode(codes_BL)
        mse = (x - x_hat_BD).pow(2).sum(dim=1).mean()
        aux = auxk_loss(self, pre_BL, x - x_hat_BD, dead_L)
        return LossOutput(mse + AUXK_WEIGHT * aux, codes_BL, x_hat_BD,
                          {"mse": mse, "auxk": aux, "fvu": fvu(x, x_hat_BD)})
