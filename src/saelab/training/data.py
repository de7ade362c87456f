"""Training data: an activation store or a tensor, read in saelab's one order
(`activations.order`: fixed by seed and epoch, shared by any number of processes)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from saelab.activations import ActivationStore, batch_indices
from saelab.errors import SaelabError


class TrainingData:
    """Rows [n, d_model] from a store (memory-mapped) or a tensor, and their statistics."""

    def __init__(self, source: ActivationStore | Tensor) -> None:
        self.source = source
        if isinstance(source, ActivationStore):
            norm = source.normalisation
            self.n, self.d_model = len(source), source.d_model
            self.mean = torch.tensor(norm["mean"], dtype=torch.float32)
            self.mean_squared_norm = float(norm["mean_squared_norm"])
            self.variance = float(norm["mean_centered_squared_norm"])
        elif isinstance(source, Tensor) and source.dim() == 2:
            x = source.detach().to(torch.float64)
            self.n, self.d_model = x.shape
            self.mean = x.mean(dim=0).float()
            self.mean_squared_norm = float((x * x).sum(dim=1).mean())
            self.variance = float((x - x.mean(dim=0)).pow(2).sum(dim=1).mean())
            if not torch.isfinite(x).all():
                raise SaelabError("training activations hold NaN or inf", expected="finite rows",
                                  found="non-finite values", fix="check the data")
        else:
            raise SaelabError("cannot train on this", expected="an ActivationStore or a tensor "
                              "[tokens, d_model]", found=type(source).__name__,
                              fix="pass saelab.ActivationStore(DIR) or a 2-D tensor")

    @property
    def input_scale(self) -> float:
        """Scale that makes the mean squared distance from the mean d_model (folded into the
        SAE at save). The centred variance, not the mean squared norm: b_dec takes the mean,
        and what the SAE must reconstruct, and so what a sparsity coefficient is weighed
        against, is the rest. In Gemma 3 270M's residual stream the mean is 88 % of the
        squared norm, and a coefficient scaled to the norm was eight times too strong there."""
        return (self.d_model / self.variance) ** 0.5

    def global_batches(self, batch_size: int, seed: int, epoch: int, start: int = 0
                       ) -> Iterator[np.ndarray]:
        """Row indices of each full batch of one epoch, from batch `start` on."""
        return batch_indices(self.n, batch_size, seed=seed, epoch=epoch, start=start)

    def rows(self, index: np.ndarray) -> Tensor:
        if isinstance(self.source, ActivationStore):
            return self.source.rows(index)
        return self.source[torch.from_numpy(index)].float()
