"""`saelab synth`: an activation store of synthetic activations, with the truth beside it
(format: `saelab.toys.store`), in OUT/synthetic/; OUT/synth.json records the config, so a
second run into OUT resumes the same data or is refused."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import saelab
from saelab.activations import ActivationStore
from saelab.activations.store import MANIFEST
from saelab.config import to_json
from saelab.errors import SaelabError
from saelab.io import read_json, write_json
from saelab.toys.store import SITE, TRUTH, SyntheticTruth, write_store
from saelab.toys.synthetic import SyntheticSpec

RUN_FILE = "synth.json"


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


def run_synth(cfg: SynthConfig) -> ActivationStore:
    """Generate (or finish generating) the store and its truth; return the store."""
    out = Path(cfg.out).expanduser()
    _check_run(out, cfg)
    if not (out / SITE / MANIFEST).is_file():
        write_store(cfg.spec(), out / SITE, cfg.tokens, dtype=cfg.dtype,
                    shard_tokens=cfg.shard_tokens)
    return ActivationStore(out / SITE)


def synth_summary(store: ActivationStore) -> list[str]:
    """What was written, and how the truth looks."""
    truth = SyntheticTruth.load(store.path)
    return [f"{store.path}: {store.n_tokens} tokens x {store.d_model} ({store.manifest['dtype']})"
            f" from {truth.n_features} true features, mean L0 {float(truth.probability.sum()):.2f}",
            f"  truth: {truth.folder / TRUTH} (directions), codes_*.safetensors (true codes)"]


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
