"""The toy-model and ground-truth figures, as PNG and SVG (matplotlib, Agg backend).

Each function takes plain tensors/lists and a path stem, and writes STEM.png and STEM.svg
atomically.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from torch import Tensor  # noqa: E402

from saelab.io import atomic_write  # noqa: E402
from saelab.toys.measures import PHASES, ToyMeasures  # noqa: E402

PHASE_COLOURS = ("#4c72b0", "#dd8452", "#c44e52")


def save_figure(fig: Figure, stem: Path) -> list[Path]:
    """Write STEM.png and STEM.svg atomically; close the figure."""
    paths = []
    for ext in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=120, bbox_inches="tight")
        path = stem.with_suffix(f".{ext}")
        atomic_write(path, lambda f, data=buf.getvalue(): f.write(data))
        paths.append(path)
    plt.close(fig)
    return paths


def plot_weights(W_IFH: Tensor, b_IF: Tensor, m: ToyMeasures, labels: Sequence[str],
                 stem: Path) -> list[Path]:
    """The paper's per-instance view: W^T W with the bias beside it, and ||W_i|| bars
    coloured by superposition (dark: none; yellow: much)."""
    n = len(labels)
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 5.2), squeeze=False,
                             gridspec_kw={"height_ratios": [1, 1.1]})
    wtw_IFF = (W_IFH @ W_IFH.transpose(1, 2)).detach().numpy()
    colour = plt.get_cmap("viridis")
    for i, label in enumerate(labels):
        top, bottom = axes[0, i], axes[1, i]
        board = np.concatenate([wtw_IFF[i], np.full((len(wtw_IFF[i]), 1), np.nan),
                                b_IF[i].detach().numpy()[:, None]], axis=1)
        top.imshow(board, cmap="RdBu", vmin=-1, vmax=1)
        top.set_title(f"{label}\n{int(m.n_represented[i])} represented", fontsize=8)
        top.set_xticks([])
        top.set_yticks([])
        sup_F = (m.superposition[i] / m.norm[i].pow(2).clamp(min=1e-12)).clamp(max=1)
        features = np.arange(len(m.norm[i]))
        bottom.barh(features, m.norm[i].numpy(), color=colour(sup_F.numpy()))
        bottom.invert_yaxis()
        bottom.set_xlim(0, 1.2)
        bottom.set_yticks([])
        bottom.set_xlabel("||W_i||", fontsize=8)
    axes[0, 0].set_ylabel("W^T W | b", fontsize=8)
    axes[1, 0].set_ylabel("features (importance ↓)", fontsize=8)
    return save_figure(fig, stem)


def plot_dimensionality(sparsity: Sequence[float], m: ToyMeasures, d_hidden: int,
                        stem: Path) -> list[Path]:
    """Dimensions per feature m / ||W||_F^2 against 1 / (1 - S), each feature's D_i as dots."""
    x = 1 / (1 - np.clip(np.asarray(sparsity, dtype=float), 0, 1 - 1e-9))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    D_IF = m.dimensionality.numpy()
    represented = m.norm.numpy() > 0.5
    jitter = np.exp(np.random.default_rng(0).uniform(-0.04, 0.04, D_IF.shape))
    xs = (x[:, None] * jitter)[represented]
    ax.scatter(xs, D_IF[represented], s=8, alpha=0.5, color="#4c72b0", label="D_i (represented)")
    order = np.argsort(x)
    ax.plot(x[order], m.dimensions_per_feature.numpy()[order], "k-o", ms=4,
            label="m / ||W||_F^2")
    for frac in (1, 3 / 4, 2 / 3, 1 / 2, 2 / 5, 1 / 3):
        ax.axhline(frac, color="grey", lw=0.5, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("1 / (1 - S)  (sparsity S)")
    ax.set_ylabel("dimensions per feature")
    ax.set_title(f"dimensionality, {D_IF.shape[1]} features in {d_hidden} dimensions",
                 fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, stem)


def plot_phase_diagram(density: Sequence[float], importance: Sequence[float], phase_SY: Tensor,
                       stem: Path) -> list[Path]:
    """The n=2, m=1 phase diagram: what the model does with the second feature, per feature
    density (x) and its importance relative to the first (y)."""
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    d, r = np.asarray(density), np.asarray(importance)
    ax.pcolormesh(_edges(d), _edges(r), phase_SY.numpy().T, cmap=ListedColormap(PHASE_COLOURS),
                  vmin=-0.5, vmax=2.5, shading="flat")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("feature density 1 - S")
    ax.set_ylabel("relative importance of the second feature")
    ax.set_title("n = 2 features, m = 1 dimension", fontsize=9)
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in PHASE_COLOURS]
    ax.legend(handles, PHASES, fontsize=8, loc="upper left", framealpha=0.9)
    return save_figure(fig, stem)


def _edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges of a log-spaced axis from its cell centres."""
    logs = np.log(centres)
    step = np.diff(logs).mean() if len(logs) > 1 else 1.0
    return np.exp(np.concatenate([logs - step / 2, logs[-1:] + step / 2]))


def plot_dropout(dropout: Sequence[float], per_dim_SQ: np.ndarray, sparsity: Sequence[float],
                 fits: Sequence[tuple[float, float]], stem: Path) -> list[Path]:
    """Features represented per hidden dimension against dropout, a line per sparsity, with
    the fitted line of each."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    q = np.asarray(dropout)
    grid = np.linspace(q.min(), q.max(), 50)
    for s, row, (a, b), c in zip(sparsity, per_dim_SQ, fits,
                                 plt.get_cmap("viridis")(np.linspace(0, 0.9, len(sparsity)))):
        ax.plot(q, row, "o", color=c, label=f"S = {s:g}")
        ax.plot(grid, a + b * grid, "-", color=c, lw=1)
    ax.axhline(1, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("hidden-layer dropout rate q")
    ax.set_ylabel("features represented / hidden dimension")
    ax.legend(fontsize=8)
    return save_figure(fig, stem)


def plot_width_sweep(widths: Sequence[int], series: dict[str, Sequence[float]],
                     n_features: int, stem: Path) -> list[Path]:
    """Recovery measures against SAE width, with the true number of features marked."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, values in series.items():
        ax.plot(widths, values, "-o", ms=4, label=name)
    ax.axvline(n_features, color="grey", ls="--", lw=1, label=f"true features ({n_features})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("SAE width (latents)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    return save_figure(fig, stem)
