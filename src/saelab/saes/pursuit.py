"""A dictionary trained with a pursuit in the loop, and no encoder (issue 20's `pursuit`).

Its code is a pursuit on its own decoder rows: matching, gradient or orthogonal matching
pursuit (`pursuit`), signed or non-negative, `k` latents per token. So `encode` is the
pursuit, and every verb that codes with an SAE's "encoder" codes this one with its pursuit.

Training alternates, as classic dictionary learning does (MOD, K-SVD): code the batch with
the pursuit on the current dictionary, with no gradient through the code; then one optimiser
step on the reconstruction's squared error for `W_dec` and `b_dec` (the decode is an
`embedding_bag`, so the decoder's gradient touches only the rows the batch used); rows are
renormalised by the base class. A latent the trainer reports dead (unused for
`dead_tokens`) is restarted, after the step, on the direction of one of the batch's largest
residuals (the worst-reconstructed rows), the rule K-SVD implementations and ITDA use: it
points where the dictionary is missing something. Decoder rows start as data rows (centred,
normalised), which K-SVD does too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.coding import Coder, SparseCode
from saelab.saes.base import SAE, LossOutput, register_architecture

PURSUITS = ("mp", "gp", "omp")
REVIVE_SHARE = 0.25  # at most this share of a batch's rows restarts dead latents per step


@register_architecture
class PursuitSAE(SAE):
    architecture = "pursuit"
    hyperparameter_names = ("k", "pursuit", "nonnegative")
    needs_data_init = True

    def __init__(self, d_model: int, n_latents: int, *, k: int, pursuit: str = "gp",
                 nonnegative: bool = True, **kw: Any) -> None:
        super().__init__(d_model, n_latents, **kw)
        if pursuit not in PURSUITS:
            raise ValueError(f"pursuit must be one of {', '.join(PURSUITS)}, got {pursuit!r}")
        if not 0 < k < n_latents:
            raise ValueError(f"k must be in 1..n_latents-1, got k={k}, n_latents={n_latents}")
        self.k, self.pursuit, self.nonnegative = k, pursuit, bool(nonnegative)
        self._revive: tuple[Tensor, Tensor] | None = None

    def code(self, x_BD: Tensor) -> SparseCode:
        """The pursuit's code of x - b_dec on the current decoder rows (no graph)."""
        with torch.no_grad():
            xc_BD = x_BD - self.b_dec if self.apply_b_dec_to_input else x_BD
            coder = Coder(self.W_dec.detach(), self.pursuit, k=self.k,
                          nonnegative=self.nonnegative, dtype=self.W_dec.dtype)
            return coder(xc_BD)

    def encode(self, x_BD: Tensor) -> Tensor:
        return self.code(x_BD).to_dense(self.n_latents)

    def forward(self, x_BD: Tensor) -> Tensor:
        return self.code(x_BD).decode(self.W_dec, self.b_dec)

    def loss(self, x_BD: Tensor, *, sparsity_coef: float = 0.0, dead_L: Tensor | None = None
             ) -> LossOutput:
        """Squared error of the pursuit's reconstruction; the code is a constant."""
        code = self.code(x_BD)
        values = code.values.to(self.W_dec.dtype)
        x_hat_BD = F.embedding_bag(code.indices, self.W_dec, per_sample_weights=values,
                                   mode="sum") + self.b_dec
        residual_BD = x_BD - x_hat_BD
        mse = residual_BD.pow(2).sum(dim=1).mean()
        live = values != 0
        fired_L = torch.zeros(self.n_latents, dtype=torch.bool, device=x_BD.device)
        fired_L[code.indices[live]] = True
        self._revive = None
        if dead_L is not None and dead_L.any():
            self._revive = self._restarts(residual_BD.detach(), dead_L & ~fired_L)
        return LossOutput(mse, x_hat_BD, fired_L, live.sum(dim=1).float().mean(), {"mse": mse})

    def _restarts(self, residual_BD: Tensor, dead_L: Tensor) -> tuple[Tensor, Tensor] | None:
        """(dead latents, the unit residuals they restart on): the batch's largest residuals,
        one per latent, at most REVIVE_SHARE of the batch."""
        dead = dead_L.nonzero().squeeze(1)
        n = min(len(dead), int(REVIVE_SHARE * len(residual_BD)))
        if n == 0:
            return None
        norms_B = residual_BD.norm(dim=1)
        worst = norms_B.topk(n).indices
        return dead[:n], residual_BD[worst] / norms_B[worst, None].clamp(min=1e-12)

    @torch.no_grad()
    def after_step(self) -> None:
        super().after_step()
        if self._revive is not None:
            latents, directions = self._revive
            self.W_dec[latents] = directions.to(self.W_dec.dtype)
            self._revive = None

    @torch.no_grad()
    def init_from_data(self, x_BD: Tensor, *, l0: float | None) -> None:
        """Decoder rows: distinct data rows, centred and normalised (as many as there are;
        random directions for the rest); b_dec stays the trainer's (the data's mean)."""
        g = torch.Generator(device="cpu").manual_seed(0)
        rows = torch.randperm(len(x_BD), generator=g)[: self.n_latents]
        centred = x_BD[rows.to(x_BD.device)] - self.b_dec
        norms = centred.norm(dim=1, keepdim=True)
        usable = (norms.squeeze(1) > 0).nonzero().squeeze(1)
        self.W_dec[: len(usable)] = (centred[usable] / norms[usable]).to(self.W_dec.dtype)
