"""`TrainConfig`: every training setting, the same fields as `saelab train`'s flags.

What an architecture needs (a k, a default sparsity coefficient) comes from its class in the
registry (`saelab.saes.architecture`), so a user's registered architecture trains with the
same config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from saelab.errors import SaelabError
from saelab.saes import SAE, architecture


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    architecture: str = "topk"
    """SAE architecture: relu (L1), topk, batchtopk, jumprelu, pursuit (a dictionary coded
    by a pursuit, no encoder), or one registered with saelab.register_architecture."""
    n_latents: int = 4096
    """Dictionary size."""
    k: int | None = None
    """Active latents per token: topk's k, batchtopk's average, jumprelu's starting L0 (its
    thresholds start where each latent fires on k / n_latents of the data). Unused by relu.
    Default: --target-l0 when given, else 32."""
    pursuit: Literal["mp", "gp", "omp"] = "gp"
    """The pursuit architecture's coder, which it trains with and codes with: matching,
    gradient or orthogonal matching pursuit, at k latents per token."""
    nonnegative: bool = True
    """The pursuit architecture's codes stay >= 0 (as SAE encoders' do); --no-nonnegative:
    signed."""
    target_l0: float | None = None
    """L0 to end at. relu, jumprelu: the sparsity coefficient starts at --sparsity-coef and a
    controller then moves it until the L0 is this (its final value goes to config.json and
    cfg.json); topk, batchtopk: this is k."""
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
    architecture's own (relu 5.0, jumprelu 1.0). With --target-l0, where the controller
    starts."""
    sparsity_warmup_steps: int | None = None
    """Steps over which the sparsity coefficient ramps up from 0 (relu, jumprelu); default a
    twentieth of the run's steps."""
    dead_tokens: int = 1_000_000
    """A latent that has not fired for this many tokens counts as dead (AuxK revives them)."""
    b_dec_init: Literal["mean", "median", "zero"] = "mean"
    """Initial decoder bias: the data's mean, its geometric median, or zero."""
    d_model: int | None = None
    """Expected activation width; checked against the data when given."""
    seed: int = 0
    """Seed for the initialisation and the order of the data."""
    snapshot_tokens: tuple[int, ...] = ()
    """Also write the SAE as it is once this many tokens are trained (each count, comma
    separated), into RUN/snapshots/TOKENS, ready for raw activations like the final one: for
    curves of what only a model can measure, such as delta loss against training tokens."""
    checkpoint_every: int = 200
    """Steps between checkpoints (a killed run resumes from the last)."""
    log_every: int = 10
    """Steps between lines in metrics.jsonl."""
    device: str = "cpu"
    """Device to train on: cpu, cuda, ... (under torchrun, cuda:LOCAL_RANK)."""

    def __post_init__(self) -> None:
        cls = self.sae_class()
        self._resolve_k(cls)
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
        late = [t for t in self.snapshot_tokens if not 0 < t <= self.steps * self.batch_size]
        if late:
            raise SaelabError("--snapshot-tokens must fall within the run",
                              expected=f"counts in 1..{self.steps * self.batch_size} "
                              "(steps x batch size)", found=", ".join(map(str, late)),
                              fix="drop them or raise --tokens")
        for name in ("tokens", "batch_size", "n_latents"):
            if getattr(self, name) < 1:
                raise SaelabError(f"--{name.replace('_', '-')} must be positive",
                                  expected=">= 1", found=str(getattr(self, name)),
                                  fix="pass a positive number")

    def _resolve_k(self, cls: type[SAE]) -> None:
        """k from --target-l0 where the architecture's L0 is k; a target the architecture
        cannot follow is refused."""
        target = self.target_l0
        if target is not None and not target > 0:
            raise SaelabError("--target-l0 must be positive", expected="> 0",
                              found=str(target), fix="pass the mean active latents per token")
        steered = target is not None and cls.sparsity_control(1, target) is not None
        k_is_l0 = "k" in cls.hyperparameter_names and not steered
        if target is not None and not k_is_l0 and not steered:
            raise SaelabError(f"architecture {self.architecture} cannot follow --target-l0",
                              expected="an architecture with a k, or whose class gives a "
                              "sparsity_control", found="neither", fix="drop --target-l0")
        if target is not None and k_is_l0:
            if self.k is not None and self.k != round(target):
                raise SaelabError(f"{self.architecture}'s L0 is k, and --k and --target-l0 "
                                  "differ", expected=f"k {round(target)} (or no --k)",
                                  found=f"k {self.k}", fix="pass one of the two")
            object.__setattr__(self, "k", round(target))
        elif self.k is None:
            object.__setattr__(self, "k", round(target) if target is not None else 32)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Each field's default (a run recorded before a field existed ran at it)."""
        return {f.name: f.default for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING}

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.batch_size)

    def snapshot_steps(self) -> dict[int, int]:
        """The step after which each snapshot is written: the first at which its tokens are
        trained (step -> tokens asked for)."""
        return {max(1, -(-t // self.batch_size)): t for t in self.snapshot_tokens}

    @property
    def sparsity_ramp_steps(self) -> int:
        """Steps of the sparsity coefficient's ramp (--sparsity-warmup-steps or 5 %)."""
        if self.sparsity_warmup_steps is not None:
            return max(1, self.sparsity_warmup_steps)
        return max(1, self.steps // 20)

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.n_latents / 2**14)

    def sparsity(self) -> float:
        return (self.sparsity_coef if self.sparsity_coef is not None
                else self.sae_class().default_sparsity_coef)

    def sae_class(self) -> type[SAE]:
        """The registered class of `architecture` (an error naming the registered ones)."""
        return architecture(self.architecture)
