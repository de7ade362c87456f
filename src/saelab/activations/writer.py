"""Writing one site's store: shards with checksummed sidecars, then the manifest.

Each shard is written atomically and followed by a sidecar `acts_NNNNN.json` holding its
sha256, row count and float64 sums for the normalisation statistics. A shard counts as done
only when its sidecar exists, so a run killed at any instant resumes by redoing at most the
shard it was in; the manifest is written last, from the sidecars, so the same shards always
give the same manifest whether or not the run was interrupted, and whichever rank wrote them.
"""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path
from typing import Any

import numpy as np

from saelab.activations.store import FORMAT, MANIFEST, TOKENS, record_verified, shard_name
from saelab.errors import SaelabError
from saelab.io import atomic_write, read_json, write_json


def _sidecar(folder: Path, index: int) -> Path:
    return folder / shard_name(index).replace(".npy", ".json")


def shard_done(folder: Path, index: int) -> bool:
    sidecar, shard = _sidecar(folder, index), folder / shard_name(index)
    return sidecar.is_file() and shard.is_file() and \
        shard.stat().st_size == read_json(sidecar)["bytes"]


def write_shard(folder: Path, index: int, acts: np.ndarray, site: str, first_window: int) -> None:
    """Write shard `index` [rows, d_model] and then its sidecar; refuse non-finite values."""
    finite = np.isfinite(acts).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise SaelabError(
            f"non-finite activations (NaN or inf) at site {site}",
            expected="finite values", found=f"shard {index}, row {row} (windows from "
            f"{first_window})", fix="use --model-dtype float32 (half precision can overflow), or "
            "check the model's weights",
        )
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(acts))
    data = buf.getvalue()
    atomic_write(folder / shard_name(index), lambda f: f.write(data))
    acts64 = acts.astype(np.float64)
    write_json(_sidecar(folder, index), {
        "rows": len(acts), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
        "sum": acts64.sum(0).tolist(), "sum_squared_norm": float((acts64 ** 2).sum()),
    })


def finalise(folder: Path, n_shards: int, tokens: np.ndarray, header: dict[str, Any]) -> None:
    """Write the token ids and the manifest of a store whose shards are all done."""
    sidecars = [read_json(_sidecar(folder, i)) for i in range(n_shards)]
    n_rows = sum(s["rows"] for s in sidecars)
    total = np.array([s["sum"] for s in sidecars], dtype=np.float64).sum(axis=0)  # [d_model]
    mean = total / n_rows
    mean_sq = sum(s["sum_squared_norm"] for s in sidecars) / n_rows
    d_model = len(mean)
    buf = io.BytesIO()
    np.save(buf, tokens.astype(np.int32))
    atomic_write(folder / TOKENS, lambda f: f.write(buf.getvalue()))
    write_json(folder / MANIFEST, {
        "format": FORMAT,
        **header,
        "n_tokens": n_rows,
        "n_windows": len(tokens),
        "tokens_file": TOKENS,
        "shards": [{"file": shard_name(i), "rows": s["rows"], "sha256": s["sha256"]}
                   for i, s in enumerate(sidecars)],
        "normalisation": {
            # x * norm_scale has mean squared norm d_model (SAELens's expected_average_only_in)
            "norm_scale": float(np.sqrt(d_model / mean_sq)),
            "mean_squared_norm": mean_sq,
            # the FVU denominator per token: E||x - mean||^2
            "mean_centered_squared_norm": float(mean_sq - mean @ mean),
            "mean": mean.tolist(),
        },
        "python": sys.version.split()[0],
    })
    # the bytes of each shard were hashed as they were written: no need to read them again
    record_verified(folder, {shard_name(i): s["sha256"] for i, s in enumerate(sidecars)})
    for i in range(n_shards):
        _sidecar(folder, i).unlink()
    for stale in folder.glob(".*.tmp"):  # a killed run's half-written file (every rank is done)
        stale.unlink(missing_ok=True)
