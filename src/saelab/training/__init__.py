"""Training SAEs on an activation store or a tensor, in one process or many (torchrun)."""

from saelab.training.config import TrainConfig
from saelab.training.data import TrainingData
from saelab.training.trainer import SNAPSHOTS, Trainer, train

__all__ = ["SNAPSHOTS", "TrainConfig", "Trainer", "TrainingData", "train"]
