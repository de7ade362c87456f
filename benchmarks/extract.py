"""Extraction benchmark: how close saelab gets to the FLOP and byte floors, and to its peers.

One run measures, on Gemma 3 270M (the embedded default) at `blocks.6.hook_resid_post`, with
2 threads and batches of 8 x 256 tokens of the built-in `python-docs` corpus:

1. load: import time, the first load (GGUF dequantise + convert, into a throwaway
   `SAELAB_CACHE`) and the cached load (median of subprocesses), each in a fresh interpreter,
   and transformers' own model and tokenizer loads of the converted folder, in another;
2. extraction tokens/s: a full forward pass, a bare forward hook that raises (the reference
   floor), `lm.read`, `cache_activations` end to end, and TransformerLens / nnsight where they
   run offline; with GFLOP/s against an estimate of the FLOPs the pass needs;
3. store read GB/s: `ActivationStore.batches` shuffled and in order, against the disk's
   sequential read of the same bytes, cold (page cache dropped) and warm.

It prints a table and writes JSON (`--out`). Runs under saelab's `.venv` or `.venv-bench`
(which also holds the peers); see benchmarks/README.md.
"""

from __future__ import annotations

import os

# Set before transformers / huggingface_hub are imported: a hub lookup must fail fast offline.
os.environ["HF_HUB_OFFLINE"] = "1"

import argparse
import ctypes
import hashlib
import importlib.metadata
import importlib.util
import mmap
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import saelab
from common import (
    ChildFailed,
    add_output_args,
    environment,
    finish,
    json_child,
    logger,
    others_cpu,
    out_path,
    render_table,
    timed,
    write_json,
)
from saelab.activations.writer import finalise, write_shard
from saelab.corpus import iter_documents, token_windows

MODEL = "gemma-3-270m"
HF_ID = "google/gemma-3-270m"  # the name the peers know the model by
SITE = "blocks.6.hook_resid_post"
LAYER = 6
BATCH = 8
CONTEXT = 256
THREADS = 2
CORPUS = "python-docs"
GOAL_LOAD_S = 2.0  # cached load
GOAL_CACHE_VS_FLOOR = 0.8  # (d) tokens/s over (b)'s
GOAL_SHUFFLED_VS_SEQ = 0.5  # shuffled store read over the disk's sequential read
READ_CHUNK = 16 << 20  # bytes per read() of the sequential-read measurements
PEERS = ("transformers", "transformer-lens", "nnsight")
log = logger("extract")


@dataclass(frozen=True)
class Plan:
    """How much of each measurement to do: the full run, a --quick run, or a --smoke run
    (one batch, one cached load, a 32 MB store of 16 MiB shards read once)."""

    batches: int  # timed batches per extraction method (same windows for every method)
    full_every: int  # the full forward pass (6.7x the FLOPs) is timed on every n-th batch only
    cached_loads: int  # subprocesses for the cached-load median
    first_load: bool
    store_gb: float  # size of the synthetic store read back in section 3
    store_reps: int  # each read of section 3 this many times (median)
    shard_mb: int = 256  # shard size of the synthetic store (cache_activations' default)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        if args.smoke:
            return cls(batches=args.batches or 1, full_every=1, cached_loads=1,
                       first_load=False, store_gb=args.store_gb or 0.032, store_reps=1,
                       shard_mb=16)
        quick = args.quick
        return cls(batches=args.batches or (2 if quick else 8), full_every=2 if quick else 4,
                   cached_loads=1 if quick else 3,
                   first_load=not (args.skip_first_load or quick),
                   store_gb=args.store_gb or (0.25 if quick else 1.0),
                   store_reps=1 if quick else 5)


# ---------------------------------------------------------------------------------------------
# 1. load
# ---------------------------------------------------------------------------------------------

# Each runs in a fresh interpreter, so import and load times are what a user sees. The first
# times `saelab.load_model` as a whole (`load_s`); the second, on the folder that load read
# (the converted copy, in the page cache by then), imports the same and then times
# transformers' public loaders one by one: the model, the tokenizer read from tokenizer.json
# as a fast tokenizer, and AutoTokenizer (which parses that file in Python first).
_LOAD_CHILD = """
import json, time
t0 = time.perf_counter()
import torch, saelab
t1 = time.perf_counter()
torch.set_num_threads({threads})
lm = saelab.load_model({model!r})
t2 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1,
                  "folder": lm.hf_model.name_or_path}}))
"""
_PARTS_CHILD = """
import json, time
from pathlib import Path
import torch, saelab  # what the other child had imported when it called load_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils import logging
torch.set_num_threads({threads})
logging.disable_progress_bar()
folder = Path({folder!r})
loads = {{"model_s": lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
         "tokenizer_s": lambda: PreTrainedTokenizerFast(
             tokenizer_file=str(folder / "tokenizer.json")),
         "auto_tokenizer_s": lambda: AutoTokenizer.from_pretrained(folder)}}
result = {{}}
for key, load in loads.items():
    t = time.perf_counter()
    load()
    result[key] = time.perf_counter() - t
print(json.dumps(result))
"""


def load_in_subprocess(cache_dir: Path | None, timeout: float, parts: bool = True
                       ) -> dict[str, Any]:
    """Time `import saelab` and `load_model` in a fresh interpreter (optionally another
    cache); with `parts`, then transformers' own loads of the folder it read, in another."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if cache_dir is not None:
        env["SAELAB_CACHE"] = str(cache_dir)
    try:
        result = json_child([sys.executable, "-c", _LOAD_CHILD.format(
            threads=THREADS, model=MODEL)], env, timeout)
        if parts:
            result.update(json_child([sys.executable, "-c", _PARTS_CHILD.format(
                threads=THREADS, folder=result["folder"])], env, timeout))
    except ChildFailed as err:
        raise RuntimeError(f"load subprocess failed: {err}") from err
    return result


def measure_load(plan: Plan) -> dict[str, Any]:
    """First load into a throwaway cache (the user's is untouched), then the cached loads."""
    result: dict[str, Any] = {"first": None}
    if plan.first_load:
        log("first load: dequantising the GGUF into a temporary SAELAB_CACHE (about a minute)")
        with tempfile.TemporaryDirectory(prefix="saelab-bench-cache-") as tmp:
            result["first"] = load_in_subprocess(Path(tmp), timeout=900, parts=False)
    runs = []
    for i in range(plan.cached_loads):
        log(f"cached load {i + 1}/{plan.cached_loads}")
        runs.append(load_in_subprocess(None, timeout=300))
    result["cached_runs"] = runs
    result["cached"] = {k: statistics.median(r[k] for r in runs) for k in runs[0]
                        if k != "folder"}
    return result


# ---------------------------------------------------------------------------------------------
# FLOP floor
# ---------------------------------------------------------------------------------------------

def _mean_attended(context: int, window: int | None) -> float:
    """Keys a query attends to, averaged over the positions of a causal window."""
    return float(np.mean([min(p + 1, window or context) for p in range(context)]))


def flops_per_token(model: nn.Module, n_layers: int, context: int, lm_head: bool) -> float:
    """Multiply-adds x 2 that one token needs through blocks 0..n_layers-1 (and the LM head).

    Linear layers: 2 x the weights they touch. Attention: QK^T and AV, 2 x 2 x heads x
    head_dim per attended key, causal (and sliding-window) average. Norms, activations,
    rotary and the embedding lookup are O(d_model) per token and left out.
    """
    layers = model.model.layers[:n_layers]
    linear = sum(m.weight.numel() for layer in layers for m in layer.modules()
                 if isinstance(m, nn.Linear))
    cfg = model.config
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * n_layers
    attn = 0.0
    for i in range(n_layers):
        window = getattr(cfg, "sliding_window", None) if types[i] == "sliding_attention" else None
        attn += 4 * cfg.num_attention_heads * cfg.head_dim * _mean_attended(context, window)
    head = model.get_output_embeddings().weight.numel() if lm_head else 0
    return 2.0 * (linear + head) + attn


def matmul_gflops(seconds: float = 2.0) -> float:
    """fp32 GFLOP/s of one MLP-shaped matmul [2048, 640] x [640, 2048]: this machine's ceiling
    (taken before and after section 2; the larger counts, the other may have been contended)."""
    a, b = torch.randn(BATCH * CONTEXT, 640), torch.randn(640, 2048)
    torch.mm(a, b)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        n += 1
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] * n / (time.perf_counter() - start) / 1e9


# ---------------------------------------------------------------------------------------------
# 2. extraction
# ---------------------------------------------------------------------------------------------

class Unavailable(Exception):
    """A method that cannot run here; the message says why (shown in the table)."""


@dataclass
class Method:
    """One way of getting the site's activations for a batch, and its timings."""

    key: str
    label: str
    flops: float  # per token
    run: Callable[[Tensor], Tensor] | None = None
    every: int = 1
    reason: str | None = None  # why it did not run
    note: str = ""
    times: list[float] = field(default_factory=list)
    max_rel_diff: float | None = None  # against saelab's activations, first batch


def corpus_batches(lm: saelab.LanguageModel, n: int) -> list[Tensor]:
    """The first n batches [BATCH, CONTEXT] of windows, the same ones `cache_activations` reads."""
    windows = token_windows(iter_documents(CORPUS), lm.tokenizer, CONTEXT, lm.bos_token_id)
    out = []
    for _ in range(n):
        out.append(torch.from_numpy(np.stack([next(windows) for _ in range(BATCH)])))
    return out


def full_forward(lm: saelab.LanguageModel) -> Callable[[Tensor], Tensor]:
    """(a) Every layer and the LM head: what a plain `model(ids)` costs."""
    def run(ids: Tensor) -> Tensor:
        with torch.inference_mode():
            return lm.hf_model(input_ids=ids, use_cache=False).logits
    return run


class _Stop(Exception):
    pass


def bare_hook(lm: saelab.LanguageModel) -> Callable[[Tensor], Tensor]:
    """(b) The floor: one forward hook on block 6 that keeps its output and raises to stop."""
    block = lm.hf_model.model.layers[LAYER]

    def run(ids: Tensor) -> Tensor:
        kept: list[Tensor] = []

        def hook(_m: nn.Module, _a: tuple, out: Tensor | tuple) -> None:
            kept.append(out[0] if isinstance(out, tuple) else out)
            raise _Stop

        handle = block.register_forward_hook(hook)
        try:
            with torch.inference_mode():
                lm.hf_model(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        return kept[0]
    return run


def saelab_read(lm: saelab.LanguageModel) -> Callable[[Tensor], Tensor]:
    """(c) saelab's early-stopping read."""
    return lambda ids: lm.read(ids, [SITE])[SITE]


def transformer_lens(lm: saelab.LanguageModel) -> tuple[Callable[[Tensor], Tensor], str]:
    """(e) TransformerLens `run_with_cache(names_filter, stop_at_layer)` on a copy of the model.

    TransformerLens 4 has no HookedTransformer; its TransformerBridge wraps a given HF model
    (no hub access with `hf_model=` and `tokenizer=`), but needs the config's `architectures`,
    which a GGUF-converted config lacks. It switches the model to eager attention in place,
    hence the copy. TransformerLens < 4 gets HookedTransformer.from_pretrained, which needs the
    hub for the config and so is expected to fail offline (the reason is reported).
    """
    if importlib.util.find_spec("transformer_lens") is None:
        raise Unavailable("not installed")
    version = importlib.metadata.version("transformer-lens")
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        return _hooked_transformer(lm, version)
    model = TransformerBridge.boot_transformers(
        HF_ID, hf_model=lm.hf_model, tokenizer=lm.tokenizer, device="cpu",
        hf_config_overrides={"architectures": ["Gemma3ForCausalLM"]})
    return _tl_read(model), f"TL {version}: TransformerBridge (eager attention)"


def _tl_read(model: Any) -> Callable[[Tensor], Tensor]:
    """A TransformerLens model's read of the site: `run_with_cache`, stopped after its block."""
    def run(ids: Tensor) -> Tensor:
        with torch.inference_mode():
            _, cache = model.run_with_cache(ids, names_filter=[SITE], stop_at_layer=LAYER + 1)
        return cache[SITE]
    return run


def _hooked_transformer(lm: saelab.LanguageModel, version: str
                        ) -> tuple[Callable[[Tensor], Tensor], str]:
    """TransformerLens < 4: HookedTransformer, given the HF model and tokenizer."""
    from transformer_lens import HookedTransformer

    try:
        model = HookedTransformer.from_pretrained_no_processing(
            HF_ID, hf_model=lm.hf_model, tokenizer=lm.tokenizer, device="cpu")
    except Exception as err:  # offline config lookup, unknown model name: report, don't crash
        raise Unavailable(f"TL {version} HookedTransformer: {_first_line(err)}") from err

    return _tl_read(model), f"TL {version}: HookedTransformer"


def nnsight_trace(lm: saelab.LanguageModel) -> tuple[Callable[[Tensor], Tensor], str]:
    """(e) nnsight: trace, save block 6's output, stop; wraps a copy of the model (nnsight
    adds its own machinery to the modules it wraps, which must not touch saelab's rows)."""
    if importlib.util.find_spec("nnsight") is None:
        raise Unavailable("not installed")
    import nnsight

    version = importlib.metadata.version("nnsight")
    wrapper_cls = getattr(nnsight, "TransformersModel", None) or nnsight.LanguageModel
    model = wrapper_cls(lm.hf_model, tokenizer=lm.tokenizer)

    def run(ids: Tensor) -> Tensor:
        with torch.inference_mode(), model.trace(ids, use_cache=False) as tracer:
            hidden = model.model.layers[LAYER].output.save()
            tracer.stop()
        return hidden[0] if isinstance(hidden, tuple) else hidden
    return run, f"nnsight {version}: {wrapper_cls.__name__}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160] if text else ''}"


def build_methods(lm: saelab.LanguageModel, plan: Plan) -> list[Method]:
    """The batch-timed methods (a), (b), (c), (e); (d) is timed as one call."""
    early = flops_per_token(lm.hf_model, LAYER + 1, CONTEXT, lm_head=False)
    full = flops_per_token(lm.hf_model, len(lm.hf_model.model.layers), CONTEXT, lm_head=True)
    methods = [
        Method("a", "full forward, logits", full, full_forward(lm), every=plan.full_every,
               note="all 18 layers + LM head"),
        Method("b", "bare hook + raise (floor)", early, bare_hook(lm)),
        Method("c", "saelab lm.read", early, saelab_read(lm)),
    ]
    for key, label, setup in [("e1", "TransformerLens run_with_cache", transformer_lens),
                              ("e2", "nnsight trace + stop", nnsight_trace)]:
        method = Method(key, label, early)
        try:
            log(f"setting up {label}")
            copy = saelab.load_model(MODEL)  # each peer gets its own copy of the weights
            method.run, method.note = setup(copy)
        except Unavailable as err:
            method.reason = str(err)
        except Exception as err:  # a peer failing is a result, not a crash
            method.reason = _first_line(err)
        methods.append(method)
    return methods


def time_methods(methods: Sequence[Method], batches: Sequence[Tensor]) -> None:
    """Warm up each method once, check it against saelab, then time them round-robin.

    Interleaving batch by batch spreads the noise of other processes on the shared cores
    evenly over the methods, so their ratios stay meaningful.
    """
    runnable = [m for m in methods if m.run is not None]
    reference = None
    for m in sorted(runnable, key=lambda m: m.key != "c"):  # saelab first: the reference
        log(f"warm-up {m.key}) {m.label}")
        out = m.run(batches[0])
        if m.key == "c":
            reference = out
        elif m.key != "a" and reference is not None:
            m.max_rel_diff = float((out - reference).abs().max() / reference.abs().max())
    for i, ids in enumerate(batches):
        log(f"batch {i + 1}/{len(batches)}")
        for m in runnable:
            if i % m.every == 0:
                start = time.perf_counter()
                m.run(ids)
                m.times.append(time.perf_counter() - start)


def time_cache(lm: saelab.LanguageModel, n_windows: int) -> dict[str, Any]:
    """(d) `cache_activations` corpus -> store, model already loaded; tokens/s over all tokens
    of the windows it runs (BOS included, as for the other rows)."""
    rows = n_windows * (CONTEXT - 1)  # BOS positions are not stored
    with tempfile.TemporaryDirectory(prefix="saelab-bench-acts-") as tmp:
        start = time.perf_counter()
        stores = saelab.cache_activations(tmp, model=MODEL, sites=(SITE,), tokens=rows,
                                          context_size=CONTEXT, batch_size=BATCH, lm=lm)
        seconds = time.perf_counter() - start
        assert len(stores[SITE]) == rows
    return {"seconds": seconds, "windows": n_windows, "rows": rows,
            "tokens_per_s": n_windows * CONTEXT / seconds}


def method_result(m: Method) -> dict[str, Any]:
    """A method's numbers: tokens/s from its median batch time (a burst of load from another
    process on the shared cores moves a mean, not a median); the mean is kept too."""
    res = asdict(m)
    res.pop("run")
    if m.times:
        res["median_batch_s"] = statistics.median(m.times)
        res["tokens_per_s"] = BATCH * CONTEXT / res["median_batch_s"]
        res["mean_tokens_per_s"] = BATCH * CONTEXT * len(m.times) / sum(m.times)
        res["gflops"] = res["tokens_per_s"] * m.flops / 1e9
    return res


def time_bracketed(floor: Method, batches: Sequence[Tensor], timed: Callable[[], dict]
                   ) -> tuple[dict[str, Any], float]:
    """Run `timed` between two halves of a pass of the floor method over `batches`.

    (d) is one long call, so it cannot be interleaved batch by batch; timing (b) on the same
    windows right around it gives it a reference taken under the same load.
    """
    half = max(1, len(batches) // 2)
    times = []
    for ids in [*batches[:half], None, *batches[half:]]:
        if ids is None:
            result = timed()
            continue
        start = time.perf_counter()
        floor.run(ids)
        times.append(time.perf_counter() - start)
    return result, BATCH * CONTEXT / statistics.median(times)


def measure_extraction(lm: saelab.LanguageModel, plan: Plan) -> dict[str, Any]:
    """Section 2: all methods on the same windows, plus (d) on those windows end to end."""
    batches = corpus_batches(lm, plan.batches)
    mm_before = matmul_gflops()
    methods = build_methods(lm, plan)
    time_methods(methods, batches)
    log(f"d) cache_activations on {plan.batches * BATCH} windows, between two halves of (b)")
    cache, cache["floor_tokens_per_s"] = time_bracketed(
        methods[1], batches, lambda: time_cache(lm, plan.batches * BATCH))
    cache["flops"] = methods[1].flops
    cache["gflops"] = cache["tokens_per_s"] * cache["flops"] / 1e9
    head = 2.0 * lm.hf_model.get_output_embeddings().weight.numel()
    return {"methods": {m.key: method_result(m) for m in methods}, "cache": cache,
            "flops_per_token": {"through_block": methods[1].flops, "full": methods[0].flops,
                                "lm_head": head},
            "matmul_gflops_runs": (mm := [mm_before, matmul_gflops()]), "matmul_gflops": max(mm)}


# ---------------------------------------------------------------------------------------------
# 3. store read
# ---------------------------------------------------------------------------------------------

def write_synthetic_store(folder: Path, gb: float, shard_mb: int = 256, d_model: int = 640
                          ) -> list[Path]:
    """A store of about `gb` GB of random float32 rows in shards of `shard_mb` MiB, written by
    saelab's own writer."""
    rows_per_shard = (shard_mb << 20) // (d_model * 4) // (CONTEXT - 1) * (CONTEXT - 1)
    n_shards = max(1, round(gb * 1e9 / (rows_per_shard * d_model * 4)))
    rng = np.random.default_rng(0)
    for i in range(n_shards):
        acts = rng.standard_normal((rows_per_shard, d_model), dtype=np.float32)
        write_shard(folder, i, acts, SITE, first_window=i * rows_per_shard // (CONTEXT - 1))
    n_windows = n_shards * rows_per_shard // (CONTEXT - 1)
    tokens = np.zeros((n_windows, CONTEXT), dtype=np.int32)
    header = {"model": "synthetic", "model_type": "none", "model_fingerprint": "none",
              "site": SITE, "d_model": d_model, "dtype": "float32", "model_dtype": "float32",
              "context_size": CONTEXT, "exclude_bos": True, "bos_token_id": 2, "corpus": "none",
              "text_column": "text", "saelab_version": saelab.__version__}
    finalise(folder, n_shards, tokens, header)
    return sorted(folder.glob("acts_*.npy"))


def drop_page_cache(paths: Sequence[Path]) -> None:
    """Flush and evict the files' pages, so the next read comes from the disk (or the host)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(paths: Sequence[Path]) -> float | None:
    """Share of the files' pages in the page cache (mincore(2)): proof that an eviction worked.

    None where libc's mincore is not reachable (not Linux)."""
    try:
        mincore = ctypes.CDLL(None, use_errno=True).mincore
    except (OSError, AttributeError):
        return None
    resident = pages = 0
    for path in paths:
        size = path.stat().st_size
        with path.open("rb") as f:  # a private writable map, only so ctypes can take its address
            mapped = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
        n = -(-size // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * n)()
        anchor = ctypes.c_char.from_buffer(mapped)
        ok = mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec) == 0
        del anchor
        mapped.close()
        if not ok:
            return None
        resident += sum(b & 1 for b in bytes(vec))
        pages += n
    return resident / max(pages, 1)


def _read_all(paths: Sequence[Path], flags: int) -> int:
    """Read the files front to back in READ_CHUNK pieces into one page-aligned buffer."""
    buf = mmap.mmap(-1, READ_CHUNK)  # page aligned, as O_DIRECT needs
    total = 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY | flags)
        try:
            while n := os.readv(fd, [buf]):
                total += n
        finally:
            os.close(fd)
    return total


def _prepare(paths: Sequence[Path], cold: bool) -> float | None:
    """Evict the files when `cold`; the share of their pages still cached either way."""
    if cold:
        drop_page_cache(paths)
    return resident_fraction(paths)


def sequential_read(paths: Sequence[Path], mode: str) -> dict[str, Any]:
    """GB/s of reading the files: `direct` (O_DIRECT), `cold` (buffered after eviction) or
    `warm` (straight from the page cache: a memory-bandwidth number)."""
    resident = _prepare(paths, cold=mode != "warm")
    flags = getattr(os, "O_DIRECT", 0) if mode == "direct" else 0
    start = time.perf_counter()
    total = _read_all(paths, flags)
    return {"gbps": total / (time.perf_counter() - start) / 1e9, "resident_before": resident}


def batches_read(folder: Path, paths: Sequence[Path], shuffle: bool, cold: bool
                 ) -> dict[str, Any]:
    """GB/s of the float32 batches `ActivationStore.batches(4096)` yields, cold or warm.

    A fresh store each time: the pages an open store has touched stay mapped, and mapped
    pages cannot be evicted, so a store kept open would make every later "cold" read warm.
    """
    resident = _prepare(paths, cold)
    start = time.perf_counter()
    store = saelab.ActivationStore(folder)
    total = 0
    for batch in store.batches(4096, shuffle=shuffle, seed=0):
        total += batch.numel() * batch.element_size()
    seconds = time.perf_counter() - start
    del store
    return {"gbps": total / seconds / 1e9, "resident_before": resident}


def verify_read(folder: Path, paths: Sequence[Path], cold: bool) -> dict[str, Any]:
    """GB/s of checking every shard's sha256 (`verify(force=True)`: what the first open of a
    store made elsewhere costs), cold or warm."""
    store = saelab.ActivationStore(folder, verify=False)
    resident = _prepare(paths, cold)
    start = time.perf_counter()
    store.verify(force=True)
    seconds = time.perf_counter() - start
    return {"gbps": sum(p.stat().st_size for p in paths) / seconds / 1e9,
            "resident_before": resident}


def recorded_open_s(folder: Path, reps: int = 5) -> float:
    """Seconds to open the store when every shard is recorded as verified (the median)."""
    return statistics.median(timed(lambda: saelab.ActivationStore(folder), reps)[0])


def sha256_floor_gbps(n_bytes: int = 256 << 20) -> float:
    """GB/s of hashlib's sha256 on bytes already in memory: the floor of any verification."""
    data = np.random.default_rng(0).bytes(n_bytes)
    seconds = min(timed(lambda: hashlib.sha256(data).digest(), 3)[0])
    return n_bytes / seconds / 1e9


def measure_store(plan: Plan, scratch: Path | None) -> dict[str, Any]:
    """Section 3: write the synthetic store, then read it every way, cold before warm."""
    with tempfile.TemporaryDirectory(prefix="saelab-bench-store-", dir=scratch) as tmp:
        folder = Path(tmp)
        log(f"writing a {plan.store_gb:g} GB synthetic store in {tmp}")
        start = time.perf_counter()
        paths = write_synthetic_store(folder, plan.store_gb, plan.shard_mb)
        write_s = time.perf_counter() - start
        log("reading it back")
        res: dict[str, Any] = {"kind": "synthetic, written with saelab.activations.writer",
                               "bytes": sum(p.stat().st_size for p in paths),
                               "shards": len(paths), "write_s": write_s}
        reads: dict[str, Callable[[], dict[str, Any]]] = {
            "seq_direct": lambda: sequential_read(paths, "direct"),
            "seq_cold": lambda: sequential_read(paths, "cold"),
            "ordered_cold": lambda: batches_read(folder, paths, shuffle=False, cold=True),
            "shuffled_cold": lambda: batches_read(folder, paths, shuffle=True, cold=True),
            "seq_warm": lambda: sequential_read(paths, "warm"),
            "ordered_warm": lambda: batches_read(folder, paths, shuffle=False, cold=False),
            "shuffled_warm": lambda: batches_read(folder, paths, shuffle=True, cold=False),
            "verify_cold": lambda: verify_read(folder, paths, cold=True),
            "verify_warm": lambda: verify_read(folder, paths, cold=False),
        }
        res.update(repeat_reads(reads, plan.store_reps))
        res["recorded_open_s"] = recorded_open_s(folder)
        res["sha256_floor_gbps"] = sha256_floor_gbps()
    return res


def repeat_reads(reads: dict[str, Callable[[], dict[str, Any]]], reps: int
                 ) -> dict[str, dict[str, Any]]:
    """Each read `reps` times, round-robin, reported by its median.

    A virtual disk shared with other guests gives the same cold read anywhere from a quarter
    to the whole of its speed from one second to the next; one read proves little.
    """
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in reads}
    for _ in range(reps):
        for key, read in reads.items():
            try:
                runs[key].append(read())
            except OSError as err:  # a filesystem without O_DIRECT
                runs[key].append({"gbps": None, "error": _first_line(err)})
    out = {}
    for key, rs in runs.items():
        speeds = [r["gbps"] for r in rs if r["gbps"] is not None]
        residents = [r["resident_before"] for r in rs if r.get("resident_before") is not None]
        out[key] = {"gbps": statistics.median(speeds) if speeds else None,
                    "runs": [r["gbps"] for r in rs], "error": rs[-1].get("error"),
                    "resident_before": max(residents) if residents else None}
    return out


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------

def render(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An aligned text table: first and last columns left-aligned, the numbers right-aligned."""
    return render_table(header, rows, left=(0, -1), title=title)


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISS"


def load_table(load: dict[str, Any]) -> str:
    """Section 1's rows."""
    cached, first = load["cached"], load["first"]
    rows = [["import torch + saelab", f"{cached['import_s']:.2f} s", "", "", "fresh interpreter"]]
    if first:
        rows.append(["first load (GGUF -> float copy)", f"{first['load_s']:.1f} s", "", "",
                     "temporary SAELAB_CACHE"])
    else:
        rows.append(["first load (GGUF -> float copy)", "skipped", "", "", "--skip-first-load"])
    n = len(load["cached_runs"])
    rows.append([f"cached load, median of {n}", f"{cached['load_s']:.2f} s",
                 f"<= {GOAL_LOAD_S:g} s", verdict(cached["load_s"] <= GOAL_LOAD_S),
                 "load_model only; weights in page cache"])
    for key, label, note in [  # transformers' loaders on the same folder, own interpreter
            ("model_s", "  transformers: the model", "AutoModelForCausalLM.from_pretrained"),
            ("tokenizer_s", "  transformers: fast tokenizer", "PreTrainedTokenizerFast(file)"),
            ("auto_tokenizer_s", "  transformers: AutoTokenizer", "AutoTokenizer.from_pretrained")]:
        if key in cached:
            rows.append([label, f"{cached[key]:.2f} s", "", "", note])
    return render("1. load", ["", "time", "goal", "", "note"], rows)


def extraction_table(ext: dict[str, Any]) -> str:
    """Section 2's rows, ratios against (b)."""
    methods, cache = ext["methods"], ext["cache"]
    floor = methods["b"].get("tokens_per_s")
    peak = ext["matmul_gflops"]

    def row(key: str, label: str, tps: float | None, gflops: float | None, goal: str,
            ok: str, note: str, floor: float | None = floor) -> list[str]:
        if tps is None:
            return [f"({key}) {label}", "-", "", "", "", "", note]
        ratio = f"{tps / floor:.0%}" if floor else ""
        return [f"({key}) {label}", f"{tps:,.0f}", ratio, f"{gflops:.1f}",
                f"{gflops / peak:.0%}", " ".join(x for x in (goal, ok) if x), note]

    rows = []
    for key in ["a", "b", "c"]:
        m = methods[key]
        rows.append(row(key, m["label"], m.get("tokens_per_s"), m.get("gflops"), "", "",
                        _method_note(m)))
    bracket = cache["floor_tokens_per_s"]
    cache_ok = verdict(cache["tokens_per_s"] >= GOAL_CACHE_VS_FLOOR * bracket)
    rows.append(row("d", "saelab cache_activations", cache["tokens_per_s"], cache["gflops"],
                    f">= {GOAL_CACHE_VS_FLOOR:.0%}", cache_ok,
                    f"{cache['rows']:,} rows to disk in {cache['seconds']:.1f} s; vs (b) "
                    f"timed around it, {bracket:,.0f} tok/s", floor=bracket))
    for key in ["e1", "e2"]:
        m = methods[key]
        rows.append(row(key, m["label"], m.get("tokens_per_s"), m.get("gflops"), "", "",
                        m["reason"] or _method_note(m)))
    table = render("2. extraction (tokens/s; GFLOP/s from the FLOP estimate)",
                   ["", "tok/s", "vs (b)", "GFLOP/s", "vs mm", "goal", "note"], rows)
    flops = ext["flops_per_token"]
    foot = (f"FLOPs/token: {flops['through_block'] / 1e6:.1f} M through block {LAYER}, "
            f"{flops['full'] / 1e6:.1f} M for the full pass (LM head {flops['lm_head'] / 1e6:.0f}"
            f" M); vs mm: against a [2048,640]x[640,2048] fp32 matmul at {peak:.1f} GFLOP/s")
    return f"{table}\n{foot}"


def _method_note(m: dict[str, Any]) -> str:
    parts = [m["note"]] if m["note"] else []
    if m["max_rel_diff"] is not None:
        parts.append(f"max rel diff {m['max_rel_diff']:.0e} vs (c)")
    n = len(m["times"])
    parts.append(f"{n} batch{'es' if n != 1 else ''}")
    return "; ".join(parts)


def store_table(st: dict[str, Any]) -> str:
    """Section 3's rows: cold reads against the cold sequential read, warm against warm."""
    def row(label: str, key: str, ref: str | None, note: str, goal: bool = False) -> list[str]:
        value, resident = st[key]["gbps"], st[key].get("resident_before")
        if value is None:
            return [label, "-", "", "", "", st[key].get("error") or ""]
        ratio = f"{value / st[ref]['gbps']:.0%}" if ref else ""
        ok = ""
        if goal:
            ok = f">= {GOAL_SHUFFLED_VS_SEQ:.0%} " + verdict(
                value >= GOAL_SHUFFLED_VS_SEQ * st[ref]["gbps"])
        cached = "?" if resident is None else f"{resident:.0%}"
        return [label, f"{value:.2f}", ratio, cached, ok, note]

    rows = [
        row("disk sequential, O_DIRECT", "seq_direct", None, f"{READ_CHUNK >> 20} MiB reads"),
        row("disk sequential, buffered (cold)", "seq_cold", None,
            "after fsync + fadvise(DONTNEED); the VM's host may still cache"),
        row("batches(4096, shuffle=False) cold", "ordered_cold", "seq_cold", "fresh store"),
        row("batches(4096, shuffle=True) cold", "shuffled_cold", "seq_cold", "fresh store",
            goal=True),
        row("page cache sequential (warm)", "seq_warm", None, "memory bandwidth, not disk"),
        row("batches(4096, shuffle=False) warm", "ordered_warm", "seq_warm", "saelab's copies"),
        row("batches(4096, shuffle=True) warm", "shuffled_warm", "seq_warm", "saelab's copies"),
        row("verify(force=True) cold", "verify_cold", "seq_cold", "every shard's sha256"),
        row("verify(force=True) warm", "verify_warm", "seq_warm",
            f"sha256 floor {st['sha256_floor_gbps']:.2f} GB/s (hashlib, in memory)"),
        ["open, every shard recorded", f"{st['recorded_open_s'] * 1e3:.1f} ms", "", "", "",
         ".verified.json: no hashing"],
    ]
    title = (f"3. store read ({st['bytes'] / 1e9:.2f} GB {st['kind']}, "
             f"{st['shards']} shard{'s' if st['shards'] != 1 else ''}; GB/s of float32 rows, "
             f"median of {len(st['seq_cold']['runs'])}; cached = share of its pages in the page "
             "cache before the read)")
    return render(title, ["", "GB/s", "vs seq", "cached", "goal", "note"], rows)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_output_args(parser, "extract",
                    quick="2 batches, 1 cached load, 0.25 GB store, no first load",
                    smoke="1 batch, 1 cached load, a 32 MB store read once, no first load")
    parser.add_argument("--skip-first-load", action="store_true",
                        help="skip the first (GGUF-converting) load, about a minute")
    parser.add_argument("--batches", type=int, default=None,
                        help=f"timed batches of {BATCH} x {CONTEXT} per method (default 8)")
    parser.add_argument("--store-gb", type=float, default=None,
                        help="size of the synthetic store of section 3 (default 1)")
    parser.add_argument("--scratch", type=Path, default=None,
                        help="folder for the synthetic store (default: the system temp dir)")
    return parser.parse_args(argv)


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The whole benchmark: load, extraction, store; prints the tables, writes the JSON."""
    args = parse_args(argv)
    plan = Plan.from_args(args)
    out = out_path(args, "extract")
    torch.set_num_threads(THREADS)
    env = environment(THREADS, PEERS)
    started = time.perf_counter()
    log("loading the model in this process (converts it into your cache if it is not there)")
    lm = saelab.load_model(MODEL)
    busy: dict[str, float] = {}
    with others_cpu(busy, "load"):
        load = measure_load(plan)
    with others_cpu(busy, "extraction"):
        extraction = measure_extraction(lm, plan)
    del lm
    with others_cpu(busy, "store"):
        store = measure_store(plan, args.scratch)
    results = {"benchmark": "extract", "model": MODEL, "site": SITE, "batch": BATCH,
               "context": CONTEXT, "corpus": CORPUS, "plan": asdict(plan),
               "environment": finish(env), "cpu_taken_by_others": busy,
               "load": load, "extraction": extraction,
               "store": store, "wall_s": time.perf_counter() - started}
    write_json(out, results, indent=2)
    header = (f"saelab extraction benchmark: {MODEL} at {SITE}, batches of {BATCH} x {CONTEXT} "
              f"tokens of {CORPUS}, {THREADS} threads{' (quick)' if args.quick else ''}"
              f"{' (smoke)' if args.smoke else ''}\n"
              f"{os.cpu_count()} cores; CPU taken by other processes: "
              + ", ".join(f"{k} {v:.0%}" for k, v in busy.items())
              + ("  <- contended: numbers are slower and noisier" if max(busy.values(), default=0)
                 > 0.1 else ""))
    print("\n\n".join([header, load_table(load), extraction_table(extraction),
                       store_table(store), f"results: {out}"]))
    return results


if __name__ == "__main__":
    run()
