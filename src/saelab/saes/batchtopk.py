"""BatchTopK SAE (Bussmann, Leask & Nanda 2024): in training, the k x batch largest
activations across the whole batch; at inference, one global threshold, which makes it a
JumpReLU SAE (as SAELens saves it). The threshold is not learned: it is an exponential
moving average, over training steps, of the smallest activation each step kept."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from saelab.saes.base import SAE, LossOutput, register_architecture
from saelab.saes.topk import AUXK_WEIGHT, auxk_loss

THRESHOLD_EMA = 0.99


@register_architecture
class BatchTopKSAE(SAE):
    architecture = "batchtopk"
    hyperparameter_names = ("k",)
    saelens_architecture = "jumprelu"  # at inference: one threshold, stored for every latent
    threshold: Tensor  # a buffer []: the EMA of each step's smallest kept activation

    def __init__(self, d_model: int, n_latents: int, *, k: int, **kw: Any) -> None:
        super().__init__(d_model, n_latents, **kw)
        if not 0 < k < n_latents:
            raise ValueError(f"k must be in 1..n_latents-1, got k={k}, n_latents={n_latents}")
        self.k = k
        self.register_buffer("threshold", torch.zeros((), dtype=self.W_dec.dtype,
                                                      device=self.W_dec.device))

    def activation(self, pre_BL: Tensor) -> Tensor:
        return pre_BL * (pre_BL > self.threshold) * (pre_BL > 0)

    def batch_activation(self, pre_BL: Tensor) -> Tensor:
        """Keep the k * batch largest positive pre-activations of the batch."""
        flat = torch.relu(pre_BL).flatten()
        top, idx = flat.topk(min(self.k * len(pre_BL), flat.numel()), sorted=False)
        return torch.zeros_like(flat).scatter_(0, idx, top).view_as(pre_BL)

    def firing_threshold(self) -> Tensor:
        return self.threshold

    def loss(self, x_BD: Tensor, *, sparsity_coef: float = 0.0, dead_L: Tensor | None = None
             ) -> LossOutput:
        pre_BL = self.pre_acts(x_BD)
        codes_BL = self.batch_activation(pre_BL)
        if self.training:
            with torch.no_grad():
                kept = codes_BL[codes_BL > 0]
                if kept.numel():
                    low = kept.min()
                    self.threshold.copy_(torch.where(self.threshold > 0, THRESHOLD_EMA *
                                                     self.threshold + (1 - THRESHOLD_EMA) * low,
                                                     low))
        x_hat_BD = self.decode(codes_BL)
        mse = (x_BD - x_hat_BD).pow(2).sum(dim=1).mean()
        aux = auxk_loss(self, x_BD, x_BD - x_hat_BD, dead_L)
        return LossOutput.from_codes(mse + AUXK_WEIGHT * aux, codes_BL, x_hat_BD,
                                     {"mse": mse, "auxk": aux})

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        super().fold_input_scale(scale)
        self.threshold.div_(scale)

    def export_state(self) -> dict[str, Tensor]:
        """The threshold once per latent, so that JumpReLU readers (SAELens,
        dictionary_learning) take the file as it is."""
        state = super().export_state()
        state["threshold"] = state["threshold"].expand(self.n_latents).contiguous()
        return state

    @classmethod
    def import_state(cls, state: dict[str, Tensor]) -> dict[str, Tensor]:
        threshold = state.get("threshold")
        if threshold is not None and threshold.dim() == 1 and len(threshold):
            state = {**state, "threshold": threshold[0]}  # stored once per latent, all equal
        return state
