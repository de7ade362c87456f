"""BatchTopK SAE (Bussmann, Leask & Nanda 2024): in training, the k x batch largest
activations across the whole batch; at inference, one global threshold, which makes it a
JumpReLU SAE (as SAELens saves it). The threshold is not learned: while training it is an
exponential moving average, over steps, of the smallest activation each step kept; when
training ends it is set from a sample of the data (`calibrate`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from saelab.saes.base import SAE, LossOutput, register_architecture
from saelab.saes.sparse import autoencode, centred, pre_activations, top_k_of_batch
from saelab.saes.topk import sparse_loss

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

    def firing_threshold(self) -> Tensor:
        return self.threshold

    def loss(self, x_BD: Tensor, *, sparsity_coef: float = 0.0, dead_L: Tensor | None = None
             ) -> LossOutput:
        """Sparse throughout (see `sparse`), like TopK's."""
        xc_BD = centred(self, x_BD)
        code = top_k_of_batch(pre_activations(self, xc_BD), self.k * len(x_BD))
        if self.training:
            with torch.no_grad():
                kept = code.acts[code.acts > 0]
                if kept.numel():
                    low = kept.min()
                    self.threshold.copy_(torch.where(self.threshold > 0, THRESHOLD_EMA *
                                                     self.threshold + (1 - THRESHOLD_EMA) * low,
                                                     low))
        dec_BD, _, count_B = autoencode(self, xc_BD, code)
        return sparse_loss(self, x_BD, xc_BD, dec_BD, code, count_B, dead_L)

    @torch.no_grad()
    def calibrate(self, x_BD: Tensor) -> None:
        """The threshold at which the trained encoder keeps k x N of the sample's N rows'
        pre-activations, as a training step keeps k x batch of its own: the moving average
        of each step's smallest kept activation lags a threshold that drifts as the encoder
        trains (on Gemma 3 270M it ended 20 % high, and the SAE fired 25.5 latents per token
        instead of 32)."""
        code = top_k_of_batch(pre_activations(self, centred(self, x_BD)), self.k * len(x_BD))
        kept = code.acts[code.acts > 0]
        if kept.numel():
            self.threshold.copy_(kept.min())

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
