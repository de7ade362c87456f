"""Training defaults (issue 17): the target-L0 controller from coefficients 100x off either
way, inputs scaled by the centred variance (a constant added to every row changes nothing),
and the run's warnings on a run built to collapse and on a healthy one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import saelab as sl
from saelab.saes import architecture as architecture_class
from saelab.toys.store import SITE, write_store
from saelab.toys.synthetic import SyntheticSpec
from saelab.training.monitor import LOST, RunMonitor

TARGET = 8.0


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> sl.ActivationStore:
    folder = tmp_path_factory.mktemp("synthetic") / "store"
    write_store(SyntheticSpec(d_model=64, n_features=512, k=4, magnitude="exponential",
                              seed=3), folder, 40_000)
    store = sl.ActivationStore(folder)
    assert store.site == SITE
    return store


def config(architecture: str, **kw) -> sl.TrainConfig:
    return sl.TrainConfig(**{"architecture": architecture, "n_latents": 256, "tokens": 400_000,
                             "batch_size": 400, "lr": 2e-3, "dead_tokens": 40_000,
                             "log_every": 1, **kw})


def ends_at(metrics: list[dict]) -> float:
    """The mean L0 over the last 5 % of steps (the run's end, less one batch's noise)."""
    tail = metrics[-max(1, len(metrics) // 20):]
    return sum(m["l0"] for m in tail) / len(tail)


def run(cfg: sl.TrainConfig, source, out) -> tuple[sl.SAE, list[dict], dict]:
    sae = sl.train(cfg, source, out)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return sae, metrics, json.loads((out / "config.json").read_text())


@pytest.mark.parametrize("architecture", ["relu", "jumprelu"])
def test_the_controller_reaches_the_target_from_100x_off_either_way(architecture, synthetic,
                                                                   tmp_path, one_thread):
    """From the coefficient a first run settles at, times 0.01 and times 100 (which the
    controller clips to the top of the class's range): the L0 ends within 10 % of the
    target, and the coefficient comes back near where the first run settled."""
    control = architecture_class(architecture).sparsity_control(64, TARGET)
    span = control.high - max(control.low, 0.0)
    _, _, settled = run(config(architecture, target_l0=TARGET), synthetic, tmp_path / "mid")
    coef = settled["outcome"]["sparsity_coef"]
    assert control.low + 0.05 * span < coef < control.high - 0.05 * span  # not pinned
    for factor in (0.01, 100.0):
        out = tmp_path / f"x{factor}"
        sae, metrics, recorded = run(config(architecture, target_l0=TARGET,
                                            sparsity_coef=coef * factor), synthetic, out)
        assert max(m["sparsity_coef"] for m in metrics) <= control.high
        assert ends_at(metrics) == pytest.approx(TARGET, rel=0.1), (factor, metrics[-1])
        final = recorded["outcome"]["sparsity_coef"]
        assert final == pytest.approx(coef, abs=0.15 * span)
        cfg_json = json.loads((out / "cfg.json").read_text())
        assert cfg_json["metadata"]["sparsity_coef"] == final
        codes = sae.encode(synthetic.rows(np.arange(4000)))
        assert (codes > 0).sum(1).float().mean().item() == pytest.approx(TARGET, rel=0.15)


@pytest.mark.parametrize("architecture", ["relu", "jumprelu", "topk"])
def test_a_constant_added_to_every_row_changes_nothing(architecture, one_thread):
    g = torch.Generator().manual_seed(0)
    true = torch.nn.functional.normalize(torch.randn(64, 16, generator=g), dim=1)
    codes = torch.rand(8000, 64, generator=g) * (torch.rand(8000, 64, generator=g) < 0.08)
    x = codes @ true
    shift = 20.0 * torch.randn(16, generator=g)  # the mean is 99.7 % of the squared norm
    cfg = sl.TrainConfig(architecture=architecture, n_latents=32, k=4, tokens=40_000,
                         batch_size=500, lr=2e-3, sparsity_coef=0.3)
    plain = sl.train(cfg, x.double().float())
    shifted = sl.train(cfg, (x.double() + shift.double()).float())
    for name, a in plain.state_dict().items():
        b = shifted.state_dict()[name]
        if name == "b_dec":
            b = b - shift
        assert_close(b, a, atol=2e-3, rtol=2e-3, msg=name)


def test_the_collapse_warning_fires_on_a_collapsing_run_only(synthetic, tmp_path, one_thread):
    _, _, settled = run(config("relu", target_l0=TARGET), synthetic, tmp_path / "healthy")
    assert settled["outcome"]["warnings"] == []
    coef = settled["outcome"]["sparsity_coef"]
    # 3x the coefficient, ramped over 400 steps: the code learns (FVU 0.54 at step 75) and
    # then loses it to the penalty (0.91 by step 275) while its L0 falls from 115 to 8
    _, metrics, collapsed = run(config("relu", sparsity_coef=3 * coef,
                                       sparsity_warmup_steps=400), synthetic, tmp_path / "bad")
    warnings = collapsed["outcome"]["warnings"]
    assert len(warnings) >= 1 and warnings[0].startswith("collapse from step")
    assert "--sparsity-coef" in warnings[0] and "--target-l0" in warnings[0]
    first = next(m for m in metrics if "collapse" in m.get("warnings", []))
    assert first["fvu"] > 1.4 * min(m["fvu"] for m in metrics[:first["step"]])
    assert first["l0"] < 0.5 * max(m["l0"] for m in metrics[:first["step"]])
    healthy = [json.loads(line) for line in
               (tmp_path / "healthy" / "metrics.jsonl").read_text().splitlines()]
    assert not any("warnings" in m for m in healthy)


def test_the_monitor_rule(synthetic):
    """The rule itself, on made-up series: a rise of FVU past half the variance with a fall of
    L0; not a rise that stays small, nor a fall of L0 alone, nor a controller bringing L0 down
    to its target; and a code that rebuilds nothing at all."""
    cfg = config("relu", tokens=400 * 200, sparsity_warmup_steps=50)

    def feed(monitor, fvu, l0, steps=range(1, 201)):
        return [monitor.observe({"step": s, "fvu": fvu(s), "l0": l0(s), "dead_fraction": 0.0,
                                 "sparsity_coef": 1.0}) for s in steps]

    def rising(s):
        return 0.05 * 1.02 ** s

    def falling(s):
        return 100 * 0.98 ** s

    seen = feed(m := RunMonitor(cfg), rising, falling)
    first = next(i for i, w in enumerate(seen) if w) + 1
    quarter = m.window // 4  # the last quarter's median is its middle step's value
    assert first == next(s for s in range(1, 201) if rising(s - quarter // 2) >= LOST)
    assert seen[-1] == ["collapse"] and "FVU rose from" in m.advice()[0]
    assert not any(feed(RunMonitor(cfg), lambda s: 0.005 * 1.02 ** s, falling))  # stays small
    assert not any(feed(RunMonitor(cfg), lambda s: 0.1, falling))  # L0 falls, FVU holds
    assert not any(feed(RunMonitor(cfg), lambda s: min(rising(s), 0.9), lambda s: 30.0))  # L0 holds
    controlled = config("relu", tokens=400 * 200, sparsity_warmup_steps=50, target_l0=10)
    towards = feed(RunMonitor(controlled), rising, lambda s: 10 + 90 * 0.97 ** s)
    assert not any(towards)  # down to the target is what a controller does
    assert feed(RunMonitor(controlled), rising, falling)[-1] == ["collapse"]  # through it
    flat = RunMonitor(cfg)
    assert feed(flat, lambda s: 1.0, lambda s: 3.0)[-1] == ["collapse"]
    assert "FVU stayed at 1.000 (the code rebuilds nothing)" in flat.advice()[0]
    dead = RunMonitor(cfg)
    assert dead.observe({"step": 1, "fvu": 0.1, "l0": 5, "dead_fraction": 0.11,
                         "sparsity_coef": 1.0}) == ["dead"]
    assert dead.advice()[0].startswith("dead latents from step 1: 11% had not fired")
