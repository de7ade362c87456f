"""`saelab synth`: an activation store of synthetic activations, with the truth beside it
(format: `saelab.toys.store`), in OUT/synthetic/; OUT/synth.json records the config, so a
second run into OUT resumes the same data or is refused."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from saelab.activations import ActivationStore
from saelab.activations.store import MANIFEST
from saelab.config import Verb
from saelab.io import record_run, to_json
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
    record_run(out / RUN_FILE, {k: v for k, v in to_json(cfg).items() if k != "out"},
               what="synthetic data")
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


VERB = Verb(SynthConfig, run_synth, synth_summary, "Write an activation store of synthetic "
            "activations built from known feature directions, with the truth.")
