"""Sparse coding on a dictionary: the SAE encoder, its fixes, and inference-time optimisation.

`coding` does not know where activations come from: a tensor in, a `SparseCode` out.
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
