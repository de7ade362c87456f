"""The SAE contract every architecture shares: a dictionary plus an encoder.

Weights use the SAELens / Gemma Scope orientation: `W_enc` [d_model, n_latents], `b_enc`
[n_latents], `W_dec` [n_latents, d_model], `b_dec` [d_model]. An architecture only says how
pre-activations become latent activations (`activation`); everything else lives here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

REGISTRY: dict[str, type[SAE]] = {}


@dataclass
class LossOutput:
    """One training step's loss and what went into it."""

    loss: Tensor  # scalar to minimise
    x_hat: Tensor  # [batch, d_model]
    fired: Tensor  # [n_latents] bool: which latents were active on some token of the batch
    l0: Tensor  # scalar: mean number of active latents per token
    terms: dict[str, Tensor] = field(default_factory=dict)  # named parts, for metrics

    @classmethod
    def from_codes(cls, loss: Tensor, codes_BL: Tensor, x_hat: Tensor,
                   terms: dict[str, Tensor]) -> LossOutput:
        """From dense codes [batch, n_latents] (the architectures that make them anyway)."""
        active_BL = codes_BL > 0
        return cls(loss, x_hat, active_BL.any(dim=0), active_BL.sum(dim=1).float().mean(),
                   terms)


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum().clamp(min=1e-30)


def register(cls: type[SAE]) -> type[SAE]:
    """Class decorator: make an architecture loadable by its name."""
    if cls.architecture in REGISTRY:
        raise ValueError(f"architecture {cls.architecture!r} is registered twice")
    REGISTRY[cls.architecture] = cls
    return cls


class SAE(nn.Module):
    """A sparse autoencoder: encode(x) = activation(pre_acts(x)); decode(z) = z W_dec + b_dec.

    `apply_b_dec_to_input` subtracts `b_dec` before encoding (SAELens, sparsify); Gemma Scope
    encodes raw activations. `site` and `model` say where the SAE reads (saelab site names).
    """

    architecture: ClassVar[str]

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
        """Architecture-specific settings saved in `cfg.json` (k, ...)."""
        return {}

    def pre_acts(self, x: Tensor) -> Tensor:
        """[batch, d_model] -> [batch, n_latents], before the sparsifying activation."""
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activation(self, pre_BL: Tensor) -> Tensor:
        raise NotImplementedError

    def loss(self, x: Tensor, *, sparsity_coef: float, dead_L: Tensor | None = None
             ) -> LossOutput:
        """The architecture's training loss on a batch of (normalised) activations.
        `dead_L` marks latents that have not fired for a while (AuxK uses it)."""
        raise NotImplementedError

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make an SAE trained on x * scale work on raw x, keeping decoder rows unit norm:
        codes shrink by 1/scale, so the biases (and any threshold) do too."""
        self.b_dec.div_(scale)
        self.b_enc.div_(scale)

    def encode(self, x: Tensor) -> Tensor:
        """Latent activations [batch, n_latents] (dense, mostly zeros)."""
        return self.activation(self.pre_acts(x))

    def decode(self, codes_BL: Tensor) -> Tensor:
        return codes_BL @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def init_random(self, seed: int = 0) -> SAE:
        """Decoder rows random unit vectors, encoder their transpose (Gao et al. 2024)."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        W = torch.randn(self.n_latents, self.d_model, generator=g, dtype=torch.float64)
        W /= W.norm(dim=1, keepdim=True)
        self.W_dec.copy_(W)
        self.W_enc.copy_(W.T)
        return self
