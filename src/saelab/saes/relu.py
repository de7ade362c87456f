"""ReLU SAE (SAELens `standard`): z = ReLU(pre-activations), trained with an L1 penalty
weighted by decoder norms (Anthropic, "Circuits Updates", April 2024):
    loss = mean_b ||x - x_hat||^2 + lambda * mean_b sum_j z_j ||W_dec_j||."""

from __future__ import annotations

import torch
from torch import Tensor

from saelab.saes.base import SAE, LossOutput, register_architecture
from saelab.saes.sparse import above, autoencode, centred, fired, pre_activations


@register_architecture
class ReluSAE(SAE):
    architecture = "relu"
    unit_norm_decoder = False  # the L1 term is weighted by the rows' norms instead
    default_sparsity_coef = 5.0  # on inputs normalised to mean squared norm d_model
    saelens_architecture = "standard"

    def activation(self, pre_BL: Tensor) -> Tensor:
        return torch.relu(pre_BL)

    def loss(self, x_BD: Tensor, *, sparsity_coef: float, dead_L: Tensor | None = None
             ) -> LossOutput:
        """Sparse (see `sparse`) once the code is sparse enough, dense before."""
        xc_BD = centred(self, x_BD)
        pre_BL = pre_activations(self, xc_BD)
        code = above(pre_BL, 0.0)
        del pre_BL
        if code is None:  # the graph's GEMM again: only while training is young
            return self.dense_loss(x_BD, torch.relu(self.pre_acts(x_BD)), sparsity_coef)
        dec_BD, acts_E, count_B = autoencode(self, xc_BD, code)
        x_hat_BD = dec_BD + self.b_dec
        mse = (x_BD - x_hat_BD).pow(2).sum(dim=1).mean()
        l1 = (acts_E * self.W_dec.norm(dim=1)[code.cols]).sum() / len(x_BD)
        return LossOutput(mse + sparsity_coef * l1, x_hat_BD, fired(code, self.n_latents),
                          count_B.mean(), {"mse": mse, "l1": l1})

    def dense_loss(self, x_BD: Tensor, codes_BL: Tensor, sparsity_coef: float) -> LossOutput:
        """The same loss by dense autograd, from the codes relu(pre-activations) with their
        graph: the reference the sparse path is tested against, and its fallback."""
        x_hat_BD = self.decode(codes_BL)
        mse = (x_BD - x_hat_BD).pow(2).sum(dim=1).mean()
        l1 = (codes_BL * self.W_dec.norm(dim=1)).sum(dim=1).mean()
        return LossOutput.from_codes(mse + sparsity_coef * l1, codes_BL, x_hat_BD,
                                     {"mse": mse, "l1": l1})
