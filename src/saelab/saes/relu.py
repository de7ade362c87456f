"""ReLU SAE (SAELens `standard`): z = ReLU(pre-activations), trained with an L1 penalty
weighted by decoder norms (Anthropic, "Circuits Updates", April 2024):
    loss = mean_b ||x - x_hat||^2 + lambda * mean_b sum_j z_j ||W_dec_j||."""

from __future__ import annotations

import torch
from torch import Tensor

from saelab.saes.base import SAE, LossOutput, SparsityControl, register_architecture
from saelab.saes.sparse import above, autoencode, centred, fired, pre_activations

INIT_NORM = 0.1  # decoder rows' (and encoder columns') starting norm


@register_architecture
class ReluSAE(SAE):
    architecture = "relu"
    unit_norm_decoder = False  # the L1 term is weighted by the rows' norms instead
    default_sparsity_coef = 5.0  # on inputs scaled to a centred mean squared norm of d_model
    saelens_architecture = "standard"

    def activation(self, pre_BL: Tensor) -> Tensor:
        return torch.relu(pre_BL)

    @torch.no_grad()
    def init_random(self, seed: int = 0) -> ReluSAE:
        """Random directions as every architecture's, at norm 0.1 (Anthropic, April 2024;
        dictionary_learning): at unit norm half the latents fire on every token with codes
        the size of the input, the first reconstructions are several times the input, and
        the first hundred steps go to undoing that."""
        super().init_random(seed)
        self.W_dec.mul_(INIT_NORM)
        self.W_enc.mul_(INIT_NORM)
        return self

    @classmethod
    def sparsity_control(cls, d_model: int, l0: float) -> SparsityControl:
        """From 0 to 2 sqrt(d_model / l0). The L1 term shortens each active latent's
        contribution by lambda / 2 along its decoder row's direction, so a code of l0 active
        latents loses about l0 lambda^2 / 4 of the input's variance (d_model, as inputs are
        scaled) to shrinkage alone: at the top of the range, all of it; above it the target
        L0 is reached only by a collapsed code. Down four times faster than up: at a fixed
        coefficient a ReLU code's L0 keeps falling as its dictionary improves, and a
        coefficient that lags above the right one shrinks the code towards collapse. The
        encoder biases (a ReLU latent's threshold) train at sqrt(d_model) times the run's
        rate, as JumpReLU's thresholds do and for the same reason; on planted data that took
        the FVU at the target L0 from 0.45-0.54 to 0.36-0.43."""
        return SparsityControl(0.0, 2 * (d_model / l0) ** 0.5, rate_up=0.0025, rate_down=0.01,
                               lr_scales={"b_enc": d_model ** 0.5})

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
