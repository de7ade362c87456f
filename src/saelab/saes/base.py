"""The SAE contract every architecture shares, and the registry that makes one a plug-in.

Weights use the SAELens / Gemma Scope orientation: `W_enc` [d_model, n_latents], `b_enc`
[n_latents], `W_dec` [n_latents, d_model], `b_dec` [d_model]. An architecture says how
pre-activations become latent activations (`activation`), its training loss (`loss`), and,
through the class attributes and hooks below, everything the trainer, the file formats and
the verbs need to know about it; none of them compares architecture names. A user's own
architecture is a subclass registered with `register_architecture`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from saelab.errors import SaelabError

REGISTRY: dict[str, type[SAE]] = {}


@dataclass
class LossOutput:
    """One training step's loss and what went into it."""

    loss: Tensor
    """Scalar to minimise."""
    x_hat: Tensor
    """[batch, d_model] the reconstruction."""
    fired: Tensor
    """[n_latents] bool: which latents were active on some token of the batch."""
    l0: Tensor
    """Scalar: mean number of active latents per token."""
    terms: dict[str, Tensor] = field(default_factory=dict)
    """Named parts of the loss, logged as metrics (mse, l1, auxk, ...)."""

    @classmethod
    def from_codes(cls, loss: Tensor, codes_BL: Tensor, x_hat_BD: Tensor,
                   terms: dict[str, Tensor]) -> LossOutput:
        """From dense codes [batch, n_latents] (the architectures that make them anyway)."""
        active_BL = codes_BL > 0
        return cls(loss, x_hat_BD, active_BL.any(dim=0), active_BL.sum(dim=1).float().mean(),
                   terms)


@dataclass(frozen=True)
class SparsityControl:
    """How a target-L0 controller steers a class's sparsity coefficient: the range it keeps
    the coefficient in and its rates (per step, the coefficient moves by rate x (high -
    max(low, 0)) x the clamped log-L0 error x the learning rate's share of its peak,
    `rate_up` when the L0 is above where it should be, `rate_down` when below)."""

    low: float
    high: float
    rate_up: float = 0.0025
    rate_down: float = 0.0025
    lr_scales: dict[str, float] = field(default_factory=dict)
    """Learning-rate multipliers, by parameter name, that the parameters the coefficient acts
    through need to follow it (the rest train at the run's rate)."""


def register_architecture(cls: type[SAE]) -> type[SAE]:
    """Make an SAE class trainable, saveable and loadable under its `architecture` name
    (usable as a class decorator). Registering the same class again does nothing; another
    class under a taken name is refused."""
    if not (isinstance(cls, type) and issubclass(cls, SAE)):
        raise TypeError(f"register_architecture takes a subclass of saelab.SAE, got {cls!r}")
    name = cls.__dict__.get("architecture")
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} must name itself: a class attribute architecture = "
                        "'NAME' (the name configs and files use)")
    if REGISTRY.get(name, cls) is not cls:
        raise ValueError(f"architecture {name!r} is registered already, by "
                         f"{REGISTRY[name].__module__}.{REGISTRY[name].__qualname__}")
    REGISTRY[name] = cls
    return cls


def architecture(name: str) -> type[SAE]:
    """The registered class called `name`."""
    if name not in REGISTRY:
        raise SaelabError(f"unknown SAE architecture {name!r}",
                          expected="one of " + ", ".join(sorted(REGISTRY)),
                          found=repr(name),
                          fix="pick one of those, or import the module that registers yours "
                          "(saelab.register_architecture) before using it")
    return REGISTRY[name]


class SAE(nn.Module):
    """A sparse autoencoder: encode(x) = activation(pre_acts(x)); decode(z) = z W_dec + b_dec.

    `apply_b_dec_to_input` subtracts `b_dec` before encoding (SAELens, sparsify); Gemma Scope
    encodes raw activations. `site` and `model` say where the SAE reads (saelab site names).
    """

    architecture: ClassVar[str]
    """The name configs, the CLI and saved files use for this class."""
    hyperparameter_names: ClassVar[tuple[str, ...]] = ()
    """Settings the constructor takes beyond the sizes: saved in cfg.json, read back by the
    loaders, filled by the trainer from the `TrainConfig` fields of the same names."""
    unit_norm_decoder: ClassVar[bool] = True
    """Whether training keeps decoder rows at norm 1 (gradients projected, rows rescaled)."""
    default_sparsity_coef: ClassVar[float] = 0.0
    """Sparsity coefficient training uses when none is given (0: the loss has none)."""
    needs_data_init: ClassVar[bool] = False
    """Whether training calls `init_from_data` on a sample of the data before step 1."""
    saelens_architecture: ClassVar[str | None] = None
    """SAELens's name for what this class computes at inference, if it has one; a class
    without one is written in the SAELens layout under its own name (saelab reads it)."""

    def __init__(self, d_model: int, n_latents: int, *, apply_b_dec_to_input: bool = True,
                 site: str | None = None, model: str | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        super().__init__()
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(torch.zeros(d_model, n_latents, **kw))
        self.b_enc = nn.Parameter(torch.zeros(n_latents, **kw))
        self.W_dec = nn.Parameter(torch.zeros(n_latents, d_model, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_model, **kw))
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.site, self.model = site, model

    @property
    def d_model(self) -> int:
        return self.W_dec.shape[1]

    @property
    def n_latents(self) -> int:
        return self.W_dec.shape[0]

    def hyperparameters(self) -> dict[str, Any]:
        """The values of `hyperparameter_names`, as cfg.json records them."""
        return {name: getattr(self, name) for name in self.hyperparameter_names}

    # -- inference -----------------------------------------------------------------------
    def pre_acts(self, x_BD: Tensor) -> Tensor:
        """[batch, d_model] -> [batch, n_latents], before the sparsifying activation."""
        if self.apply_b_dec_to_input:
            x_BD = x_BD - self.b_dec
        return x_BD @ self.W_enc + self.b_enc

    def activation(self, pre_BL: Tensor) -> Tensor:
        raise NotImplementedError

    def encode(self, x_BD: Tensor) -> Tensor:
        """Latent activations [batch, n_latents] (dense, mostly zeros)."""
        return self.activation(self.pre_acts(x_BD))

    def decode(self, codes_BL: Tensor) -> Tensor:
        return codes_BL @ self.W_dec + self.b_dec

    def forward(self, x_BD: Tensor) -> Tensor:
        return self.decode(self.encode(x_BD))

    def firing_threshold(self) -> Tensor | None:
        """The threshold a pre-activation must pass to fire: one [] or one per latent
        [n_latents]; None when the activation has none (ReLU, TopK)."""
        return None

    # -- training ------------------------------------------------------------------------
    def loss(self, x_BD: Tensor, *, sparsity_coef: float, dead_L: Tensor | None = None
             ) -> LossOutput:
        """The architecture's training loss on a batch of (normalised) activations.
        `dead_L` marks latents that have not fired for a while (AuxK uses it)."""
        raise NotImplementedError

    @torch.no_grad()
    def init_random(self, seed: int = 0) -> SAE:
        """Decoder rows random unit vectors, encoder their transpose (Gao et al. 2024)."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        W_LD = torch.randn(self.n_latents, self.d_model, generator=g, dtype=torch.float64)
        W_LD /= W_LD.norm(dim=1, keepdim=True)
        self.W_dec.copy_(W_LD)
        self.W_enc.copy_(W_LD.T)
        return self

    @classmethod
    def sparsity_control(cls, d_model: int, l0: float) -> SparsityControl | None:
        """How a target-L0 controller may steer this class's sparsity coefficient at mean L0
        `l0`, on inputs scaled to a centred mean squared norm of d_model; None when the class
        has no coefficient to steer."""
        return None

    def init_from_data(self, x_BD: Tensor, *, l0: float | None) -> None:
        """Start from a sample of the (normalised) training data, when `needs_data_init`;
        `l0` is the mean number of active latents training should start near, if given."""

    @torch.no_grad()
    def calibrate(self, x_BD: Tensor) -> None:
        """Called once when training ends, on a sample of the (normalised) training data:
        an architecture whose inference differs from its training step sets what inference
        needs here (BatchTopK: its threshold)."""

    @torch.no_grad()
    def before_step(self) -> None:
        """Called between the backward pass and the optimiser step. With unit-norm decoder
        rows, removes each row's gradient along the row (it could only change its norm)."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            W_LD, g_LD = self.W_dec, self.W_dec.grad
            g_LD -= (g_LD * W_LD).sum(dim=1, keepdim=True) * W_LD

    @torch.no_grad()
    def after_step(self) -> None:
        """Called after each optimiser step: rows back to norm 1 (when kept so)."""
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-8)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make an SAE trained on x * scale work on raw x, keeping decoder rows as they are:
        codes shrink by 1/scale, so the biases (and any threshold) do too."""
        self.b_dec.div_(scale)
        self.b_enc.div_(scale)

    # -- files ---------------------------------------------------------------------------
    def export_state(self) -> dict[str, Tensor]:
        """The tensors a file stores, in saelab's names and orientation (`state_dict` unless
        the class stores something in another shape for other libraries' sake)."""
        return {name: t.detach() for name, t in self.state_dict().items()}

    @classmethod
    def import_state(cls, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """`state` as a file stored it -> `state_dict` shapes (the inverse of
        `export_state`); tensors the class does not use are left for the loader to drop."""
        return state
