"""`TrainConfig`: every training setting, the same fields as `saelab train`'s flags.

What an architecture needs (a k, a default sparsity coefficient) comes from its class in the
registry (`saelab.saes.architecture`), so a user's registered architecture trains with the
same config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from saelab.errors import SaelabError
from saelab.saes import SAE, architecture


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    architecture: str = "topk"
    """SAE architecture: relu (L1), topk, batchtopk, jumprelu, or one registered with
    saelab.register_architecture."""
    n_latents: int = 4096
    """Dictionary size."""
    k: int | None = 32
    """Active latents per token: topk's k, batchtopk's average, jumprelu's starting L0 (its
    thresholds start where each latent fires on k / n_latents of the data). Unused by relu."""
    tokens: int = 1_000_000
    """Training tokens (activation rows) in all; the store is re-read when it is shorter."""
    batch_size: int = 4096
    """Rows per optimiser step, over all processes."""
    lr: float | None = None
    """Adam learning rate; default 2e-4 / sqrt(n_latents / 16384), as sparsify scales it."""
    lr_warmup_steps: int = 100
    """Steps of linear learning-rate warm-up."""
    lr_decay_fraction: float = 0.2
    """Final fraction of training over which the learning rate decays linearly to 0."""
    sparsity_coef: float | None = None
    """L1 (relu) or L0 (jumprelu) coefficient, on normalised inputs; default: the
    architecture's own (relu 5.0, jumprelu 1.0)."""
    sparsity_warmup_steps: int = 500
    """Steps over which the sparsity coefficient ramps up from 0 (relu, jumprelu)."""
    dead_tokens: int = 1_000_000
    """A latent that has not fired for this many tokens counts as dead (AuxK revives them)."""
    b_dec_init: Literal["mean", "median", "zero"] = "mean"
    """Initial decoder bias: the data's mean, its geometric median, or zero."""
    d_model: int | None = None
    """Expected activation width; checked against the data when given."""
    seed: int = 0
    """Seed for the initialisation and the order of the data."""
    checkpoint_every: int = 200
    """Steps between checkpoints (a killed run resumes from the last)."""
    log_every: int = 10
    """Steps between lines in metrics.jsonl."""
    device: str = "cpu"
    """Device to train on: cpu, cuda, ... (under torchrun, cuda:LOCAL_RANK)."""

    def __post_init__(self) -> None:
        cls = self.sae_class()
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = [name for name in cls.hyperparameter_names if name not in fields]
        if unknown:
            raise SaelabError(f"architecture {self.architecture} takes settings TrainConfig "
                              "does not have", expected="hyperparameter_names among "
                              "TrainConfig's fields", found=", ".join(unknown),
                              fix="rename them to TrainConfig fields (k, ...)")
        if "k" in cls.hyperparameter_names and (self.k is None or
                                                not 0 < self.k < self.n_latents):
            raise SaelabError(f"{self.architecture} needs 0 < k < n_latents",
                              expected=f"k in 1..{self.n_latents - 1}",
                              found=f"k={self.k}, n_latents={self.n_latents}",
                              fix="lower --k or raise --n-latents")
        for name in ("tokens", "batch_size", "n_latents"):
            if getattr(self, name) < 1:
                raise SaelabError(f"--{name.replace('_', '-')} must be positive",
                                  expected=">= 1", found=str(getattr(self, name)),
                                  fix="pass a positive number")

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.batch_size)

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.n_latents / 2**14)

    def sparsity(self) -> float:
        return (self.sparsity_coef if self.sparsity_coef is not None
                else self.sae_class().default_sparsity_coef)

    def sae_class(self) -> type[SAE]:
        """The registered class of `architecture` (an error naming the registered ones)."""
        return architecture(self.architecture)
