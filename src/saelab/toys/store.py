"""Synthetic data on disk: an activation store in `saelab cache`'s format, the truth beside it.

The store is written with the same writer as `saelab cache` (so `ActivationStore`, `saelab
train` and `saelab decompose` read it unchanged). There is no text behind a synthetic row, so
each row is its own window of one token whose id is -1 (`model` and `site` are
"synthetic"); a row traces back to its true code instead:

    FOLDER/manifest.json        the store's manifest, plus the spec under "synthetic"
    FOLDER/acts_*.npy           activations, as from `saelab cache`
    FOLDER/truth.safetensors    directions [n_features, d_model], probability [n_features]
                                (marginal firing rate), parent [n_features] (-1: none)
    FOLDER/codes_*.safetensors  the true codes of each shard's rows (a `SparseCode` file)

Shards are generated from (seed, shard index) alone, so a killed run resumes exactly.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save
from tqdm.auto import tqdm

from saelab.activations.store import MANIFEST, resolve_store_dir
from saelab.activations.writer import finalise, shard_done, write_shard
from saelab.coding import SparseCode
from saelab.errors import SaelabError
from saelab.io import SAELAB_VERSION, atomic_write, read_json, read_safetensors, to_json
from saelab.toys.synthetic import (
    SyntheticSpec,
    feature_directions,
    firing_probability,
    parents,
    sample,
    seeded,
)

SITE = "synthetic"
TRUTH = "truth.safetensors"
_SHARD_BYTES = 256 << 20
_CHUNK = 8192  # rows generated at once


@dataclass(frozen=True)
class SyntheticTruth:
    """What generated a synthetic store: the true features, and the true code of each row."""

    directions: torch.Tensor  # [n_features, d_model] unit rows
    probability: torch.Tensor  # [n_features] marginal firing probability
    parent: torch.Tensor  # [n_features] int64, -1 for none
    folder: Path
    shards: list[dict[str, Any]]  # the manifest's shard entries, for the codes' row ranges

    @staticmethod
    def load(path: str | Path) -> SyntheticTruth:
        """The truth of a store written by `saelab synth` (OUT or OUT/synthetic)."""
        folder = resolve_store_dir(Path(path), SITE)
        manifest = read_json(folder / MANIFEST)
        if "synthetic" not in manifest:
            raise SaelabError(f"{folder} holds no synthetic ground truth",
                              expected="a store written by `saelab synth`",
                              found=f"activations of {manifest.get('model')}",
                              fix="generate one with `saelab synth --out DIR`")
        t = read_safetensors(folder / TRUTH)
        absent = [key for key in ("directions", "probability", "parent") if key not in t]
        if absent:
            raise SaelabError(f"{folder / TRUTH} lacks tensors of the truth",
                              expected="directions, probability, parent",
                              found=", ".join(sorted(t)) or "no tensors",
                              fix="generate the store again with `saelab synth`")
        return SyntheticTruth(t["directions"], t["probability"], t["parent"], folder,
                              manifest["shards"])

    @property
    def n_features(self) -> int:
        return self.directions.shape[0]

    def codes(self, start: int, stop: int) -> SparseCode:
        """True codes of rows [start, stop), read from the shards that hold them."""
        parts, offset = [], 0
        for i, entry in enumerate(self.shards):
            lo, hi = max(start - offset, 0), min(stop - offset, entry["rows"])
            if lo < hi:
                parts.append(SparseCode.load(self.folder / _codes_name(i))[lo:hi])
            offset += entry["rows"]
        return SparseCode.cat(parts)


def _codes_name(index: int) -> str:
    return f"codes_{index:05d}.safetensors"


def write_store(spec: SyntheticSpec, folder: Path, tokens: int, *, dtype: str = "float32",
                shard_tokens: int | None = None) -> None:
    """Generate `tokens` rows of `spec` into the store `folder`, skipping finished shards."""
    directions_FD, p_F = feature_directions(spec), firing_probability(spec)
    truth = save({"directions": directions_FD, "probability": p_F, "parent": parents(spec)})
    atomic_write(folder / TRUTH, lambda f: f.write(truth))
    per_shard = shard_tokens or max(_SHARD_BYTES // (spec.d_model * np.dtype(dtype).itemsize), 1)
    n_shards = -(-tokens // per_shard)
    with tqdm(total=tokens, unit="tok", desc="synth", disable=None) as bar:
        for i in range(n_shards):
            rows = min(per_shard, tokens - i * per_shard)
            if not shard_done(folder, i):
                gen = seeded(spec.seed, 1, i)
                parts = [sample(spec, directions_FD, p_F, min(_CHUNK, rows - j), gen)
                         for j in range(0, rows, _CHUNK)]
                SparseCode.cat([c for _, c in parts]).save(folder / _codes_name(i))
                acts = torch.cat([x for x, _ in parts]).numpy().astype(dtype)
                write_shard(folder, i, acts, SITE, i * per_shard)
            bar.update(rows)
    finalise(folder, n_shards, np.full((tokens, 1), -1, dtype=np.int32), _header(spec, dtype))


def _header(spec: SyntheticSpec, dtype: str) -> dict[str, Any]:
    described = to_json(spec)
    return {
        "model": SITE, "model_type": SITE,
        # the spec determines the directions and every row: its hash stands for the weights'
        "model_fingerprint": hashlib.sha256(json.dumps(described, sort_keys=True).encode())
        .hexdigest(),
        "site": SITE, "d_model": spec.d_model, "dtype": dtype, "model_dtype": "float32",
        "context_size": 1, "exclude_bos": False, "bos_token_id": None,
        "corpus": SITE, "text_column": None, "saelab_version": SAELAB_VERSION,
        "synthetic": described,
    }
