"""Per-window sums of a comparison, and the metrics computed from them.

Every metric of a comparison is a ratio of sums over tokens, so keeping the sums per window
(instead of one running total) costs a few numbers a window and gives everything else: the
point estimate (the sums over all windows), its bootstrap interval (`intervals`), a paired
difference between two coders on the same windows, and data-parallel evaluation (each rank
sums its own windows; the ranks' windows are joined in order).

Columns: `tokens` (positions reconstructed), `sq_err`, `sq_norm` (sum ||x||^2), `sum_x`
[windows, d], `l0_sum`, `positions` (positions whose next-token loss is scored), `loss`
(spliced cross-entropy), `clean`, `zero` (zero-ablation cross-entropy) and `kl`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch import Tensor

from saelab.evals.intervals import Columns
from saelab.evals.metrics import fvu_of_sums
from saelab.io import atomic_write

SHARED = ("tokens", "sq_norm", "sum_x", "positions", "clean", "zero")  # the same for every coder
PER_CODER = ("sq_err", "l0_sum", "loss", "kl", "attribution", "sq_err_top")


def _loss_recovered(s: Columns) -> np.ndarray:
    gap = s["zero"] - s["clean"]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(gap != 0, (s["zero"] - s["loss"]) / gap, np.nan)


METRICS: dict[str, Callable[[Columns], np.ndarray]] = {
    "fvu": lambda s: fvu_of_sums(s["sq_err"], s["sq_norm"], s["sum_x"], s["tokens"]),
    "l0": lambda s: s["l0_sum"] / s["tokens"],
    "delta_loss": lambda s: (s["loss"] - s["clean"]) / s["positions"],
    "kl": lambda s: s["kl"] / s["positions"],
    "loss_recovered": _loss_recovered,
    "attributed_delta_loss": lambda s: s["attribution"] / s["positions"],
    "error_top_share": lambda s: s["sq_err_top"] / np.maximum(s["sq_err"], 1e-300),
}
"""Each metric from the sums over a set of windows (leading resample axes kept)."""

LM_METRICS = ("delta_loss", "kl", "loss_recovered")  # those that need the reconstruction spliced in
ATTRIBUTION_METRICS = ("attributed_delta_loss",)  # those that need the clean loss's gradient
PRINCIPAL_METRICS = ("error_top_share",)  # those that need the activations' principal directions


class WindowSums:
    """Per-window columns, appended batch by batch."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.parts: dict[str, list[np.ndarray]] = {name: [] for name in names}

    def add(self, **columns: np.ndarray) -> None:
        if set(columns) != set(self.names):
            raise ValueError(f"expected columns {sorted(self.names)}, got {sorted(columns)}")
        for name, col in columns.items():
            self.parts[name].append(np.asarray(col, dtype=np.float64))

    def extend(self, other: WindowSums) -> None:
        """Append `other`'s windows after these (another rank's, under torchrun)."""
        for name in self.names:
            self.parts[name] += other.parts[name]

    def columns(self) -> Columns:
        return {name: np.concatenate(parts) if parts else np.zeros(0)
                for name, parts in self.parts.items()}


def shared_sums(x_BTD: Tensor, clean_loss_BP: Tensor, zero_loss_BP: Tensor) -> Columns:
    """The coder-independent columns of one batch of windows: x_BTD the site's activations
    [windows, positions, d], the clean and zero-ablation losses [windows, scored positions]."""
    x = x_BTD.detach().double()
    n, t = x.shape[0], x.shape[1]
    return {"tokens": np.full(n, float(t)), "sq_norm": x.pow(2).sum(dim=(1, 2)).cpu().numpy(),
            "sum_x": x.sum(dim=1).cpu().numpy(),
            "positions": np.full(n, float(clean_loss_BP.shape[1])),
            "clean": clean_loss_BP.detach().double().sum(dim=1).cpu().numpy(),
            "zero": zero_loss_BP.detach().double().sum(dim=1).cpu().numpy()}


def coder_sums(x_BTD: Tensor, x_hat_BTD: Tensor, l0_BT: Tensor, loss_BP: Tensor,
               kl_BP: Tensor, gradient_BTD: Tensor | None = None,
               principal_DM: Tensor | None = None) -> Columns:
    """One coder's columns for one batch of windows (shapes as `shared_sums`): with the
    clean loss's gradient at the site, the error's first-order effect on the loss
    g . (x_hat - x); with orthonormal principal directions [d, m], the error's squared norm
    in their span. Columns not computed are NaN."""
    err_BTD = x_hat_BTD.double() - x_BTD.double()
    n = len(err_BTD)
    nan = np.full(n, np.nan)
    attribution = nan if gradient_BTD is None else \
        (err_BTD * gradient_BTD.double()).sum(dim=(1, 2)).cpu().numpy()
    top = nan if principal_DM is None else \
        (err_BTD @ principal_DM.double()).pow(2).sum(dim=(1, 2)).cpu().numpy()
    return {"sq_err": err_BTD.pow(2).sum(dim=(1, 2)).detach().cpu().numpy(),
            "l0_sum": l0_BT.detach().double().sum(dim=1).cpu().numpy(),
            "loss": loss_BP.detach().double().sum(dim=1).cpu().numpy(),
            "kl": kl_BP.detach().double().sum(dim=1).cpu().numpy(),
            "attribution": attribution, "sq_err_top": top}


def save_columns(columns: dict[str, Columns], path: Path) -> None:
    """Every row's columns in one .npz, as `LABEL/COLUMN` arrays (written atomically)."""
    flat = {f"{label}/{name}": col for label, cols in columns.items()
            for name, col in cols.items()}
    atomic_write(path, lambda f: np.savez_compressed(f, **flat))  # type: ignore[arg-type]


def load_columns(path: Path) -> dict[str, Columns]:
    """What `save_columns` wrote."""
    out: dict[str, Columns] = {}
    with np.load(path) as data:
        for key in data.files:
            label, name = key.rsplit("/", 1)
            out.setdefault(label, {})[name] = data[key]
    return out
