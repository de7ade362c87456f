"""saelab: sparse dictionaries for language-model activations.

    import saelab as sl
    lm = sl.load_model("gemma-3-270m")
    stores = sl.cache_activations(sl.CacheConfig(out="acts", tokens=20_000))
    store = sl.ActivationStore("acts")
"""

__version__ = "0.1.0"

from saelab.activations import ActivationStore, CacheConfig, cache_activations  # noqa: E402
from saelab.coding import Coder, SparseCode, decompose  # noqa: E402
from saelab.errors import SaelabError  # noqa: E402
from saelab.formats import load_sae, write_sae  # noqa: E402
from saelab.lm import LanguageModel, load_model  # noqa: E402
from saelab.saes import SAE, save_sae  # noqa: E402
from saelab.training import TrainConfig, train  # noqa: E402

__all__ = [
    "ActivationStore",
    "CacheConfig",
    "Coder",
    "LanguageModel",
    "SAE",
    "SaelabError",
    "SparseCode",
    "TrainConfig",
    "cache_activations",
    "decompose",
    "load_model",
    "load_sae",
    "save_sae",
    "train",
    "write_sae",
]
