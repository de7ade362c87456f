"""How codes differ: support overlap between two coders, and the geometry of a selection."""

from __future__ import annotations

import torch
from torch import Tensor

from saelab.coding import SparseCode


def jaccard(a_BL: Tensor, b_BL: Tensor) -> Tensor:
    """Per-row |A and B| / |A or B| of two supports [batch] (1 where both are empty)."""
    inter = (a_BL & b_BL).sum(dim=1)
    union = (a_BL | b_BL).sum(dim=1)
    return torch.where(union > 0, inter / union.clamp(min=1), 1.0)


def top_kept(reference: SparseCode, other_BL: Tensor, m: int) -> Tensor:
    """Per row, the fraction of the reference code's `m` largest latents that the other
    support also holds [batch] (rows with fewer than m non-zeros use those they have)."""
    top_BM = reference.values.abs().topk(min(m, reference.k), dim=1)
    idx_BM = reference.indices.gather(1, top_BM.indices)
    real_BM = top_BM.values > 0
    hit_BM = other_BL.gather(1, idx_BM) & real_BM
    return hit_BM.sum(dim=1) / real_BM.sum(dim=1).clamp(min=1)


ORDER_SLOTS = 128  # `order_cosines` follows each code's 128 largest latents


def order_cosines(code: SparseCode, W_dec: Tensor, slots: int = ORDER_SLOTS) -> Tensor:
    """Cosine between each latent's decoder direction and the span of the latents before it
    in the code, latents taken in order of decreasing |value| [batch, k] (0 for the first;
    NaN for empty slots, and past the `slots` largest). For an encoder this is the geometry
    of its choice, comparable to a pursuit's `trace.span_cosine`.

    By Gram-Schmidt over the slots (batched over rows): the norm of a direction's part
    orthogonal to the earlier ones is the sine; a latent chosen twice (matching pursuit
    re-picks) has cosine 1 and adds nothing to the basis. The cost grows with the square of
    the slots followed: an encoder whose widest row fires hundreds of latents (BatchTopK,
    JumpReLU, ReLU) is followed through its `slots` largest only.
    """
    order = code.values.abs().argsort(dim=1, descending=True)
    idx_BK = code.indices.gather(1, order)
    live_BK = code.values.gather(1, order) != 0
    k = min(code.k, slots)
    rows_BKD = torch.nn.functional.normalize(W_dec[idx_BK[:, :k]].double(), dim=-1)
    basis_BKD = torch.zeros_like(rows_BKD)
    cos_BK = torch.full(idx_BK.shape, torch.nan, dtype=torch.float64, device=rows_BKD.device)
    for j in range(k):
        w_BD, before_BJD = rows_BKD[:, j], basis_BKD[:, :j]
        orth_BD = w_BD - torch.einsum("bjd,bj->bd", before_BJD, torch.einsum(
            "bjd,bd->bj", before_BJD, w_BD))
        sine_B = orth_BD.norm(dim=1)
        cos_BK[:, j] = (1 - sine_B.pow(2)).clamp(min=0).sqrt()
        keep_B = (sine_B > 1e-7) & live_BK[:, j]
        basis_BKD[:, j] = torch.where(keep_B[:, None], orth_BD / sine_B.clamp(min=1e-30)[:, None],
                                      0.0)
    return torch.where(live_BK, cos_BK, torch.nan).to(code.values.dtype)  # NaN past k
