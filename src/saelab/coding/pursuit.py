"""Inference-time optimisation: matching pursuit, gradient pursuit and OMP, batched.

All three share one loop shape: select the latent most correlated with the residual, add it
to the row's support, update the weights on the support, update the correlations. They run
on unit-norm decoder rows (`Dictionary.unit_LD`). The only Python loop is over the k
selection steps; every step works on the whole batch.

The correlations c = r D' [B, L] are the expensive part: recomputing them is one
[B, d] x [d, L] GEMM per step. With the Gram matrix G = D D' in memory, a weight change on m
slots changes c by (delta z) G[S, :], a sparse x dense product costing B*m*L instead of
B*d*L, so while the support is small compared with d the Gram path is many times cheaper
(Rubinstein, Zibulevsky & Elad 2008, "Batch-OMP"; correlations.py says how it is laid out
to run from cache). Each step takes the cheaper of the two.

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
from torch.nn.functional import embedding_bag

from saelab.coding.code import PursuitTrace
from saelab.coding.correlations import BlockedGram, Correlations
from saelab.coding.linalg import IncrementalCholesky, nnls

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


class _Support:
    """The per-row state of a pursuit: support slots, weights, residual and correlations."""

    def __init__(self, x_BD: Tensor, unit_LD: Tensor, gram: BlockedGram | None, k: int,
                 nonnegative: bool, tol: float | None, trace: bool, cholesky: bool,
                 screen_LD: Tensor | None = None) -> None:
        B = len(x_BD)
        self.x_BD, self.unit_LD, self.gram = x_BD, unit_LD, gram
        self.screen_LD = screen_LD  # bf16 copy of unit_LD, or None: never screen
        self.nonnegative = nonnegative
        self.idx_BK = torch.zeros(B, k, dtype=torch.long, device=x_BD.device)
        self.val_BK = x_BD.new_zeros(B, k)
        self.live_BK = torch.zeros(B, k, dtype=torch.bool, device=x_BD.device)
        # unit decoder row of each slot (0 if unused), built on first use: only the paths
        # without correlations in memory read it
        self._dirs_BKD: Tensor | None = None
        self.count_B = torch.zeros(B, dtype=torch.long, device=x_BD.device)
        self.r_BD = x_BD.clone()
        # correlations in the working dtype; None once the pursuit screens (every selection
        # then starts from the residual)
        self.c: Correlations | None = (Correlations.of(x_BD, unit_LD, gram)
                                       if gram is not None or screen_LD is None else None)
        self.x_norm_B = x_BD.norm(dim=1)
        self.stop_norm_B = (tol or 0.0) * self.x_norm_B
        self.active_B = self.x_norm_B > 0
        # screened selections the first candidates left unsettled, and those left to a
        # float32 recompute
        self.unsettled = [0, 0]
        self.chol = (IncrementalCholesky(B, k, x_BD.dtype, x_BD.device)
                     if trace or cholesky else None)
        self.log: dict[str, list[Tensor]] | None = (
            {"residual_norm": [self.x_norm_B.clone()], "selected": [], "span_cosine": []}
            if trace else None)

    def select(self, exclude_support: bool) -> tuple[Tensor, Tensor]:
        """Latent most correlated with the residual [B] (largest positive correlation when
        non-negative) and its correlation [B]; rows with nothing left to gain, or below
        tolerance, stop here."""
        residual_B = self.r_BD.norm(dim=1)
        if self.c is None:
            score_B, i_B, value_B = self._screen(exclude_support, residual_B)
        else:
            score_B, i_B = self.c.best(self.idx_BK, self.live_BK, exclude_support,
                                       self.nonnegative)
            value_B = self.c.gather(i_B[:, None]).squeeze(1)
        floor_B = 10 * torch.finfo(self.x_BD.dtype).eps * self.x_norm_B
        self.active_B &= (score_B > floor_B) & (residual_B > self.stop_norm_B)
        return i_B, value_B

    def _screen(self, exclude_support: bool, residual_B: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
        """The float32 selection, found through a bfloat16 screen (see the module docstring):
        (score [B], latent [B], float32 correlation [B]). Rows the first few candidates do not
        settle try more of them, then recompute in float32."""
        assert self.screen_LD is not None
        s_BL = _bf16_product(self.r_BD, self.screen_LD)
        if not self.nonnegative:
            s_BL.abs_()
        if exclude_support:  # flat index_fill_: a bf16 scatter_ copies the whole tensor
            L = s_BL.shape[1]
            flat_N = (self.idx_BK + L * torch.arange(len(s_BL), device=s_BL.device)[:, None])
            s_BL.view(-1).index_fill_(0, flat_N[self.live_BK], -torch.inf)
        found = (torch.zeros_like(self.x_norm_B), torch.zeros_like(self.count_B),
                 torch.zeros_like(self.x_norm_B))  # score, latent, value (0: stopped rows)
        bound_B = screen_error(self.r_BD.shape[1]) * residual_B
        rows_R = self.active_B.nonzero().squeeze(1)
        for stage, m in enumerate(SCREEN_CANDIDATES):
            if stage:
                self.unsettled[0] += len(rows_R)
            s_RL = s_BL if len(rows_R) == len(s_BL) else s_BL[rows_R]
            settled_R = self._check_candidates(s_RL, rows_R, min(m, s_BL.shape[1]), bound_B,
                                               found)
            rows_R = rows_R[~settled_R]
            if not len(rows_R):
                break
        del s_BL
        if len(rows_R):
            c = Correlations.of(self.r_BD[rows_R], self.unit_LD, None)
            score_R, i_R = c.best(self.idx_BK[rows_R], self.live_BK[rows_R], exclude_support,
                                  self.nonnegative)
            found[0][rows_R], found[1][rows_R] = score_R, i_R
            found[2][rows_R] = c.gather(i_R[:, None]).squeeze(1)
        self.unsettled[-1] += len(rows_R)
        return found

    def _check_candidates(self, s_RL: Tensor, rows_R: Tensor, m: int, bound_B: Tensor,
                          found: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """The best of the top m screened latents of `rows` by float32 correlation, written
        into `found`; returns which rows it settles (no latent outside the m can beat it).
        Rows go in pieces, so the gathered [rows, m, d] candidates stay in bounded memory."""
        piece = max(_CHECK_BYTES // (4 * m * self.unit_LD.shape[1]), 1)
        settled = []
        for at in range(0, len(rows_R), piece):
            sub_R = rows_R[at:at + piece]
            top_RM, cand_RM = s_RL[at:at + piece].topk(m, dim=1)
            value_RM = torch.einsum("rmd,rd->rm", self.rows(cand_RM), self.r_BD[sub_R])
            score_RM = torch.where(top_RM == -torch.inf, -torch.inf,
                                   value_RM if self.nonnegative else value_RM.abs())
            score_R, j_R = score_RM.max(dim=1)
            found[0][sub_R] = score_R
            found[1][sub_R] = cand_RM.gather(1, j_R[:, None]).squeeze(1)
            found[2][sub_R] = value_RM.gather(1, j_R[:, None]).squeeze(1)
            settled.append(score_R > top_RM[:, -1].float() + bound_B[sub_R])
        return torch.cat(settled)

    def dirs(self) -> Tensor:
        """Unit decoder row of each slot [B, K, d] (0 on unused slots)."""
        if self._dirs_BKD is None:
            self._dirs_BKD = self.rows(self.idx_BK) * self.live_BK[..., None]
        return self._dirs_BKD

    def combine(self, w_BK: Tensor) -> Tensor:
        """sum_s w[b, s] d_s [B, d] over each row's live slots (embedding_bag gathers the rows
        itself: faster than a batched [1, K] x [K, d] product over stored directions)."""
        return embedding_bag(self.idx_BK, self.unit_LD, per_sample_weights=w_BK * self.live_BK,
                             mode="sum")

    def rows(self, i: Tensor) -> Tensor:
        """Unit decoder rows of latents i [...] -> [..., d] (index_select: several times
        faster than advanced indexing on CPU)."""
        return self.unit_LD.index_select(0, i.reshape(-1)).view(*i.shape, self.unit_LD.shape[1])

    def support_correlations(self) -> Tensor:
        """<r, d_s> for every slot [B, K] (0 on unused slots)."""
        if self.c is not None:
            return self.c.gather(self.idx_BK) * self.live_BK
        return torch.einsum("bkd,bd->bk", self.dirs(), self.r_BD)

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

    def inner_with_support(self, i_B: Tensor, rows_R: Tensor) -> Tensor:
        """<d_i, d_s> for every slot s of `rows` [R, K] (0 on unused slots)."""
        idx_RK, i_R = self.idx_BK[rows_R], i_B[rows_R]
        if self.gram is not None:
            return self.gram.entries(idx_RK, i_R[:, None]) * self.live_BK[rows_R]
        # every row, then pick: indexing dirs first would copy [R, K, d]
        return torch.einsum("bkd,bd->bk", self.dirs(), self.rows(i_B))[rows_R]

    def add(self, i_B: Tensor, pos_B: Tensor, new_B: Tensor, *,
            stop_if_dependent: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Put latent i into slot pos of the active rows that selected a new latent.

        With a Cholesky factor, also grows it and records the cosine of the new direction to
        the span of the support. A direction numerically inside that span cannot join the
        factor: OMP (`stop_if_dependent`) stops such a row; MP and GP add the slot anyway and
        leave it out of the factor, which only the trace sees. Returns the rows [R] that added
        a slot and, with a factor, their inner products [R, K] with the previous support and
        the new direction's `project`ion [R, cap].
        """
        cosine_B = torch.full_like(self.x_norm_B, torch.nan)
        cosine_B[self.active_B & ~new_B] = 1.0  # matching pursuit re-picked a latent
        rows_R = (self.active_B & new_B).nonzero().squeeze(1)
        b_RK = w_RC = None
        if self.chol is not None:
            b_RK = self.inner_with_support(i_B, rows_R)
            w_RC = self.chol.project(rows_R, b_RK)
            ok_R = self.chol.add(rows_R, pos_B[rows_R], w_RC)
            cosine_B[rows_R] = w_RC.norm(dim=1).clamp(max=1)
            if stop_if_dependent:
                self.active_B[rows_R[~ok_R]] = False
                rows_R, b_RK, w_RC = rows_R[ok_R], b_RK[ok_R], w_RC[ok_R]
        pos_R, i_R = pos_B[rows_R], i_B[rows_R]
        first_R = pos_R == 0  # unused slots point at the first latent (see `select`)
        self.idx_BK[rows_R[first_R]] = i_R[first_R, None]
        self.idx_BK[rows_R, pos_R] = i_R
        if self._dirs_BKD is not None:
            self._dirs_BKD[rows_R, pos_R] = self.rows(i_R)
        self.live_BK[rows_R, pos_R] = True
        self.count_B[rows_R] += 1
        if self.log is not None:
            self.log["selected"].append(torch.where(self.active_B, i_B, -1))
            self.log["span_cosine"].append(torch.where(self.active_B, cosine_B, torch.nan))
        return rows_R, b_RK, w_RC

    def apply(self, delta_BK: Tensor, dx_BD: Tensor | None = None,
              changed_BM: Tensor | None = None) -> None:
        """Change the weights by delta (per slot; only the slots `changed` when given) and
        update the residual and the correlations."""
        self.val_BK += delta_BK
        if self.nonnegative:
            self.val_BK.clamp_(min=0)
        if dx_BD is None:
            dx_BD = self.combine(delta_BK)
        self.r_BD -= dx_BD
        if changed_BM is None:
            m = int(self.count_B.max())
            changed_BM = torch.arange(m, device=delta_BK.device).expand(len(delta_BK), m)
        m, d = changed_BM.shape[1], self.x_BD.shape[1]
        if (self.c is not None and self.gram is not None
                and gram_pays(m, d, screens=self.screen_LD is not None)):
            self.c.sub_gram_rows_(self.idx_BK.gather(1, changed_BM),
                                  delta_BK.gather(1, changed_BM), self.gram)
        elif self.screen_LD is not None:
            self.c = None  # from here on every selection screens
        else:
            assert self.c is not None
            self.c.recompute_(self.r_BD, self.unit_LD, self.gram)
        if self.log is not None:
            self.log["residual_norm"].append(self.r_BD.norm(dim=1))

    def trace(self) -> PursuitTrace | None:
        if self.log is None:
            return None
        steps = len(self.log["selected"])
        empty = self.x_norm_B.new_zeros(0, len(self.x_norm_B))
        return PursuitTrace(
            torch.stack(self.log["residual_norm"][: steps + 1]),
            torch.stack(self.log["selected"]) if steps else empty.long(),
            torch.stack(self.log["span_cosine"]) if steps else empty)


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


def matching_pursuit(state: _Support, k: int) -> None:
    """Matching pursuit (Mallat & Zhang 1993): k times, select the latent with the largest
    |correlation| and add that correlation to its weight; a latent may be picked again."""
    for _ in range(k):
        i_B, value_B = state.select(exclude_support=False)
        if not state.active_B.any():
            break
        pos_B, new_B = state.slot_for(i_B, reuse=True)
        state.add(i_B, pos_B, new_B)
        step_B = value_B * state.active_B
        delta_BK = torch.zeros_like(state.val_BK).scatter_(1, pos_B[:, None], step_B[:, None])
        state.apply(delta_BK, dx_BD=step_B[:, None] * state.rows(i_B),
                    changed_BM=pos_B[:, None])


def gradient_pursuit(state: _Support, k: int) -> None:
    """Gradient pursuit (Blumensath & Davies 2008), one new latent per step:
    1. select the latent most correlated with the residual and add it to the support;
    2. gradient g = the correlations on the support (non-negative: 0 for weights at 0 whose
       gradient points below 0, and the step is cut where a weight would cross 0);
    3. exact line search: a = <u, r> / <u, u> with u = g D_S;
    4. z += a g, r -= a u."""
    for _ in range(k):
        i_B, _ = state.select(exclude_support=True)
        if not state.active_B.any():
            break
        pos_B, new_B = state.slot_for(i_B, reuse=False)
        state.add(i_B, pos_B, new_B)
        g_BK = state.support_correlations()
        if state.nonnegative:
            g_BK = torch.where((state.val_BK <= 0) & (g_BK < 0), 0.0, g_BK)
        u_BD = state.combine(g_BK)
        uu_B = (u_BD * u_BD).sum(dim=1)
        a_B = (u_BD * state.r_BD).sum(dim=1) / torch.where(uu_B > 0, uu_B, 1.0)
        if state.nonnegative:  # largest step keeping every weight >= 0
            cap_BK = torch.where(g_BK < 0, state.val_BK / -g_BK.clamp(max=-1e-30), torch.inf)
            a_B = torch.minimum(a_B, cap_BK.amin(dim=1))
        a_B = a_B * state.active_B
        state.apply(a_B[:, None] * g_BK, dx_BD=a_B[:, None] * u_BD)


def orthogonal_matching_pursuit(state: _Support, k: int) -> None:
    """Orthogonal matching pursuit (Pati et al. 1993): select as gradient pursuit does, then
    the exact least-squares weights on the support. The Cholesky factor L of the support's
    Gram matrix grows by one row per step (a triangular solve), never refactorised, and so
    does the forward half of the least-squares solve (L a = D_S x), leaving one triangular
    solve (L' z = a) per step; the non-negative variant solves NNLS on the support,
    warm-started from the last step. Needs a `_Support` built with `cholesky=True`."""
    chol = state.chol
    assert chol is not None
    if state.nonnegative:  # <x, d_s> and <d_s, d_t> for NNLS
        y_BK = torch.zeros_like(state.val_BK)
        gram_BKK = state.val_BK.new_zeros(*y_BK.shape, y_BK.shape[1])
    else:
        a_BK = torch.zeros_like(state.val_BK)  # L a = <x, d_s>
    for _ in range(k):
        i_B, c_B = state.select(exclude_support=True)
        if not state.active_B.any():
            break
        pos_B, new_B = state.slot_for(i_B, reuse=False)
        rows_R, b_RK, w_RC = state.add(i_B, pos_B, new_B, stop_if_dependent=True)
        # <x, d_i> = <r, d_i> + sum_s z_s <d_s, d_i>: both terms are at hand, so no pass
        # over x and d_i (and no [R, d] temporaries)
        pos_R = pos_B[rows_R]
        y_R = c_B[rows_R] + (b_RK * state.val_BK[rows_R]).sum(dim=1)
        if state.nonnegative:
            y_BK[rows_R, pos_R] = y_R
            gram_BKK[rows_R, pos_R] = b_RK
            gram_BKK[rows_R, :, pos_R] = b_RK
            gram_BKK[rows_R, pos_R, pos_R] = 1.0
            z_BK = nnls(gram_BKK, y_BK, state.live_BK, z0_BK=state.val_BK)
        else:
            chol.extend(a_BK, rows_R, pos_R, w_RC, y_R)
            z_BK = chol.solve(a_BK) * state.live_BK
        state.apply((z_BK - state.val_BK) * state.active_B[:, None])
