"""Training defaults on a real store: every built-in architecture with its defaults and one
target L0, side by side (issue 17's "defaults that hold").

    .venv/bin/python benchmarks/training_defaults.py --store DIR [--target-l0 32]
        [--n-latents 4096] [--tokens 2000000] [--runs RUNS] [--plot PNG] [--out FILE]

Each architecture trains with `saelab.train(TrainConfig(architecture=A, n_latents=N,
tokens=T, target_l0=L))` and nothing else set, into RUNS/A (a run folder: a killed script
started again resumes each run where it was, and a finished run is read back). Then each SAE
is evaluated on a fixed sample of 16,384 rows of the store: FVU (sum ||x - x_hat||^2 over
sum ||x - mean||^2), L0, and the dead fraction the trainer tracked at its last step
(latents that had not fired for --dead-tokens tokens). The goals: L0 within 10 % of the
target, at most 1 % dead, FVU at most 1.5x topk's. The table, the JSON and one PNG with the
four runs' curves (FVU, L0, dead fraction and the sparsity coefficient against tokens).
The time of a run is its training loop's (tokens / tokens_per_s of its last metrics line).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import saelab
from common import environment, finish, render_table, write_json
from saelab.evals.metrics import fvu
from saelab.io import read_json
from saelab.reports.training import read_metrics, training_curves

ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "relu")
SAMPLE = 16_384


def evaluate(sae: saelab.SAE, store: saelab.ActivationStore) -> dict[str, float]:
    """FVU and L0 of `sae` (which takes raw activations) on a fixed sample of the store."""
    rng = np.random.default_rng(0)
    index = np.sort(rng.choice(len(store), min(SAMPLE, len(store)), replace=False))
    x_ND = store.rows(index)
    with torch.no_grad():
        codes_NL = sae.encode(x_ND)
        x_hat_ND = sae.decode(codes_NL)
    return {"fvu": fvu(x_ND, x_hat_ND), "l0": float((codes_NL > 0).sum(1).float().mean())}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(2)
    store = saelab.ActivationStore(args.store)
    env = environment(threads=2)
    rows: dict[str, dict[str, Any]] = {}
    curves: dict[str, list[dict[str, Any]]] = {}
    for arch in args.architectures:
        config = saelab.TrainConfig(architecture=arch, n_latents=args.n_latents,
                                    tokens=args.tokens, target_l0=args.target_l0)
        folder = args.runs / arch
        print(f"training {arch} into {folder}", file=sys.stderr, flush=True)
        sae = saelab.train(config, store, folder)
        metrics = read_metrics(folder / "metrics.jsonl")
        curves[arch] = metrics
        last = metrics[-1]
        run = read_json(folder / "config.json")
        rows[arch] = {**evaluate(sae, store), "dead_fraction": last["dead_fraction"],
                      "train_fvu": last["fvu"], "train_l0": last["l0"],
                      "sparsity_coef": run.get("outcome", {}).get("sparsity_coef"),
                      "warnings": run.get("outcome", {}).get("warnings", []),
                      "seconds": last["tokens"] / last["tokens_per_s"]}
    reference = rows.get("topk", {}).get("fvu")
    for row in rows.values():
        row["l0_ok"] = abs(row["l0"] / args.target_l0 - 1) <= 0.1
        row["dead_ok"] = row["dead_fraction"] <= 0.01
        row["fvu_vs_topk"] = row["fvu"] / reference if reference else None
        row["fvu_ok"] = row["fvu_vs_topk"] is not None and row["fvu_vs_topk"] <= 1.5
    head = ("architecture", "L0", "FVU", "vs topk", "dead", "coefficient", "seconds", "goals")
    table = [(arch, f"{r['l0']:.1f}", f"{r['fvu']:.4f}",
              f"{r['fvu_vs_topk']:.2f}x" if r["fvu_vs_topk"] else "-",
              f"{r['dead_fraction']:.1%}",
              f"{r['sparsity_coef']:.3g}" if r["sparsity_coef"] is not None else "-",
              f"{r['seconds']:.0f}",
              ", ".join(name for name, ok in (("L0", r["l0_ok"]), ("dead", r["dead_ok"]),
                                              ("FVU", r["fvu_ok"])) if not ok) or "all met")
             for arch, r in rows.items()]
    title = (f"{args.n_latents} latents, {args.tokens:,} tokens, target L0 {args.target_l0:g}, "
             f"on {store.model} {store.site}; goals: L0 within 10 %, dead <= 1 %, FVU <= 1.5x "
             "topk's (a goal not met is named in the last column)")
    print(title)
    print(render_table(head, table))
    if args.plot is not None:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        training_curves(curves, args.plot, target_l0=args.target_l0,
                        title=f"each architecture's defaults, target L0 {args.target_l0:g}")
    write_json(args.out, finish({**env, "store": str(args.store), "target_l0": args.target_l0,
                                 "n_latents": args.n_latents, "tokens": args.tokens,
                                 "rows": rows}))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True, help="activation store (one site)")
    parser.add_argument("--target-l0", type=float, default=32.0)
    parser.add_argument("--n-latents", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=2_000_000)
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES))
    parser.add_argument("--runs", type=Path, default=Path("runs/training_defaults"),
                        help="folder of the run folders (resumable)")
    parser.add_argument("--plot", type=Path, default=Path("docs/images/training/defaults.png"))
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "training_defaults.json")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
