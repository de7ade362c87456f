"""Sparse coding on a dictionary: the SAE encoder, its fixes, and inference-time optimisation.

`coding` does not know where activations come from: a tensor in, a `SparseCode` out.

Reading the pursuits (mp, gp, omp)? Start with reference.py: the algorithms as their papers
state them, one row and one step at a time, in float64. pursuit.py is the batched engine the
tests hold to it (with state.py, the rows' slots and residuals, and selection.py, how each
step's latent is found); api.py is the `Coder` in front of both.
"""

from saelab.coding.api import (
    ENCODER_METHODS,
    METHODS,
    PURSUIT_METHODS,
    Coder,
    CodingPlan,
    Method,
    decompose,
)
from saelab.coding.code import PursuitTrace, SparseCode
from saelab.coding.dictionary import SAELike
from saelab.coding.encoder import LatentScale, fit_scale

__all__ = ["ENCODER_METHODS", "METHODS", "PURSUIT_METHODS", "Coder", "CodingPlan",
           "LatentScale", "Method", "PursuitTrace", "SAELike", "SparseCode",
           "decompose", "fit_scale"]
