"""Batched small linear algebra on supports: every row of a batch has its own k x k system.

Shapes: B batch rows, K slots (the support, padded); `live_BK` marks the slots in use, and
the masked systems put the identity on the others so one batched factorisation serves rows
with supports of any size.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _masked(G_BKK: Tensor, live_BK: Tensor) -> Tensor:
    """G on live slots, identity on the rest: a well-posed system that leaves padding at 0."""
    keep_BKK = live_BK.unsqueeze(2) & live_BK.unsqueeze(1)
    eye_KK = torch.eye(G_BKK.shape[-1], dtype=G_BKK.dtype, device=G_BKK.device)
    return torch.where(keep_BKK, G_BKK, eye_KK * (~live_BK).unsqueeze(2))


def solve_masked(G_BKK: Tensor, y_BK: Tensor, live_BK: Tensor) -> Tensor:
    """Least squares on each row's live slots: G_SS z_S = y_S, zero on the other slots.

    Cholesky where the support's Gram is positive definite; rows whose support is linearly
    dependent fall back to the pseudo-inverse (the minimum-norm least-squares solution).
    """
    A_BKK = _masked(G_BKK, live_BK)
    rhs_BK1 = (y_BK * live_BK).unsqueeze(2)
    L_BKK, info_B = torch.linalg.cholesky_ex(A_BKK)
    z_BK = torch.cholesky_solve(rhs_BK1, L_BKK).squeeze(2)
    bad_B = info_B != 0
    if bad_B.any():
        z_BK[bad_B] = (torch.linalg.pinv(A_BKK[bad_B], hermitian=True)
                       @ rhs_BK1[bad_B]).squeeze(2)
    return z_BK * live_BK


def nnls(G_BKK: Tensor, y_BK: Tensor, live_BK: Tensor, z0_BK: Tensor | None = None,
         max_iter: int | None = None, z0_optimal: bool = True) -> Tensor:
    """Non-negative least squares on each row's live slots (Lawson & Hanson 1974), batched.

    Minimises 1/2 z'Gz - y'z subject to z >= 0, i.e. ||x - z D_S||^2 for G = D_S D_S' and
    y = D_S x. All rows step together: a row either adds the slot with the largest positive
    gradient to its passive set, or, when its last solve went negative, steps back to
    feasibility and drops the slot that hit zero. `z0` warm-starts: the optimum on its own
    positive slots (OMP adds one slot a step), or, with `z0_optimal` False, any feasible
    point, whose positive slots are solved on first (the encoder-refit starts from the
    encoder's code, a few steps back from the full support instead of adding it slot by slot).
    """
    B, K = y_BK.shape
    z_BK = torch.zeros_like(y_BK) if z0_BK is None else z0_BK.clamp(min=0) * live_BK
    passive_BK = z_BK > 0
    tol_B1 = 1e-6 * y_BK.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(y_BK.dtype).tiny)
    may_add_B = torch.ones(B, dtype=torch.bool, device=y_BK.device)
    settled_B = torch.full((B,), z0_BK is None or z0_optimal, device=y_BK.device)
    for _ in range(max_iter or 3 * K + 3):
        grad_BK = y_BK - (G_BKK @ z_BK.unsqueeze(2)).squeeze(2)  # minus the gradient
        cand_BK = live_BK & ~passive_BK & (grad_BK > tol_B1)
        add_B = may_add_B & cand_BK.any(dim=1)
        if not add_B.any() and may_add_B.all() and settled_B.all():
            break  # every row satisfies the KKT conditions
        j_B = torch.where(cand_BK, grad_BK, -torch.inf).argmax(dim=1)
        passive_BK = passive_BK | (torch.nn.functional.one_hot(j_B, K).bool() & add_B[:, None])
        s_BK = solve_masked(G_BKK, y_BK, passive_BK)
        blocked_BK = passive_BK & (s_BK <= 0)
        infeasible_B = blocked_BK.any(dim=1)
        ratio_BK = torch.where(blocked_BK, z_BK / (z_BK - s_BK).clamp(min=1e-30), torch.inf)
        alpha_B, stop_B = ratio_BK.min(dim=1)
        alpha_B = torch.where(infeasible_B, alpha_B.clamp(max=1), 1.0)
        z_BK = z_BK + alpha_B[:, None] * (s_BK - z_BK)
        drop_BK = torch.nn.functional.one_hot(stop_B, K).bool() & infeasible_B[:, None]
        passive_BK = passive_BK & ~drop_BK & (z_BK > 0)
        z_BK = (z_BK * passive_BK).clamp(min=0)
        may_add_B = ~infeasible_B
        settled_B = ~infeasible_B  # a feasible solve: z is the optimum on its passive set
    return z_BK


class IncrementalCholesky:
    """Cholesky factor L of the support's Gram matrix, grown one slot at a time.

    Slots fill in order, so every row's support is a prefix of its slots, and the factor is
    held as [B, cap, cap] with cap the used slots rounded up to GROW (unused slots hold
    identity rows): the solves run on what is in use, not on all k slots. Adding a direction
    costs one triangular solve (B x cap^2); the solution also gives the norm of the new
    direction's projection onto the span of the support, which is the selection-geometry
    diagnostic. OMP's least squares then needs one more (`solve`): the forward half,
    L a = y, grows with the factor (`extend`).

    L is stored twice, as L' and as L, so that both L and L' are contiguous column-major
    matrices: LAPACK solves those in place and copies any other layout (a [:n, :n] view
    included) first, which made the solves 2-3x slower (B 4096, k 64, measured).
    """

    GROW = 16  # capacity step: a regrowth copies the factor, a larger cap slows each solve

    def __init__(self, batch: int, k: int, dtype: torch.dtype, device: torch.device) -> None:
        self.k, self.cap = k, 0
        self._Lt_BCC = torch.empty(batch, 0, 0, dtype=dtype, device=device)  # L = _Lt.mT
        self._L_BCC = torch.empty_like(self._Lt_BCC)  # L' = _L.mT
        self.eps = 100 * torch.finfo(dtype).eps

    def _reserve(self, slots: int) -> None:
        """Capacity for `slots` slots: copy the factor into a larger identity."""
        if slots <= self.cap:
            return
        cap = min(-(-slots // self.GROW) * self.GROW, self.k)
        old = self.cap
        for name in ("_Lt_BCC", "_L_BCC"):
            small = getattr(self, name)
            big = torch.eye(cap, dtype=small.dtype, device=small.device).repeat(len(small), 1, 1)
            big[:, :old, :old] = small
            setattr(self, name, big)
        self.cap = cap

    def project(self, rows_R: Tensor, b_RK: Tensor) -> Tensor:
        """w = L^-1 b [R, cap] for b = <new unit direction, support directions> [R, K];
        ||w|| is the norm of the new direction's projection onto the span of the support."""
        if self.cap == 0:
            return b_RK.new_zeros(len(b_RK), 0)
        Lt_RCC = self._Lt_BCC if len(rows_R) == len(self._Lt_BCC) else self._Lt_BCC[rows_R]
        return torch.linalg.solve_triangular(Lt_RCC.mT, b_RK[:, :self.cap, None],
                                             upper=False).squeeze(2)

    def add(self, rows_R: Tensor, pos_R: Tensor, w_RC: Tensor) -> Tensor:
        """Append a new unit direction at slot `pos` of `rows`, given its `project`ion w;
        returns which rows could (a direction already in the span cannot be added)."""
        pivot_R = 1 - (w_RC * w_RC).sum(dim=1)
        ok_R = pivot_R > self.eps
        rows_R, pos_R, w_RC = rows_R[ok_R], pos_R[ok_R], w_RC[ok_R]
        if len(pos_R):
            self._reserve(int(pos_R.max()) + 1)
        root_R, c = pivot_R[ok_R].sqrt(), w_RC.shape[1]
        self._Lt_BCC[rows_R, :c, pos_R] = w_RC
        self._Lt_BCC[rows_R, pos_R, pos_R] = root_R
        self._L_BCC[rows_R, pos_R, :c] = w_RC
        self._L_BCC[rows_R, pos_R, pos_R] = root_R
        return ok_R

    def extend(self, a_BK: Tensor, rows_R: Tensor, pos_R: Tensor, w_RC: Tensor,
               y_R: Tensor) -> None:
        """Forward substitution, one slot on: a[pos] = (y - w . a) / L[pos, pos] for the rows
        that just `add`ed slot pos with projection w, so that L a = y stays solved."""
        known_R = (w_RC * a_BK[rows_R, :w_RC.shape[1]]).sum(dim=1)
        a_BK[rows_R, pos_R] = (y_R - known_R) / self._L_BCC[rows_R, pos_R, pos_R]

    def solve(self, a_BK: Tensor) -> Tensor:
        """z [B, K] with L' z = a, i.e. (L L') z = y for a from `extend`: least squares on the
        support when y = D_S x."""
        z_BK = torch.zeros_like(a_BK)
        if self.cap:
            z_BK[:, :self.cap] = torch.linalg.solve_triangular(
                self._L_BCC.mT, a_BK[:, :self.cap, None], upper=True).squeeze(2)
        return z_BK
