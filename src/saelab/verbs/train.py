"""`saelab train`: an SAE on an activation store, into a run folder (resumable)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from saelab.activations import ActivationStore
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
        fields = TrainConfig.__dataclass_fields__
        return TrainConfig(**{name: getattr(self, name) for name in fields})


def run_train(cmd: TrainCommand) -> SAE:
    return train(cmd.train_config(), ActivationStore(cmd.activations), cmd.out)
