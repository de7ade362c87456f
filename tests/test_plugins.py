"""Architectures are plug-ins: one defined here, outside saelab, trains through
`saelab.train`, is saved, and loads back with `saelab.load_sae`, with no change to saelab.

`CappedReLU` keeps the k largest ReLU pre-activations (TopK's code with plain dense autograd),
starts its encoder biases from the data, and counts the optimiser steps it was told about:
every hook the trainer and the file formats call is exercised, and each is checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import saelab as sl
from saelab.saes import REGISTRY, SAE, LossOutput

N_LATENTS, D_MODEL, K = 48, 16, 3


class CappedReLU(SAE):
    architecture = "test_capped_relu"
    hyperparameter_names = ("k",)
    needs_data_init = True
    default_sparsity_coef = 0.25  # not the base class's 0.0: the config must ask this class

    def __init__(self, d_model: int, n_latents: int, *, k: int, **kw: Any) -> None:
        super().__init__(d_model, n_latents, **kw)
        self.k = k
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long,
                                                       device=self.W_dec.device))
        self.data_rows_seen = 0

    def activation(self, pre_BL: Tensor) -> Tensor:
        top_BK, idx_BK = torch.relu(pre_BL).topk(self.k, dim=1)
        return torch.zeros_like(pre_BL).scatter(1, idx_BK, top_BK)

    def loss(self, x_BD: Tensor, *, sparsity_coef: float, dead_L: Tensor | None = None
             ) -> LossOutput:
        codes_BL = self.encode(x_BD)
        x_hat_BD = self.decode(codes_BL)
        mse = (x_BD - x_hat_BD).pow(2).sum(dim=1).mean()
        return LossOutput.from_codes(mse, codes_BL, x_hat_BD, {"mse": mse})

    @torch.no_grad()
    def init_from_data(self, x_BD: Tensor, *, l0: float | None) -> None:
        """Encoder biases at minus the median pre-activation: half the latents fire."""
        self.b_enc.sub_(self.pre_acts(x_BD).median(dim=0).values)
        self.data_rows_seen = len(x_BD)

    @torch.no_grad()
    def after_step(self) -> None:
        super().after_step()
        self.steps_seen += 1


sl.register_architecture(CappedReLU)


def planted(n: int, seed: int = 0) -> Tensor:
    """Rows made of K of N_LATENTS fixed directions with positive weights, plus an offset."""
    g = torch.Generator().manual_seed(seed)
    D_LD = torch.nn.functional.normalize(torch.randn(N_LATENTS, D_MODEL, generator=g), dim=1)
    idx_NK = torch.randint(0, N_LATENTS, (n, K), generator=g)
    return sl.SparseCode(idx_NK, 1 + torch.rand(n, K, generator=g)).decode(D_LD) + 0.5


def config(**kw: Any) -> sl.TrainConfig:
    return sl.TrainConfig(**{"architecture": CappedReLU.architecture, "n_latents": N_LATENTS,
                             "k": K, "tokens": 200 * 256, "batch_size": 256, "lr": 5e-3,
                             "lr_warmup_steps": 5, "log_every": 5, **kw})


def test_registration_takes_the_name_from_the_class():
    assert REGISTRY[CappedReLU.architecture] is CappedReLU
    assert sl.register_architecture(CappedReLU) is CappedReLU  # again: nothing happens

    class Impostor(CappedReLU):
        architecture = CappedReLU.architecture

    with pytest.raises(ValueError, match="registered already"):
        sl.register_architecture(Impostor)

    class Nameless(CappedReLU):  # inherits a name, but names nothing itself
        pass

    with pytest.raises(TypeError, match="must name itself"):
        sl.register_architecture(Nameless)


def test_the_config_asks_the_class_what_it_needs():
    with pytest.raises(sl.SaelabError, match="needs 0 < k < n_latents"):
        config(k=0)
    with pytest.raises(sl.SaelabError, match="unknown SAE architecture 'no_such'") as err:
        config(architecture="no_such")
    assert CappedReLU.architecture in str(err.value) and "topk" in str(err.value)
    assert config().sparsity() == 0.25
    assert config(sparsity_coef=2.0).sparsity() == 2.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[SAE, Path, Tensor]:
    out = tmp_path_factory.mktemp("plugin") / "run"
    x = planted(4000)
    return sl.train(config(), x, out), out, x


def test_a_plugin_trains_with_every_hook_called(trained):
    sae, out, x = trained
    assert isinstance(sae, CappedReLU) and sae.k == K
    assert int(sae.steps_seen) == 200  # after_step once per optimiser step: 200 * 256 / 256
    assert sae.data_rows_seen == 4000  # init_from_data saw a sample of the data
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(N_LATENTS), atol=1e-5)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = lines[0]["fvu"], lines[-1]["fvu"]
    assert last < 0.5 * first  # it learned
    fvu = sl.evals.fvu(x, sae(x).detach())
    assert fvu == pytest.approx(last, abs=0.1)  # the logged FVU is the SAE's, on raw inputs


def test_a_plugin_saves_and_loads_back(trained):
    sae, out, x = trained
    loaded = sl.load_sae(out)
    assert type(loaded) is CappedReLU and loaded.k == K
    assert loaded.site is None and int(loaded.steps_seen) == int(sae.steps_seen)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=0, atol=0)
    codes = sl.decompose(x[:64], loaded, "encoder")  # every coder takes it
    torch.testing.assert_close(codes.decode(loaded.W_dec, loaded.b_dec),
                               loaded(x[:64]).detach(), rtol=1e-5, atol=1e-5)
    for fmt in ("sparsify", "dictionary_learning"):  # layouts with no such class: refused
        with pytest.raises(sl.SaelabError, match="no"):
            sl.write_sae(loaded, out.parent / fmt, fmt)


def test_loading_needs_the_module_that_registers_it(trained):
    _, out, _ = trained
    code = (f"import saelab as sl\ntry:\n    sl.load_sae({str(out)!r})\n"
            "except sl.SaelabError as err:\n    print(err)\n"
            f"import test_plugins\nprint(type(sl.load_sae({str(out)!r})).__name__)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          check=True)
    assert "architecture not registered here" in proc.stdout
    assert "import the module that registers it" in proc.stdout
    assert proc.stdout.strip().endswith("CappedReLU")
