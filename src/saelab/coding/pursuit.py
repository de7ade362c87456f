"""Inference-time optimisation: matching pursuit, gradient pursuit and OMP, batched.

Read reference.py first: it states the three algorithms one row and one step at a time, in
float64, and the tests hold this engine to it (same selections, same weights). This file runs
them on a whole batch at once, on unit-norm decoder rows (`Dictionary.unit_LD`); the only
Python loop is over the k selection steps. The pieces:

- `PursuitState` (state.py): each row's slots, weights, residual and activity, and the trace.
- a `Selector` (selection.py): finds each row's next latent, from correlations kept in memory
  (`CorrelationSelector`) or through a bfloat16 screen (`ScreenSelector`).
- `SupportFactor` (here): the Cholesky factor of each row's support, for OMP and the trace.
- `Pursuit` (here) ties them together for the three algorithms at the bottom of this file.

The correlations c = r D' [B, L] are the expensive part: recomputing them is one
[B, D] x [D, L] GEMM per step. With the Gram matrix G = D D' in memory, a weight change on m
slots changes c by (delta z) G[S, :], a sparse x dense product costing B*m*L instead of
B*D*L, so while the support is small compared with d the Gram path is many times cheaper
(Rubinstein, Zibulevsky & Elad 2008, "Batch-OMP"; correlations.py says how it is laid out
to run from cache). Each step takes the cheaper of the two (selection.py's `gram_pays`).

Once the support outgrows the Gram path, a float32 pursuit screens instead of recomputing:
the correlations come from a bfloat16 GEMM (several times faster than float32 on CPUs with
bf16 dot products, and on GPUs), which is within screen_error(d) * ||r|| of the float32 value.
The few latents on top of the screen get their float32 correlations, and the best of them is
taken only if it beats the screen's best remaining value by more than that bound, so no
other latent can be the float32 winner; rows where the bound does not settle it try more
candidates, then recompute every correlation in float32. The selection is the float32 one
(up to ties within float32 rounding, which any change of summation order can flip).
"""

from __future__ import annotations

import torch
from torch import Tensor

from saelab.coding.correlations import BlockedGram
from saelab.coding.linalg import IncrementalCholesky, nnls
from saelab.coding.selection import Selector, first_selector
from saelab.coding.state import PursuitState


class SupportFactor:
    """The Cholesky factor of each row's support Gram matrix D_S D_S' (linalg's
    `IncrementalCholesky`), grown with each new latent's inner products with the support:
    entries of G when the Gram matrix is in memory, else products with the support's
    directions. Its by-product, the norm of the new direction's projection onto the span of
    the support, is the trace's `span_cosine`."""

    def __init__(self, state: PursuitState, k: int, gram: BlockedGram | None) -> None:
        self.chol = IncrementalCholesky(len(state.x_BD), k, state.x_BD.dtype, state.x_BD.device)
        self.gram = gram

    def inner_with_support(self, state: PursuitState, i_B: Tensor, rows_R: Tensor) -> Tensor:
        """<d_i, d_s> for every slot s of `rows` [R, K] (0 on unused slots)."""
        idx_RK, i_R = state.idx_BK[rows_R], i_B[rows_R]
        if self.gram is not None:
            return self.gram.entries(idx_RK, i_R[:, None]) * state.live_BK[rows_R]
        # every row, then pick: indexing dirs first would copy [R, K, D]
        return torch.einsum("bkd,bd->bk", state.dirs(), state.rows(i_B))[rows_R]

    def grow(self, state: PursuitState, i_B: Tensor, rows_R: Tensor, pos_R: Tensor
             ) -> tuple[Tensor, Tensor, Tensor]:
        """Add latent i at slot pos of `rows` to the factor. Returns which rows could (ok [R]:
        a direction numerically inside the span cannot join), the inner products b [R, K]
        with the support and the projection w = L^-1 b [R, C]."""
        b_RK = self.inner_with_support(state, i_B, rows_R)
        w_RC = self.chol.project(rows_R, b_RK)
        return self.chol.add(rows_R, pos_R, w_RC), b_RK, w_RC


class Pursuit:
    """A batch in the middle of a pursuit: its `state`, the `selector` that finds each step's
    latent (which may hand over to another as the support grows) and, for OMP or a trace,
    the support's Cholesky `factor`. The three algorithms below drive it step by step."""

    def __init__(self, state: PursuitState, selector: Selector,
                 factor: SupportFactor | None) -> None:
        self.state, self.selector, self.factor = state, selector, factor

    @classmethod
    def start(cls, x_BD: Tensor, unit_LD: Tensor, k: int, *, gram: BlockedGram | None,
              screen_LD: Tensor | None, nonnegative: bool, tol: float | None, trace: bool,
              cholesky: bool) -> Pursuit:
        """A pursuit of at most k steps on rows x [B, D] over unit rows [L, D]: with the
        Gram matrix when `gram` is given, screening through `screen_LD` (a bf16 copy of the
        unit rows) when given, and with the support's Cholesky factor when `cholesky`
        (OMP) or `trace`."""
        state = PursuitState(x_BD, unit_LD, k, nonnegative=nonnegative, tol=tol, trace=trace)
        factor = SupportFactor(state, k, gram) if trace or cholesky else None
        return cls(state, first_selector(state, gram, screen_LD), factor)

    def select(self, exclude_support: bool) -> tuple[Tensor, Tensor]:
        """Latent most correlated with the residual [B] (largest positive correlation when
        non-negative) and its correlation [B]; rows with nothing left to gain, or below
        tolerance, stop here."""
        score_B, i_B, value_B = self.selector.select(self.state, exclude_support)
        self.state.stop(score_B)
        return i_B, value_B

    def support_correlations(self) -> Tensor:
        """<r, d_s> for every slot [B, K] (0 on unused slots)."""
        return self.selector.support_correlations(self.state)

    def add(self, i_B: Tensor, pos_B: Tensor, new_B: Tensor, *,
            stop_if_dependent: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Put latent i into slot pos of the active rows that selected a new latent.

        With a factor, also grows it and records the cosine of the new direction to the span
        of the support. A direction numerically inside that span cannot join the factor: OMP
        (`stop_if_dependent`) stops such a row; MP and GP add the slot anyway and leave it
        out of the factor, which only the trace sees. Returns the rows [R] that added a slot
        and, with a factor, their inner products [R, K] with the previous support and the
        new direction's projection [R, C] (`SupportFactor.grow`).
        """
        s = self.state
        cosine_B = torch.full_like(s.x_norm_B, torch.nan)
        cosine_B[s.active_B & ~new_B] = 1.0  # matching pursuit re-picked a latent
        rows_R = (s.active_B & new_B).nonzero().squeeze(1)
        b_RK = w_RC = None
        if self.factor is not None:
            ok_R, b_RK, w_RC = self.factor.grow(s, i_B, rows_R, pos_B[rows_R])
            cosine_B[rows_R] = w_RC.norm(dim=1).clamp(max=1)
            if stop_if_dependent:
                s.active_B[rows_R[~ok_R]] = False
                rows_R, b_RK, w_RC = rows_R[ok_R], b_RK[ok_R], w_RC[ok_R]
        s.place(rows_R, pos_B[rows_R], i_B[rows_R])
        s.record(i_B, cosine_B)
        return rows_R, b_RK, w_RC

    def apply(self, delta_BK: Tensor, dx_BD: Tensor | None = None,
              changed_BM: Tensor | None = None) -> None:
        """Change the weights by delta [B, K] (only the slots `changed` [B, M] when given; dx
        = delta D_S when at hand) and bring the residual and the selector up to date."""
        self.state.move(delta_BK, dx_BD)
        self.selector = self.selector.update(self.state, delta_BK, changed_BM)


def matching_pursuit(p: Pursuit, k: int) -> None:
    """Matching pursuit (Mallat & Zhang 1993): k times, select the latent with the largest
    |correlation| and add that correlation to its weight; a latent may be picked again."""
    s = p.state
    for _ in range(k):
        i_B, value_B = p.select(exclude_support=False)
        if not s.active_B.any():
            break
        pos_B, new_B = s.slot_for(i_B, reuse=True)
        p.add(i_B, pos_B, new_B)
        step_B = value_B * s.active_B
        delta_BK = torch.zeros_like(s.val_BK).scatter_(1, pos_B[:, None], step_B[:, None])
        p.apply(delta_BK, dx_BD=step_B[:, None] * s.rows(i_B), changed_BM=pos_B[:, None])


def gradient_pursuit(p: Pursuit, k: int) -> None:
    """Gradient pursuit (Blumensath & Davies 2008), one new latent per step:
    1. select the latent most correlated with the residual and add it to the support;
    2. gradient g = the correlations on the support (non-negative: 0 for weights at 0 whose
       gradient points below 0, and the step is cut where a weight would cross 0);
    3. exact line search: a = <u, r> / <u, u> with u = g D_S;
    4. z += a g, r -= a u."""
    s = p.state
    for _ in range(k):
        i_B, _ = p.select(exclude_support=True)
        if not s.active_B.any():
            break
        pos_B, new_B = s.slot_for(i_B, reuse=False)
        p.add(i_B, pos_B, new_B)
        g_BK = p.support_correlations()
        if s.nonnegative:
            g_BK = torch.where((s.val_BK <= 0) & (g_BK < 0), 0.0, g_BK)
        u_BD = s.combine(g_BK)
        uu_B = (u_BD * u_BD).sum(dim=1)
        a_B = (u_BD * s.r_BD).sum(dim=1) / torch.where(uu_B > 0, uu_B, 1.0)
        if s.nonnegative:  # largest step keeping every weight >= 0
            cap_BK = torch.where(g_BK < 0, s.val_BK / -g_BK.clamp(max=-1e-30), torch.inf)
            a_B = torch.minimum(a_B, cap_BK.amin(dim=1))
        a_B = a_B * s.active_B
        p.apply(a_B[:, None] * g_BK, dx_BD=a_B[:, None] * u_BD)


def orthogonal_matching_pursuit(p: Pursuit, k: int) -> None:
    """Orthogonal matching pursuit (Pati et al. 1993): select as gradient pursuit does, then
    the exact least-squares weights on the support. The Cholesky factor L of the support's
    Gram matrix grows by one row per step (a triangular solve), never refactorised, and so
    does the forward half of the least-squares solve (L a = D_S x), leaving one triangular
    solve (L' z = a) per step; the non-negative variant solves NNLS on the support,
    warm-started from the last step. Needs a `Pursuit` started with `cholesky=True`."""
    s, factor = p.state, p.factor
    assert factor is not None
    if s.nonnegative:  # <x, d_s> and <d_s, d_t> for NNLS
        y_BK = torch.zeros_like(s.val_BK)
        gram_BKK = s.val_BK.new_zeros(*y_BK.shape, y_BK.shape[1])
    else:
        a_BK = torch.zeros_like(s.val_BK)  # L a = <x, d_s>
    for _ in range(k):
        i_B, c_B = p.select(exclude_support=True)
        if not s.active_B.any():
            break
        pos_B, new_B = s.slot_for(i_B, reuse=False)
        rows_R, b_RK, w_RC = p.add(i_B, pos_B, new_B, stop_if_dependent=True)
        assert b_RK is not None and w_RC is not None
        # <x, d_i> = <r, d_i> + sum_s z_s <d_s, d_i>: both terms are at hand, so no pass
        # over x and d_i (and no [R, D] temporaries)
        pos_R = pos_B[rows_R]
        y_R = c_B[rows_R] + (b_RK * s.val_BK[rows_R]).sum(dim=1)
        if s.nonnegative:
            y_BK[rows_R, pos_R] = y_R
            gram_BKK[rows_R, pos_R] = b_RK
            gram_BKK[rows_R, :, pos_R] = b_RK
            gram_BKK[rows_R, pos_R, pos_R] = 1.0
            z_BK = nnls(gram_BKK, y_BK, s.live_BK, z0_BK=s.val_BK)
        else:
            factor.chol.extend(a_BK, rows_R, pos_R, w_RC, y_R)
            z_BK = factor.chol.solve(a_BK) * s.live_BK
        p.apply((z_BK - s.val_BK) * s.active_B[:, None])
