"""ReLU+L1 SAE quality: saelab's relu trainer against SAELens and dictionary_learning at
matched L0 on a real activation store.

What is measured: the final reconstruction quality of ReLU+L1 SAEs, not their speed. Every
library trains on the same rows of one saelab activation store, in the same order (saelab's:
`TrainingData.global_batches(batch_size, seed=0, epoch=e)`, epoch after epoch), scaled by
the same s = sqrt(d_model / mean_centered_squared_norm) (`TrainingData.input_scale`, what
saelab's trainer does, so an L1 coefficient means the same thing in all three), for the same
number of tokens and the same batch size:

- saelab: `saelab.train(TrainConfig(architecture="relu", target_l0=TARGET, ...), store)`;
  its controller moves the L1 coefficient until the L0 is the target, so there is one row.
- SAELens: `StandardTrainingSAE` (ReLU, L1 on W_dec-norm-weighted codes), each step through
  its own `SAETrainer.step` (coefficient scheduler, gradient clipping at 1, Adam, LR
  scheduler), at each coefficient of --saelens-coefs.
- dictionary_learning: `StandardTrainerAprilUpdate.update(step, x)` (Anthropic's April 2024
  update: decoder norms unconstrained, L1 weighted by them), at each of --dl-coefs.

The peers keep their own initialisation and default learning rate (unless --peer-lr); their
LR warm-up and sparsity warm-up are 5 % of the steps and their LR decays linearly to 0 over
the last 20 %. saelab runs with its own defaults.

Every row is then evaluated the same way on a fixed sample of 16,384 rows of the store (also
scaled by s; held-out-ish: a run of several epochs has seen them): FVU = sum ||x - x_hat||^2 /
sum ||x - mean||^2, L0 (mean number of non-zero codes per row), the fraction of latents that
never fire on the sample, and the training wall time. A peer's FVU at L0 = TARGET is
interpolated linearly in log L0 between the two coefficients whose L0s bracket it; that is
what saelab's FVU at its own L0 is compared with.

Why: a single L1 coefficient does not say how sparse a code ends up, so the libraries can
only be compared on the FVU-L0 curve; the question is whether saelab's trainer lands on (or
below) the peers' curve at the L0 it was asked for.

Each row runs in its own subprocess (OMP_NUM_THREADS=2, `torch.set_num_threads(2)`), one
after another, never two at once. Runs in `.venv`, which holds sae_lens and
dictionary_learning; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from common import (
    ChildFailed,
    CpuWatch,
    add_output_args,
    environment,
    finish,
    json_child,
    load_average,
    logger,
    out_path,
    render_table,
    version,
    write_json,
)

THREADS = 2
SEED = 0  # saelab's default seed: the order of the data and saelab's initialisation
EVAL_ROWS = 16_384
EVAL_SEED = 20_240_401  # the evaluation sample's draw (not the training order's seed)
EVAL_CHUNK = 4096
WARMUP_FRACTION = 0.05  # peers' LR warm-up and sparsity warm-up, as a fraction of the steps
DECAY_FRACTION = 0.2  # peers' final LR decay to 0, as a fraction of the steps
PEERS = {"sae_lens": ("SAELens (standard)", "sae-lens"),
         "dictionary_learning": ("dictionary_learning (April update)", "dictionary-learning")}
# full / --quick / --smoke sizes; an explicit flag overrides its preset
PRESETS: dict[str, dict[str, Any]] = {
    "full": {"n_latents": 4096, "tokens": 2_000_000, "batch_size": 4096,
             "saelens_coefs": "10,30", "dl_coefs": "10,30"},
    "quick": {"n_latents": 1024, "tokens": 250_000, "batch_size": 2048,
              "saelens_coefs": "1,3", "dl_coefs": "1,3"},
    "smoke": {"n_latents": 256, "tokens": 40_000, "batch_size": 1024,
              "saelens_coefs": "1,3", "dl_coefs": "1,3"},
}
log = logger("relu_quality")

Reconstruct = Callable[[Tensor], tuple[Tensor, Tensor]]  # scaled rows -> (codes, x_hat)


@dataclass(frozen=True)
class Sizes:
    """What every row of one run shares."""

    store: str
    n_latents: int
    tokens: int
    batch_size: int
    target_l0: float
    peer_lr: float | None

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.batch_size)

    @property
    def warmup_steps(self) -> int:
        """Peers' LR warm-up and sparsity warm-up: 5 % of the steps (at least 1)."""
        return max(1, int(WARMUP_FRACTION * self.steps))

    @property
    def decay_steps(self) -> int:
        """Peers' final LR decay: the last 20 % of the steps."""
        return int(DECAY_FRACTION * self.steps)


# ---------------------------------------------------------------------------------------------
# Data: saelab's order, saelab's scale; the evaluation sample
# ---------------------------------------------------------------------------------------------

def open_data(store_dir: str) -> Any:
    """The store as saelab's `TrainingData` (its statistics, its order, its scale)."""
    import saelab
    from saelab.training import TrainingData

    return TrainingData(saelab.ActivationStore(store_dir))


def training_batches(data: Any, sizes: Sizes) -> Iterator[Tensor]:
    """The `sizes.steps` batches saelab's training loop takes, each scaled by s: each epoch's
    `global_batches(batch_size, seed=SEED, epoch=e)`, epoch after epoch."""
    scale, done, epoch = data.input_scale, 0, 0
    while done < sizes.steps:
        before = done
        for index in data.global_batches(sizes.batch_size, SEED, epoch):
            yield data.rows(index) * scale
            done += 1
            if done >= sizes.steps:
                return
        if done == before:
            raise ValueError(f"the store's {data.n} rows hold no full batch of "
                             f"{sizes.batch_size}")
        epoch += 1


def eval_sample(data: Any) -> Tensor:
    """A fixed sample of EVAL_ROWS rows of the store (seeded, in store order), scaled by s."""
    rng = np.random.default_rng(EVAL_SEED)
    index = np.sort(rng.choice(data.n, min(data.n, EVAL_ROWS), replace=False))
    return data.rows(index) * data.input_scale


@torch.no_grad()
def evaluate(reconstruct: Reconstruct, x_ND: Tensor) -> dict[str, float]:
    """FVU (sum of squared errors over the sum of squared distances from the sample's mean,
    float64), L0 (mean non-zero codes per row) and the fraction of latents that never fire on
    the sample."""
    from saelab.evals.metrics import ReconstructionMetrics  # saelab's one FVU

    metrics, l0_sum, fired_L = ReconstructionMetrics(), 0.0, None
    for x_BD in x_ND.split(EVAL_CHUNK):
        codes_BL, x_hat_BD = reconstruct(x_BD)
        metrics.update(x_BD, x_hat_BD)
        nonzero_BL = codes_BL != 0
        l0_sum += float(nonzero_BL.sum())
        fired = nonzero_BL.any(dim=0)
        fired_L = fired if fired_L is None else fired_L | fired
    assert fired_L is not None
    return {"fvu": metrics.fvu, "l0": l0_sum / len(x_ND),
            "dead_fraction": float((~fired_L).float().mean()), "eval_rows": len(x_ND)}


# ---------------------------------------------------------------------------------------------
# The rows: each trains, then returns its reconstruction of scaled rows
# ---------------------------------------------------------------------------------------------

def train_saelab(data: Any, sizes: Sizes) -> tuple[Reconstruct, dict[str, Any]]:
    """`saelab.train` with target_l0 (its controller steers the L1 coefficient). The SAE it
    returns has the input scale folded in (it works on raw rows), so scaled rows are divided
    by s on the way in and the reconstruction multiplied by s on the way out. It trains into
    a temporary folder, with no checkpoint during the run, only to read the coefficient the
    controller ended with (config.json's outcome)."""
    import saelab

    config = saelab.TrainConfig(architecture="relu", n_latents=sizes.n_latents,
                                tokens=sizes.tokens, batch_size=sizes.batch_size,
                                target_l0=sizes.target_l0, checkpoint_every=10**9)
    with tempfile.TemporaryDirectory(prefix="relu-quality-") as folder:
        watch, t0 = CpuWatch(), time.perf_counter()
        sae = saelab.train(config, data.source, folder)
        seconds = time.perf_counter() - t0
        watch.stop()
        outcome = json.loads((Path(folder) / "config.json").read_text()).get("outcome", {})
    sae.eval()
    scale = data.input_scale

    def reconstruct(x_BD: Tensor) -> tuple[Tensor, Tensor]:
        codes_BL = sae.encode(x_BD / scale)
        return codes_BL, sae.decode(codes_BL) * scale

    notes = {"lr": config.learning_rate(), "lr_warmup_steps": config.lr_warmup_steps,
             "lr_decay_fraction": config.lr_decay_fraction,
             "sparsity_start": config.sparsity(),
             "sparsity_warmup_steps": config.sparsity_ramp_steps,
             "final_coefficient": outcome.get("sparsity_coef"),
             "warnings": outcome.get("warnings"),
             "timing": "the whole saelab.train call (initialisation and the SAE written at "
                       "the end included)"}
    return reconstruct, {"seconds": seconds, "others_cpu_share": watch.share, "notes": notes}


def train_sae_lens(data: Any, sizes: Sizes, coef: float) -> tuple[Reconstruct, dict[str, Any]]:
    """SAELens's StandardTrainingSAE (its own init: kaiming-uniform rows scaled to norm 0.1,
    W_enc = W_dec^T, zero biases), each batch through its `SAETrainer.step` (the public seam
    `fit` and MultiSAETrainer use: training_forward_pass with the L1 coefficient's scheduler,
    dead-neuron bookkeeping, backward, clipping at 1, Adam, LR scheduler), then
    `n_training_steps += 1` as `fit` does. No activation normalisation in SAELens
    (normalize_activations "none"): the rows come in scaled by s."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    watch, t0 = CpuWatch(), time.perf_counter()
    torch.manual_seed(SEED)
    cfg = StandardTrainingSAEConfig(d_in=data.d_model, d_sae=sizes.n_latents, dtype="float32",
                                    device="cpu", l1_coefficient=coef,
                                    l1_warm_up_steps=sizes.warmup_steps)
    sae = StandardTrainingSAE(cfg)
    lr = sizes.peer_lr if sizes.peer_lr is not None else SAETrainerConfig.lr
    trainer_cfg = SAETrainerConfig(
        total_training_samples=sizes.steps * sizes.batch_size,
        train_batch_size_samples=sizes.batch_size, lr=lr, lr_end=lr / 10,  # the runner's
        lr_scheduler_name="constant", lr_warm_up_steps=sizes.warmup_steps,
        lr_decay_steps=sizes.decay_steps, device="cpu")
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=iter(()))
    for x_BD in training_batches(data, sizes):
        trainer.step(x_BD)
        trainer.n_training_steps += 1
    seconds = time.perf_counter() - t0
    watch.stop()
    sae.eval()

    def reconstruct(x_BD: Tensor) -> tuple[Tensor, Tensor]:
        codes_BL = sae.encode(x_BD)
        return codes_BL, sae.decode(codes_BL)

    notes = {"lr": lr, "lr_default": SAETrainerConfig.lr, "l1_coefficient": cfg.l1_coefficient,
             "l1_warm_up_steps": cfg.l1_warm_up_steps, "lp_norm": cfg.lp_norm,
             "lr_warm_up_steps": trainer_cfg.lr_warm_up_steps,
             "lr_decay_steps": trainer_cfg.lr_decay_steps,
             "lr_scheduler_name": trainer_cfg.lr_scheduler_name,
             "decoder_init_norm": cfg.decoder_init_norm,
             "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
             "adam_betas": [trainer_cfg.adam_beta1, trainer_cfg.adam_beta2],
             "final_l1": trainer.get_coefficients()["l1"]}
    return reconstruct, {"seconds": seconds, "others_cpu_share": watch.share, "notes": notes}


def train_dictionary_learning(data: Any, sizes: Sizes, coef: float
                              ) -> tuple[Reconstruct, dict[str, Any]]:
    """dictionary_learning's StandardTrainerAprilUpdate (AutoEncoder, its own init: gaussian
    columns of norm 0.1, encoder = decoder^T, zero biases), driven by `update(step, x)` as its
    `trainSAE` drives it; the L1 coefficient is its `l1_penalty`. Its LambdaLR schedule does
    the warm-up and the decay (from `decay_start`); `sparsity_warmup_steps` ramps the
    penalty. No normalisation in dictionary_learning (trainSAE's normalize_activations off):
    the rows come in scaled by s."""
    from dictionary_learning.trainers.standard import StandardTrainerAprilUpdate

    watch, t0 = CpuWatch(), time.perf_counter()
    decay_start = sizes.steps - sizes.decay_steps
    kwargs: dict[str, Any] = {"lr": sizes.peer_lr} if sizes.peer_lr is not None else {}
    trainer = StandardTrainerAprilUpdate(
        steps=sizes.steps, activation_dim=data.d_model, dict_size=sizes.n_latents, layer=0,
        lm_name="relu_quality", l1_penalty=coef, warmup_steps=sizes.warmup_steps,
        sparsity_warmup_steps=sizes.warmup_steps,
        decay_start=decay_start if decay_start > sizes.warmup_steps else None,
        seed=SEED, device="cpu", **kwargs)
    for step, x_BD in enumerate(training_batches(data, sizes)):
        trainer.update(step, x_BD)
    seconds = time.perf_counter() - t0
    watch.stop()
    ae = trainer.ae.eval()

    def reconstruct(x_BD: Tensor) -> tuple[Tensor, Tensor]:
        f_BL = ae.encode(x_BD)
        return f_BL, ae.decode(f_BL)

    notes = {"lr": trainer.lr,
             "lr_default": inspect.signature(StandardTrainerAprilUpdate).parameters["lr"].default,
             "l1_penalty": trainer.l1_penalty, "warmup_steps": trainer.warmup_steps,
             "sparsity_warmup_steps": trainer.sparsity_warmup_steps,
             "decay_start": trainer.decay_start}
    return reconstruct, {"seconds": seconds, "others_cpu_share": watch.share, "notes": notes}


def worker(spec: str, sizes: Sizes) -> dict[str, Any]:
    """One row in this process: train, then evaluate. `spec` is "saelab" or
    "<peer>:<coefficient>"."""
    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    data = open_data(sizes.store)
    name, _, coef = spec.partition(":")
    if name == "saelab":
        reconstruct, result = train_saelab(data, sizes)
    elif name == "sae_lens":
        reconstruct, result = train_sae_lens(data, sizes, float(coef))
    elif name == "dictionary_learning":
        reconstruct, result = train_dictionary_learning(data, sizes, float(coef))
    else:
        raise ValueError(f"unknown row {spec!r}")
    t0 = time.perf_counter()
    result.update(evaluate(reconstruct, eval_sample(data)))
    result["eval_seconds"] = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def run_worker(spec: str, sizes: Sizes, timeout: float) -> dict[str, Any]:
    """`worker(spec)` in a fresh interpreter (2 threads); its JSON, or the error it died
    with."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", spec,
           "--store", sizes.store, "--n-latents", str(sizes.n_latents),
           "--tokens", str(sizes.tokens), "--batch-size", str(sizes.batch_size),
           "--target-l0", repr(sizes.target_l0)]
    if sizes.peer_lr is not None:
        cmd += ["--peer-lr", repr(sizes.peer_lr)]
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    try:
        result = json_child(cmd, env, timeout)
    except (ChildFailed, subprocess.TimeoutExpired) as err:
        result = {"error": str(err)[:300]}
    return {**result, "wall_s": time.perf_counter() - t0}


def interpolate_at(rows: Sequence[dict[str, Any]], target: float) -> dict[str, Any]:
    """FVU at L0 = target, linear in log L0 between the two rows (adjacent by L0) whose L0s
    bracket it; "n/a (not bracketed: L0s ...)" otherwise."""
    points = sorted((r["l0"], r["fvu"], r["coefficient"]) for r in rows
                    if "l0" in r and r["l0"] > 0)
    for (l0_a, fvu_a, c_a), (l0_b, fvu_b, c_b) in zip(points, points[1:]):
        if l0_a <= target <= l0_b:
            t = 0.0 if l0_b == l0_a else math.log(target / l0_a) / math.log(l0_b / l0_a)
            return {"fvu": fvu_a + t * (fvu_b - fvu_a), "between_coefficients": [c_b, c_a],
                    "between_l0s": [l0_a, l0_b]}
    l0s = ", ".join(f"{r['l0']:.1f}" for r in rows if "l0" in r) or "none"
    return {"fvu": None, "text": f"n/a (not bracketed: L0s {l0s})"}


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The printed table: one line per row."""
    head = ["row", "coefficient", "lr", "L0", "FVU", "dead", "seconds", "others CPU"]
    lines: list[list[str]] = []
    for r in rows:
        if "error" in r:
            lines.append([r["label"], f"{r['coefficient_text']}  n/a: {r['error']}"])
            continue
        others = r.get("others_cpu_share")
        lines.append([r["label"], r["coefficient_text"], f"{r['notes']['lr']:.2g}",
                      f"{r['l0']:.1f}", f"{r['fvu']:.4f}", f"{r['dead_fraction']:.1%}",
                      f"{r['seconds']:.1f}", f"{others:.0%}" if others is not None else "-"])
    return render_table(head, lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    sizes = Sizes(store=str(args.store), n_latents=args.n_latents, tokens=args.tokens,
                  batch_size=args.batch_size, target_l0=args.target_l0, peer_lr=args.peer_lr)
    if args.worker:
        print(json.dumps(worker(args.worker, sizes)))
        return
    out = out_path(args, "relu_quality")
    env = environment(THREADS, tuple(p for _, p in PEERS.values()))
    data = open_data(sizes.store)
    log(f"{sizes}; {sizes.steps} steps; load average {env['loadavg_start']}")
    specs: list[tuple[str, str, float | None]] = [("saelab", "saelab", None)]
    for name, coefs in (("sae_lens", args.saelens_coefs), ("dictionary_learning", args.dl_coefs)):
        specs += [(name, PEERS[name][0], c) for c in coefs]
    rows: list[dict[str, Any]] = []
    for name, label, coef in specs:
        row: dict[str, Any] = {"row": name, "label": label, "coefficient": coef,
                               "coefficient_text": (f"target L0 {sizes.target_l0:g}"
                                                    if coef is None else f"{coef:g}")}
        if name in PEERS and version(PEERS[name][1]) is None:
            rows.append({**row, "error": f"{PEERS[name][1]} not installed"})
            continue
        log(f"{label}" + (f", coefficient {coef:g}" if coef is not None else
                          f", target L0 {sizes.target_l0:g}"))
        spec = name if coef is None else f"{name}:{coef!r}"
        row.update(run_worker(spec, sizes, args.timeout))
        if "error" in row:
            log(f"  failed: {row['error']}")
        else:
            final = row["notes"].get("final_coefficient")
            if coef is None and final is not None:
                row["coefficient_text"] += f" (ends at {final:.3g})"
            log(f"  L0 {row['l0']:.1f}, FVU {row['fvu']:.4f}, {row['seconds']:.0f} s, "
                f"lr {row['notes']['lr']:.2g}")
        rows.append(row)
    finish(env)

    summary: dict[str, Any] = {}
    saelab_row = rows[0]
    for name, (label, _) in PEERS.items():
        summary[name] = {"label": label, **interpolate_at(
            [r for r in rows if r["row"] == name], sizes.target_l0)}
    if "fvu" in saelab_row:
        summary["saelab"] = {"label": "saelab", "fvu": saelab_row["fvu"], "l0": saelab_row["l0"]}

    text = table(rows)
    print(f"ReLU+L1 SAE quality on {sizes.store}: {data.n:,} rows, d_model {data.d_model}, "
          f"input scale s = {data.input_scale:.4g}; n_latents {sizes.n_latents}, "
          f"{sizes.steps} steps of {sizes.batch_size} ({sizes.steps * sizes.batch_size:,} "
          f"tokens), peers' warm-up {sizes.warmup_steps} step(s), decay over the last "
          f"{sizes.decay_steps}; evaluated on {EVAL_ROWS:,} rows; {THREADS} threads; "
          f"{load_average(env)}")
    print(text)
    print(f"\nFVU at L0 = {sizes.target_l0:g}:")
    for name, (label, _) in PEERS.items():
        s = summary[name]
        if s["fvu"] is None:
            print(f"  {label}: {s['text']}")
        else:
            lo, hi = s["between_l0s"]
            print(f"  {label}: {s['fvu']:.4f} (interpolated between L0 {lo:.1f} and {hi:.1f})")
    if "saelab" in summary:
        print(f"  saelab: {summary['saelab']['fvu']:.4f} at its own L0 "
              f"{summary['saelab']['l0']:.1f}")
    else:
        print(f"  saelab: n/a: {saelab_row.get('error')}")

    result = {"environment": env, "setup": {
        **asdict(sizes), "steps": sizes.steps, "peer_warmup_steps": sizes.warmup_steps,
        "peer_decay_steps": sizes.decay_steps, "d_model": data.d_model, "store_rows": data.n,
        "input_scale": data.input_scale, "eval_rows": EVAL_ROWS, "eval_seed": EVAL_SEED,
        "order": f"TrainingData.global_batches(batch_size, seed={SEED}, epoch=e), "
                 "e = 0, 1, ...", "threads": THREADS,
        "smoke": args.smoke, "quick": args.quick},
        "rows": rows, "at_target_l0": summary, "table": text}
    write_json(out, result)
    log(f"wrote {out}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_output_args(parser, "relu_quality",
                    quick="n_latents 1024, 250k tokens, batches of 2048",
                    smoke="n_latents 256, 40k tokens, batches of 1024, two coefficients a "
                          "peer (under 2 minutes)")
    parser.add_argument("--store", type=Path, required=True,
                        help="a saelab activation store folder (saelab.ActivationStore)")
    parser.add_argument("--n-latents", type=int, default=None, help="dictionary size "
                        "(default 4096)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="training rows per row of the table (default 2,000,000)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 4096")
    parser.add_argument("--target-l0", type=float, default=32.0,
                        help="saelab's target L0, and where the peers are interpolated")
    parser.add_argument("--saelens-coefs", default=None,
                        help="SAELens L1 coefficients, comma-separated (default 10,30)")
    parser.add_argument("--dl-coefs", default=None,
                        help="dictionary_learning l1_penalty values, comma-separated "
                             "(default 10,30)")
    parser.add_argument("--peer-lr", type=float, default=None,
                        help="learning rate of both peers (default: each peer's own)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per subprocess")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    preset = PRESETS["smoke" if args.smoke else "quick" if args.quick else "full"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("saelens_coefs", "dl_coefs"):
        if isinstance(getattr(args, key), str):
            setattr(args, key, [float(c) for c in getattr(args, key).split(",") if c.strip()])
    return args


if __name__ == "__main__":
    main()
