"""Streaming reconstruction and latent-usage metrics: update batch by batch, read at the end.

Sums are kept in float64 so that FVU over millions of tokens does not drift; nothing here
holds more than one batch of activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from saelab.coding import SparseCode

DENSE_DENSITY = 0.1  # a latent active on more than 10% of tokens is "dense" (as SAEBench)
LOG10_DENSITY_BINS = np.linspace(-6.0, 0.0, 49)  # density histogram edges, log10 scale
VALUE_SAMPLE = 200_000  # non-zero values kept per coder for the magnitude histogram


@dataclass
class ReconstructionMetrics:
    """FVU, MSE, cosine and L0 over every token seen."""

    tokens: int = 0
    sq_err: float = 0.0
    sq_norm: float = 0.0
    cosine_sum: float = 0.0
    sum_x: Tensor | None = None
    l0_counts: dict[int, int] = field(default_factory=dict)

    def update(self, x_BD: Tensor, x_hat_BD: Tensor, code: SparseCode) -> None:
        x, x_hat = x_BD.double(), x_hat_BD.double()
        self.tokens += len(x)
        self.sq_err += float((x - x_hat).pow(2).sum())
        self.sq_norm += float(x.pow(2).sum())
        self.cosine_sum += float(torch.nn.functional.cosine_similarity(x, x_hat, dim=1).sum())
        sum_x = x.sum(dim=0).cpu()
        self.sum_x = sum_x if self.sum_x is None else self.sum_x + sum_x
        l0s, counts = code.l0().cpu().unique(return_counts=True)
        for l0, count in zip(l0s.tolist(), counts.tolist(), strict=True):
            self.l0_counts[l0] = self.l0_counts.get(l0, 0) + count

    def result(self) -> dict[str, float | dict[str, int]]:
        n = max(self.tokens, 1)
        centred = self.sq_norm - float(self.sum_x @ self.sum_x) / n if self.tokens else 0.0
        l0_mean = sum(k * c for k, c in self.l0_counts.items()) / n
        return {"tokens": self.tokens, "fvu": self.sq_err / max(centred, 1e-300),
                "mse": self.sq_err / n, "cosine": self.cosine_sum / n, "l0": l0_mean,
                "l0_histogram": {str(k): self.l0_counts[k] for k in sorted(self.l0_counts)}}


@dataclass
class LatentUsage:
    """How often each latent fires, and a sample of the non-zero values codes give it."""

    n_latents: int
    tokens: int = 0
    fires: Tensor = field(init=False)
    values: list[Tensor] = field(default_factory=list)
    kept: int = 0

    def __post_init__(self) -> None:
        self.fires = torch.zeros(self.n_latents, dtype=torch.int64)

    def update(self, code: SparseCode) -> None:
        active = code.values != 0
        self.tokens += len(code)
        # a latent in two slots of a row (matching pursuit re-picks) fires once on that token;
        # "amax" also keeps an unused slot (value 0, meaningless index) from erasing a firing
        on_BL = torch.zeros(len(code), self.n_latents, dtype=torch.int8, device=active.device)
        on_BL.scatter_reduce_(1, code.indices, active.to(torch.int8), "amax")
        self.fires += on_BL.sum(dim=0).cpu()
        if self.kept < VALUE_SAMPLE:
            vals = code.values[active].detach().float().cpu()[: VALUE_SAMPLE - self.kept]
            self.values.append(vals)
            self.kept += len(vals)

    def density(self) -> Tensor:
        """Fraction of tokens each latent fired on [n_latents]."""
        return self.fires.double() / max(self.tokens, 1)

    def result(self) -> dict[str, float | int | list[float]]:
        density = self.density()
        live = density[density > 0]
        hist, _ = np.histogram(np.log10(live.numpy()), bins=LOG10_DENSITY_BINS)
        return {"dead": int((density == 0).sum()),
                "dead_fraction": float((density == 0).double().mean()),
                "dense": int((density > DENSE_DENSITY).sum()),
                "log10_density_histogram": hist.tolist()}

    def value_sample(self) -> np.ndarray:
        return torch.cat(self.values).numpy() if self.values else np.zeros(0, np.float32)
