"""The correlations c = r D' of a batch with every latent, and the Gram matrix G = D D', both
stored in blocks of latent columns.

Why blocks: the Gram path updates the correlations of each row b by
c[b] -= sum_m dz[b, m] G[s_bm, :]. Done row by row (a CSR x dense product), each of the B*m
Gram rows it reads (n_latents floats) comes from memory, so the step is bound by memory
traffic. Done one block of `BLOCK` latent columns at a time, that block of G
(n_latents x BLOCK, 16 MiB at 16k latents) stays in cache while every row of the batch reads
it: G streams from memory about once per step. On the 2-core CPU measured this made the
update 2-3x faster (benchmarks/coding.py). The price is the layout [n_blocks, B, BLOCK], so
selection is a two-level argmax.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.functional import embedding_bag, pad

BLOCK = 256  # latent columns per block


class BlockedGram:
    """G = D D' for unit rows D, as `blocks_NLW` [n_blocks, n_latents, width]: block j holds the
    columns of latents j*width .. (j+1)*width - 1 (the last block padded with zeros)."""

    def __init__(self, unit_LD: Tensor, width: int = BLOCK) -> None:
        L, D = unit_LD.shape
        self.n_latents, self.width = L, min(width, L)
        n_blocks = -(-L // self.width)
        # a copy only when the last block needs zero rows
        padded = (pad(unit_LD, (0, 0, 0, n_blocks * self.width - L)) if L % self.width
                  else unit_LD)
        self.unit_NWD = padded.view(n_blocks, self.width, D)  # unit rows, block by block
        self.blocks_NLW = unit_LD.new_empty(n_blocks, L, self.width)
        for j in range(n_blocks):
            torch.mm(unit_LD, self.unit_NWD[j].T, out=self.blocks_NLW[j])

    def entries(self, rows: Tensor, cols: Tensor) -> Tensor:
        """G[rows, cols] (broadcast like advanced indexing)."""
        return self.blocks_NLW[cols // self.width, rows, cols % self.width]


class Correlations:
    """c [B, n_latents] held as `c_NBW` [n_blocks, B, width]; padding columns hold 0."""

    def __init__(self, c_NBW: Tensor, n_latents: int) -> None:
        self.c_NBW, self.n_latents = c_NBW, n_latents
        self.width = c_NBW.shape[2]
        self.rows_B1 = torch.arange(c_NBW.shape[1], device=c_NBW.device)[:, None]

    @classmethod
    def of(cls, r_BD: Tensor, unit_LD: Tensor, gram: BlockedGram | None) -> Correlations:
        """r D' in the Gram's blocks (one block of all latents without a Gram)."""
        if gram is None:
            return cls((r_BD @ unit_LD.T)[None], len(unit_LD))
        c = cls(r_BD.new_empty(len(gram.unit_NWD), len(r_BD), gram.width), gram.n_latents)
        c.recompute_(r_BD, unit_LD, gram)
        return c

    def recompute_(self, r_BD: Tensor, unit_LD: Tensor, gram: BlockedGram | None) -> None:
        """c = r D' again, in place: one batched GEMM straight into the blocks (r broadcast
        to every block without a copy; as fast as one plain GEMM on the CPU measured, and
        without its [B, n_latents] temporary)."""
        if gram is None:
            torch.mm(r_BD, unit_LD.T, out=self.c_NBW[0])
            return
        N, B, _ = self.c_NBW.shape
        torch.bmm(r_BD.expand(N, *r_BD.shape), gram.unit_NWD.transpose(1, 2), out=self.c_NBW)

    def sub_gram_rows_(self, idx_BM: Tensor, val_BM: Tensor, gram: BlockedGram) -> None:
        """c[b] -= sum_m val[b, m] G[idx[b, m], :], block by block (see the module docstring)."""
        for j, block_LW in enumerate(gram.blocks_NLW):
            self.c_NBW[j].sub_(embedding_bag(idx_BM, block_LW, per_sample_weights=val_BM,
                                             mode="sum"))

    def gather(self, idx_BK: Tensor) -> Tensor:
        """c[b, idx[b, k]] [B, K]."""
        return self.c_NBW[idx_BK // self.width, self.rows_B1, idx_BK % self.width]

    def best(self, idx_BK: Tensor, live_BK: Tensor, exclude_support: bool,
             nonnegative: bool) -> tuple[Tensor, Tensor]:
        """(score, latent) [B] of the largest correlation (largest |correlation| unless
        non-negative), optionally leaving out each row's support.

        Reads c without copying it: the support is zeroed in place for the search and restored
        after (unused slots point at slot 0's latent, so zeroing them is harmless).
        """
        where = (idx_BK // self.width, self.rows_B1, idx_BK % self.width)
        masked = exclude_support and bool(live_BK.any())
        if masked:
            saved_BK = self.c_NBW[where]
            self.c_NBW[where] = 0.0
        best_B, i_B = self._largest(nonnegative)
        if masked:
            self.c_NBW[where] = saved_BK
        # a padding column (0) wins only rows with nothing positive, which stop: keep the
        # index valid for them
        return best_B, i_B.clamp_(max=self.n_latents - 1)

    def _largest(self, nonnegative: bool) -> tuple[Tensor, Tensor]:
        """Largest value (|value| unless non-negative) and its latent, per row: the best block
        from value-only reductions (amax/amin run several times faster than max with indices
        on CPU), then the position inside that block (a view when there is one block)."""
        high_NB = self.c_NBW.amax(dim=2)
        low_NB = None if nonnegative else self.c_NBW.amin(dim=2).neg_()
        score_NB = high_NB if low_NB is None else torch.maximum(high_NB, low_NB)
        score_B, block_B = score_NB.max(dim=0)
        inside_BW = (self.c_NBW[0] if len(self.c_NBW) == 1
                     else self.c_NBW[block_B, self.rows_B1[:, 0]])
        pos_B = inside_BW.argmax(dim=1)
        if low_NB is not None:  # the winner is the block's minimum where that is larger in |.|
            from_low_B = low_NB.gather(0, block_B[None]).squeeze(0) > high_NB.gather(
                0, block_B[None]).squeeze(0)
            pos_B = torch.where(from_low_B, inside_BW.argmin(dim=1), pos_B)
        return score_B, block_B * self.width + pos_B
