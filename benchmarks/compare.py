"""Comparison benchmark: where the time of `saelab demo` goes, and what splicing costs.

On 2 CPU threads, with the demo's own settings (`--quick` for its CI settings), it times each
stage of the demo separately: the cached model load, caching activations, training the TopK
SAE, then on the evaluation tokens: the clean pass (with the site read on the way), a plain
forward pass (no hooks), an identity splice, and every coder at the encoder's L0; and the peak
memory of scoring 1024 tokens. The goals for delta loss: a spliced pass (CE + KL) costs at
most 1.15x the plain pass, the clean pass at most 1.3x, and it is paid once per batch for all
coders (so N coders cost N + 1 passes, not 2N); scoring 1024 tokens peaks at most 0.5 GB
above the model.

Floor: a forward pass of Gemma 3 270M costs about 2 x (parameters touched) FLOPs per token;
the GEMM rate measured here says what that is in seconds on this machine.

No peer library runs this comparison (none decomposes a pretrained dictionary with ITO and
splices the result back in; see ../shared/REFERENCES.md), so the table has no peer rows; the
coders' own speed against scikit-learn and dictionary_learning is in benchmarks/coding.py.

The machine's cores are shared: each row also records the share of the CPU other processes
took while it was timed (from /proc/stat, less this process's own time). It prints a table and
writes JSON (`--out`). Every call is saelab's public API: `cache_activations`, `train`,
`saelab.evals` (`CompareConfig`, `corpus_windows`, `site_activations`, `clean_pass`,
`spliced_loss`, `plan`) and `Coder`, with the demo's settings from `saelab.verbs.demo`.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import argparse
import ctypes
import dataclasses
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import saelab
from common import (
    CpuWatch,
    add_output_args,
    environment,
    finish,
    gemm_times,
    out_path,
    render_table,
    timed,
    write_json,
)
from saelab.coding import Coder, fit_scale
from saelab.evals import (
    CompareConfig,
    clean_pass,
    corpus_windows,
    plan,
    site_activations,
    spliced_loss,
)
from saelab.verbs.demo import FULL, QUICK, SITE

THREADS = 2
# A smoke run: the demo's quick settings, smaller still (what proves the script runs)
SMOKE = dataclasses.replace(QUICK, cache_tokens=2_000, n_latents=256, train_tokens=4_000,
                            eval_tokens=126, fit_tokens=126, ks=(8,))


def median_time(fn: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
    """(median seconds, last result) of `repeats` calls."""
    times, out = timed(fn, repeats)
    return statistics.median(times), out


def gemm_rate() -> float:
    """float32 FLOP/s of [1024, 640] x [640, 8192], the median of 5 into one output."""
    a, b = torch.randn(1024, 640), torch.randn(640, 8192)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / statistics.median(gemm_times(a, b, 5))


def _status_mb(field: str) -> float:
    """A line of /proc/self/status (VmRSS, VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def scoring_peak_mb(lm: Any, ids: torch.Tensor) -> float:
    """Peak RSS above the resident model while one batch is scored (a clean pass, then one
    spliced pass): Linux resets the high-water mark when "5" is written to clear_refs, and
    malloc_trim first hands back the heap that earlier work freed, which would otherwise
    absorb the batch's temporaries unseen."""
    clean_pass(lm, SITE, ids[:1, :4])  # first-call allocations outside the measure
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    clean = clean_pass(lm, SITE, ids)
    spliced_loss(lm, SITE, clean, clean.activations)
    return _status_mb("VmHWM") - before


def run(s: Any, work: Path, load_repeats: int) -> dict[str, Any]:
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
    seconds, lm = median_time(lambda: saelab.load_model("gemma-3-270m"), load_repeats)
    row("load (cached)", seconds, watch)
    peak_ids = torch.randint(3, lm.hf_model.config.vocab_size, (8, 128),
                             generator=torch.Generator().manual_seed(0))
    peak_ids[:, 0] = lm.bos_token_id
    peak_mb = scoring_peak_mb(lm, peak_ids)
    print(f"  scoring 1024 tokens: peak RSS {peak_mb:,.0f} MB above the model", flush=True)
    watch = CpuWatch()
    seconds, stores = median_time(lambda: saelab.cache_activations(
        work / "activations", sites=(SITE,), tokens=s.cache_tokens,
        context_size=s.context_size, lm=lm))
    store = stores[SITE]
    row("cache", seconds, watch, len(store))
    watch = CpuWatch()
    seconds, sae = median_time(lambda: saelab.train(saelab.TrainConfig(
        architecture="topk", n_latents=s.n_latents, k=s.k, tokens=s.train_tokens,
        batch_size=s.batch_size, lr_warmup_steps=s.lr_warmup_steps), store, work / "sae"))
    row("train", seconds, watch, s.train_tokens)

    cfg = CompareConfig(sae=str(work / "sae"), out=work / "compare", site=SITE,
                        tokens=s.eval_tokens, fit_tokens=s.fit_tokens,
                        context_size=s.context_size, skip_tokens=len(store), k=s.ks)
    fit_windows, windows = corpus_windows(lm, cfg.corpus, text_column=cfg.text_column,
                                          context_size=cfg.context_size,
                                          skip_tokens=cfg.skip_tokens,
                                          fit_tokens=cfg.fit_tokens, tokens=cfg.tokens)
    held_out = site_activations(lm, SITE, fit_windows)
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
        plain += median_time(lambda ids=ids: lm.logits(ids))[0]
        t, clean = median_time(lambda ids=ids: clean_pass(lm, SITE, ids))
        clean_t += t
        splice_t += median_time(lambda c=clean: spliced_loss(lm, SITE, c, c.activations))[0]
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
        seconds, _ = median_time(lambda c=c: c(x))
        row(f"code: {coder}" + (f" k={k}" if coder in ("mp", "gp", "omp") else ""), seconds,
            watch, coded)
    n_rows = len(plan(cfg.coders, cfg.k, k))  # the comparison's rows (saelab.evals.plan)
    return {"rows": rows, "settings": dataclasses.asdict(s), "matched_k": k,
            "scoring_peak_mb_1024_tokens": peak_mb,
            "compare_rows": n_rows, "passes_per_batch": n_rows + 2,
            "naive_passes_per_batch": 2 * n_rows + 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_output_args(parser, "compare", quick="the demo's --quick settings",
                    smoke="smaller than --quick (2,000 cached tokens, 256 latents trained on "
                    "4,000 tokens, 126 evaluated), one cached load")
    args = parser.parse_args()
    settings = SMOKE if args.smoke else QUICK if args.quick else FULL
    out = out_path(args, "compare")
    torch.set_num_threads(THREADS)
    env = environment(THREADS)
    rate = gemm_rate()
    print(f"float32 GEMM: {rate / 1e9:.0f} GFLOP/s on {THREADS} threads", flush=True)
    watch = CpuWatch()
    with tempfile.TemporaryDirectory() as work:
        result = run(settings, Path(work), load_repeats=1 if args.smoke else 3)
    others = watch.others_share()
    params = 268e6 - 262144 * 640  # Gemma 3 270M without the embedding (read by index)
    floor_tok_s = rate / (2 * (params + 262144 * 640))  # blocks + LM head (tied embedding)
    print(f"\nother processes took {others:.0%} of the CPU over the whole run")
    lines = [[r["stage"], f"{r['seconds']:.2f}",
              f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "",
              f"{r['overhead']:+.1%}" if "overhead" in r else "",
              f"{r['others_cpu_share']:.0%}"] for r in result["rows"]]
    print(render_table(["stage", "seconds", "tokens/s", "vs plain", "others CPU"], lines))
    print(f"scoring 1024 tokens (clean + spliced pass): peak RSS "
          f"{result['scoring_peak_mb_1024_tokens']:,.0f} MB above the model")
    print(f"floor: a forward pass at the GEMM rate {floor_tok_s:,.0f} tokens/s; "
          f"compare runs {result['passes_per_batch']} passes per batch for "
          f"{result['compare_rows']} rows (clean once), not {result['naive_passes_per_batch']}")
    result.update({"others_cpu_share": others, "gemm_gflops": rate / 1e9,
                   "floor_forward_tokens_per_s": floor_tok_s, "threads": THREADS,
                   "quick": args.quick, "smoke": args.smoke, "environment": finish(env)})
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
