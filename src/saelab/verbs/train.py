"""`saelab train`: an SAE on an activation store, into a run folder (resumable)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saelab.activations import ActivationStore
from saelab.config import Verb
from saelab.io import read_json
from saelab.reports.training import read_metrics
from saelab.saes import SAE
from saelab.training import TrainConfig, train


@dataclass(frozen=True, kw_only=True)
class TrainCommand(TrainConfig):
    activations: Path
    """Activation store from `saelab cache` (OUT or OUT/SITE); under torchrun each rank reads
    its own part of every batch."""
    out: Path
    """Run folder: config.json, metrics.jsonl, checkpoints, then cfg.json +
    sae_weights.safetensors (SAELens layout). Re-running the same command resumes."""

    def train_config(self) -> TrainConfig:
        return TrainConfig(**{f.name: getattr(self, f.name)
                              for f in dataclasses.fields(TrainConfig)})


@dataclass(frozen=True)
class Trained:
    sae: SAE
    command: TrainCommand
    last: dict[str, Any]
    """The last line of metrics.jsonl."""
    seconds: float
    outcome: dict[str, Any]
    """config.json's `outcome`: the final sparsity coefficient, the run's warnings."""


def run_train(cmd: TrainCommand) -> Trained:
    start = time.perf_counter()
    sae = train(cmd.train_config(), ActivationStore(cmd.activations), cmd.out)
    metrics = cmd.out / "metrics.jsonl"
    lines = read_metrics(metrics) if metrics.is_file() else []
    outcome = read_json(cmd.out / "config.json").get("outcome", {})
    return Trained(sae, cmd, lines[-1] if lines else {}, time.perf_counter() - start, outcome)


def train_summary(result: Trained) -> list[str]:
    cmd, last, nan = result.command, result.last, float("nan")
    coef = result.outcome.get("sparsity_coef")
    steered = (f", sparsity coefficient {coef:.4g}" + (" (steered to L0 "
               f"{cmd.target_l0:g})" if cmd.target_l0 is not None else "")
               if coef is not None else "")
    return [f"{cmd.architecture} SAE, {result.sae.n_latents} latents on {result.sae.site}: FVU "
            f"{last.get('fvu', nan):.4f}, L0 {last.get('l0', nan):.1f}, dead "
            f"{last.get('dead_fraction', nan):.1%} after {cmd.steps} steps{steered} "
            f"({result.seconds:.0f} s) -> {cmd.out}",
            *(f"warning: {w}" for w in result.outcome.get("warnings", []))]


VERB = Verb(TrainCommand, run_train, train_summary, "Train an SAE (relu, topk, batchtopk, "
            "jumprelu, or a registered one) on an activation store; resumable; data-parallel "
            "under torchrun.")
