"""SAE architectures on one small base class, registered by name."""

from saelab.saes import jumprelu, relu, topk  # noqa: F401  (registers the architectures)
from saelab.saes.base import REGISTRY, SAE
from saelab.saes.io import load_sae, save_sae
from saelab.saes.jumprelu import JumpReluSAE
from saelab.saes.relu import ReluSAE
from saelab.saes.topk import TopKSAE

__all__ = ["REGISTRY", "SAE", "JumpReluSAE", "ReluSAE", "TopKSAE", "load_sae", "save_sae"]
