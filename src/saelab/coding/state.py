"""`PursuitState`: what a batched pursuit knows about each row, and nothing about how it selects.

Each row has K slots: which latent each holds (`idx_BK`), its weight (`val_BK`) and whether it
is in use (`live_BK`); slots fill in order, so a row's support is a prefix of its slots, and
unused slots point at slot 0's latent with weight 0. Besides the slots: the residual r = x - z D_S
and its norm, and whether the row is still going (`active_B`). How the next latent is found
is selection.py's job, the Cholesky factor of the support is pursuit.py's (`SupportFactor`);
reference.py does the same one row at a time.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.functional import embedding_bag

from saelab.coding.code import PursuitTrace


class PursuitState:
    """Slots, weights, residual and activity of every row of a batch, and (with `trace`) the
    log of what each step did."""

    def __init__(self, x_BD: Tensor, unit_LD: Tensor, k: int, *, nonnegative: bool,
                 tol: float | None, trace: bool) -> None:
        B = len(x_BD)
        self.x_BD, self.unit_LD, self.nonnegative = x_BD, unit_LD, nonnegative
        self.idx_BK = torch.zeros(B, k, dtype=torch.long, device=x_BD.device)
        self.val_BK = x_BD.new_zeros(B, k)
        self.live_BK = torch.zeros(B, k, dtype=torch.bool, device=x_BD.device)
        self.count_B = torch.zeros(B, dtype=torch.long, device=x_BD.device)  # slots in use
        # unit decoder row of each slot (0 if unused), built on first use: only the steps
        # without correlations in memory read it
        self._dirs_BKD: Tensor | None = None
        self.r_BD = x_BD.clone()
        self.x_norm_B = x_BD.norm(dim=1)
        self.r_norm_B = self.x_norm_B  # ||r||, kept current by `move`
        self.stop_norm_B = (tol or 0.0) * self.x_norm_B
        self.active_B = self.x_norm_B > 0
        self.log: dict[str, list[Tensor]] | None = (
            {"residual_norm": [self.x_norm_B.clone()], "selected": [], "span_cosine": []}
            if trace else None)

    def rows(self, i: Tensor) -> Tensor:
        """Unit decoder rows of latents i [...] -> [..., D] (index_select: several times
        faster than advanced indexing on CPU)."""
        return self.unit_LD.index_select(0, i.reshape(-1)).view(*i.shape, self.unit_LD.shape[1])

    def dirs(self) -> Tensor:
        """Unit decoder row of each slot [B, K, D] (0 on unused slots)."""
        if self._dirs_BKD is None:
            self._dirs_BKD = self.rows(self.idx_BK) * self.live_BK[..., None]
        return self._dirs_BKD

    def combine(self, w_BK: Tensor) -> Tensor:
        """sum_s w[b, s] d_s [B, D] over each row's live slots (embedding_bag gathers the rows
        itself: faster than a batched [1, K] x [K, D] product over stored directions)."""
        return embedding_bag(self.idx_BK, self.unit_LD, per_sample_weights=w_BK * self.live_BK,
                             mode="sum")

    def stop(self, score_B: Tensor) -> None:
        """End the rows whose best `score` is nothing to gain (<= 10 eps ||x||: with
        `nonnegative`, no positive correlation left) or whose residual is within tolerance."""
        floor_B = 10 * torch.finfo(self.x_BD.dtype).eps * self.x_norm_B
        self.active_B &= (score_B > floor_B) & (self.r_norm_B > self.stop_norm_B)

    def slot_for(self, i_B: Tensor, reuse: bool) -> tuple[Tensor, Tensor]:
        """Slot of latent i in each row: its existing slot when `reuse` and already
        selected, else the next free one. Returns (position [B], is_new [B])."""
        pos_B, new_B = self.count_B.clone(), torch.ones_like(self.active_B)
        if reuse:
            hit_BK = (self.idx_BK == i_B[:, None]) & self.live_BK
            found_B = hit_BK.any(dim=1)
            pos_B = torch.where(found_B, hit_BK.int().argmax(dim=1), pos_B)
            new_B = ~found_B
        return pos_B, new_B

    def place(self, rows_R: Tensor, pos_R: Tensor, i_R: Tensor) -> None:
        """Put latent i into slot pos of `rows` (weight 0 until the next `move`)."""
        first_R = pos_R == 0  # unused slots point at the first latent
        self.idx_BK[rows_R[first_R]] = i_R[first_R, None]
        self.idx_BK[rows_R, pos_R] = i_R
        if self._dirs_BKD is not None:
            self._dirs_BKD[rows_R, pos_R] = self.rows(i_R)
        self.live_BK[rows_R, pos_R] = True
        self.count_B[rows_R] += 1

    def move(self, delta_BK: Tensor, dx_BD: Tensor | None = None) -> None:
        """Change the weights by delta [B, K] (clipped at 0 when non-negative) and the
        residual by -delta D_S (`dx`, when the caller has it at hand)."""
        self.val_BK += delta_BK
        if self.nonnegative:
            self.val_BK.clamp_(min=0)
        if dx_BD is None:
            dx_BD = self.combine(delta_BK)
        self.r_BD -= dx_BD
        self.r_norm_B = self.r_BD.norm(dim=1)
        if self.log is not None:
            self.log["residual_norm"].append(self.r_norm_B)

    def record(self, i_B: Tensor, cosine_B: Tensor) -> None:
        """Log a step (with `trace`): the latent each row selected and its direction's cosine
        to the span of the support (-1 and NaN for rows that have stopped)."""
        if self.log is not None:
            self.log["selected"].append(torch.where(self.active_B, i_B, -1))
            self.log["span_cosine"].append(torch.where(self.active_B, cosine_B, torch.nan))

    def trace(self) -> PursuitTrace | None:
        if self.log is None:
            return None
        steps = len(self.log["selected"])
        empty = self.x_norm_B.new_zeros(0, len(self.x_norm_B))
        return PursuitTrace(
            torch.stack(self.log["residual_norm"][: steps + 1]),
            torch.stack(self.log["selected"]) if steps else empty.long(),
            torch.stack(self.log["span_cosine"]) if steps else empty)
