"""What a trained toy model represents: the measures of Elhage et al. 2022.

With W_i the hidden-space direction of feature i (a column of the paper's W [m, n], a row of
`W_IFH` here) and W_i_hat = W_i / ||W_i||:

- norm ||W_i||: about 1 for a represented feature, about 0 for an ignored one;
- superposition sum_{j != i} (W_i_hat . W_j)^2: how much of other features projects onto i;
- dimensionality D_i = ||W_i||^2 / sum_j (W_i_hat . W_j)^2: the fraction of a dimension
  feature i gets (1 for a dedicated dimension, 1/2 for an antipodal pair, 2/5 for a pentagon);
- number of features represented: ||W_i|| > 0.5;
- dimensions per feature D* = m / ||W||_F^2 (the paper's "dimensions per feature" plot).

All are vectorised over the instance axis.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

REPRESENTED_NORM = 0.5  # the paper's threshold on ||W_i||


class ToyMeasures(NamedTuple):
    """The measures of every instance; I instances, F features."""

    norm: Tensor
    """[I, F] ||W_i||."""
    superposition: Tensor
    """[I, F] sum over j != i of (W_i_hat . W_j)^2."""
    dimensionality: Tensor
    """[I, F] D_i (0 for a feature with W_i = 0)."""
    n_represented: Tensor
    """[I] int: features with ||W_i|| > 0.5."""
    dimensions_per_feature: Tensor
    """[I] m / ||W||_F^2."""


def measure(W_IFH: Tensor) -> ToyMeasures:
    """The measures of weights W [I, F, H] (one row per feature)."""
    W_IFH = W_IFH.detach().double()
    norm_IF = W_IFH.norm(dim=-1)
    unit_IFH = W_IFH / norm_IF.clamp(min=1e-12)[..., None]
    overlap_IFF = unit_IFH @ W_IFH.transpose(1, 2)  # [i, j] = W_i_hat . W_j
    total_IF = overlap_IFF.pow(2).sum(dim=-1)  # includes j = i, which is ||W_i||^2
    superposition_IF = total_IF - norm_IF**2
    dimensionality_IF = torch.where(norm_IF > 1e-12, norm_IF**2 / total_IF.clamp(min=1e-30), 0)
    d_hidden = W_IFH.shape[-1]
    return ToyMeasures(
        norm=norm_IF.float(), superposition=superposition_IF.float(),
        dimensionality=dimensionality_IF.float(),
        n_represented=(norm_IF > REPRESENTED_NORM).sum(dim=-1),
        dimensions_per_feature=(d_hidden / W_IFH.pow(2).sum(dim=(1, 2))).float(),
    )


NOT_REPRESENTED, DEDICATED, SUPERPOSITION = 0, 1, 2
PHASES = ("not represented", "dedicated dimension", "superposition")  # by the codes above


def second_feature_phase(norm_I2: Tensor) -> Tensor:
    """For n=2, m=1 models, what happened to the second feature [I] int: not represented
    (||W_2|| <= 0.5), given the dimension alone (the first feature dropped), or sharing it
    with the first in superposition (both represented)."""
    first, second = norm_I2[:, 0] > REPRESENTED_NORM, norm_I2[:, 1] > REPRESENTED_NORM
    return torch.where(~second, NOT_REPRESENTED, torch.where(first, SUPERPOSITION, DEDICATED))
