"""saelab: sparse dictionaries for language-model activations.

    import saelab as sl
    stores = sl.cache_activations("acts", tokens=20_000)      # Gemma 3 270M, built-in corpus
    store = sl.ActivationStore("acts")
    sae = sl.train(sl.TrainConfig(n_latents=4096, k=32), store, out="sae")
    code = sl.decompose(store[:4096], sae, "gp", k=32)

Shape letters, the same in every module (a tensor named `x_BD` is [batch, d_model]):
    B rows of a batch (tokens)       D d_model, an activation's width   L latents
    K slots of a sparse code (k)     T positions of a window            V vocabulary
    R a subset of a batch's rows     A a subset of the latents (those a dashboard shows)
    C slots a Cholesky factor holds  N blocks of latent columns         W columns of a block
    M candidates, changed slots of a step, or the m largest slots of a code
Toy models: I instances, F true features, H hidden dimensions; S sparsities (or the densities
1 - S), Y relative importances, Q dropout rates, X repeats of a setting. Synthetic features
(toys.synthetic): P parents (the features without a parent: all of them without a hierarchy),
E the (mutually exclusive) children of a parent, G groups of correlated features.
"""

from saelab.activations import ActivationStore, cache_activations
from saelab.coding import Coder, SparseCode, decompose
from saelab.errors import SaelabError
from saelab.formats import load_sae, write_sae
from saelab.io import SAELAB_VERSION as __version__
from saelab.lm import LanguageModel, load_model
from saelab.saes import SAE, register_architecture
from saelab.training import TrainConfig, Trainer, train

__all__ = [
    "SAE",
    "ActivationStore",
    "Coder",
    "LanguageModel",
    "SaelabError",
    "SparseCode",
    "TrainConfig",
    "Trainer",
    "__version__",
    "cache_activations",
    "decompose",
    "load_model",
    "load_sae",
    "register_architecture",
    "train",
    "write_sae",
]
