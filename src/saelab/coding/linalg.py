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
         max_iter: int | None = None) -> Tensor:
    """Non-negative least squares on each row's live slots (Lawson & Hanson 1974), batched.

    Minimises 1/2 z'Gz - y'z subject to z >= 0, i.e. ||x - z D_S||^2 for G = D_S D_S' and
    y = D_S x. All rows step together: a row either adds the slot with the largest positive
    gradient to its passive set, or, when its last solve went negative, steps back to
    feasibility and drops the slot that hit zero. `z0` warm-starts (OMP adds one slot a step).
    """
    B, K = y_BK.shape
    z_BK = torch.zeros_like(y_BK) if z0_BK is None else z0_BK.clamp(min=0) * live_BK
    passive_BK = z_BK > 0
    tol_B1 = 1e-6 * y_BK.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(y_BK.dtype).tiny)
    may_add_B = torch.ones(B, dtype=torch.bool, device=y_BK.device)
    for _ in range(max_iter or 3 * K + 3):
        grad_BK = y_BK - (G_BKK @ z_BK.unsqueeze(2)).squeeze(2)  # minus the gradient
        cand_BK = live_BK & ~passive_BK & (grad_BK > tol_B1)
        add_B = may_add_B & cand_BK.any(dim=1)
        if not add_B.any() and may_add_B.all():
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
    return z_BK


class IncrementalCholesky:
    """Cholesky factor of the support's Gram matrix, grown one slot at a time.

    Unused slots hold identity rows, so triangular solves run over all K slots for every
    row whatever its support size. Adding a direction costs one triangular solve (B x K^2);
    the solution also gives the norm of the new direction's projection onto the span of the
    support, which is the selection-geometry diagnostic.
    """

    def __init__(self, batch: int, k: int, dtype: torch.dtype, device: torch.device) -> None:
        # stored transposed, so that L = U' is a column-major view: LAPACK then solves in
        # place of copying the factor every step (on a VM the copy's fresh pages cost more
        # than the solve)
        self.U_BKK = torch.eye(k, dtype=dtype, device=device).repeat(batch, 1, 1)
        self.eps = 100 * torch.finfo(dtype).eps

    @property
    def L_BKK(self) -> Tensor:
        return self.U_BKK.mT

    def project(self, rows_R: Tensor, b_RK: Tensor) -> Tensor:
        """w = L^-1 b for b = <new unit direction, support directions>; ||w|| is the norm of
        the new direction's projection onto the span of the support."""
        L_RKK = self.L_BKK if len(rows_R) == len(self.U_BKK) else self.L_BKK[rows_R]
        return torch.linalg.solve_triangular(L_RKK, b_RK.unsqueeze(2), upper=False).squeeze(2)

    def add(self, rows_R: Tensor, pos_R: Tensor, w_RK: Tensor) -> Tensor:
        """Append a new unit direction at slot `pos` of `rows`, given its `project`ion w;
        returns which rows could (a direction already in the span cannot be added)."""
        pivot_R = 1 - (w_RK * w_RK).sum(dim=1)
        ok_R = pivot_R > self.eps
        rows_R, pos_R = rows_R[ok_R], pos_R[ok_R]
        self.U_BKK[rows_R, :, pos_R] = w_RK[ok_R]
        self.U_BKK[rows_R, pos_R, pos_R] = pivot_R[ok_R].sqrt()
        return ok_R

    def solve(self, y_BK: Tensor) -> Tensor:
        """z with (L L') z = y: least squares on the support when y = D_S x."""
        # two triangular solves: cholesky_solve would clone the factor
        v_BK1 = torch.linalg.solve_triangular(self.L_BKK, y_BK.unsqueeze(2), upper=False)
        return torch.linalg.solve_triangular(self.U_BKK, v_BK1, upper=True).squeeze(2)
