"""The LM head applied a slice of the vocabulary at a time, with a running log-sum-exp.

Gemma 3's vocabulary has 262,144 entries: [1024 tokens, vocab] logits are a gigabyte in
float32, and writing them (then reading them back for a log-softmax) costs more than the head's
GEMM. Scoring needs only per-token summaries of them: the log-sum-exp, the target's logit, and
for the KL the clean distribution's expected unembedding (see `splice.CleanPass`). Each slice
of the vocabulary is multiplied, folded into the running summaries and dropped, the way flash
attention folds its softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saelab.lm import Unembedding

# Elements of one logits slice: 4M float32 (16 MiB) stays in the caches of this machine's
# class; at 1024 tokens it is 4096 vocabulary entries, which measured faster than 16,384
# (2.53 s against 2.73 s for Gemma 3's head on 2 cores) and than the whole head at once (2.75 s).
SLICE_ELEMENTS = 1 << 22

# exp(z - max) is clamped at exp(-64): a term below it adds at most vocab * e^-64 (2e-22 for a
# vocabulary of a million) to a sum that is at least 1, below float64's rounding, so the clamp
# changes no result; it keeps exp out of subnormal outputs, where it ran 23x slower.
UNDERFLOW = -64.0


@dataclass
class HeadScores:
    lse: Tensor  # [tokens]: log sum_v exp(z_v)
    target: Tensor  # [tokens]: z at the next token
    expected: Tensor | None  # [tokens, d]: sum_v softmax(z)_v W_v, when asked for


def head_scores(h: Tensor, unembed: Unembedding, targets: Tensor, *, expected: bool = False,
                slice_size: int | None = None) -> HeadScores:
    """Summaries of the logits z = h @ W.T + b of `h` [tokens, d] (float32 at least), one
    vocabulary slice at a time; `expected` also accumulates the softmax-weighted rows of W."""
    dtype = torch.promote_types(h.dtype, torch.float32)
    h = h.to(dtype)
    W, b = unembed.weight, unembed.bias
    n_tokens, vocab = h.shape[0], W.shape[0]
    step = slice_size or max(512, SLICE_ELEMENTS // max(n_tokens, 1))
    run_max = torch.full((n_tokens,), -torch.inf, dtype=dtype, device=h.device)
    run_sum = torch.zeros(n_tokens, dtype=dtype, device=h.device)
    run_expected = torch.zeros_like(h) if expected else None
    for start in range(0, vocab, step):
        W_s = W[start:start + step].to(dtype)
        z = h @ W_s.T if b is None else torch.addmm(b[start:start + step].to(dtype), h, W_s.T)
        new_max = torch.maximum(run_max, z.amax(dim=-1))
        rescale = torch.exp(run_max - new_max)  # 0 on the first slice (exp(-inf))
        # in place (z is not needed again); clamped where exp would leave float32's normal
        # range, whose slow path made exp cost as much as the GEMM (see UNDERFLOW)
        weights = z.sub_(new_max[:, None]).clamp_(min=UNDERFLOW).exp_()
        run_sum = run_sum * rescale + weights.sum(dim=-1)
        if run_expected is not None:
            run_expected.mul_(rescale[:, None]).addmm_(weights, W_s)
        run_max = new_max
    target_rows = W[targets].to(dtype)
    target = torch.linalg.vecdot(h, target_rows)
    if b is not None:
        target = target + b[targets].to(dtype)
    return HeadScores(lse=run_max + torch.log(run_sum), target=target,
                      expected=None if run_expected is None else run_expected / run_sum[:, None])
