"""`saelab synth`: an activation store of synthetic activations, with the truth beside it.

The store is the one `saelab cache` writes (the same writer, so `ActivationStore`, `saelab
train` and `saelab decompose` read it unchanged), in OUT/synthetic/. There is no text behind
a synthetic row, so each row is its own window of one token whose id is -1 (`model` and
`site` are "synthetic"); a row traces back to its true code instead:

    OUT/synth.json                 the config (a second run into OUT resumes it or is refused)
    OUT/synthetic/manifest.json    the store's manifest, plus the config under "synthetic"
    OUT/synthetic/acts_*.npy       activations, as from `saelab cache`
    OUT/synthetic/truth.safetensors  directions [n_features, d_model], firing probability
                                   [n_features], parent [n_features] (-1: none)
    OUT/synthetic/codes_*.safetensors  true codes of each shard's rows (a `SparseCode` file)

Shards are generated from (seed, shard index) alone, so a killed run resumes exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

import saelab
from saelab.activations import ActivationStore
from saelab.activations.store import MANIFEST, resolve_store_dir
from saelab.activations.writer import finalise, shard_done, write_shard
from saelab.coding import SparseCode
from saelab.config import to_json
from saelab.errors import SaelabError
from saelab.io import atomic_write, read_json, write_json
from saelab.toys.synthetic import (
    SyntheticSpec,
    feature_directions,
    firing_probability,
    parents,
    sample,
    seeded,
)

SITE = "synthetic"
RUN_FILE = "synth.json"
TRUTH = "truth.safetensors"
_SHARD_BYTES = 256 << 20
_CHUNK = 8192  # rows generated at once


@dataclass(frozen=True, kw_only=True)
class SynthConfig(SyntheticSpec):
    out: Path
    """Output folder: the store goes in OUT/synthetic/ with the true directions and codes."""
    tokens: int = 100_000
    """Rows (tokens) to generate."""
    dtype: Literal["float32", "float16"] = "float32"
    """Dtype of the stored activations."""
    shard_tokens: int | None = None
    """Rows per shard (default: about 256 MiB per shard)."""

    def spec(self) -> SyntheticSpec:
        return SyntheticSpec(**{f.name: getattr(self, f.name)
                                for f in dataclasses.fields(SyntheticSpec)})


@dataclass(frozen=True)
class SyntheticTruth:
    """What generated a synthetic store."""

    directions: torch.Tensor  # [n_features, d_model] unit rows
    probability: torch.Tensor  # [n_features] marginal firing probability
    parent: torch.Tensor  # [n_features] int64, -1 for none
    folder: Path
    shards: list[dict]  # the manifest's shard entries, for the codes' row ranges

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
        t = load_file(str(folder / TRUTH))
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


def run_synth(cfg: SynthConfig) -> ActivationStore:
    """Generate (or finish generating) the store and its truth; return the store."""
    out = Path(cfg.out).expanduser()
    folder = out / SITE
    _check_run(out, cfg)
    if (folder / MANIFEST).is_file():
        return ActivationStore(folder)
    spec = cfg.spec()
    directions_FD, p_F = feature_directions(spec), firing_probability(spec)
    truth = save({"directions": directions_FD, "probability": p_F, "parent": parents(spec)})
    atomic_write(folder / TRUTH, lambda f: f.write(truth))
    per_shard = cfg.shard_tokens or max(_SHARD_BYTES // (cfg.d_model * np.dtype(cfg.dtype)
                                                         .itemsize), 1)
    n_shards = -(-cfg.tokens // per_shard)
    with tqdm(total=cfg.tokens, unit="tok", desc="synth", disable=None) as bar:
        for i in range(n_shards):
            rows = min(per_shard, cfg.tokens - i * per_shard)
            if not shard_done(folder, i):
                gen = seeded(cfg.seed, 1, i)
                parts = [sample(spec, directions_FD, p_F, min(_CHUNK, rows - j), gen)
                         for j in range(0, rows, _CHUNK)]
                SparseCode.cat([c for _, c in parts]).save(folder / _codes_name(i))
                acts = torch.cat([x for x, _ in parts]).numpy().astype(cfg.dtype)
                write_shard(folder, i, acts, SITE, i * per_shard)
            bar.update(rows)
    finalise(folder, n_shards, np.full((cfg.tokens, 1), -1, dtype=np.int32), _header(cfg))
    return ActivationStore(folder)


def _header(cfg: SynthConfig) -> dict:
    return {
        "model": SITE, "model_type": SITE,
        "model_fingerprint": _fingerprint(cfg),
        "site": SITE, "d_model": cfg.d_model, "dtype": cfg.dtype, "model_dtype": "float32",
        "context_size": 1, "exclude_bos": False, "bos_token_id": None,
        "corpus": SITE, "text_column": None, "saelab_version": saelab.__version__,
        "synthetic": to_json(cfg.spec()),
    }


def _fingerprint(cfg: SynthConfig) -> str:
    """sha256 of the generating spec: it determines the directions and every row."""
    return hashlib.sha256(json.dumps(to_json(cfg.spec()), sort_keys=True).encode()).hexdigest()


def _check_run(out: Path, cfg: SynthConfig) -> None:
    """Record the config in OUT/synth.json, or refuse to mix two configs in one folder."""
    asked = {k: v for k, v in to_json(cfg).items() if k != "out"}
    run_file = out / RUN_FILE
    if not run_file.is_file():
        write_json(run_file, {"config": asked, "saelab_version": saelab.__version__})
        return
    recorded = read_json(run_file)["config"]
    diff = {k: (recorded.get(k), v) for k, v in asked.items() if recorded.get(k) != v}
    if diff:
        raise SaelabError(f"{out} holds synthetic data made with another config",
                          expected="; ".join(f"{k}={new}" for k, (_, new) in diff.items()),
                          found="; ".join(f"{k}={old}" for k, (old, _) in diff.items()),
                          fix="use another --out, or delete the folder to start over")


def synth_summary(store: ActivationStore) -> list[str]:
    """What was written, and how the truth looks."""
    truth = SyntheticTruth.load(store.path)
    return [f"{store.path}: {store.n_tokens} tokens x {store.d_model} ({store.manifest['dtype']})"
            f" from {truth.n_features} true features, mean L0 {float(truth.probability.sum()):.2f}",
            f"  truth: {truth.folder / TRUTH} (directions), codes_*.safetensors (true codes)"]
