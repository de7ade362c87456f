"""SAE architectures on one small base class, registered by name."""

from saelab.saes import batchtopk, jumprelu, relu, topk  # noqa: F401  (registers them)
from saelab.saes.base import REGISTRY, SAE, LossOutput, fvu
from saelab.saes.batchtopk import BatchTopKSAE
from saelab.saes.io import load_sae, save_sae
from saelab.saes.jumprelu import JumpReluSAE
from saelab.saes.relu import ReluSAE
from saelab.saes.topk import TopKSAE

__all__ = ["REGISTRY", "SAE", "BatchTopKSAE", "JumpReluSAE", "LossOutput", "ReluSAE", "TopKSAE", "fvu", "load_sae", "save_sae"]
