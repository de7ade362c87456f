"""Delta LM loss: next-token cross-entropy with a site's activations replaced, against clean.

Windows start with BOS. The BOS position is neither replaced (its activation is an outlier
no dictionary is trained on) nor averaged over: the prediction made at position 0 cannot
see a replaced value, so counting it would only dilute the difference (SAELens and SAEBench
exclude it too). Positions 1 .. T-2 are scored, each predicting the next token.

One clean pass per batch of windows serves every coder: it records the site's activations
(what the coders code) and what the KL needs of the clean distribution, kept compact
(`CleanPass`). The head is applied a vocabulary slice at a time (`vocab.head_scores`), so no
[tokens, vocab] tensor is built where the head is affine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saelab.errors import SaelabError
from saelab.evals.vocab import HeadScores, head_scores
from saelab.lm import LanguageModel


@dataclass
class CleanPass:
    """What every spliced pass of a batch is scored against.

    KL(clean || spliced) = sum_v p_v (z_v - z'_v) + lse' - lse, for the clean distribution p,
    clean and spliced logits z, z' and their log-sum-exps. For an affine head (z = W h + b)
    the sum is e . (h - h') with e = sum_v p_v W_v, so the clean pass keeps e and h, [tokens, d]
    each, not p, [tokens, vocab] (1 GB per 1k tokens for Gemma 3). A head that is not affine
    (Gemma 2's soft-capping) keeps p and sum_v p_v z_v instead, and builds full logits.
    """

    input_ids: Tensor  # [batch, T]
    activations: Tensor  # [batch, T - 1, d]: the site at positions 1 .. T-1 (no BOS)
    loss: Tensor  # [batch, T - 2]: clean cross-entropy at scored positions
    lse: Tensor  # [batch, T - 2]: clean log-sum-exp of the logits
    hidden: Tensor | None  # [batch, T - 2, d_model]: the head's input (affine head)
    expected_unembedding: Tensor | None  # [batch, T - 2, d_model]: e above (affine head)
    probs: Tensor | None = None  # [batch, T - 2, vocab] (other heads)
    expected_logit: Tensor | None = None  # [batch, T - 2]: sum_v p_v z_v (other heads)


def _scored(t: Tensor) -> Tensor:
    """Positions 1 .. T-2 of [batch, T, ...], in float32 at least (float64 kept)."""
    scored = t[:, 1:-1]
    return scored.to(torch.promote_types(scored.dtype, torch.float32))


def _cross_entropy(scored: Tensor, input_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(cross-entropy of the next tokens, logsumexp) from full logits at the scored positions."""
    lse = torch.logsumexp(scored, dim=-1)
    target = scored.gather(-1, input_ids[:, 2:, None].to(scored.device)).squeeze(-1)
    return lse - target, lse


def _head(lm: LanguageModel, input_ids: Tensor, splice: dict, expected: bool
          ) -> tuple[Tensor, HeadScores] | None:
    """(the head's input, its scores) at the scored positions, a vocabulary slice at a time;
    None where the model's head is not affine."""
    unembed = lm.unembedding()
    if unembed is None:
        return None
    h = _scored(lm.final_hidden(input_ids, splice=splice))
    flat = h.reshape(-1, h.shape[-1])
    targets = input_ids[:, 2:].reshape(-1).to(flat.device)
    scores = head_scores(flat, unembed, targets, expected=expected)
    return h, scores


def clean_pass(lm: LanguageModel, site: str, input_ids: Tensor) -> CleanPass:
    """The unmodified forward pass, reading `site` on the way."""
    if input_ids.shape[1] < 3:
        raise SaelabError("delta loss needs windows of at least 3 tokens",
                          expected="BOS, a replaced token, and a token to predict",
                          found=f"context size {input_ids.shape[1]}",
                          fix="pass --context-size 3 or more")
    seen: dict[str, Tensor] = {}

    def record(x: Tensor) -> None:
        seen["x"] = x[:, 1:].detach().clone()

    shape = (input_ids.shape[0], input_ids.shape[1] - 2)
    head = _head(lm, input_ids, {site: record}, expected=True)
    if head is not None:
        h, scores = head
        assert scores.expected is not None
        # loss as `spliced_loss` computes it, bit for bit
        return CleanPass(input_ids, seen["x"], (scores.lse - scores.target).view(shape),
                         scores.lse.view(shape), h, scores.expected.view(h.shape))
    scored = _scored(lm.logits(input_ids, splice={site: record}))
    loss, lse = _cross_entropy(scored, input_ids)
    probs = torch.softmax(scored, dim=-1)
    return CleanPass(input_ids, seen["x"], loss, lse, None, None, probs,
                     torch.linalg.vecdot(probs, scored))


def spliced_loss(lm: LanguageModel, site: str, clean: CleanPass, replacement: Tensor
                 ) -> tuple[Tensor, Tensor]:
    """(cross-entropy, KL(clean || spliced)) per scored position [batch, T - 2], with the
    site at positions 1 .. T-1 replaced by `replacement` [batch, T - 1, d]."""
    if replacement.shape != clean.activations.shape:
        raise ValueError(f"replacement {tuple(replacement.shape)} must match the site's "
                         f"activations {tuple(clean.activations.shape)}")

    def replace(x: Tensor) -> Tensor:
        out = x.clone()
        out[:, 1:] = replacement.to(device=x.device, dtype=x.dtype)
        return out

    if clean.hidden is not None and clean.expected_unembedding is not None:
        head = _head(lm, clean.input_ids, {site: replace}, expected=False)
        assert head is not None
        h, scores = head
        lse = scores.lse.view(clean.lse.shape)
        gap = torch.linalg.vecdot(clean.expected_unembedding, clean.hidden - h)
        return lse - scores.target.view(lse.shape), gap + lse - clean.lse
    assert clean.probs is not None and clean.expected_logit is not None
    scored = _scored(lm.logits(clean.input_ids, splice={site: replace}))
    loss, lse = _cross_entropy(scored, clean.input_ids)
    kl = clean.expected_logit - torch.linalg.vecdot(clean.probs, scored) + lse - clean.lse
    return loss, kl
