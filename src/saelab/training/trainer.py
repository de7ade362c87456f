"""Training: `train(config, source, out)` -> a trained SAE, built from a `Trainer`.

One step (`Trainer.step`): the architecture's loss on this rank's rows of the global batch
(scaled so their mean squared distance from the mean is d_model: `TrainingData.input_scale`)
with the step's sparsity coefficient (`sparsity`: a ramp, then fixed or steered to a target
L0), gradients averaged over ranks, the class's `before_step` (unit-norm rows: the radial part
of their gradient removed), Adam, the class's `after_step` (rows renormalised, thresholds
clamped, ...), the dead-latent tracker, and the run's warnings (`monitor`). The trainer never
asks which architecture it trains: the class says (`saes.base`).

`train` adds the loop, metrics.jsonl, and checkpoints: every `checkpoint_every` steps the
whole state goes to `checkpoint.pt` atomically, so a killed run started again with the same
command continues where it was and ends with the same weights.
"""

from __future__ import annotations

import copy
import io
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from saelab.activations import ActivationStore
from saelab.distributed import World, join_world
from saelab.errors import SaelabError
from saelab.evals.metrics import fvu
from saelab.formats import load_sae, write_sae
from saelab.io import atomic_write, read_json, record_run, write_json
from saelab.reports.training import read_metrics, training_curves
from saelab.saes import SAE
from saelab.training.config import TrainConfig
from saelab.training.data import TrainingData
from saelab.training.monitor import RunMonitor
from saelab.training.sparsity import SparsitySchedule

CHECKPOINT, CONFIG, METRICS, CURVES, SNAPSHOTS = ("checkpoint.pt", "config.json",
                                                 "metrics.jsonl", "curves.png", "snapshots")
_SAMPLE_ROWS = 4096  # rows of data an architecture's data-dependent start and calibration see


class Trainer:
    """The state of one training run (SAE, optimiser, steps done, dead-latent tracker) and
    its step. `train` drives it; drive it yourself for a loop of your own."""

    def __init__(self, config: TrainConfig, data: TrainingData, world: World | None = None
                 ) -> None:
        self.config, self.data = config, data
        self.world = world or World(0, 1)
        self.device = self.world.device(config.device)
        cls = config.sae_class()
        sae = cls(data.d_model, config.n_latents, device=self.device,
                  **{name: getattr(config, name) for name in cls.hyperparameter_names})
        sae.init_random(config.seed)
        with torch.no_grad():
            sae.b_dec.copy_(_initial_b_dec(config, data) * data.input_scale)
        if cls.needs_data_init:
            sae.init_from_data(self.sample(_SAMPLE_ROWS).to(self.device) * data.input_scale,
                               l0=config.k)
        self.sae = sae.train()
        control = (cls.sparsity_control(data.d_model, config.target_l0)
                   if config.target_l0 is not None else None)
        scales = control.lr_scales if control is not None else {}
        groups: dict[float, list[nn.Parameter]] = {}
        for name, param in sae.named_parameters():
            groups.setdefault(scales.get(name, 1.0), []).append(param)
        self.optimizer = torch.optim.Adam(
            [{"params": params, "lr_scale": scale} for scale, params in groups.items()],
            lr=config.learning_rate(), fused=True)
        self.steps_done = 0
        self.sparsity = SparsitySchedule(config.sparsity(), config.sparsity_ramp_steps,
                                         config.target_l0, config.steps, control)
        self.monitor = RunMonitor(config)
        self.since_fired_L = torch.zeros(config.n_latents, dtype=torch.long,
                                         device=self.device)  # tokens since each last fired
        self.variance = data.variance * data.input_scale**2  # loss scale: FVU-sized numbers

    def batch(self, index: np.ndarray) -> Tensor:
        """This rank's rows of the global batch `index`, checked finite and normalised."""
        index = index[self.world.slice(len(index))]
        x_BD = self.data.rows(index).to(self.device)
        if not torch.isfinite(x_BD).all():
            bad = int(index[int((~torch.isfinite(x_BD)).any(dim=1).nonzero()[0, 0])])
            raise SaelabError("the training data holds NaN or inf",
                              expected="finite activations",
                              found=f"a non-finite value in row {bad}",
                              fix="re-create the store with `saelab cache` (it checks every "
                              "shard)")
        return x_BD * self.data.input_scale

    def step(self, x_BD: Tensor) -> dict[str, Any]:
        """One optimiser step on normalised rows; returns the step's metrics."""
        config, sae, step = self.config, self.sae, self.steps_done
        dead_L = self.since_fired_L >= config.dead_tokens
        coef = self.sparsity.coef(step)
        out = sae.loss(x_BD, sparsity_coef=coef, dead_L=dead_L)
        lr = _lr(config, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        self.optimizer.zero_grad(set_to_none=True)  # backward's tensors become the grads
        (out.loss / self.variance).backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in sae.parameters()]
        for p, g in zip(sae.parameters(), grads, strict=True):
            p.grad = g
        self.world.all_reduce_mean_(grads)
        sae.before_step()
        self.optimizer.step()
        sae.after_step()
        with torch.no_grad():
            fired_L = out.fired.to(torch.float32)
            l0_ = out.l0.detach().to(torch.float32).reshape(1)  # every rank steers alike
            self.world.all_reduce_mean_([fired_L, l0_])
            self.since_fired_L = torch.where(fired_L > 0, 0,
                                             self.since_fired_L + config.batch_size)
        self.steps_done += 1
        l0, step_fvu = float(l0_), fvu(x_BD.detach(), out.x_hat.detach())
        self.sparsity.observe(step + 1, l0, step_fvu, lr / config.learning_rate())
        metrics = {"step": step + 1, "tokens": (step + 1) * config.batch_size,
                   "loss": float(out.loss.detach()),
                   **{k: float(v.detach()) for k, v in out.terms.items()},
                   "fvu": step_fvu, "l0": l0,
                   "dead_fraction": float(dead_L.float().mean()), "lr": lr,
                   "sparsity_coef": coef}
        warnings = self.monitor.observe(metrics)
        return {**metrics, "warnings": warnings} if warnings else metrics

    def outcome(self) -> dict[str, Any]:
        """What the run ends with beyond its weights: the sparsity coefficient it used last
        (the controller's, with a target L0) and the monitor's advice, if any."""
        out: dict[str, Any] = {"warnings": self.monitor.advice()}
        if self.sparsity.start > 0 or self.sparsity.controller is not None:
            out["sparsity_coef"] = self.sparsity.coef(self.steps_done)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (a checkpoint)."""
        return {"sae": self.sae.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.steps_done, "since_fired": self.since_fired_L,
                "sparsity": self.sparsity.state_dict(), "monitor": self.monitor.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps_done = int(state["step"])
        self.since_fired_L = state["since_fired"].to(self.device)
        self.sparsity.load_state_dict(state.get("sparsity", {}))
        self.monitor.load_state_dict(state.get("monitor", {}))

    def sample(self, n: int) -> Tensor:
        """A seeded sample of up to n raw rows, in store order (the same on every rank)."""
        rng = np.random.default_rng(self.config.seed)
        return self.data.rows(np.sort(rng.choice(self.data.n, min(self.data.n, n),
                                                 replace=False)))


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
        resumed = record_run(folder / CONFIG, asdict(config), what="a training run",
                             defaults=TrainConfig.defaults())
        if resumed and (folder / "cfg.json").is_file() and not (folder / CHECKPOINT).is_file():
            return load_sae(folder, device=world.device(config.device))
    trainer = Trainer(config, data, world)
    if folder is not None and (folder / CHECKPOINT).is_file():
        trainer.load_state_dict(_read_checkpoint(folder / CHECKPOINT, trainer.device))
        _truncate_metrics(folder / METRICS, trainer.steps_done)
    _loop(trainer, folder, source)
    sae = _as_saved(trainer, trainer.sae.eval(), source)
    outcome = trainer.outcome()
    if folder is not None and world.is_main:
        write_sae(sae, folder, metadata={"training_tokens": config.steps * config.batch_size,
                                         "saelab_config": asdict(config), **outcome})
        run = read_json(folder / CONFIG)
        write_json(folder / CONFIG, {**run, "outcome": outcome})
        if (folder / METRICS).is_file():
            training_curves({config.architecture: read_metrics(folder / METRICS)},
                            folder / CURVES, title=str(folder), target_l0=config.target_l0)
        (folder / CHECKPOINT).unlink(missing_ok=True)
    world.barrier()
    return sae


def _as_saved(trainer: Trainer, sae: SAE, source: ActivationStore | Tensor) -> SAE:
    """`sae` as a run saves it: calibrated (BatchTopK's threshold), the input scale folded
    in so that it takes raw activations, and told its site and model."""
    data = trainer.data
    sae.calibrate(trainer.sample(_SAMPLE_ROWS).to(trainer.device) * data.input_scale)
    sae.fold_input_scale(data.input_scale)
    if isinstance(source, ActivationStore):
        sae.site, sae.model = source.site, source.model
    return sae


def _snapshot(folder: Path, trainer: Trainer, source: ActivationStore | Tensor,
              tokens: int) -> None:
    """The SAE as it is now, saved as the run's end saves it, into snapshots/TOKENS (a copy:
    the run goes on unchanged). A resumed run writes it again, the same."""
    if trainer.world.is_main:
        sae = _as_saved(trainer, copy.deepcopy(trainer.sae).eval(), source)
        write_sae(sae, folder / SNAPSHOTS / str(tokens), metadata={
            "training_tokens": trainer.steps_done * trainer.config.batch_size,
            "saelab_config": asdict(trainer.config), **trainer.outcome()})
    trainer.world.barrier()


def _initial_b_dec(config: TrainConfig, data: TrainingData) -> Tensor:
    if config.b_dec_init == "zero":
        return torch.zeros(data.d_model)
    if config.b_dec_init == "mean":
        return data.mean
    rng = np.random.default_rng(config.seed)  # geometric median (Weiszfeld) of a sample
    x_BD = data.rows(np.sort(rng.choice(data.n, min(data.n, 8192), replace=False))).double()
    median_D = x_BD.mean(dim=0)
    for _ in range(100):
        w_B = 1 / (x_BD - median_D).norm(dim=1).clamp(min=1e-8)
        median_D = (w_B[:, None] * x_BD).sum(dim=0) / w_B.sum()
    return median_D.float()


def _loop(trainer: Trainer, folder: Path | None, source: ActivationStore | Tensor) -> None:
    config, world = trainer.config, trainer.world
    snapshots = config.snapshot_steps()
    per_epoch = max(1, trainer.data.n // config.batch_size)
    bar = tqdm(total=config.steps * config.batch_size,
               initial=trainer.steps_done * config.batch_size, unit="tok", unit_scale=True,
               desc=f"train {config.architecture}", disable=None if world.is_main else True)
    start, start_step = time.perf_counter(), trainer.steps_done
    while trainer.steps_done < config.steps:
        epoch, offset = divmod(trainer.steps_done, per_epoch)
        for index in trainer.data.global_batches(config.batch_size, config.seed, epoch, offset):
            metrics = trainer.step(trainer.batch(index))
            step = trainer.steps_done
            bar.update(config.batch_size)
            if step % config.log_every == 0 or step == config.steps:
                tps = (step - start_step) * config.batch_size / (time.perf_counter() - start)
                postfix = {"fvu": f"{metrics['fvu']:.3f}", "l0": f"{metrics['l0']:.1f}"}
                if "warnings" in metrics:
                    postfix["warn"] = ",".join(metrics["warnings"])
                bar.set_postfix(postfix)
                if folder is not None and world.is_main:
                    _log(folder, {**metrics, "tokens_per_s": tps})
            if folder is not None and step in snapshots:
                _snapshot(folder, trainer, source, snapshots[step])
            if folder is not None and step % config.checkpoint_every == 0:
                _checkpoint(folder, trainer)
            if step >= config.steps:
                break
    bar.close()


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


def _checkpoint(folder: Path, trainer: Trainer) -> None:
    if trainer.world.is_main:
        buffer = io.BytesIO()
        torch.save(trainer.state_dict(), buffer)
        atomic_write(folder / CHECKPOINT, lambda f: f.write(buffer.getvalue()))
    trainer.world.barrier()


def _read_checkpoint(path: Path, device: str) -> dict[str, Any]:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise SaelabError(f"cannot read the checkpoint {path}",
                          expected="a complete checkpoint written by saelab train",
                          found=f"{type(err).__name__}: {str(err)[:300]}",
                          fix="delete it to restart the run from the start (or from an older "
                          "copy)") from err


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint (and a line a kill cut short); the resumed
    run logs those steps again."""
    if not path.is_file():
        return
    kept = [json.dumps(entry) for entry in read_metrics(path) if entry["step"] <= step]
    atomic_write(path, lambda f: f.write("".join(ln + "\n" for ln in kept).encode()))
