"""`saelab toy width-sweep`: SAEs of growing width on a synthetic store, scored against the
true features, to see whether the SAE converges to them (a jump in recovery near the true
number of features would say it does).

Each width's SAE is trained into RUN/latents_<width>/ (so a killed sweep resumes), then scored:
direction recovery of its dictionary, and support precision/recall of its encoder and of
gradient pursuit on its dictionary, on the store's first --eval-tokens rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saelab.activations import ActivationStore
from saelab.coding import Coder
from saelab.config import Verb
from saelab.errors import SaelabError
from saelab.io import to_json, write_json
from saelab.saes import architecture
from saelab.toys.plots import plot_width_sweep
from saelab.toys.recovery import RECOVERED_COSINE, direction_recovery, support_scores
from saelab.toys.store import SyntheticTruth
from saelab.training import TrainConfig, train


@dataclass(frozen=True, kw_only=True)
class WidthSweepConfig:
    activations: Path
    """Synthetic store from `saelab synth` (OUT or OUT/synthetic)."""
    out: Path
    """Run folder: one SAE per width in latents_<width>/, results.json, recovery.png/.svg."""
    widths: tuple[int, ...] | None = None
    """SAE widths (latents); default: the true feature count times 1/8, 1/4, ..., 4."""
    architecture: str = "topk"
    """SAE architecture: relu, topk, batchtopk, jumprelu, or one registered with
    saelab.register_architecture."""
    k: int | None = None
    """Active latents per token for the SAE and for gradient pursuit (default: the data's
    mean number of active features, rounded)."""
    tokens: int = 3_000_000
    """Training tokens per SAE (the store is re-read when shorter)."""
    batch_size: int = 1024
    """Rows per optimiser step."""
    eval_tokens: int = 4096
    """Rows scored against their true codes."""
    threshold: float = RECOVERED_COSINE
    """Cosine above which a latent counts as a true feature's direction."""
    seed: int = 0
    """Seed of the SAEs' initialisation and data order."""
    device: str = "cpu"
    """Device to train and code on."""


def run_width_sweep(cfg: WidthSweepConfig) -> dict[str, Any]:
    """Train and score one SAE per width; write results.json and the recovery plot."""
    store, truth = ActivationStore(cfg.activations), SyntheticTruth.load(cfg.activations)
    n = truth.n_features
    widths = cfg.widths or tuple(max(n * f // 8, 1) for f in (1, 2, 4, 8, 16, 32))
    k = cfg.k or max(round(float(truth.probability.sum())), 1)
    takes_k = "k" in architecture(cfg.architecture).hyperparameter_names
    if takes_k and any(w <= k for w in widths):
        raise SaelabError("every width must exceed k", expected=f"widths > k={k}",
                          found=", ".join(map(str, widths)), fix="drop the small widths")
    write_json(cfg.out / "config.json", to_json(cfg))
    n_eval = min(cfg.eval_tokens, len(store))
    x = store[:n_eval].to(cfg.device)
    true = truth.codes(0, n_eval)
    rows = []
    for width in widths:
        sae = train(TrainConfig(architecture=cfg.architecture, n_latents=width, k=k,
                                       tokens=cfg.tokens, batch_size=cfg.batch_size,
                                       seed=cfg.seed, device=cfg.device),
                           store, cfg.out / f"latents_{width}")
        rec = direction_recovery(truth.directions, sae.W_dec, cfg.threshold)
        scores = {name: support_scores(true, Coder(sae, method, k=kk)(x), n, rec.latent_feature)
                  for name, method, kk in (("encoder", "encoder", None), ("gp", "gp", k))}
        rows.append({"width": width, "mean_max_cosine": rec.mean_max_cosine,
                     "fraction_recovered": rec.fraction_recovered,
                     "fraction_latents_matched": rec.fraction_latents_matched,
                     **{f"{name}_{part}": getattr(s, part) for name, s in scores.items()
                        for part in ("precision", "recall")}})
    series = {"mean max cosine": "mean_max_cosine",
              f"features recovered (cos > {cfg.threshold:g})": "fraction_recovered",
              "latents matching a feature": "fraction_latents_matched",
              "support recall, encoder": "encoder_recall", "support recall, gp": "gp_recall"}
    plot_width_sweep(widths, {label: [r[key] for r in rows] for label, key in series.items()},
                     n, cfg.out / "recovery")
    results = {"n_features": n, "k": k, "widths": rows}
    write_json(cfg.out / "results.json", results)
    return results


def width_sweep_summary(results: dict[str, Any]) -> list[str]:
    """One line per width: direction recovery and support recall."""
    lines = [f"{results['n_features']} true features, k {results['k']}",
             f"{'width':>7} {'MMCS':>6} {'recovered':>9} {'matched':>8} {'enc P/R':>11} "
             f"{'gp P/R':>11}"]
    lines += [f"{r['width']:>7} {r['mean_max_cosine']:>6.3f} {r['fraction_recovered']:>9.3f} "
              f"{r['fraction_latents_matched']:>8.3f} {r['encoder_precision']:>5.2f}/"
              f"{r['encoder_recall']:<5.2f} {r['gp_precision']:>5.2f}/{r['gp_recall']:<5.2f}"
              for r in results["widths"]]
    return lines


VERB = Verb(WidthSweepConfig, run_width_sweep, width_sweep_summary, "Train SAEs of growing width "
            "on a `saelab synth` store; plot how many true features they recover.")
