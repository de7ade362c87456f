"""`saelab cache`: activations of a model at one or more sites, into a store per site."""

from __future__ import annotations

import dataclasses
import inspect
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from saelab.activations import ActivationStore, cache_activations
from saelab.config import Verb

# The library function is the one home of the defaults; the flags mirror it.
_DEFAULT = {name: p.default for name, p in inspect.signature(cache_activations).parameters.items()}


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    out: Path
    """Output folder; each site's store goes in OUT/SITE/. Re-running the same command resumes."""
    model: str = _DEFAULT["model"]
    """Model: gemma-3-270m (embedded, offline), a .gguf file, a local Hugging Face folder, or a hub id."""
    site: tuple[str, ...] = tuple(_DEFAULT["sites"])
    """Site to read, as a TransformerLens hook name (`saelab sites MODEL` lists them)."""
    corpus: str = _DEFAULT["corpus"]
    """Text: python-docs (built-in), a .txt/.jsonl/.parquet file or folder, or hf:NAME[:CONFIG][@SPLIT]."""
    text_column: str = _DEFAULT["text_column"]
    """Column holding the text, for .jsonl, .parquet and Hugging Face datasets."""
    tokens: int = _DEFAULT["tokens"]
    """Activation rows to store per site (BOS positions are not counted when excluded)."""
    context_size: int = _DEFAULT["context_size"]
    """Tokens per window, BOS included."""
    batch_size: int = _DEFAULT["batch_size"]
    """Windows per forward pass."""
    dtype: Literal["float32", "float16"] = _DEFAULT["dtype"]
    """Dtype of the stored activations."""
    model_dtype: Literal["float32", "bfloat16", "float16"] = _DEFAULT["model_dtype"]
    """Dtype the model runs in."""
    device: str = _DEFAULT["device"]
    """Device the model runs on (cpu, cuda, cuda:1, ...; under torchrun, cuda is each rank's GPU)."""
    include_bos: bool = _DEFAULT["include_bos"]
    """Store BOS positions too (they are outliers that SAEs are usually not trained on)."""
    shard_tokens: int | None = _DEFAULT["shard_tokens"]
    """Rows per shard, rounded to whole batches (default: about 256 MiB per shard)."""


@dataclass(frozen=True)
class Cached:
    stores: dict[str, ActivationStore]
    seconds: float


def run_cache(cfg: CacheConfig) -> Cached:
    start = time.perf_counter()
    settings = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                if f.name not in ("out", "site")}
    stores = cache_activations(cfg.out, sites=cfg.site, **settings)
    return Cached(stores, time.perf_counter() - start)


def cache_summary(result: Cached) -> list[str]:
    lines = []
    for store in result.stores.values():
        norm, shards = store.normalisation, store.manifest["shards"]
        size = sum((store.path / s["file"]).stat().st_size for s in shards)
        ctx = store.context(len(store) // 2)
        lines += [
            f"{store.path}: {store.n_tokens} tokens x {store.d_model} "
            f"({store.manifest['dtype']}) from {store.model} at {store.site}",
            f"  {len(shards)} shard(s), {size / 2**20:.1f} MiB; {store.manifest['n_windows']} "
            f"windows of {store.context_size} tokens, BOS "
            f"{'excluded' if store.manifest['exclude_bos'] else 'included'}",
            f"  mean squared norm {norm['mean_squared_norm']:.4g}, norm scale "
            f"{norm['norm_scale']:.4g}, centred variance {norm['mean_centered_squared_norm']:.4g}",
            f"  row {len(store) // 2} is token {ctx.position} of window {ctx.window}"]
    return [*lines, f"done in {result.seconds:.1f} s"]


VERB = Verb(CacheConfig, run_cache, cache_summary, "Read activations at sites of a model over "
            "a corpus and store them on disk (resumable).")
