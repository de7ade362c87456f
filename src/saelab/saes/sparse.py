"""Training through sparse codes: one dense GEMM a step (the encoder's pre-activations), and
everything else, forward and backward, on the selected entries only.

Autograd through a dense code costs four or more [batch, n_latents]-sized GEMMs a step (the
decode, dL/dz, dW_dec, dW_enc) on codes that are 99.8 % zeros at L0 32 of 16,384. Here an
architecture selects its code's entries from the pre-activations without a graph (`top_k`,
`top_k_of_batch`, `above`, `jumprelu_entries`), and `autoencode` decodes them with an
`embedding_bag` and returns the gradients autograd would give, from sparse products: dW_dec
and dW_enc^T are one CSR-dense product each (MKL on CPU), db_enc an index_add, and a
JumpReLU threshold's straight-through estimators a third product over the entries in its
kernel's window. Tests compare every gradient with dense float64 autograd.

A code too dense for this to pay (ReLU+L1 early in training) is refused by the selection
(None, see `SPARSE_DENSITY`), and the architecture runs its dense autograd path instead.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import BackwardCFunction

if TYPE_CHECKING:
    from saelab.saes.base import SAE

# Above this share of non-zero entries of [batch, n_latents], the dense path is faster: a
# ReLU+L1 step on 16,384 latents, d_model 640, batch 4096 cost 0.66x the dense one at 5 %,
# 1.02x at 10 % (benchmarks/train.py --crossing; benchmarks/README.md, "train.py").
SPARSE_DENSITY = 0.08


@dataclass
class CodeEntries:
    """A training code as its entries, grouped by token: entry e is latent `cols[e]` of token
    `rows[e]` with activation `acts[e]` (>= 0; TopK may keep zeros, which do nothing)."""

    rows: Tensor  # [E] int64, non-decreasing
    cols: Tensor  # [E] int64
    acts: Tensor  # [E]
    n_tokens: int

    def offsets(self) -> Tensor:
        """Where each token's entries start (embedding_bag's layout)."""
        counts = torch.bincount(self.rows, minlength=self.n_tokens)
        return torch.cumsum(counts, 0) - counts


@dataclass
class ThresholdWindow:
    """Where a JumpReLU threshold's straight-through estimators look: the entries with
    |pre - theta| < eps / 2 (a rectangle kernel of width eps), pre = relu(pre-activations).

    Listed: the positive pre-activations near or above theta, each with `weight` = (in the
    window) - low[latent]. `low` marks the latents with theta < eps / 2, whose window holds
    every zero pre-activation too: a sum over their window is the whole batch's, less their
    positive entries', plus their window's positive entries', so the zeros are never listed.
    `fired` marks the code's entries that lie in the window (their own gradient adds there).
    """

    rows: Tensor  # [C]
    cols: Tensor  # [C]
    weight: Tensor  # [C]: 1, 0 or -1
    low: Tensor  # [n_latents] bool
    fired: Tensor  # [E] bool
    bandwidth: float


def _dense_enough(n_entries: int, pre_BL: Tensor) -> bool:
    return n_entries > SPARSE_DENSITY * pre_BL.numel()


def _flat_entries(pre_BL: Tensor, flat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(rows, cols, values) of flat indices into pre_BL, in increasing order."""
    n_latents = pre_BL.shape[1]
    return flat // n_latents, flat % n_latents, pre_BL.view(-1)[flat]


def top_k(pre_BL: Tensor, k: int, columns: Tensor | None = None) -> CodeEntries:
    """TopK's code: relu of the k largest pre-activations of each token (of `pre_BL`'s
    columns, which are `columns` of the SAE when given: AuxK's dead latents)."""
    top_BK, j_BK = pre_BL.topk(k, dim=1, sorted=False)
    cols = (j_BK if columns is None else columns[j_BK]).reshape(-1)
    rows = torch.arange(len(pre_BL), device=pre_BL.device).repeat_interleave(k)
    return CodeEntries(rows, cols, top_BK.clamp_(min=0).reshape(-1), len(pre_BL))


def top_k_of_batch(pre_BL: Tensor, n: int, per_row: int = 4) -> CodeEntries:
    """BatchTopK's code: the n largest positive pre-activations of the whole batch.

    A top-n over all B x L entries is a slow sort-like pass (1.5 s at 4096 x 16384 on 2
    cores); instead each token's top (per_row * n / B) are the candidates, and the top n of
    those is the batch's as long as every token's last candidate is below their n-th value T
    (then nothing left out can reach T). The tokens where it is not contribute their whole row
    instead, which keeps the result exact (up to the order of ties, as any top-k).
    """
    n = min(n, pre_BL.numel())
    m = min(pre_BL.shape[1], max(1, -(-per_row * n // len(pre_BL))))
    top_BM, j_BM = pre_BL.topk(m, dim=1, sorted=True)
    values, flat = top_BM.reshape(-1), (j_BM + torch.arange(
        len(pre_BL), device=pre_BL.device)[:, None] * pre_BL.shape[1]).reshape(-1)
    if m < pre_BL.shape[1]:
        nth = values.topk(min(n, len(values)), sorted=False).values.min()
        full = (top_BM[:, -1] >= nth).nonzero().squeeze(1)  # tokens with more above T
        if len(full):
            keep = ~torch.isin(flat // pre_BL.shape[1], full)
            rows_flat = (full[:, None] * pre_BL.shape[1] + torch.arange(
                pre_BL.shape[1], device=pre_BL.device)).reshape(-1)
            values = torch.cat([values[keep], pre_BL.view(-1)[rows_flat]])
            flat = torch.cat([flat[keep], rows_flat])
    top, pick = values.topk(n, sorted=False)
    flat, order = flat[pick].sort()
    rows, cols, _ = _flat_entries(pre_BL, flat)
    return CodeEntries(rows, cols, top[order].clamp_(min=0), len(pre_BL))


def above(pre_BL: Tensor, threshold: float | Tensor) -> CodeEntries | None:
    """The entries of pre_BL above `threshold` (a number, or one per latent), or None when
    they are too many for the sparse path to pay."""
    mask = pre_BL > threshold
    n = int(torch.count_nonzero(mask))
    if _dense_enough(n, pre_BL):
        return None
    rows, cols, values = _flat_entries(pre_BL, mask.view(-1).nonzero().squeeze(1))
    return CodeEntries(rows, cols, values, len(pre_BL))


def jumprelu_entries(pre_BL: Tensor, theta: Tensor, bandwidth: float
                     ) -> tuple[CodeEntries, ThresholdWindow] | None:
    """JumpReLU's code, pre * H(pre - theta) of `pre_BL` = relu(pre-activations), and its
    thresholds' window; None when too dense. The window test is the dense path's own,
    |(pre - theta) / eps| < 1/2 computed the same way, on candidates listed with a margin."""
    low = -theta / bandwidth > -0.5  # a zero pre-activation lies in the window
    floor = (theta - 0.5001 * bandwidth).clamp(min=0)  # below every window: candidates above
    cand = above(pre_BL, floor)
    if cand is None:
        return None
    t_C = theta[cand.cols]
    u = (cand.acts - t_C) / bandwidth
    in_window = (u > -0.5) & (u < 0.5)
    fires = cand.acts > t_C
    code = CodeEntries(cand.rows[fires], cand.cols[fires], cand.acts[fires], cand.n_tokens)
    weight = in_window.to(pre_BL.dtype) - low[cand.cols].to(pre_BL.dtype)
    keep = weight != 0
    window = ThresholdWindow(cand.rows[keep], cand.cols[keep], weight[keep], low,
                             in_window[fires], bandwidth)
    return code, window


def _by_latent(cols: Tensor, rows: Tensor, n_latents: int) -> tuple[Tensor, Tensor, Tensor]:
    """CSR layout of the [n_latents, batch] matrix with an entry at (cols[e], rows[e]): row
    pointers, the token of each entry, and the permutation taking entries to CSR order."""
    order = torch.argsort(cols, stable=True)
    crow = torch.zeros(n_latents + 1, dtype=torch.int64, device=cols.device)
    torch.cumsum(torch.bincount(cols, minlength=n_latents), 0, out=crow[1:])
    return crow, rows[order], order


def _latent_t_mm(layout: tuple[Tensor, Tensor, Tensor], values: Tensor, dense_BD: Tensor
                 ) -> Tensor:
    """S^T @ dense as [n_latents, D], S the [B, n_latents] matrix holding `values` at the
    layout's entries: for each latent, the rows of `dense` of its tokens, weighted. That is
    dW_dec (values: activations) and dW_enc^T (values: dL/dpre) without a dense
    [B, n_latents] operand or an [E, D] gather."""
    crow, col, order = layout
    n_latents = len(crow) - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        S = torch.sparse_csr_tensor(crow, col, values[order],
                                    size=(n_latents, dense_BD.shape[0]))
    out = dense_BD.new_empty(n_latents, dense_BD.shape[1])
    return torch.addmm(out, S, dense_BD, beta=0.0, out=out)  # MKL sparse mm; `S @ d` is slower


class _Context(BackwardCFunction):
    """The type of `SparseAutoencode`'s ctx (torch passes an instance of a BackwardCFunction
    subclass it generates), with what forward leaves on it for backward."""

    saved_tensors: tuple[Tensor, ...]  # torch's stub says tuple[Tensor], one tensor
    graph: tuple[Tensor, Tensor]  # (out_BD, acts): the decode's graph for dL/dacts
    code: CodeEntries
    window: ThresholdWindow | None
    subtract_b_dec: bool


class SparseAutoencode(torch.autograd.Function):
    """(sum_e acts_e W_dec[cols_e] per token without b_dec [B, D], the activations [E], the
    firing count per token [B]) of a selected code, differentiable in b_dec, W_enc, b_enc,
    W_dec and (with a window) the thresholds.

    Backward: dL/dact gets the decoder's share by embedding_bag's own per-sample-weight
    backward (no [E, D] gather); dpre is non-zero at the entries that fired only; dW_dec,
    dW_enc^T are one sparse-dense product each, db_enc an index_add, and
    db_dec = -W_enc @ db_enc (x - b_dec feeds every pre-activation), so dL/dx, which data does
    not need, is never formed. With a window, the thresholds get the JumpReLU
    straight-through estimators (Rajamanoharan et al. 2024, eqs. 11-12): from the code,
    -(theta / eps) sum_window dL/dz, where dL/dz = dL/dx_hat . W_dec_j is a third sparse
    product; from the count, -(1 / eps) sum_window dL/dcount.
    """

    @staticmethod
    def forward(ctx: _Context, xc_BD: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor,
                W_dec: Tensor, theta: Tensor | None, code: CodeEntries,
                window: ThresholdWindow | None, subtract_b_dec: bool
                ) -> tuple[Tensor, Tensor, Tensor]:
        with torch.enable_grad():  # a graph for dL/dacts only
            acts = code.acts.detach().requires_grad_()
            out_BD = F.embedding_bag(code.cols, W_dec.detach(), code.offsets(),
                                     per_sample_weights=acts, mode="sum")
        count_B = torch.bincount(code.rows[code.acts > 0], minlength=code.n_tokens)
        ctx.graph = (out_BD, acts)
        ctx.save_for_backward(xc_BD, W_enc, W_dec, *(() if theta is None else (theta,)))
        ctx.code, ctx.window, ctx.subtract_b_dec = code, window, subtract_b_dec
        count_B = count_B.to(xc_BD.dtype)
        if window is None:  # only thresholds are differentiable through the count
            ctx.mark_non_differentiable(count_B)
        return out_BD.detach(), code.acts.clone(), count_B

    @staticmethod
    def backward(ctx: _Context, g_out_BD: Tensor, g_acts_E: Tensor, g_count_B: Tensor
                 ) -> tuple[Tensor | None, ...]:
        if ctx.needs_input_grad[0]:
            raise NotImplementedError("SparseAutoencode gives no gradient for the activations")
        xc_BD, W_enc, W_dec, *thresholds = ctx.saved_tensors
        code, window = ctx.code, ctx.window
        out_BD, acts = ctx.graph
        del ctx.graph
        n_latents = W_dec.shape[0]
        g_z_E = g_acts_E + torch.autograd.grad(out_BD, acts, g_out_BD)[0]
        g_pre_E = g_z_E * (code.acts > 0)
        layout = _by_latent(code.cols, code.rows, n_latents)
        g_W_dec = _latent_t_mm(layout, code.acts, g_out_BD)
        g_W_enc = _latent_t_mm(layout, g_pre_E, xc_BD).T
        g_b_enc = g_pre_E.new_zeros(n_latents).index_add_(0, code.cols, g_pre_E)
        g_b_dec = -(W_enc @ g_b_enc) if ctx.subtract_b_dec else None
        g_theta = None
        if window is not None:
            theta = thresholds[0]
            low = window.low.to(g_out_BD.dtype)
            S_LD = _latent_t_mm(_by_latent(window.cols, window.rows, n_latents),
                                window.weight, g_out_BD)
            S_LD.addr_(low, g_out_BD.sum(dim=0))  # the low latents' zeros: all tokens
            g_code = torch.linalg.vecdot(W_dec, S_LD).index_add_(
                0, code.cols[window.fired], g_acts_E[window.fired])
            g_count = (low * g_count_B.sum()).index_add_(
                0, window.cols, window.weight * g_count_B[window.rows])
            g_theta = -(theta / window.bandwidth) * g_code - g_count / window.bandwidth
        return None, g_b_dec, g_W_enc, g_b_enc, g_W_dec, g_theta, None, None, None


def centred(sae: SAE, x_BD: Tensor) -> Tensor:
    """The encoder's input, x - b_dec (or x), without a graph: `autoencode` differentiates
    b_dec itself."""
    with torch.no_grad():
        return x_BD - sae.b_dec if sae.apply_b_dec_to_input else x_BD


def pre_activations(sae: SAE, xc_BD: Tensor, columns: Tensor | None = None) -> Tensor:
    """The one dense GEMM of a sparse step (over `columns` only, when given), no graph. The
    bias is added after the product: `addmm` first copies it into every row of the output,
    a [batch, n_latents] pass that cost 0.1 s of a 1 s step."""
    with torch.no_grad():
        if columns is None:
            return (xc_BD @ sae.W_enc).add_(sae.b_enc)
        return (xc_BD @ sae.W_enc[:, columns]).add_(sae.b_enc[columns])


def autoencode(sae: SAE, xc_BD: Tensor, code: CodeEntries,
               window: tuple[ThresholdWindow, Tensor] | None = None
               ) -> tuple[Tensor, Tensor, Tensor]:
    """(decoded sum without b_dec [B, D], activations [E], firing count per token [B]) of
    `code`, with the sparse backward of `SparseAutoencode`; `window` is (the window, the
    threshold parameter it is for), for JumpReLU."""
    theta = None if window is None else window[1]
    return SparseAutoencode.apply(xc_BD, sae.b_dec, sae.W_enc, sae.b_enc, sae.W_dec, theta,
                                  code, None if window is None else window[0],
                                  sae.apply_b_dec_to_input)


def fired(code: CodeEntries, n_latents: int) -> Tensor:
    """[n_latents] bool: the latents with a positive activation somewhere in the code."""
    out = torch.zeros(n_latents, dtype=torch.bool, device=code.cols.device)
    out[code.cols[code.acts > 0]] = True
    return out
