"""Training data: an activation store or a tensor, read in a fixed order any process count
shares.

The order is a property of (seed, epoch), not of the number of processes: a global batch is
a list of row indices, and rank r of w reads rows [r*B/w, (r+1)*B/w) of it. So a run under
torchrun sees exactly the rows a single process sees, and a resumed run can skip to any step
without reading the rows it skips.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from saelab.activations import ActivationStore
from saelab.errors import SaelabError

_BLOCK = 1024  # rows kept contiguous when shuffling a store (sequential reads)


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
    def norm_scale(self) -> float:
        """Scale that makes the mean squared norm d_model (folded into the SAE at save)."""
        return (self.d_model / self.mean_squared_norm) ** 0.5

    def global_batches(self, batch_size: int, seed: int, epoch: int) -> Iterator[np.ndarray]:
        """Row indices of each full batch of one epoch: blocks of rows in a seeded order,
        rows shuffled within each run of batches."""
        rng = np.random.default_rng([seed, epoch])
        n_blocks = -(-self.n // _BLOCK)
        index = (rng.permutation(n_blocks)[:, None] * _BLOCK + np.arange(_BLOCK)).ravel()
        index = index[index < self.n]
        window = max(batch_size, 64 * _BLOCK)  # shuffle rows inside windows of this many
        for start in range(0, len(index), window):
            rng.shuffle(index[start:start + window])
        for b in range(len(index) // batch_size):
            yield index[b * batch_size:(b + 1) * batch_size]

    def rows(self, index: np.ndarray) -> Tensor:
        if isinstance(self.source, ActivationStore):
            return self.source.rows(index)
        return self.source[torch.from_numpy(index)].float()
