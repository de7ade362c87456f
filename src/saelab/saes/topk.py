"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations of each token, then ReLU.

Loss: mean_b ||x - x_hat||^2 + (1/32) AuxK, where AuxK = mean_b ||e - e_hat||^2 asks the
top k_aux = d_model / 2 pre-activations of the dead latents to reconstruct the residual
e = x - x_hat the live latents leave, which pulls dead latents back towards the data.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from saelab.saes.base import SAE, LossOutput, register_architecture
from saelab.saes.sparse import CodeEntries, autoencode, centred, fired, pre_activations, top_k

AUXK_WEIGHT = 1 / 32


def auxk_loss(sae: SAE, xc_BD: Tensor, residual_BD: Tensor, dead_L: Tensor | None) -> Tensor:
    """Squared error of the residual (detached) rebuilt from the dead latents' top
    pre-activations, mean over the batch; 0 when no latent is dead. `xc_BD` is the encoder's
    input (`sparse.centred`). Only the dead latents' pre-activations are computed (a GEMM
    n_dead / n_latents the size of the encoder's), and the code is sparse."""
    if dead_L is None or not dead_L.any():
        return xc_BD.new_zeros(())
    dead = dead_L.nonzero().squeeze(1)
    code = top_k(pre_activations(sae, xc_BD, dead), min(sae.d_model // 2, len(dead)), dead)
    e_hat_BD, _, _ = autoencode(sae, xc_BD, code)
    return (residual_BD.detach() - e_hat_BD).pow(2).sum(dim=1).mean()


@register_architecture
class TopKSAE(SAE):
    architecture = "topk"
    hyperparameter_names = ("k",)
    saelens_architecture = "topk"

    def __init__(self, d_model: int, n_latents: int, *, k: int, **kw: Any) -> None:
        super().__init__(d_model, n_latents, **kw)
        if not 0 < k < n_latents:
            raise ValueError(f"k must be in 1..n_latents-1, got k={k}, n_latents={n_latents}")
        self.k = k

    def activation(self, pre_BL: Tensor) -> Tensor:
        top_BK, idx_BK = pre_BL.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre_BL).scatter_(-1, idx_BK, torch.relu(top_BK))

    def loss(self, x_BD: Tensor, *, sparsity_coef: float = 0.0, dead_L: Tensor | None = None
             ) -> LossOutput:
        """Sparse throughout (see `sparse`): no dense [batch, n_latents] codes."""
        xc_BD = centred(self, x_BD)
        code = top_k(pre_activations(self, xc_BD), self.k)
        dec_BD, _, count_B = autoencode(self, xc_BD, code)
        return sparse_loss(self, x_BD, xc_BD, dec_BD, code, count_B, dead_L)


def sparse_loss(sae: SAE, x_BD: Tensor, xc_BD: Tensor, dec_BD: Tensor, code: CodeEntries,
                count_B: Tensor, dead_L: Tensor | None) -> LossOutput:
    """MSE + AuxK of a sparse code's decode (TopK and BatchTopK)."""
    x_hat_BD = dec_BD + sae.b_dec
    mse = (x_BD - x_hat_BD).pow(2).sum(dim=1).mean()
    aux = auxk_loss(sae, xc_BD, x_BD - x_hat_BD, dead_L)
    return LossOutput(mse + AUXK_WEIGHT * aux, x_hat_BD, fired(code, sae.n_latents),
                      count_B.mean(), {"mse": mse, "auxk": aux})
