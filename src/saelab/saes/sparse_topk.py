"""TopK encoding and decoding with hand-written sparse backward passes, for training.

Autograd through `topk` + `scatter` + a dense decode costs six [batch, n_latents]-sized
GEMMs a step and dense [batch, n_latents] codes and gradients; only k of the n_latents
columns of each row are ever non-zero. Here the forward does one dense GEMM (the encoder's
pre-activations) and everything else, forward and backward, touches only the selected
latents: the decoder is an `embedding_bag`, and dW_dec, dW_enc are one sparse-dense product
each (MKL CSR on CPU). The gradients are the ones autograd would give (tests check this).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import BackwardCFunction


def _by_latent(idx_BK: Tensor, n_latents: int) -> tuple[Tensor, Tensor, Tensor]:
    """CSR layout of the [n_latents, batch] matrix with an entry at (idx[b, j], b): row
    pointers, the token of each entry, and the permutation taking [B, k] values to entries."""
    flat = idx_BK.reshape(-1)
    order = torch.argsort(flat, stable=True)
    crow = torch.zeros(n_latents + 1, dtype=torch.int64, device=idx_BK.device)
    torch.cumsum(torch.bincount(flat, minlength=n_latents), 0, out=crow[1:])
    return crow, order // idx_BK.shape[1], order


def _latent_t_mm(layout: tuple[Tensor, Tensor, Tensor], values_BK: Tensor, dense_BD: Tensor
                 ) -> Tensor:
    """S^T @ dense as [n_latents, D], S the [B, n_latents] matrix holding `values_BK` at the
    layout's positions: for each latent, the rows of `dense` of the tokens it fired on,
    weighted. That is dW_dec (values: activations) and dW_enc^T (values: dL/dpre) without a
    dense [B, n_latents] operand or a [B, k, D] gather."""
    crow, col, order = layout
    n_latents = len(crow) - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        S = torch.sparse_csr_tensor(crow, col, values_BK.reshape(-1)[order],
                                    size=(n_latents, dense_BD.shape[0]))
    out = dense_BD.new_empty(n_latents, dense_BD.shape[1])
    return torch.addmm(out, S, dense_BD, beta=0.0, out=out)  # MKL sparse mm; `S @ d` is slower


class _Context(BackwardCFunction):
    """The type of `TopKAutoencode`'s ctx (torch passes an instance of a BackwardCFunction
    subclass it generates), with what forward leaves on it for backward."""

    saved_tensors: tuple[Tensor, ...]  # torch's stub says tuple[Tensor], one tensor
    graph: tuple[Tensor, Tensor]  # (out_BD, acts): the decode's graph for dL/dacts
    subtract_b_dec: bool
    n_latents: int


class TopKAutoencode(torch.autograd.Function):
    """relu(top-k of pre = xc W_enc + b_enc), xc = x - b_dec (or x), over all latents or over
    `columns` only (AuxK's dead latents); returns (sum_j act_j W_dec[idx_j] without b_dec,
    activations [B, k], latents [B, k]).

    Backward: dL/dact gets the decoder's share by embedding_bag's own per-sample-weight
    backward (no [B, k, D] gather); dpre is non-zero at the selected, positive entries only;
    dW_dec, dW_enc^T are one sparse-dense product each, db_enc an index_add; and
    db_dec = -W_enc @ db_enc (x - b_dec feeds every pre-activation), so dL/dx, which data
    does not need, is never formed.
    """

    @staticmethod
    def forward(ctx: _Context, x_BD: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor,
                W_dec: Tensor, k: int, columns: Tensor | None, subtract_b_dec: bool
                ) -> tuple[Tensor, Tensor, Tensor]:
        xc_BD = x_BD - b_dec if subtract_b_dec else x_BD
        if columns is None:
            pre_BL = torch.addmm(b_enc, xc_BD, W_enc)
        else:
            pre_BL = torch.addmm(b_enc[columns], xc_BD, W_enc[:, columns])
        top_BK, j_BK = pre_BL.topk(k, dim=1, sorted=False)
        del pre_BL
        idx_BK = j_BK if columns is None else columns[j_BK]
        acts_BK = top_BK.clamp_(min=0)
        with torch.enable_grad():  # a graph for dL/dacts only
            acts = acts_BK.detach().requires_grad_()
            out_BD = F.embedding_bag(idx_BK, W_dec.detach(), per_sample_weights=acts,
                                     mode="sum")
        ctx.graph = (out_BD, acts)
        ctx.save_for_backward(xc_BD, W_enc, idx_BK, acts_BK)
        ctx.subtract_b_dec, ctx.n_latents = subtract_b_dec, W_dec.shape[0]
        ctx.mark_non_differentiable(idx_BK)
        return out_BD.detach(), acts_BK, idx_BK

    @staticmethod
    def backward(ctx: _Context, g_out_BD: Tensor, g_acts_BK: Tensor, _: Tensor | None
                 ) -> tuple[Tensor | None, ...]:
        if ctx.needs_input_grad[0]:
            raise NotImplementedError("TopKAutoencode gives no gradient for the activations")
        xc_BD, W_enc, idx_BK, acts_BK = ctx.saved_tensors
        out_BD, acts = ctx.graph
        del ctx.graph
        g_acts_BK = g_acts_BK + torch.autograd.grad(out_BD, acts, g_out_BD)[0]
        g_pre_BK = g_acts_BK * (acts_BK > 0)
        layout = _by_latent(idx_BK, ctx.n_latents)
        g_W_dec = _latent_t_mm(layout, acts_BK, g_out_BD)
        g_W_enc = _latent_t_mm(layout, g_pre_BK, xc_BD).T
        g_b_enc = g_pre_BK.new_zeros(ctx.n_latents).index_add_(0, idx_BK.reshape(-1),
                                                               g_pre_BK.reshape(-1))
        g_b_dec = -(W_enc @ g_b_enc) if ctx.subtract_b_dec else None
        return None, g_b_dec, g_W_enc, g_b_enc, g_W_dec, None, None, None


def topk_autoencode(x_BD: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor,
                    k: int, *, columns: Tensor | None = None, subtract_b_dec: bool = True
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """(decoded sum without b_dec [B, D], activations [B, k], latents [B, k]) of a TopK
    code, with a sparse backward."""
    return TopKAutoencode.apply(x_BD, b_dec, W_enc, b_enc, W_dec, k, columns, subtract_b_dec)
