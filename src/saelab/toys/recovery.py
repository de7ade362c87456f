"""Scoring against the truth: does a dictionary hold the true directions, does a coder find
the true supports?

- Direction recovery (Sharkey et al. 2022, "Taking features out of superposition with sparse
  autoencoders"): for each true feature, the largest cosine with any latent's decoder row;
  their mean (mean max cosine, MMCS) and the fraction above a threshold (recovered).
- Support recovery: each latent stands for the feature its decoder row is closest to, if
  their cosine clears the threshold; on a token, an active latent is a hit when it stands
  for a feature of the token's true support. Precision = hits / active latents; recall = true
  features found by some active latent / true features. Both are pooled over all tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from saelab.coding import SparseCode

RECOVERED_COSINE = 0.9


class DirectionRecovery(NamedTuple):
    """How well the latents of a dictionary match the true feature directions."""

    mean_max_cosine: float
    """Mean over true features of the best cosine with any latent."""
    fraction_recovered: float
    """Fraction of true features whose best cosine exceeds the threshold."""
    fraction_latents_matched: float
    """Fraction of latents whose best cosine with a true feature exceeds the threshold."""
    best_cosine: Tensor
    """[n_features] the best cosine of each true feature."""
    latent_feature: Tensor
    """[n_latents] int64: the feature each latent stands for, -1 if none clears the threshold."""


class SupportScores(NamedTuple):
    """Precision and recall of the supports a coder found, pooled over tokens."""

    precision: float
    """Active latents that stand for a feature of the token's true support / active latents."""
    recall: float
    """True features found by some active latent / true features."""


def direction_recovery(true_FD: Tensor, W_dec_LD: Tensor, threshold: float = RECOVERED_COSINE
                       ) -> DirectionRecovery:
    """Compare true directions [n_features, d_model] with decoder rows [n_latents, d_model]."""
    unit_FD = torch.nn.functional.normalize(true_FD.detach().float(), dim=1)
    unit_LD = torch.nn.functional.normalize(W_dec_LD.detach().float().to(unit_FD.device), dim=1)
    cos_FL = unit_FD @ unit_LD.T
    best_F = cos_FL.max(dim=1).values
    latent_best_L, latent_feature_L = cos_FL.max(dim=0)
    matched_L = latent_best_L > threshold
    return DirectionRecovery(
        mean_max_cosine=float(best_F.mean()),
        fraction_recovered=float((best_F > threshold).float().mean()),
        fraction_latents_matched=float(matched_L.float().mean()),
        best_cosine=best_F.cpu(),
        latent_feature=torch.where(matched_L, latent_feature_L, -1).cpu(),
    )


def support_scores(true: SparseCode, found: SparseCode, n_features: int,
                   latent_feature: Tensor | None = None) -> SupportScores:
    """Score `found` (codes on some dictionary) against `true` (codes on the true features).

    `latent_feature` [n_latents] maps latents to features (-1: none), as
    `direction_recovery` gives it; without it, latent i is feature i (the true dictionary).
    """
    true_BF = SparseCode(true.indices.cpu(), true.values.cpu()).support(n_features)
    slot_feature_BK = found.indices.cpu() if latent_feature is None \
        else latent_feature[found.indices.cpu()]
    active_BK = found.values.cpu() != 0
    matched_BK = active_BK & (slot_feature_BK >= 0)
    hit_BK = matched_BK & true_BF.gather(1, slot_feature_BK.clamp(min=0))
    found_BF = SparseCode(slot_feature_BK.clamp(min=0), hit_BK.float()).support(n_features)
    n_true, n_active = int(true_BF.sum()), int(active_BK.sum())
    return SupportScores(precision=int(hit_BK.sum()) / max(n_active, 1),
                         recall=int(found_BF.sum()) / max(n_true, 1))
