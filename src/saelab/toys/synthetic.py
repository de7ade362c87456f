"""Synthetic activations with known features: x = sum_i c_i d_i + noise.

The d_i are unit feature directions in R^d_model and the code c is sparse and non-negative.
Knowing both, a learned dictionary can be scored on whether its latents are the true
directions, and a coder on whether it finds the true supports (`toys.recovery`).

Which features fire on a token:
- independently, feature i with probability p_i, the p_i summing to k (the mean L0);
- `exact_k`: exactly k features per token, drawn without replacement with weights p_i (the
  k-sparse signals of compressed sensing);
- `correlation` rho: within consecutive groups of `group_size` features, a Gaussian copula
  with one shared factor (z_i = sqrt(rho) g + sqrt(1 - rho) e_i fires when above the
  1 - p_i quantile), so each feature keeps its rate p_i but fires together with its group;
- `hierarchy` h: the first n / (h + 1) features are parents; whenever a parent fires,
  exactly one of its h children fires with it (children are mutually exclusive, and never
  fire alone), as "animal" -> one of {dog, cat, ...}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from saelab.coding import SparseCode
from saelab.errors import SaelabError


@dataclass(frozen=True, kw_only=True)
class SyntheticSpec:
    d_model: int = 256
    """Width of the synthetic activations."""
    n_features: int = 2048
    """Number of true features (unit directions)."""
    k: float = 8.0
    """Mean number of active features per token (exactly k with --exact-k)."""
    magnitude: Literal["uniform", "exponential", "constant"] = "uniform"
    """Magnitude of an active feature: U[0, 1] (as in Elhage et al. 2022), Exp(1), or 1."""
    frequency: Literal["uniform", "zipf"] = "uniform"
    """Firing rates: all equal (k / n_features), or proportional to 1 / rank (Zipf)."""
    exact_k: bool = False
    """Exactly round(k) active features on every token instead of independent firing."""
    correlation: float = 0.0
    """Correlation of firing within groups of --group-size consecutive features (0: none)."""
    group_size: int = 16
    """Features per correlated group (with --correlation)."""
    hierarchy: int = 0
    """Children per parent feature (0: no hierarchy); an active parent brings one child."""
    noise: float = 0.0
    """Standard deviation of isotropic Gaussian noise added to every coordinate."""
    directions: Literal["random", "incoherent"] = "random"
    """Feature directions: uniform on the sphere, or two mutually unbiased orthonormal bases
    (identity and Hadamard, randomly rotated: coherence 1/sqrt(d_model); needs d_model a
    power of two and n_features <= 2 d_model)."""
    seed: int = 0
    """Seed of the directions and of every shard's samples."""

    def __post_init__(self) -> None:
        _require(self.d_model >= 1 and self.n_features >= 1, "--d-model and --n-features must "
                 "be positive", f"d_model={self.d_model}, n_features={self.n_features}")
        _require(0 < self.k <= self.n_features, "--k must be in (0, n_features]", f"k={self.k}")
        _require(0 <= self.correlation < 1, "--correlation must be in [0, 1)",
                 f"correlation={self.correlation}")
        _require(self.noise >= 0 and self.group_size >= 1 and self.hierarchy >= 0,
                 "--noise, --group-size and --hierarchy must be non-negative",
                 f"noise={self.noise}, group_size={self.group_size}, hierarchy={self.hierarchy}")
        kinds = [name for name, on in (("--exact-k", self.exact_k),
                                       ("--correlation", self.correlation > 0),
                                       ("--hierarchy", self.hierarchy > 0)) if on]
        _require(len(kinds) <= 1, "choose one firing structure", " and ".join(kinds))
        _require(not (self.exact_k and self.frequency != "uniform"), "--exact-k draws features "
                 "without replacement, which keeps only uniform rates exact",
                 f"--exact-k with --frequency {self.frequency}")
        if self.hierarchy:
            _require(self.n_features % (self.hierarchy + 1) == 0 and
                     self.k / 2 <= self.n_features // (self.hierarchy + 1),
                     "--n-features must split into parents with --hierarchy children each, and "
                     "k / 2 parents must fit", f"n_features={self.n_features}, hierarchy="
                     f"{self.hierarchy}, k={self.k}")
        if self.directions == "incoherent":
            d = self.d_model
            _require(d & (d - 1) == 0 and self.n_features <= 2 * d, "incoherent directions "
                     "need d_model a power of two and n_features <= 2 d_model",
                     f"d_model={d}, n_features={self.n_features}")


def _require(ok: bool, problem: str, found: str) -> None:
    if not ok:
        raise SaelabError(problem, expected="a valid synthetic-data setting", found=found,
                          fix="change the flags named above")


def seeded(*keys: int) -> torch.Generator:
    """A CPU generator seeded from several integers (the seed, a shard index ...)."""
    state = np.random.SeedSequence(list(keys)).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def feature_directions(spec: SyntheticSpec) -> Tensor:
    """The true directions [n_features, d_model], unit rows."""
    gen = seeded(spec.seed, 0)
    if spec.directions == "random":
        return torch.nn.functional.normalize(
            torch.randn(spec.n_features, spec.d_model, generator=gen, dtype=torch.float64), dim=1
        ).float()
    d = spec.d_model
    hadamard = torch.ones(1, 1, dtype=torch.float64)
    while len(hadamard) < d:  # Sylvester's construction
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1),
                              torch.cat([hadamard, -hadamard], 1)])
    bases_2DD = torch.cat([torch.eye(d, dtype=torch.float64), hadamard / math.sqrt(d)])
    rotation_DD, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    pick = torch.randperm(2 * d, generator=gen)[:spec.n_features]
    return (bases_2DD[pick] @ rotation_DD.T).float()


def parents(spec: SyntheticSpec) -> Tensor:
    """Parent of every feature [n_features] int64; -1 for a feature without one."""
    parent_F = torch.full((spec.n_features,), -1, dtype=torch.long)
    if spec.hierarchy:
        n_parents = spec.n_features // (spec.hierarchy + 1)
        parent_F[n_parents:] = torch.arange(n_parents).repeat_interleave(spec.hierarchy)
    return parent_F


def firing_probability(spec: SyntheticSpec) -> Tensor:
    """Marginal probability that each feature is active on a token [n_features]."""
    parent_F = parents(spec)
    roots = int((parent_F < 0).sum())
    mean_roots = spec.k / 2 if spec.hierarchy else spec.k  # an active parent brings a child
    weight_P = (torch.ones(roots, dtype=torch.float64) if spec.frequency == "uniform"
                else 1 / torch.arange(1, roots + 1, dtype=torch.float64))
    p_P = _capped_rates(weight_P, mean_roots)
    p_F = torch.cat([p_P, p_P[parent_F[roots:]] / max(spec.hierarchy, 1)])
    return p_F.float()


def _capped_rates(weight_P: Tensor, total: float) -> Tensor:
    """Rates proportional to `weight_P`, summing to `total`, none above 1 (water filling)."""
    p_P = weight_P * total / weight_P.sum()
    for _ in range(len(weight_P)):
        over = p_P >= 1
        if not (p_P > 1 + 1e-12).any():
            break
        rest = weight_P.masked_fill(over, 0)
        p_P = torch.where(over, 1.0, rest * (total - over.sum()) / rest.sum())
    return p_P.clamp(max=1)


def sample(spec: SyntheticSpec, directions_FD: Tensor, p_F: Tensor, n: int,
           gen: torch.Generator) -> tuple[Tensor, SparseCode]:
    """n activations [n, d_model] and their true codes (slots of value 0 are padding)."""
    active_BF = _active(spec, p_F, n, gen)
    code = SparseCode.from_dense(active_BF.float())
    values_BK = _magnitudes(spec.magnitude, code.values.shape, gen) * code.values
    code = SparseCode(code.indices, values_BK)
    x_BD = code.decode(directions_FD)
    if spec.noise:
        x_BD += spec.noise * torch.randn(x_BD.shape, generator=gen)
    return x_BD, code


def _active(spec: SyntheticSpec, p_F: Tensor, n: int, gen: torch.Generator) -> Tensor:
    """Which features fire on each of n tokens [n, n_features] bool."""
    F = spec.n_features
    if spec.exact_k:
        picks_BK = torch.multinomial(p_F.expand(n, F), round(spec.k), generator=gen)
        return torch.zeros(n, F, dtype=torch.bool).scatter_(1, picks_BK, True)
    if spec.correlation:
        groups = -(-F // spec.group_size)
        shared_BG = torch.randn(n, groups, generator=gen)
        z_BF = math.sqrt(spec.correlation) * shared_BG.repeat_interleave(spec.group_size, 1)[:, :F] \
            + math.sqrt(1 - spec.correlation) * torch.randn(n, F, generator=gen)
        return z_BF > torch.special.ndtri(1 - p_F.double()).float()
    if spec.hierarchy:
        P, h = F // (spec.hierarchy + 1), spec.hierarchy
        parent_BP = torch.rand(n, P, generator=gen) < p_F[:P]
        child_BPE = torch.nn.functional.one_hot(torch.randint(h, (n, P), generator=gen), h)
        return torch.cat([parent_BP, (child_BPE.bool() & parent_BP[..., None]).reshape(n, -1)], 1)
    return torch.rand(n, F, generator=gen) < p_F


def _magnitudes(kind: str, shape: torch.Size, gen: torch.Generator) -> Tensor:
    if kind == "uniform":
        return torch.rand(shape, generator=gen)
    if kind == "exponential":
        return torch.empty(shape).exponential_(1.0, generator=gen)
    return torch.ones(shape)


def coherence(directions_FD: Tensor) -> float:
    """Mutual coherence: the largest |cos| between two distinct directions."""
    unit_FD = torch.nn.functional.normalize(directions_FD.double(), dim=1)
    gram_FF = (unit_FD @ unit_FD.T).abs().fill_diagonal_(0)
    return float(gram_FF.max())
