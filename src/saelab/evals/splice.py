"""Delta LM loss: next-token cross-entropy with a site's activations replaced, against clean.

Windows start with BOS. The BOS position is neither replaced (its activation is an outlier
no dictionary is trained on) nor averaged over: the prediction made at position 0 cannot
see a replaced value, so counting it would only dilute the difference (SAELens and SAEBench
exclude it too). Positions 1 .. T-2 are scored, each predicting the next token.

One clean pass per batch of windows serves every coder: it records the site's activations
(what the coders code) and the clean next-token log-probabilities (for the KL).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saelab.errors import SaelabError
from saelab.lm import LanguageModel


@dataclass
class CleanPass:
    input_ids: Tensor  # [batch, T]
    activations: Tensor  # [batch, T - 1, d]: the site at positions 1 .. T-1 (no BOS)
    probs: Tensor  # [batch, T - 2, vocab]: clean next-token probabilities at scored positions
    neg_entropy: Tensor  # [batch, T - 2]: sum_v p log p, the clean half of every KL
    loss: Tensor  # [batch, T - 2]: clean cross-entropy at scored positions


def _scored_logits(logits: Tensor) -> Tensor:
    """Logits at positions 1 .. T-2, in float32 at least (float64 kept)."""
    scored = logits[:, 1:-1]
    return scored.to(torch.promote_types(scored.dtype, torch.float32))


def _cross_entropy(scored: Tensor, input_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(cross-entropy of the next tokens, logsumexp) at the scored positions."""
    lse = torch.logsumexp(scored, dim=-1)
    target = scored.gather(-1, input_ids[:, 2:, None].to(scored.device)).squeeze(-1)
    return lse - target, lse


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

    scored = _scored_logits(lm.logits(input_ids, splice={site: record}))
    loss, _ = _cross_entropy(scored, input_ids)  # as `spliced_loss` computes it, bit for bit
    logprobs = torch.log_softmax(scored, dim=-1)
    del scored
    probs = logprobs.exp()
    neg_entropy = torch.linalg.vecdot(probs, logprobs)
    return CleanPass(input_ids, seen["x"], probs, neg_entropy, loss)


def spliced_loss(lm: LanguageModel, site: str, clean: CleanPass, replacement: Tensor
                 ) -> tuple[Tensor, Tensor]:
    """(cross-entropy, KL(clean || spliced)) per scored position [batch, T - 2], with the
    site at positions 1 .. T-1 replaced by `replacement` [batch, T - 1, d].

    KL = sum p log p - sum p (logits - logsumexp): no spliced log-softmax is materialised
    (with a 262k vocabulary each [tokens, vocab] temporary is a gigabyte per 1k tokens).
    """
    if replacement.shape != clean.activations.shape:
        raise ValueError(f"replacement {tuple(replacement.shape)} must match the site's "
                         f"activations {tuple(clean.activations.shape)}")

    def replace(x: Tensor) -> Tensor:
        out = x.clone()
        out[:, 1:] = replacement.to(device=x.device, dtype=x.dtype)
        return out

    scored = _scored_logits(lm.logits(clean.input_ids, splice={site: replace}))
    loss, lse = _cross_entropy(scored, clean.input_ids)
    kl = clean.neg_entropy - (torch.linalg.vecdot(clean.probs, scored) - lse)
    return loss, kl
