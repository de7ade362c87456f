"""`saelab cache`: corpus -> token windows -> LM forward read at sites -> activation stores.

Resumable: the windows are a deterministic function of the config, shard boundaries fall on
batch boundaries, and a shard is done once its sidecar is written (see `writer`), so a run
killed at any point and started again with the same command ends with the same files as an
uninterrupted run. Under torchrun, rank r computes shards r, r + world, ...; rank 0 writes
the manifests once every rank is done.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

import saelab
from saelab.activations.store import MANIFEST, ActivationStore
from saelab.activations.writer import finalise, shard_done, write_shard
from saelab.config import to_json
from saelab.corpus import BUILTIN_CORPUS, iter_documents, token_windows
from saelab.errors import SaelabError
from saelab.io import read_json, write_json
from saelab.lm import EMBEDDED_MODEL, LanguageModel, load_model

log = logging.getLogger(__name__)
RUN_FILE = "cache.json"
_SHARD_BYTES = 256 << 20  # target shard size


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    out: Path
    """Output folder; each site's store goes in OUT/SITE/. Re-running the same command resumes."""
    model: str = EMBEDDED_MODEL
    """Model: gemma-3-270m (embedded, offline), a .gguf file, a local Hugging Face folder, or a hub id."""
    site: tuple[str, ...] = ("blocks.6.hook_resid_post",)
    """Site to read, as a TransformerLens hook name (`saelab sites MODEL` lists them)."""
    corpus: str = BUILTIN_CORPUS
    """Text: python-docs (built-in), a .txt/.jsonl/.parquet file or folder, or hf:NAME[:CONFIG][@SPLIT]."""
    text_column: str = "text"
    """Column holding the text, for .jsonl, .parquet and Hugging Face datasets."""
    tokens: int = 100_000
    """Activation rows to store per site (BOS positions are not counted when excluded)."""
    context_size: int = 128
    """Tokens per window, BOS included."""
    batch_size: int = 8
    """Windows per forward pass."""
    dtype: Literal["float32", "float16"] = "float32"
    """Dtype of the stored activations."""
    model_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the model runs in."""
    device: str = "cpu"
    """Device the model runs on (cpu, cuda, cuda:1, ...)."""
    include_bos: bool = False
    """Store BOS positions too (they are outliers that SAEs are usually not trained on)."""
    shard_tokens: int | None = None
    """Rows per shard, rounded to whole batches (default: about 256 MiB per shard)."""

    def __post_init__(self) -> None:
        for name in ("tokens", "context_size", "batch_size"):
            if getattr(self, name) < 1:
                raise SaelabError(f"--{name.replace('_', '-')} must be positive",
                                  expected="an integer >= 1", found=str(getattr(self, name)))
        if self.context_size < 2:
            raise SaelabError("--context-size must hold BOS and at least one token",
                              expected=">= 2", found=str(self.context_size))
        if len(set(self.site)) != len(self.site):
            raise SaelabError("a site is given twice", expected="distinct --site values",
                              found=", ".join(self.site))


def cache_activations(cfg: CacheConfig, lm: LanguageModel | None = None
                      ) -> dict[str, ActivationStore]:
    """Cache the activations of `cfg.site` and return one store per site."""
    out = Path(cfg.out).expanduser()
    folders = {name: out / name for name in cfg.site}
    if all((f / MANIFEST).is_file() for f in folders.values()) and (out / RUN_FILE).is_file():
        _check_run(out, cfg, fingerprint=None)
        return {name: ActivationStore(f) for name, f in folders.items()}
    docs = iter_documents(cfg.corpus, text_column=cfg.text_column)  # a bad spec fails here, early
    lm = lm or load_model(cfg.model, device=cfg.device, dtype=cfg.model_dtype)
    sites = [lm.site(name) for name in cfg.site]
    _check_run(out, cfg, fingerprint=lm.fingerprint())
    rank, world = _distributed()

    rows_per_window = cfg.context_size - (0 if cfg.include_bos else 1)
    tokens = _windows(cfg, docs, lm, -(-cfg.tokens // rows_per_window))  # [n_windows, context]
    n_rows = min(cfg.tokens, len(tokens) * rows_per_window)
    per_shard = _windows_per_shard(cfg, max(s.width for s in sites), rows_per_window)
    n_shards = -(-len(tokens) // per_shard)
    todo = [i for i in range(rank, n_shards, world)
            if not all(shard_done(f, i) for f in folders.values())]

    first = 0 if cfg.include_bos else 1
    bar = tqdm(total=len(todo) * per_shard * rows_per_window, unit="tok", desc="cache",
               disable=None, dynamic_ncols=True)
    for i in todo:
        w0, w1 = i * per_shard, min(len(tokens), (i + 1) * per_shard)
        parts: dict[str, list[np.ndarray]] = {s.name: [] for s in sites}
        for b in range(w0, w1, cfg.batch_size):
            ids = torch.from_numpy(tokens[b:min(b + cfg.batch_size, w1)])  # [batch, context]
            acts = lm.read(ids, cfg.site)
            for s in sites:  # [batch, context - first, width] -> [rows, width]
                parts[s.name].append(acts[s.name][:, first:].reshape(-1, s.width)
                                     .to("cpu", torch.float32).numpy())
            bar.update(ids.numel() - first * len(ids))
        n = min(n_rows, w1 * rows_per_window) - w0 * rows_per_window
        for s in sites:
            shard = np.concatenate(parts[s.name])[:n].astype(cfg.dtype)
            write_shard(folders[s.name], i, shard, s.name, w0)
    bar.close()

    _barrier(world)
    if rank == 0:
        for s in sites:
            finalise(folders[s.name], n_shards, tokens, _header(cfg, lm, s.name, s.width))
    _barrier(world)
    return {name: ActivationStore(f) for name, f in folders.items()}


def _windows(cfg: CacheConfig, docs: Iterator[str], lm: LanguageModel, n_windows: int
             ) -> np.ndarray:
    windows = list(itertools.islice(
        token_windows(docs, lm.tokenizer, cfg.context_size, lm.bos_token_id), n_windows))
    if not windows:
        raise SaelabError(f"corpus {cfg.corpus} gave no window of {cfg.context_size} tokens",
                          expected="at least one full window", found="too little text",
                          fix="use a larger corpus or a smaller --context-size")
    if len(windows) < n_windows:
        log.warning("corpus %s holds only %d windows of %d tokens; caching those (asked for %d)",
                    cfg.corpus, len(windows), cfg.context_size, n_windows)
    return np.stack(windows)


def _windows_per_shard(cfg: CacheConfig, width: int, rows_per_window: int) -> int:
    rows = cfg.shard_tokens or _SHARD_BYTES // (width * np.dtype(cfg.dtype).itemsize)
    batches = max(1, rows // (rows_per_window * cfg.batch_size))
    return batches * cfg.batch_size


def _check_run(out: Path, cfg: CacheConfig, fingerprint: str | None) -> None:
    """Record the run's config in OUT/cache.json, or refuse to mix two runs in one folder."""
    asked = {k: v for k, v in to_json(cfg).items() if k != "out"}
    run_file = out / RUN_FILE
    if not run_file.is_file():
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        write_json(run_file, {"config": asked, "model_fingerprint": fingerprint,
                              "started": stamp, "saelab_version": saelab.__version__})
        return
    recorded = read_json(run_file)
    diff = {k: (recorded["config"].get(k), v) for k, v in asked.items()
            if recorded["config"].get(k) != v}
    if fingerprint is not None and recorded["model_fingerprint"] != fingerprint:
        diff["model weights (sha256)"] = (recorded["model_fingerprint"], fingerprint)
    if diff:
        raise SaelabError(
            f"{out} holds activations cached with another config",
            expected="; ".join(f"{k}={new}" for k, (_, new) in diff.items()),
            found="; ".join(f"{k}={old}" for k, (old, _) in diff.items()),
            fix="use another --out, or delete the folder to start over",
        )


def _header(cfg: CacheConfig, lm: LanguageModel, site: str, width: int) -> dict:
    return {
        "model": cfg.model,
        "model_type": lm.hf_model.config.model_type,
        "model_fingerprint": lm.fingerprint(),
        "site": site,
        "d_model": width,
        "dtype": cfg.dtype,
        "model_dtype": cfg.model_dtype,
        "context_size": cfg.context_size,
        "exclude_bos": not cfg.include_bos,
        "bos_token_id": lm.bos_token_id,
        "corpus": cfg.corpus,
        "text_column": cfg.text_column,
        "saelab_version": saelab.__version__,
    }


def _distributed() -> tuple[int, int]:
    """(rank, world size): from torch.distributed when launched by torchrun, else (0, 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=24))
    return dist.get_rank(), dist.get_world_size()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
