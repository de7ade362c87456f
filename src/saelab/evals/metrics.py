"""Streaming reconstruction and latent-usage metrics: update batch by batch, read at the end.

Sums are kept in float64 so that FVU over millions of tokens does not drift; nothing here
holds more than one batch of activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypedDict

import numpy as np
import torch
from torch import Tensor

from saelab.coding import SparseCode

DENSE_DENSITY = 0.1  # a latent active on more than 10% of tokens is "dense" (as SAEBench)
LOG10_DENSITY_BINS = np.linspace(-6.0, 0.0, 49)  # density histogram edges, log10 scale
VALUE_SAMPLE = 200_000  # non-zero values kept per coder for the magnitude histogram


class ReconstructionResult(TypedDict):
    """`ReconstructionMetrics.result()`: means over the tokens seen."""

    tokens: int
    fvu: float
    mse: float
    cosine: float
    l0: float
    l0_histogram: dict[str, int]
    """Tokens per L0 (the keys are the L0s, as strings for JSON)."""


class UsageResult(TypedDict):
    """`LatentUsage.result()`."""

    dead: int
    dead_fraction: float
    dense: int
    log10_density_histogram: list[int]


def fvu_of_sums(sq_err: np.ndarray, sq_norm: np.ndarray, sum_x: np.ndarray,
                tokens: np.ndarray) -> np.ndarray:
    """FVU from its sums over a set of tokens: sum ||x - x_hat||^2, sum ||x||^2, sum x [..., d]
    and the count (leading axes, e.g. bootstrap resamples, kept): the one definition of FVU,
    which `ReconstructionMetrics` and the per-window sums of a comparison both use."""
    centred = sq_norm - (sum_x ** 2).sum(axis=-1) / tokens
    return sq_err / np.maximum(centred, 1e-300)


def fvu(x_BD: Tensor, x_hat_BD: Tensor) -> float:
    """Fraction of variance unexplained of one batch: ReconstructionMetrics over it."""
    metrics = ReconstructionMetrics()
    metrics.update(x_BD, x_hat_BD)
    return metrics.fvu


@dataclass
class ReconstructionMetrics:
    """FVU, MSE, cosine and L0 over every token seen: the one definition of FVU,
    sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, the mean taken per dimension over all the
    tokens seen."""

    tokens: int = 0
    sq_err: float = 0.0
    sq_norm: float = 0.0
    cosine_sum: float = 0.0
    sum_x: Tensor | None = None
    l0_counts: dict[int, int] = field(default_factory=dict)

    def update(self, x_BD: Tensor, x_hat_BD: Tensor, code: SparseCode | None = None) -> None:
        """Add a batch (and the code it was decoded from, for the L0 histogram)."""
        x, x_hat = x_BD.double(), x_hat_BD.double()
        self.tokens += len(x)
        self.sq_err += float((x - x_hat).pow(2).sum())
        self.sq_norm += float(x.pow(2).sum())
        self.cosine_sum += float(torch.nn.functional.cosine_similarity(x, x_hat, dim=1).sum())
        sum_x = x.sum(dim=0).cpu()
        self.sum_x = sum_x if self.sum_x is None else self.sum_x + sum_x
        if code is not None:
            l0s, counts = code.l0().cpu().unique(return_counts=True)
            for l0, count in zip(l0s.tolist(), counts.tolist(), strict=True):
                self.l0_counts[l0] = self.l0_counts.get(l0, 0) + count

    def merge(self, other: ReconstructionMetrics) -> None:
        """Add the tokens `other` saw (another rank's)."""
        self.tokens += other.tokens
        self.sq_err += other.sq_err
        self.sq_norm += other.sq_norm
        self.cosine_sum += other.cosine_sum
        if other.sum_x is not None:
            self.sum_x = other.sum_x if self.sum_x is None else self.sum_x + other.sum_x
        for l0, count in other.l0_counts.items():
            self.l0_counts[l0] = self.l0_counts.get(l0, 0) + count

    @property
    def fvu(self) -> float:
        if self.sum_x is None:
            return float("nan")
        return float(fvu_of_sums(np.asarray(self.sq_err), np.asarray(self.sq_norm),
                                 self.sum_x.numpy(), np.asarray(float(self.tokens))))

    def result(self) -> ReconstructionResult:
        n = max(self.tokens, 1)
        l0_mean = sum(k * c for k, c in self.l0_counts.items()) / n
        return {"tokens": self.tokens, "fvu": self.fvu,
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
        # a latent in two slots of a row (matching pursuit re-picks) fires once on that token
        self.fires += code.firing_counts(self.n_latents).cpu()
        if self.kept < VALUE_SAMPLE:
            vals = code.values[active].detach().float().cpu()[: VALUE_SAMPLE - self.kept]
            self.values.append(vals)
            self.kept += len(vals)

    def merge(self, other: LatentUsage) -> None:
        """Add the tokens `other` saw after these (another rank's): its values join the
        sample after this one's, as they would have in one pass over both."""
        self.tokens += other.tokens
        self.fires += other.fires
        for vals in other.values:
            vals = vals[: VALUE_SAMPLE - self.kept]
            if len(vals):
                self.values.append(vals)
                self.kept += len(vals)

    def density(self) -> Tensor:
        """Fraction of tokens each latent fired on [n_latents]."""
        return self.fires.double() / max(self.tokens, 1)

    def result(self) -> UsageResult:
        density = self.density()
        live = density[density > 0]
        hist, _ = np.histogram(np.log10(live.numpy()), bins=LOG10_DENSITY_BINS)
        return {"dead": int((density == 0).sum()),
                "dead_fraction": float((density == 0).double().mean()),
                "dense": int((density > DENSE_DENSITY).sum()),
                "log10_density_histogram": hist.tolist()}

    def value_sample(self) -> np.ndarray:
        return torch.cat(self.values).numpy() if self.values else np.zeros(0, np.float32)
