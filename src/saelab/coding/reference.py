"""The three pursuits as their papers state them, one row and one step at a time, in float64.

Start here: pursuit.py runs the same algorithms on a whole batch at once (correlations kept
current through the Gram matrix, or screened in bfloat16), and tests/test_coding.py holds it
to this file. It is for reading, not speed. On unit-norm rows d_i of W, each row starts from
z = 0, r = x and, for at most k steps:

1. stops once ||r|| <= tol ||x||, or when no latent has anything left to give: the best score
   is <= 10 eps ||x||, eps of the working dtype (non-negative: no positive correlation left);
2. selects the latent i with the largest |<r, d_i>| (non-negative: the largest <r, d_i>);
   gp and omp leave the support S out, mp may pick a latent again (it keeps its slot);
3. updates the weights z on S, and r = x - z D_S:
   - mp (Mallat & Zhang 1993): z_i += <r, d_i>;
   - gp (Blumensath & Davies 2008): gradient g_s = <r, d_s> on S, u = g D_S, exact line
     search a = <u, r> / <u, u>, z += a g. Non-negative: g_s = 0 where z_s <= 0 and g_s < 0,
     and a is cut to the largest step keeping z >= 0 (z_s / -g_s over g_s < 0);
   - omp (Pati et al. 1993): z = argmin ||x - z D_S|| (non-negative: NNLS, Lawson & Hanson
     1974); a row whose new d_i lies in the span of S (numerically) stops without it.

Codes come back as a `SparseCode` [batch, k], slots in order of first selection; unused slots
hold value 0 and, as in the engine, repeat slot 0's latent (0 if none), so indices compare.
With them comes each row's `gap`: the smallest lead, relative to ||x||, of a selected
latent's score over the runner-up's. Where a gap is within an engine's rounding (float32:
about 1e-6), that engine may as well take the runner-up, and the rows go different ways.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saelab.coding.code import SparseCode

EPS = torch.finfo(torch.float64).eps


def pursue(x_BD: Tensor, W_LD: Tensor, method: str, k: int, nonnegative: bool = False,
           tol: float | None = None) -> tuple[SparseCode, Tensor]:
    """Codes of x [B, D] on unit rows W [L >= 2, D] by `method` (mp, gp or omp), row by row,
    and each row's gap [B] (the module docstring)."""
    rows = [pursue_row(x_D, W_LD.double(), method, k, nonnegative, tol or 0.0)
            for x_D in x_BD.double()]
    idx_BK = [S + [S[0] if S else 0] * (k - len(S)) for S, _, _ in rows]
    val_BK = [z_K.tolist() + [0.0] * (k - len(S)) for S, z_K, _ in rows]
    return (SparseCode(torch.tensor(idx_BK, dtype=torch.long).view(-1, k),
                       torch.tensor(val_BK, dtype=torch.float64).view(-1, k)),
            torch.tensor([gap for _, _, gap in rows], dtype=torch.float64))


def pursue_row(x_D: Tensor, W_LD: Tensor, method: str, k: int, nonnegative: bool,
               tol: float) -> tuple[list[int], Tensor, float]:
    """One row: the support S (latents in order of first selection), its weights z_K, and
    the gap."""
    S: list[int] = []
    z_K, r_D, gap = x_D.new_zeros(0), x_D.clone(), torch.inf
    for _ in range(k):
        c_L = W_LD @ r_D
        score_L = c_L.clone() if nonnegative else c_L.abs()
        if method != "mp":
            score_L[S] = -torch.inf
        i = int(score_L.argmax())
        if r_D.norm() <= tol * x_D.norm() or score_L[i] <= 10 * EPS * x_D.norm():
            break
        best, runner_up = score_L.topk(2).values.tolist()
        gap = min(gap, (best - runner_up) / float(x_D.norm()))
        if method == "omp" and S and in_span(W_LD[i], W_LD[S]):
            break
        if i not in S:
            S, z_K = [*S, i], torch.cat([z_K, z_K.new_zeros(1)])
        D_KD = W_LD[S]
        if method == "mp":
            z_K[S.index(i)] += c_L[i]
        elif method == "gp":
            g_K = c_L[S]
            if nonnegative:
                g_K[(z_K <= 0) & (g_K < 0)] = 0
            u_D = g_K @ D_KD
            a = line_search(u_D, r_D)
            if nonnegative and (g_K < 0).any():
                a = min(a, float((z_K[g_K < 0] / -g_K[g_K < 0]).min()))
            z_K = z_K + a * g_K
        else:
            z_K = nnls(D_KD.T, x_D) if nonnegative else torch.linalg.pinv(D_KD.T) @ x_D
        z_K = z_K.clamp(min=0) if nonnegative else z_K
        r_D = x_D - z_K @ D_KD
    return S, z_K, gap


def line_search(u_D: Tensor, r_D: Tensor) -> float:
    """The step a minimising ||r - a u||."""
    return float(u_D @ r_D / (u_D @ u_D))


def in_span(d_D: Tensor, D_KD: Tensor) -> bool:
    """Whether the unit vector d lies in the span of the rows of D, numerically."""
    off_D = d_D - D_KD.T @ (torch.linalg.pinv(D_KD.T) @ d_D)
    return float(off_D @ off_D) <= 100 * EPS


def nnls(A_DK: Tensor, y_D: Tensor) -> Tensor:
    """argmin ||A z - y|| over z >= 0 (Lawson & Hanson 1974): grow the passive set P by the
    largest positive gradient; step back towards feasibility while its solve goes <= 0."""
    z_K = A_DK.new_zeros(A_DK.shape[1])
    P_K = torch.zeros_like(z_K, dtype=torch.bool)  # the passive set
    for _ in range(3 * A_DK.shape[1] + 3):
        w_K = A_DK.T @ (y_D - A_DK @ z_K)
        if P_K.all() or w_K[~P_K].max() <= 1e-12 * y_D.norm():
            break
        P_K[int(torch.where(P_K, -torch.inf, w_K).argmax())] = True
        while True:
            s_K = torch.zeros_like(z_K)
            s_K[P_K] = torch.linalg.pinv(A_DK[:, P_K]) @ y_D
            if (s_K[P_K] > 0).all():
                break
            hit_K = P_K & (s_K <= 0)
            z_K = z_K + (z_K[hit_K] / (z_K[hit_K] - s_K[hit_K])).min() * (s_K - z_K)
            P_K &= z_K > 1e-12 * z_K.abs().max()
        z_K = s_K
    return z_K
