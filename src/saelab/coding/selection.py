"""How a pursuit finds each row's next latent: two strategies behind one small interface.

- `CorrelationSelector` keeps the correlations c = r D' [B, L] in memory (correlations.py) and
  brings them up to date after each step: through the Gram matrix (c -= (delta z) G[S, :])
  while that pays, else by recomputing them in float32 (one [B, D] x [D, L] GEMM).
- `ScreenSelector` keeps nothing: each step screens every latent with a bfloat16 GEMM and
  checks the few on top in float32 (pursuit.py's docstring says why the selection is the
  float32 one).

A pursuit starts on the Gram path when it has the Gram matrix (`first_selector`) and moves to
the screen, when it may screen, as soon as the Gram update stops paying (`gram_pays`). The
selection itself is the same either way; reference.py states it for one row.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from saelab.coding.correlations import BlockedGram, Correlations
from saelab.coding.state import PursuitState

# The Gram update runs about this many times slower per multiply-add than a dense GEMM on
# the CPUs measured (benchmarks/coding.py); it is taken while m times this is below d_model
# (d_model / SCREEN_SPEEDUP when the pursuit may screen instead).
GRAM_PENALTY = 3
# latents per row whose float32 correlation is checked: first 8, then 64 for the rows those
# leave unsettled (real SAE dictionaries crowd their top correlations more than random ones)
SCREEN_CANDIDATES = (8, 64)
# A screening step costs about this many times less than a float32 recompute (bf16 GEMM
# against float32, less the top-k and the check; benchmarks/coding.py).
SCREEN_SPEEDUP = 2.5
_CHECK_BYTES = 2**28  # float32 candidate rows gathered at once by the check


def gram_pays(m: int, d_model: int, screens: bool) -> bool:
    """Whether a Gram update over m changed slots beats recomputing the correlations (a
    float32 GEMM, or a bf16 screen when the pursuit `screens`): the cost model above."""
    return m * GRAM_PENALTY < (d_model / SCREEN_SPEEDUP if screens else d_model)


def screen_error(d_model: int) -> float:
    """Bound on |bf16 screen - float32 correlation| / ||r|| for unit rows in d_model dims.

    bfloat16 keeps 8 significant bits (unit roundoff u = 2^-8). Rounding r and the unit rows
    to bf16 moves each product by <= 2u |r_i d_i|; a float32 sum of d terms adds up to
    d 2^-24 of sum |r_i d_i|; rounding the output adds u |c| <= u ||r||; and
    sum |r_i d_i| <= ||r|| (Cauchy-Schwarz). The 0.1u covers second-order terms.
    """
    return (3.1 + d_model * 2.0**-16) * 2.0**-8


class Selector(Protocol):
    """What a pursuit asks of a selection strategy."""

    def select(self, state: PursuitState, exclude_support: bool
               ) -> tuple[Tensor, Tensor, Tensor]:
        """Each row's best latent: (score [B], latent [B], correlation <r, d_i> [B]). The
        score is |correlation| (the correlation itself when `state.nonnegative`); with
        `exclude_support`, latents already in the row's support are left out."""
        ...

    def support_correlations(self, state: PursuitState) -> Tensor:
        """<r, d_s> for every slot [B, K] (0 on unused slots)."""
        ...

    def update(self, state: PursuitState, delta_BK: Tensor, changed_BM: Tensor | None
               ) -> Selector:
        """After `state.move(delta)` (on the slots `changed`, when given): the selector for
        the next step, up to date with the new residual (itself, or its successor)."""
        ...


def first_selector(state: PursuitState, gram: BlockedGram | None,
                   screen_LD: Tensor | None) -> Selector:
    """The correlations in memory when there is a Gram matrix to update them with, or no
    screen (`screen_LD`, a bf16 copy of the unit rows) to find latents without them."""
    if gram is not None or screen_LD is None:
        return CorrelationSelector(state, gram, screen_LD)
    return ScreenSelector(screen_LD)


class CorrelationSelector:
    """c = r D' in the working dtype, kept current through the Gram matrix G = D D' while that
    pays, else recomputed; hands over to a `ScreenSelector` (given `screen_LD`) instead of
    recomputing."""

    def __init__(self, state: PursuitState, gram: BlockedGram | None,
                 screen_LD: Tensor | None = None) -> None:
        self.gram, self.screen_LD = gram, screen_LD
        self.c = Correlations.of(state.r_BD, state.unit_LD, gram)

    def select(self, state: PursuitState, exclude_support: bool
               ) -> tuple[Tensor, Tensor, Tensor]:
        score_B, i_B = self.c.best(state.idx_BK, state.live_BK, exclude_support,
                                   state.nonnegative)
        return score_B, i_B, self.c.gather(i_B[:, None]).squeeze(1)

    def support_correlations(self, state: PursuitState) -> Tensor:
        return self.c.gather(state.idx_BK) * state.live_BK

    def update(self, state: PursuitState, delta_BK: Tensor, changed_BM: Tensor | None
               ) -> Selector:
        """c -= (delta z) G[S, :] over the changed slots (all slots in use unless `changed`
        says which) when `gram_pays`; else the screen, or c = r D' again."""
        if changed_BM is None:
            m = int(state.count_B.max())
            changed_BM = torch.arange(m, device=delta_BK.device).expand(len(delta_BK), m)
        m, d = changed_BM.shape[1], state.r_BD.shape[1]
        if self.gram is not None and gram_pays(m, d, screens=self.screen_LD is not None):
            self.c.sub_gram_rows_(state.idx_BK.gather(1, changed_BM),
                                  delta_BK.gather(1, changed_BM), self.gram)
            return self
        if self.screen_LD is not None:
            return ScreenSelector(self.screen_LD)  # from here on every selection screens
        self.c.recompute_(state.r_BD, state.unit_LD, self.gram)
        return self


class ScreenSelector:
    """The float32 selection found through a bfloat16 screen of every latent, the few on top
    checked in float32 (pursuit.py's docstring). Keeps no correlations: every selection starts
    from the residual. `unsettled` counts the selections the first candidates left open and
    those left to a float32 recompute."""

    def __init__(self, screen_LD: Tensor) -> None:
        self.screen_LD = screen_LD  # bf16 copy of the unit rows
        self.unsettled = [0, 0]

    def select(self, state: PursuitState, exclude_support: bool
               ) -> tuple[Tensor, Tensor, Tensor]:
        """Rows the first few candidates do not settle try more of them, then recompute in
        float32; rows that have stopped get score, latent and value 0."""
        s_BL = _bf16_product(state.r_BD, self.screen_LD)
        if not state.nonnegative:
            s_BL.abs_()
        if exclude_support:  # flat index_fill_: a bf16 scatter_ copies the whole tensor
            L = s_BL.shape[1]
            flat_BK = state.idx_BK + L * torch.arange(len(s_BL), device=s_BL.device)[:, None]
            s_BL.view(-1).index_fill_(0, flat_BK[state.live_BK], -torch.inf)
        found = (torch.zeros_like(state.x_norm_B), torch.zeros_like(state.count_B),
                 torch.zeros_like(state.x_norm_B))  # score_B, latent_B, value_B
        bound_B = screen_error(state.r_BD.shape[1]) * state.r_norm_B
        rows_R = state.active_B.nonzero().squeeze(1)
        for stage, m in enumerate(SCREEN_CANDIDATES):
            if stage:
                self.unsettled[0] += len(rows_R)
            s_RL = s_BL if len(rows_R) == len(s_BL) else s_BL[rows_R]
            settled_R = self._check_candidates(state, s_RL, rows_R, min(m, s_BL.shape[1]),
                                               bound_B, found)
            rows_R = rows_R[~settled_R]
            if not len(rows_R):
                break
        del s_BL
        if len(rows_R):
            c = Correlations.of(state.r_BD[rows_R], state.unit_LD, None)
            score_R, i_R = c.best(state.idx_BK[rows_R], state.live_BK[rows_R],
                                  exclude_support, state.nonnegative)
            found[0][rows_R], found[1][rows_R] = score_R, i_R
            found[2][rows_R] = c.gather(i_R[:, None]).squeeze(1)
        self.unsettled[-1] += len(rows_R)
        return found

    def _check_candidates(self, state: PursuitState, s_RL: Tensor, rows_R: Tensor, m: int,
                          bound_B: Tensor, found: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """The best of the top m screened latents of `rows` by float32 correlation, written
        into `found`; returns which rows it settles (no latent outside the m can beat it).
        Rows go in pieces, so the gathered [R, M, D] candidates stay in bounded memory."""
        piece = max(_CHECK_BYTES // (4 * m * state.unit_LD.shape[1]), 1)
        settled = []
        for at in range(0, len(rows_R), piece):
            sub_R = rows_R[at:at + piece]
            top_RM, cand_RM = s_RL[at:at + piece].topk(m, dim=1)
            value_RM = torch.einsum("rmd,rd->rm", state.rows(cand_RM), state.r_BD[sub_R])
            score_RM = torch.where(top_RM == -torch.inf, -torch.inf,
                                   value_RM if state.nonnegative else value_RM.abs())
            score_R, j_R = score_RM.max(dim=1)
            found[0][sub_R] = score_R
            found[1][sub_R] = cand_RM.gather(1, j_R[:, None]).squeeze(1)
            found[2][sub_R] = value_RM.gather(1, j_R[:, None]).squeeze(1)
            settled.append(score_R > top_RM[:, -1].float() + bound_B[sub_R])
        return torch.cat(settled)

    def support_correlations(self, state: PursuitState) -> Tensor:
        return torch.einsum("bkd,bd->bk", state.dirs(), state.r_BD)

    def update(self, state: PursuitState, delta_BK: Tensor, changed_BM: Tensor | None
               ) -> Selector:
        return self  # nothing kept, nothing to update


def _bf16_product(r_BD: Tensor, screen_LD: Tensor) -> Tensor:
    """r D' in bfloat16 with float32 accumulation (on CUDA, cuBLAS may otherwise add split-K
    partial sums in bf16, which the screen's bound does not cover)."""
    if r_BD.device.type != "cuda":
        return r_BD.to(torch.bfloat16) @ screen_LD.T
    flags = torch.backends.cuda.matmul
    reduced = flags.allow_bf16_reduced_precision_reduction
    flags.allow_bf16_reduced_precision_reduction = False
    try:
        return r_BD.to(torch.bfloat16) @ screen_LD.T
    finally:
        flags.allow_bf16_reduced_precision_reduction = reduced
