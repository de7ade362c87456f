"""The training loop: `train(config, source, out)` -> a trained SAE.

One step: read this rank's rows of the global batch, normalise them (mean squared norm
d_model), take the architecture's loss, average gradients over ranks, keep decoder rows unit
norm (their gradient's radial part removed, then renormalised), Adam. Every
`checkpoint_every` steps the whole state goes to `checkpoint.pt` atomically, so a killed run
started again with the same command continues where it was and ends with the same weights.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab.activations import ActivationStore
from saelab.errors import SaelabError
from saelab.io import atomic_write, read_json, write_json
from saelab.saes import REGISTRY, SAE, save_sae
from saelab.training.config import TrainConfig
from saelab.training.data import TrainingData
from saelab.training.distributed import World, join_world

CHECKPOINT, CONFIG, METRICS = "checkpoint.pt", "config.json", "metrics.jsonl"


@dataclass
class _State:
    sae: SAE
    optimizer: torch.optim.Adam
    step: int
    since_fired_L: Tensor  # [n_latents] tokens since each latent last fired


def train(config: TrainConfig, source: ActivationStore | Tensor, out: str | Path | None = None
          ) -> SAE:
    """Train an SAE on `source` (an `ActivationStore` or a tensor [tokens, d_model]).

    With `out`, the run folder gets config.json, metrics.jsonl, checkpoints and, at the end,
    the SAE in SAELens layout (cfg.json + sae_weights.safetensors), input normalisation
    folded in so it works on raw activations. Re-running a finished run loads its SAE.
    """
    data = TrainingData(source)
    if config.d_model is not None and config.d_model != data.d_model:
        raise SaelabError("the activations' width differs from --d-model",
                          expected=f"d_model {config.d_model}", found=f"{data.d_model}",
                          fix="drop --d-model or use the store of the right site")
    world = join_world(config.device)
    folder = Path(out) if out is not None else None
    if folder is not None:
        done = _prepare_folder(folder, config, world)
        if done is not None:
            return done
    if world.size > 1 and config.device == "cuda":  # one GPU per rank
        config = replace(config, device=f"cuda:{os.environ.get('LOCAL_RANK', world.rank)}")
    state = _resume(folder, config, data) or _fresh(config, data)
    _loop(state, config, data, world, folder)
    sae = state.sae.eval()
    sae.fold_input_scale(data.norm_scale)
    if isinstance(source, ActivationStore):
        sae.site, sae.model = source.site, source.model
    if folder is not None and world.is_main:
        save_sae(sae, folder, metadata={"training_tokens": config.steps * config.batch_size,
                                        "saelab_config": asdict(config)})
        (folder / CHECKPOINT).unlink(missing_ok=True)
    world.barrier()
    return sae


def _fresh(config: TrainConfig, data: TrainingData) -> _State:
    extra = {"k": config.k} if config.architecture in ("topk", "batchtopk") else {}
    sae = REGISTRY[config.architecture](data.d_model, config.n_latents, **extra,
                                        device=config.device)
    sae.init_random(config.seed)
    with torch.no_grad():
        sae.b_dec.copy_(_initial_b_dec(config, data) * data.norm_scale)
        if config.architecture == "jumprelu" and config.k is not None:
            _initial_thresholds(sae, config, data)
    optimizer = torch.optim.Adam(sae.parameters(), lr=config.learning_rate(), fused=True)
    return _State(sae.train(), optimizer, 0,
                  torch.zeros(config.n_latents, dtype=torch.long, device=config.device))


def _initial_b_dec(config: TrainConfig, data: TrainingData) -> Tensor:
    if config.b_dec_init == "zero":
        return torch.zeros(data.d_model)
    if config.b_dec_init == "mean":
        return data.mean
    rng = np.random.default_rng(config.seed)  # geometric median (Weiszfeld) of a sample
    x = data.rows(np.sort(rng.choice(data.n, min(data.n, 8192), replace=False))).double()
    median = x.mean(dim=0)
    for _ in range(100):
        w = 1 / (x - median).norm(dim=1).clamp(min=1e-8)
        median = (w[:, None] * x).sum(dim=0) / w.sum()
    return median.float()


def _initial_thresholds(sae: SAE, config: TrainConfig, data: TrainingData) -> None:
    """Start each JumpReLU threshold where its latent fires on a fraction k / n_latents of a
    data sample: the L0 starts near its target instead of at n_latents / 2, and the
    straight-through gradients only have to fine-tune the thresholds."""
    rng = np.random.default_rng(config.seed)
    x = data.rows(np.sort(rng.choice(data.n, min(data.n, 4096), replace=False)))
    pre_BL = sae.pre_acts(x.to(config.device) * data.norm_scale)
    q = 1 - config.k / config.n_latents
    sae.threshold.copy_(pre_BL.float().quantile(q, dim=0).clamp(min=1e-3).to(pre_BL.dtype))


def _loop(state: _State, config: TrainConfig, data: TrainingData, world: World,
          folder: Path | None) -> None:
    per_epoch = max(1, data.n // config.batch_size)
    variance = data.variance * data.norm_scale**2  # loss scale: FVU-sized numbers
    bar = tqdm(total=config.steps * config.batch_size, initial=state.step * config.batch_size,
               unit="tok", unit_scale=True, desc=f"train {config.architecture}",
               disable=None if world.is_main else True)
    start, start_step = time.perf_counter(), state.step
    while state.step < config.steps:
        epoch, offset = divmod(state.step, per_epoch)
        for index in _skip(data.global_batches(config.batch_size, config.seed, epoch), offset):
            x = _batch(data, index[world.slice(config.batch_size)], config.device)
            metrics = _step(state, config, x, variance, world)
            state.step += 1
            bar.update(config.batch_size)
            if state.step % config.log_every == 0 or state.step == config.steps:
                tps = (state.step - start_step) * config.batch_size / (time.perf_counter() - start)
                bar.set_postfix(fvu=f"{metrics['fvu']:.3f}", l0=f"{metrics['l0']:.1f}")
                if folder is not None and world.is_main:
                    _log(folder, {**metrics, "tokens_per_s": tps})
            if folder is not None and (state.step % config.checkpoint_every == 0):
                _checkpoint(folder, state, world)
            if state.step >= config.steps:
                break
    bar.close()


def _skip(batches: Any, n: int) -> Any:
    for _ in range(n):
        next(batches, None)
    return batches


def _batch(data: TrainingData, index: np.ndarray, device: str) -> Tensor:
    x = data.rows(index).to(device)
    if not torch.isfinite(x).all():
        bad = int(index[(~torch.isfinite(x)).any(dim=1).nonzero()[0, 0].item()])
        raise SaelabError("the training data holds NaN or inf", expected="finite activations",
                          found=f"a non-finite value in row {bad}",
                          fix="re-create the store with `saelab cache` (it checks every shard)")
    return x * data.norm_scale


def _step(state: _State, config: TrainConfig, x: Tensor, variance: float,
          world: World) -> dict[str, float]:
    sae, step = state.sae, state.step
    dead_L = state.since_fired_L >= config.dead_tokens
    ramp = min(1.0, (step + 1) / max(1, config.sparsity_warmup_steps))
    out = sae.loss(x, sparsity_coef=config.sparsity() * ramp, dead_L=dead_L)
    for group in state.optimizer.param_groups:
        group["lr"] = _lr(config, step)
    state.optimizer.zero_grad(set_to_none=True)  # backward's tensors become the grads
    (out.loss / variance).backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in sae.parameters()]
    for p, g in zip(sae.parameters(), grads, strict=True):
        p.grad = g
    world.all_reduce_mean_(grads)
    unit_norm = config.architecture != "relu"  # relu's L1 is weighted by the decoder norms
    if unit_norm:
        with torch.no_grad():  # no gradient along each decoder row (it would change its norm)
            W, g = sae.W_dec, sae.W_dec.grad
            g -= (g * W).sum(dim=1, keepdim=True) * W
    state.optimizer.step()
    with torch.no_grad():
        if unit_norm:
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-8)
        if config.architecture == "jumprelu":
            sae.threshold.clamp_(min=1e-6)
        fired_L = out.fired.to(torch.float32)
        world.all_reduce_mean_([fired_L])
        state.since_fired_L = torch.where(fired_L > 0, 0, state.since_fired_L + config.batch_size)
    return {"step": step + 1, "tokens": (step + 1) * config.batch_size,
            "loss": float(out.loss.detach()), **{k: float(v.detach()) for k, v in out.terms.items()},
            "l0": float(out.l0),
            "dead_fraction": float(dead_L.float().mean()), "lr": _lr(config, step)}


def _lr(config: TrainConfig, step: int) -> float:
    """Linear warm-up, constant, then linear decay to 0 over the last fraction of steps."""
    base, steps = config.learning_rate(), config.steps
    warm = min(1.0, (step + 1) / max(1, config.lr_warmup_steps))
    decay_steps = int(config.lr_decay_fraction * steps)
    decay = min(1.0, (steps - step) / decay_steps) if decay_steps else 1.0
    return base * warm * decay


def _log(folder: Path, metrics: dict[str, float]) -> None:
    with open(folder / METRICS, "a") as f:
        f.write(json.dumps(metrics) + "\n")


def _checkpoint(folder: Path, state: _State, world: World) -> None:
    if world.is_main:
        buffer = io.BytesIO()
        torch.save({"sae": state.sae.state_dict(), "optimizer": state.optimizer.state_dict(),
                    "step": state.step, "since_fired": state.since_fired_L}, buffer)
        atomic_write(folder / CHECKPOINT, lambda f: f.write(buffer.getvalue()))
    world.barrier()


def _resume(folder: Path | None, config: TrainConfig, data: TrainingData) -> _State | None:
    if folder is None or not (folder / CHECKPOINT).is_file():
        return None
    state = _fresh(config, data)
    saved = torch.load(folder / CHECKPOINT, map_location=config.device, weights_only=True)
    state.sae.load_state_dict(saved["sae"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.step, state.since_fired_L = saved["step"], saved["since_fired"]
    _truncate_metrics(folder / METRICS, state.step)
    return state


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint; the resumed run logs those steps again."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= step]
        atomic_write(path, lambda f: f.write("".join(ln + "\n" for ln in lines).encode()))


def _prepare_folder(folder: Path, config: TrainConfig, world: World) -> SAE | None:
    """Refuse a folder holding another run; return the SAE of a finished identical run."""
    wanted = asdict(config)
    if (folder / CONFIG).is_file():
        found = read_json(folder / CONFIG)
        if found != json.loads(json.dumps(wanted)):
            diff = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
            raise SaelabError(f"{folder} holds another training run",
                              expected="the same settings, to resume it",
                              found="different " + ", ".join(diff),
                              fix="pick a new --out, or delete the folder to start over")
        if (folder / "cfg.json").is_file() and not (folder / CHECKPOINT).is_file():
            from saelab.saes import load_sae

            return load_sae(folder, device=config.device)
    elif world.is_main:
        write_json(folder / CONFIG, wanted)
    world.barrier()
    return None
