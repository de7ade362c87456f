"""`saelab cache`: corpus -> token windows -> LM forward read at sites -> activation stores.

Resumable: the windows are a deterministic function of the config, shard boundaries fall on
batch boundaries, and a shard is done once its sidecar is written (see `writer`), so a run
killed at any point and started again with the same command ends with the same files as an
uninterrupted run. Under torchrun, rank r computes shards r, r + world, ...; rank 0 writes
the manifests once every rank is done.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from saelab.activations.store import MANIFEST, ActivationStore
from saelab.activations.writer import finalise, shard_done, write_shard
from saelab.corpus import BUILTIN_CORPUS, iter_documents, token_windows
from saelab.distributed import join_world
from saelab.errors import SaelabError
from saelab.io import SAELAB_VERSION, record_run
from saelab.lm import EMBEDDED_MODEL, LanguageModel, load_model

log = logging.getLogger(__name__)
RUN_FILE = "cache.json"
_SHARD_BYTES = 256 << 20  # target shard size


def cache_activations(out: str | Path, *, model: str = EMBEDDED_MODEL,
                      sites: Sequence[str] = ("blocks.6.hook_resid_post",),
                      corpus: str = BUILTIN_CORPUS, text_column: str = "text",
                      tokens: int = 100_000, context_size: int = 128, batch_size: int = 8,
                      dtype: Literal["float32", "float16"] = "float32",
                      model_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
                      device: str = "cpu", include_bos: bool = False,
                      shard_tokens: int | None = None, lm: LanguageModel | None = None
                      ) -> dict[str, ActivationStore]:
    """Cache `tokens` rows of activations of `model` at each of `sites`, read over `corpus`
    in windows of `context_size` tokens (BOS first), into one store per site, OUT/SITE/;
    return the stores. `lm` is `model` already loaded, if you have it.

    OUT/cache.json records the settings and the model's sha256: running again with the
    same ones resumes (or returns at once when done); other settings are refused.
    """
    settings: dict[str, Any] = {
        "model": model, "site": list(sites), "corpus": corpus, "text_column": text_column,
        "tokens": tokens, "context_size": context_size, "batch_size": batch_size,
        "dtype": dtype, "model_dtype": model_dtype, "device": device,
        "include_bos": include_bos, "shard_tokens": shard_tokens}
    _check(settings)
    out = Path(out).expanduser()
    folders = {name: out / name for name in sites}
    if all((f / MANIFEST).is_file() for f in folders.values()) and (out / RUN_FILE).is_file():
        record_run(out / RUN_FILE, settings, what="activations")  # done: no model needed
        return {name: ActivationStore(f) for name, f in folders.items()}
    docs = iter_documents(corpus, text_column=text_column)  # a bad spec fails here, early
    world = join_world(device)
    lm = lm or load_model(model, device=world.device(device), dtype=model_dtype)
    site_list = [lm.site(name) for name in sites]
    record_run(out / RUN_FILE, settings, what="activations",
               inputs={"model_fingerprint": lm.fingerprint()})

    rows_per_window = context_size - (0 if include_bos else 1)
    windows = _windows(corpus, context_size, docs, lm, -(-tokens // rows_per_window))
    n_rows = min(tokens, len(windows) * rows_per_window)
    per_shard = _windows_per_shard(shard_tokens, dtype, batch_size,
                                   max(s.width for s in site_list), rows_per_window)
    n_shards = -(-len(windows) // per_shard)
    todo = [i for i in range(world.rank, n_shards, world.size)
            if not all(shard_done(f, i) for f in folders.values())]

    first = 0 if include_bos else 1
    bar = tqdm(total=len(todo) * per_shard * rows_per_window, unit="tok", desc="cache",
               disable=None, dynamic_ncols=True)
    for i in todo:
        w0, w1 = i * per_shard, min(len(windows), (i + 1) * per_shard)
        parts: dict[str, list[np.ndarray]] = {s.name: [] for s in site_list}
        for b in range(w0, w1, batch_size):
            ids_BT = torch.from_numpy(windows[b:min(b + batch_size, w1)])
            acts = lm.read(ids_BT, list(sites))
            for s in site_list:  # [batch, context - first, width] -> [rows, width]
                parts[s.name].append(acts[s.name][:, first:].reshape(-1, s.width)
                                     .to("cpu", torch.float32).numpy())
            bar.update(ids_BT.numel() - first * len(ids_BT))
        n = min(n_rows, w1 * rows_per_window) - w0 * rows_per_window
        for s in site_list:
            shard = np.concatenate(parts[s.name])[:n].astype(dtype)
            write_shard(folders[s.name], i, shard, s.name, w0)
    bar.close()

    world.barrier()
    if world.is_main:
        for s in site_list:
            finalise(folders[s.name], n_shards, windows, _header(settings, lm, s.name, s.width))
    world.barrier()
    return {name: ActivationStore(f) for name, f in folders.items()}


def _check(settings: dict[str, Any]) -> None:
    for name in ("tokens", "context_size", "batch_size"):
        if settings[name] < 1:
            flag = "--" + name.replace("_", "-")
            raise SaelabError(f"{name} ({flag}) must be positive", expected="an integer >= 1",
                              found=f"{name}={settings[name]}", fix=f"pass {flag} 1 or more")
    if settings["context_size"] < 2:
        raise SaelabError("context_size must hold BOS and at least one token",
                          expected=">= 2", found=str(settings["context_size"]),
                          fix="pass a context size of 2 or more")
    sites = settings["site"]
    if not sites or len(set(sites)) != len(sites):
        raise SaelabError("sites must be distinct, and at least one",
                          expected="distinct site names", found=", ".join(sites) or "none",
                          fix="name each site once")


def _windows(corpus: str, context_size: int, docs: Iterator[str], lm: LanguageModel,
             n_windows: int) -> np.ndarray:
    """[n_windows, context_size] token ids, or as many as the corpus holds."""
    windows = list(itertools.islice(
        token_windows(docs, lm.tokenizer, context_size, lm.bos_token_id), n_windows))
    if not windows:
        raise SaelabError(f"corpus {corpus} gave no window of {context_size} tokens",
                          expected="at least one full window", found="too little text",
                          fix="use a larger corpus or a smaller --context-size")
    if len(windows) < n_windows:
        log.warning("corpus %s holds only %d windows of %d tokens; caching those (asked for %d)",
                    corpus, len(windows), context_size, n_windows)
    return np.stack(windows)


def _windows_per_shard(shard_tokens: int | None, dtype: str, batch_size: int, width: int,
                       rows_per_window: int) -> int:
    """Whole batches of windows per shard: shard boundaries on batch boundaries."""
    rows = shard_tokens or _SHARD_BYTES // (width * np.dtype(dtype).itemsize)
    return max(1, rows // (rows_per_window * batch_size)) * batch_size


def _header(settings: dict[str, Any], lm: LanguageModel, site: str, width: int
            ) -> dict[str, Any]:
    return {
        "model": settings["model"],
        "model_type": lm.hf_model.config.model_type,
        "model_fingerprint": lm.fingerprint(),
        "site": site,
        "d_model": width,
        "dtype": settings["dtype"],
        "model_dtype": settings["model_dtype"],
        "context_size": settings["context_size"],
        "exclude_bos": not settings["include_bos"],
        "bos_token_id": lm.bos_token_id,
        "corpus": settings["corpus"],
        "text_column": settings["text_column"],
        "saelab_version": SAELAB_VERSION,
    }
