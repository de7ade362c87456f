"""Training SAEs on an activation store or a tensor, in one process or many (torchrun)."""

from saelab.training.config import TrainConfig
from saelab.training.trainer import train

__all__ = ["TrainConfig", "train"]
