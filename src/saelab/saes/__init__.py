"""SAE architectures on one small base class, registered by name (plug-ins welcome)."""

from saelab.saes.base import (
    REGISTRY,
    SAE,
    LossOutput,
    SparsityControl,
    architecture,
    register_architecture,
)
from saelab.saes.batchtopk import BatchTopKSAE
from saelab.saes.jumprelu import JumpReluSAE
from saelab.saes.pursuit import PursuitSAE
from saelab.saes.relu import ReluSAE
from saelab.saes.topk import TopKSAE

__all__ = ["REGISTRY", "SAE", "BatchTopKSAE", "JumpReluSAE", "LossOutput", "PursuitSAE",
           "ReluSAE", "SparsityControl", "TopKSAE", "architecture", "register_architecture"]
