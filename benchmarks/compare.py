"""Comparison benchmark: where the time of `saelab demo` goes, and what splicing costs.

On 2 CPU threads, with the demo's own settings (`--quick` for its CI settings), it times each
stage of the demo separately: the cached model load, caching activations, training the TopK
SAE, then on the evaluation tokens: the clean pass (with the site read on the way), a plain
forward pass (no hooks), an identity splice, and every coder at the encoder's L0. The goal
for delta loss: a spliced pass costs at most 10% more than the plain pass, and the clean pass
is paid once per batch for all coders (so N coders cost N + 1 passes, not 2N).

Floor: a forward pass of Gemma 3 270M costs about 2 x (parameters touched) FLOPs per token;
the GEMM rate measured here says what that is in seconds on this machine.

No peer library runs this comparison (none decomposes a pretrained dictionary with ITO and
splices the result back in; see ../shared/REFERENCES.md), so the table has no peer rows; the
coders' own speed against scikit-learn and dictionary_learning is in benchmarks/coding.py.

The machine's cores are shared: each row also records the share of the CPU other processes
took while it was timed (from /proc/stat, less this process's own time). It prints a table and
writes JSON (`--out`).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import saelab
from cpu_share import CpuWatch
from saelab.coding import Coder, fit_scale
from saelab.evals.splice import clean_pass, spliced_loss
from saelab.verbs.compare import CompareConfig, _activations, _windows
from saelab.verbs.demo import FULL, QUICK, SITE
from saelab.verbs.train import TrainCommand, run_train

THREADS = 2
DEFAULT_OUT = Path(__file__).parent / "results" / "compare.json"


def timed(fn: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
    """(median seconds, last result) of `repeats` calls."""
    times, out = [], None
    for _ in range(repeats):
        began = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times), out


def gemm_rate() -> float:
    a, b = torch.randn(1024, 640), torch.randn(640, 8192)
    torch.mm(a, b)
    seconds, _ = timed(lambda: torch.mm(a, b), 5)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / seconds


def run(quick: bool, work: Path) -> dict[str, Any]:
    s = QUICK if quick else FULL
    rows: list[dict[str, Any]] = []

    def row(stage: str, seconds: float, watch: CpuWatch, tokens: int | None = None,
            **extra: Any) -> None:
        others = watch.others_share()
        rows.append({"stage": stage, "seconds": seconds, "tokens": tokens,
                     "tokens_per_s": tokens / seconds if tokens else None,
                     "others_cpu_share": others, **extra})
        print(f"  {stage}: {seconds:.2f} s (others took {others:.0%} of the CPU)", flush=True)

    saelab.load_model("gemma-3-270m")  # convert once, outside the timing
    watch = CpuWatch()
    seconds, lm = timed(lambda: saelab.load_model("gemma-3-270m"), 3)
    row("load (cached)", seconds, watch)
    cache_cfg = saelab.CacheConfig(out=work / "activations", tokens=s.cache_tokens,
                                   context_size=s.context_size)
    watch = CpuWatch()
    seconds, stores = timed(lambda: saelab.cache_activations(cache_cfg, lm))
    store = stores[SITE]
    row("cache", seconds, watch, len(store))
    watch = CpuWatch()
    seconds, sae = timed(lambda: run_train(TrainCommand(
        activations=store.path, out=work / "sae", architecture="topk", n_latents=s.n_latents,
        k=s.k, tokens=s.train_tokens, batch_size=s.batch_size,
        lr_warmup_steps=s.lr_warmup_steps)))
    row("train", seconds, watch, s.train_tokens)

    cfg = CompareConfig(sae=str(work / "sae"), out=work / "compare", site=SITE,
                        tokens=s.eval_tokens, fit_tokens=s.fit_tokens,
                        context_size=s.context_size, skip_tokens=len(store))
    fit_windows, windows = _windows(cfg, lm)
    held_out = _activations(lm, SITE, fit_windows)
    scale = fit_scale(sae, held_out)
    per_batch = max(1, cfg.batch_tokens // s.context_size)
    batches = [torch.from_numpy(windows[i:i + per_batch])
               for i in range(0, len(windows), per_batch)]
    n_tokens = sum(b.numel() for b in batches)
    coded = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)

    plain, clean_t, splice_t = 0.0, 0.0, 0.0
    cleans = []
    watch = CpuWatch()  # one watch for the three interleaved rows
    for ids in batches:
        plain += timed(lambda ids=ids: lm.logits(ids))[0]
        t, clean = timed(lambda ids=ids: clean_pass(lm, SITE, ids))
        clean_t += t
        splice_t += timed(lambda c=clean: spliced_loss(lm, SITE, c, c.activations))[0]
        cleans.append(clean)
    row("plain forward (logits only)", plain, watch, n_tokens)
    row("clean pass (read site, log-probs)", clean_t, watch, n_tokens,
        overhead=clean_t / plain - 1)
    row("spliced pass (identity, CE + KL)", splice_t, watch, n_tokens,
        overhead=splice_t / plain - 1)

    x = torch.cat([c.activations.reshape(-1, c.activations.shape[-1]) for c in cleans]).float()
    k = max(1, round(float(Coder(sae, "encoder")(held_out).l0().double().mean())))
    for coder in ("encoder", "encoder-refit", "encoder-scaled", "mp", "gp", "omp"):
        c = Coder(sae, coder, k=k if coder in ("mp", "gp", "omp") else None, scale=scale)
        watch = CpuWatch()
        seconds, _ = timed(lambda c=c: c(x))
        row(f"code: {coder}" + (f" k={k}" if coder in ("mp", "gp", "omp") else ""), seconds,
            watch, coded)
    n_rows = 3 + 3 * len(set(s.ks) | {k})
    return {"rows": rows, "settings": s.__dict__, "matched_k": k,
            "compare_rows": n_rows, "passes_per_batch": n_rows + 2,
            "naive_passes_per_batch": 2 * n_rows + 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the demo's --quick settings")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    rate = gemm_rate()
    print(f"float32 GEMM: {rate / 1e9:.0f} GFLOP/s on {THREADS} threads", flush=True)
    watch = CpuWatch()
    with tempfile.TemporaryDirectory() as work:
        result = run(args.quick, Path(work))
    others = watch.others_share()
    params = 268e6 - 262144 * 640  # Gemma 3 270M without the embedding (read by index)
    floor_tok_s = rate / (2 * (params + 262144 * 640))  # blocks + LM head (tied embedding)
    print(f"\nother processes took {others:.0%} of the CPU over the whole run")
    print(f"{'stage':<36} {'seconds':>9} {'tokens/s':>10} {'vs plain':>9} {'others CPU':>10}")
    for r in result["rows"]:
        tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else ""
        over = f"{r['overhead']:+.1%}" if "overhead" in r else ""
        print(f"{r['stage']:<36} {r['seconds']:>9.2f} {tps:>10} {over:>9} "
              f"{r['others_cpu_share']:>10.0%}")
    print(f"floor: a forward pass at the GEMM rate {floor_tok_s:,.0f} tokens/s; "
          f"compare runs {result['passes_per_batch']} passes per batch for "
          f"{result['compare_rows']} rows (clean once), not {result['naive_passes_per_batch']}")
    result.update({"others_cpu_share": others, "gemm_gflops": rate / 1e9, "floor_forward_tokens_per_s": floor_tok_s,
                   "threads": THREADS, "quick": args.quick, "machine": platform.machine(),
                   "torch": torch.__version__, "saelab": saelab.__version__,
                   "date": datetime.date.today().isoformat(),
                   "cpu_count": os.cpu_count(), "numpy": np.__version__})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
