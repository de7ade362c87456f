"""`saelab toy tms | dropout | phase-diagram`: toy models of superposition, measured and plotted.

Every verb trains all its instances as one vectorised model (the paper's instance axis) and
writes a run folder: config.json, results.json, toy.safetensors (weights) and PNG + SVG plots.
Defaults are the paper's: n=20 features in m=5 dimensions, importance 0.7^i, sparsities
0 ... 0.999, AdamW at lr 1e-3 for 10,000 steps of 1024.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save

from saelab.config import Verb
from saelab.errors import SaelabError
from saelab.io import atomic_write, to_json, write_json
from saelab.toys.measures import (
    PHASES,
    ToyMeasures,
    measure,
    second_feature_phase,
)
from saelab.toys.model import Instances, ToyModel, expected_loss, train_toy
from saelab.toys.plots import plot_dimensionality, plot_dropout, plot_phase_diagram, plot_weights


@dataclass(frozen=True, kw_only=True)
class ToyTraining:
    out: Path
    """Run folder: config.json, results.json, toy.safetensors and the plots (PNG and SVG)."""
    steps: int = 10_000
    """Optimiser steps (the paper: 10,000)."""
    batch_size: int = 1024
    """Inputs per step and instance (the paper: 1024)."""
    lr: float = 1e-3
    """AdamW learning rate, constant (the paper: 1e-3)."""
    weight_decay: float = 0.01
    """AdamW weight decay (torch's default, which the paper's code kept)."""
    repeats: int = 1
    """Instances trained per setting, from different initialisations."""
    seed: int = 0
    """Seed of the initialisation and the data."""
    device: str = "cpu"
    """Device to train on: cpu, cuda, ..."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "repeats"):
            if getattr(self, name) < 1:
                raise SaelabError(f"--{name.replace('_', '-')} must be positive",
                                  expected=">= 1", found=str(getattr(self, name)),
                                  fix="pass a positive number")

    def train(self, instances: Instances, d_hidden: int) -> tuple[ToyModel, torch.Tensor]:
        return train_toy(instances, d_hidden, steps=self.steps, batch_size=self.batch_size,
                         lr=self.lr, weight_decay=self.weight_decay, seed=self.seed,
                         device=self.device)


@dataclass(frozen=True, kw_only=True)
class TmsConfig(ToyTraining):
    n_features: int = 20
    """Input features n."""
    d_hidden: int = 5
    """Hidden dimensions m."""
    sparsity: tuple[float, ...] = (0.0, 0.7, 0.9, 0.97, 0.99, 0.997, 0.999)
    """Sparsity S (probability a feature is 0); one instance per value."""
    dropout: tuple[float, ...] = (0.0,)
    """Hidden-layer dropout rate q during training; one instance per (sparsity, rate)."""
    input_dropout: float = 0.0
    """Dropout rate on the input features (the loss still compares with the clean input)."""
    importance_decay: float = 0.7
    """Feature i has importance decay^i (1: all equal)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        rates = [*self.sparsity, *self.dropout, self.input_dropout]
        if not all(0 <= r < 1 for r in rates) or self.importance_decay <= 0:
            raise SaelabError("sparsity and dropout rates must be in [0, 1), decay positive",
                              expected="0 <= S, q < 1 and --importance-decay > 0",
                              found=f"--sparsity {','.join(map(str, self.sparsity))} --dropout "
                              f"{','.join(map(str, self.dropout))} --input-dropout "
                              f"{self.input_dropout} --importance-decay {self.importance_decay}",
                              fix="pass rates such as 0.9")

    def instances(self) -> Instances:
        return Instances.grid(self.n_features, list(self.sparsity),
                              importance_decay=self.importance_decay,
                              hidden_dropout=self.dropout, input_dropout=self.input_dropout,
                              repeats=self.repeats)


@dataclass(frozen=True, kw_only=True)
class DropoutConfig(TmsConfig):
    sparsity: tuple[float, ...] = (0.7, 0.9, 0.97, 0.99)
    """Sparsity S (probability a feature is 0); one line of the plot per value."""
    dropout: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
    """Hidden-layer dropout rates q to sweep (the first is the baseline of the pooled fits)."""
    repeats: int = 4
    """Instances per (sparsity, rate), averaged."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(set(self.dropout)) < 2:
            raise SaelabError("a dropout sweep needs at least two rates",
                              expected="--dropout 0,0.1,...", found="--dropout " + ",".join(map(str, self.dropout)),
                              fix="pass two or more rates")


@dataclass(frozen=True, kw_only=True)
class PhaseDiagramConfig(ToyTraining):
    n_density: int = 10
    """Feature densities 1 - S, log-spaced from --min-density to 1."""
    min_density: float = 0.01
    """Lowest feature density."""
    n_importance: int = 10
    """Relative importances of the second feature, log-spaced over the range below."""
    min_importance: float = 0.1
    """Lowest relative importance."""
    max_importance: float = 10.0
    """Highest relative importance."""
    repeats: int = 8
    """Initialisations per cell; the one with the lowest loss is the cell's answer (a
    same-sign pair is a local minimum that catches some initialisations)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0 < self.min_density <= 1 and 0 < self.min_importance <= self.max_importance
                and self.n_density >= 1 and self.n_importance >= 1):
            raise SaelabError("the phase-diagram grid is empty or out of range",
                              expected="0 < min density <= 1, 0 < min importance <= max "
                              "importance, at least one cell a side",
                              found=f"density {self.min_density} x{self.n_density}, importance "
                              f"{self.min_importance}..{self.max_importance} "
                              f"x{self.n_importance}", fix="change the grid flags")

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        density = torch.logspace(np.log10(self.min_density), 0, self.n_density)
        importance = torch.logspace(np.log10(self.min_importance),
                                    np.log10(self.max_importance), self.n_importance)
        return density, importance


def run_tms(cfg: TmsConfig) -> dict[str, Any]:
    """Train every (sparsity, dropout) instance; write measures, weights and plots."""
    instances = cfg.instances()
    model, m = _train_and_measure(cfg, instances, cfg.d_hidden)
    settings = itertools.product(cfg.sparsity, cfg.dropout, range(cfg.repeats))  # grid order
    rows = [{"sparsity": s, "dropout": q, "input_dropout": cfg.input_dropout, "repeat": r,
             **_instance_measures(m, i)} for i, (s, q, r) in enumerate(settings)]
    labels = [f"S={r['sparsity']:.3g}" + (f", q={r['dropout']:g}" if len(cfg.dropout) > 1 else "")
              for r in rows]
    plot_weights(model.W_IFH.detach().cpu(), model.b_IF.detach().cpu(), m, labels,
                 cfg.out / "weights")
    plot_dimensionality([r["sparsity"] for r in rows], m, cfg.d_hidden, cfg.out / "dimensionality")
    results = {"instances": rows, "loss": expected_loss(model, instances).tolist()}
    write_json(cfg.out / "results.json", results)
    return results


def run_dropout(cfg: DropoutConfig) -> dict[str, Any]:
    """Sweep hidden dropout and sparsity; fit features-per-dimension against the rate."""
    _, m = _train_and_measure(cfg, cfg.instances(), cfg.d_hidden)
    shape = (len(cfg.sparsity), len(cfg.dropout), cfg.repeats)
    per_dim_SQX = (m.n_represented.float() / cfg.d_hidden).reshape(shape).numpy()
    frob_SQX = (1 / m.dimensions_per_feature).reshape(shape).numpy()  # ||W||_F^2 / m
    per_dim_SQ = per_dim_SQX.mean(axis=2)
    q = np.asarray(cfg.dropout)
    fits = [_line_fit(np.repeat(q, cfg.repeats), per_dim_SQX[s].reshape(-1))
            for s in range(len(cfg.sparsity))]
    plot_dropout(cfg.dropout, per_dim_SQ, cfg.sparsity, [(f["intercept"], f["slope"])
                                                          for f in fits], cfg.out / "dropout")
    results = {
        "sparsity": list(cfg.sparsity), "dropout": list(cfg.dropout),
        "features_per_dimension": per_dim_SQ.tolist(),
        "features_per_dimension_std": per_dim_SQX.std(axis=2).tolist(),
        "frobenius_per_dimension": frob_SQX.mean(axis=2).tolist(),
        "linear_fit": [{"sparsity": s, **f} for s, f in zip(cfg.sparsity, fits)],
        "relative_fit": _pooled_fit(q, per_dim_SQX, baseline=0.0),
        "excess_fit": _pooled_fit(q, per_dim_SQX, baseline=1.0),
    }
    write_json(cfg.out / "results.json", results)
    return results


def run_phase_diagram(cfg: PhaseDiagramConfig) -> dict[str, Any]:
    """n=2, m=1 over feature density x relative importance; keep each cell's best repeat."""
    density, importance = cfg.grid()
    density_SYX, importance_SYX, _ = torch.meshgrid(
        density, importance, torch.arange(cfg.repeats, dtype=torch.float32), indexing="ij")
    n = density_SYX.numel()
    instances = Instances(density_SYX.reshape(-1),
                          torch.stack([torch.ones(n), importance_SYX.reshape(-1)], dim=1),
                          torch.zeros(n), torch.zeros(n))
    model, m = _train_and_measure(cfg, instances, 1)
    loss_SYX = expected_loss(model, instances).reshape(len(density), len(importance), -1)
    best_SY = loss_SYX.argmin(dim=2)
    pick = (torch.arange(len(density) * len(importance)) * cfg.repeats + best_SY.reshape(-1))
    phase_SY = second_feature_phase(m.norm[pick]).reshape(len(density), len(importance))
    plot_phase_diagram(density.tolist(), importance.tolist(), phase_SY, cfg.out / "phase_diagram")
    W_SY2 = model.W_IFH.detach().cpu()[pick, :, 0].reshape(len(density), len(importance), 2)
    results = {"density": density.tolist(), "relative_importance": importance.tolist(),
               "phases": list(PHASES), "phase": phase_SY.tolist(), "W": W_SY2.tolist(),
               "loss": loss_SYX.gather(2, best_SY[..., None]).squeeze(2).tolist()}
    write_json(cfg.out / "results.json", results)
    return results


def _train_and_measure(cfg: ToyTraining, instances: Instances, d_hidden: int
                       ) -> tuple[ToyModel, ToyMeasures]:
    write_json(cfg.out / "config.json", to_json(cfg))
    model, _ = cfg.train(instances, d_hidden)
    weights = save({"W": model.W_IFH.detach().cpu().contiguous(),
                    "b": model.b_IF.detach().cpu().contiguous()})
    atomic_write(cfg.out / "toy.safetensors", lambda f: f.write(weights))
    return model, measure(model.W_IFH.cpu())


def _instance_measures(m: ToyMeasures, i: int) -> dict[str, Any]:
    return {"n_represented": int(m.n_represented[i]),
            "dimensions_per_feature": float(m.dimensions_per_feature[i]),
            "superposition": m.superposition[i].tolist(), "norm": m.norm[i].tolist(),
            "dimensionality": m.dimensionality[i].tolist()}


def _line_fit(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Least-squares y = intercept + slope x, with R^2."""
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    total = ((y - y.mean()) ** 2).sum()
    return {"intercept": float(intercept), "slope": float(slope),
            "r2": float(1 - (residual**2).sum() / total) if total > 0 else 1.0}


def _pooled_fit(q: np.ndarray, per_dim_SQX: np.ndarray, baseline: float) -> dict[str, float]:
    """One line through every sparsity at once: (features per dimension - baseline) as a
    fraction of its value at the first rate, against q. Baseline 0 gives the relative
    decline; baseline 1 the decline of the excess over one feature per dimension (the
    superposition proper). Sparsities not above the baseline at the first rate are left out."""
    start_S11 = per_dim_SQX[:, :1].mean(axis=2, keepdims=True) - baseline
    keep = start_S11[:, 0, 0] > 0
    relative_SQX = (per_dim_SQX[keep] - baseline) / start_S11[keep]
    x = np.broadcast_to(q[None, :, None], relative_SQX.shape).reshape(-1)
    return _line_fit(x, relative_SQX.reshape(-1))


def tms_summary(results: dict[str, Any]) -> list[str]:
    """One line per instance: how many features it represents, and in how many dimensions."""
    return [f"S={r['sparsity']:<6.4g} dropout {r['dropout']:<4g} repeat {r['repeat']}: "
            f"{r['n_represented']:>3} features represented, dimensions per feature "
            f"{r['dimensions_per_feature']:.3f}" for r in results["instances"]]


def dropout_summary(results: dict[str, Any]) -> list[str]:
    """Features per hidden dimension for each (sparsity, rate), and the fitted lines."""
    lines = ["features represented per hidden dimension (rows: sparsity; columns: dropout "
             + " ".join(f"{q:g}" for q in results["dropout"]) + ")"]
    for fit, row in zip(results["linear_fit"], results["features_per_dimension"]):
        lines.append(f"S={fit['sparsity']:<6g} " + " ".join(f"{v:5.2f}" for v in row)
                     + f"   fit {fit['intercept']:.2f} {fit['slope']:+.2f} q (R^2 "
                     f"{fit['r2']:.2f})")
    for key, what in (("relative_fit", "as a fraction of the first rate's"),
                      ("excess_fit", "excess over 1, as a fraction of the first rate's")):
        fit = results[key]
        lines.append(f"{what}: {fit['intercept']:.2f} {fit['slope']:+.2f} q (R^2 {fit['r2']:.2f})")
    return lines


def phase_summary(results: dict[str, Any]) -> list[str]:
    """The diagram as letters (N not represented, D dedicated, S superposition)."""
    letters = "NDS"
    lines = ["density  relative importance " + " ".join(f"{r:.2g}" for r in
                                                       results["relative_importance"])]
    lines += [f"{d:<8.3g} " + " ".join(letters[p] for p in row)
              for d, row in zip(results["density"], results["phase"])]
    return lines


TMS = Verb(TmsConfig, run_tms, tms_summary, "Train ReLU output toy models over sparsity (and "
           "dropout); measure and plot the features they represent.")
DROPOUT = Verb(DropoutConfig, run_dropout, dropout_summary, "Sweep hidden dropout and "
               "sparsity; plot and fit features represented per hidden dimension.")
PHASE_DIAGRAM = Verb(PhaseDiagramConfig, run_phase_diagram, phase_summary, "The n=2, m=1 phase "
                     "diagram over feature density and importance.")
