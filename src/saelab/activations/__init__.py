"""Activations on disk: extraction with resume, and a memory-mapped, checked store."""

from saelab.activations.cache import cache_activations
from saelab.activations.order import batch_indices
from saelab.activations.store import ActivationStore, TokenContext

__all__ = ["ActivationStore", "TokenContext", "batch_indices", "cache_activations"]
