"""Activations on disk: extraction with resume, and a memory-mapped store."""

from saelab.activations.cache import CacheConfig, cache_activations
from saelab.activations.store import ActivationStore, TokenContext

__all__ = ["ActivationStore", "CacheConfig", "TokenContext", "cache_activations"]
