"""JumpReLU SAE (Rajamanoharan et al. 2024; the Gemma Scope recipe):
    z = pre * H(pre - theta),  loss = mean_b ||x - x_hat||^2 + lambda * mean_b ||z||_0.
H has no useful gradient, so theta learns through straight-through estimators with a
rectangle kernel of bandwidth epsilon (the paper's equations 11-12)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from saelab.saes.base import SAE, LossOutput, SparsityControl, register_architecture
from saelab.saes.sparse import autoencode, centred, fired, jumprelu_entries, pre_activations

BANDWIDTH = 0.1  # epsilon, on inputs scaled to a centred mean squared norm of d_model


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """pre * H(pre - theta); d/dtheta = -(theta / eps) K((pre - theta) / eps)."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, theta: Tensor) -> Tensor:
        ctx.save_for_backward(pre, theta)
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        pre, theta = ctx.saved_tensors
        d_theta = -(theta / BANDWIDTH) * _rectangle((pre - theta) / BANDWIDTH) * grad
        return (pre > theta) * grad, d_theta.sum(dim=0)


class _Step(torch.autograd.Function):
    """H(pre - theta); d/dtheta = -(1 / eps) K((pre - theta) / eps), no gradient to pre."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, theta: Tensor) -> Tensor:
        ctx.save_for_backward(pre, theta)
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        pre, theta = ctx.saved_tensors
        return None, (-(1 / BANDWIDTH) * _rectangle((pre - theta) / BANDWIDTH) * grad).sum(0)


@register_architecture
class JumpReluSAE(SAE):
    architecture = "jumprelu"
    default_sparsity_coef = 1.0  # on inputs scaled to a centred mean squared norm of d_model
    needs_data_init = True
    saelens_architecture = "jumprelu"

    def __init__(self, d_model: int, n_latents: int, **kw: Any) -> None:
        super().__init__(d_model, n_latents, **kw)
        self.threshold = nn.Parameter(torch.full((n_latents,), BANDWIDTH,
                                                 dtype=self.W_dec.dtype, device=self.W_dec.device))

    def activation(self, pre_BL: Tensor) -> Tensor:
        return pre_BL * (pre_BL > self.threshold) * (pre_BL > 0)

    def firing_threshold(self) -> Tensor:
        return self.threshold

    def loss(self, x_BD: Tensor, *, sparsity_coef: float, dead_L: Tensor | None = None
             ) -> LossOutput:
        """Sparse (see `sparse`) unless the code or the thresholds' window is too dense."""
        xc_BD = centred(self, x_BD)
        pre_BL = pre_activations(self, xc_BD).relu_()
        selected = jumprelu_entries(pre_BL, self.threshold.detach(), BANDWIDTH)
        del pre_BL
        if selected is None:  # the graph's GEMM again: only in a regime that is slow anyway
            return self.dense_loss(x_BD, torch.relu(self.pre_acts(x_BD)), sparsity_coef)
        code, window = selected
        dec_BD, _, count_B = autoencode(self, xc_BD, code, (window, self.threshold))
        x_hat_BD = dec_BD + self.b_dec
        mse = (x_BD - x_hat_BD).pow(2).sum(dim=1).mean()
        l0 = count_B.mean()
        return LossOutput(mse + sparsity_coef * l0, x_hat_BD, fired(code, self.n_latents),
                          l0.detach(), {"mse": mse, "l0": l0})

    def dense_loss(self, x_BD: Tensor, pre_BL: Tensor, sparsity_coef: float) -> LossOutput:
        """The same loss by dense autograd, from pre_BL = relu(pre-activations) with its
        graph: the reference the sparse path is tested against, and its fallback."""
        codes_BL = _JumpReLU.apply(pre_BL, self.threshold)
        x_hat_BD = self.decode(codes_BL)
        mse = (x_BD - x_hat_BD).pow(2).sum(dim=1).mean()
        l0 = _Step.apply(pre_BL, self.threshold).sum(dim=1).mean()
        return LossOutput.from_codes(mse + sparsity_coef * l0, codes_BL, x_hat_BD,
                                     {"mse": mse, "l0": l0})

    @classmethod
    def sparsity_control(cls, d_model: int, l0: float) -> SparsityControl:
        """From -d_model / l0 to d_model / l0, the same rate both ways. A code of l0 active
        latents gives each about d_model / l0 of the variance; a coefficient above that cuts
        the average latent (the penalty saves more than its reconstruction costs), which only
        a collapsed code pays. Below zero the L0 term rewards firing: early in training the
        reconstruction's own pull on the thresholds (through the straight-through estimator)
        lowers the L0 with no penalty at all, and a Lagrange multiplier for L0 == target may
        take either sign. A faster fall than rise (as relu's) overshot here: the early dip is
        transient, and a multiplier driven far below zero then lifted the L0 to 10x the
        target once the dictionary formed.

        The thresholds train at sqrt(d_model) times the run's rate under the controller.
        They live on the scale of the pre-activations, which Adam moves by about
        lr sqrt(d_model) a step (d_model encoder weights moved by about lr each, against
        inputs of norm sqrt(d_model)); at the run's own rate a Gemma 3 270M threshold could
        move 0.2 in a 2M-token run, a tenth of its starting value, the L0 followed the
        encoder instead of the coefficient, and the controller sat at its bound. (Without a
        target they keep the run's rate: on planted data that recovers the directions
        better, 0.96 against 0.92 mean best cosine, but no coefficient then steers the L0.)"""
        bound = d_model / l0
        return SparsityControl(-bound, bound, lr_scales={"threshold": d_model ** 0.5})

    @torch.no_grad()
    def init_from_data(self, x_BD: Tensor, *, l0: float | None) -> None:
        """Each threshold where its latent fires on a fraction l0 / n_latents of the sample:
        the L0 starts near `l0` instead of at n_latents / 2, and the straight-through
        gradients only have to fine-tune the thresholds."""
        if l0 is None:
            return
        pre_BL = self.pre_acts(x_BD.to(self.W_enc))
        q = 1 - l0 / self.n_latents
        self.threshold.copy_(pre_BL.float().quantile(q, dim=0).clamp(min=1e-3))

    @torch.no_grad()
    def after_step(self) -> None:
        super().after_step()
        self.threshold.clamp_(min=1e-6)  # H(pre - theta) for theta <= 0 fires on everything

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        super().fold_input_scale(scale)
        self.threshold.div_(scale)
