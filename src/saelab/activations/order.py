"""The one order in which saelab reads rows: training and `ActivationStore.batches` share it.

The order is a property of (seed, epoch) alone, never of the number of processes: a global
batch is a list of row indices, and each process reads its own slice of it
(`World.slice`). So a run under torchrun sees exactly the rows one process sees, and a
resumed run can skip to any batch without reading the rows it skips.

Shuffled: blocks of BLOCK_ROWS contiguous rows in a seeded random order (reads stay mostly
sequential), then the rows shuffled inside each run of WINDOW_ROWS rows (at least a batch).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

BLOCK_ROWS = 1024
WINDOW_ROWS = 64 * BLOCK_ROWS


def batch_indices(n_rows: int, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                  epoch: int = 0, drop_last: bool = True, start: int = 0
                  ) -> Iterator[np.ndarray]:
    """Row indices [batch_size] of each batch of one pass over `n_rows` rows, from batch
    `start` on; without `drop_last`, a last shorter batch holds the rows left over."""
    if shuffle:
        rng = np.random.default_rng([seed, epoch])
        n_blocks = -(-n_rows // BLOCK_ROWS)
        index = (rng.permutation(n_blocks)[:, None] * BLOCK_ROWS + np.arange(BLOCK_ROWS)).ravel()
        index = index[index < n_rows]
        window = max(batch_size, WINDOW_ROWS)
        for at in range(0, len(index), window):
            rng.shuffle(index[at:at + window])
    else:
        index = np.arange(n_rows)
    n_batches = len(index) // batch_size if drop_last else -(-len(index) // batch_size)
    for b in range(start, n_batches):
        yield index[b * batch_size:(b + 1) * batch_size]
