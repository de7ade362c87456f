"""Toy models of superposition against the results of Elhage et al. 2022, and the measures
against hand-computed geometries.

The models train with lr 1e-2 for 1500 steps instead of the paper's 1e-3 for 10,000 (the
same optimum, about 7x fewer steps; checked against the paper's settings by hand), all
instances of a test in one vectorised model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from saelab.cli import main
from saelab.toys.measures import (
    DEDICATED,
    NOT_REPRESENTED,
    SUPERPOSITION,
    measure,
    second_feature_phase,
)
from saelab.toys.model import Instances, ToyModel, dropout_scale, importance_loss, train_toy
from saelab.verbs.toy import PhaseDiagramConfig, run_phase_diagram

FAST = dict(steps=1500, lr=1e-2)
N, M = 20, 5


pytestmark = pytest.mark.usefixtures("one_thread")


def _polygon(n: int) -> torch.Tensor:
    angle = 2 * math.pi * torch.arange(n, dtype=torch.float64) / n
    return torch.stack([angle.cos(), angle.sin()], dim=1)


# (name, W [features, hidden], D_i of every feature, features represented, dimensions per
# feature m / ||W||_F^2, superposition sum_j!=i (W_i_hat . W_j)^2 of every feature), by hand:
# e.g. the pentagon's neighbours are 72 and 144 degrees away, 2 cos^2 72 + 2 cos^2 144 = 1.5
GEOMETRIES = [
    ("orthogonal basis", torch.eye(3), [1, 1, 1], 3, 3 / 3, [0, 0, 0]),
    ("antipodal pair", torch.tensor([[1.0], [-1.0]]), [0.5, 0.5], 2, 1 / 2, [1, 1]),
    ("pentagon", _polygon(5), [0.4] * 5, 5, 2 / 5, [1.5] * 5),
    ("square (two antipodal pairs)", _polygon(4), [0.5] * 4, 4, 2 / 4, [1] * 4),
    ("one ignored feature", torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), [1, 1, 0], 2,
     2 / 2, [0, 0, 0]),
    ("half-norm feature", torch.tensor([[1.0, 0.0], [0.0, 0.4]]), [1, 1], 1, 2 / 1.16, [0, 0]),
]


@pytest.mark.parametrize(("name", "W", "dims", "represented", "per_feature", "superposition"),
                         GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_measures_of_known_geometries(name, W, dims, represented, per_feature, superposition):
    m = measure(W[None].float())
    torch.testing.assert_close(m.dimensionality[0], torch.tensor(dims, dtype=torch.float32))
    assert int(m.n_represented[0]) == represented
    assert float(m.dimensions_per_feature[0]) == pytest.approx(per_feature, rel=1e-6)
    torch.testing.assert_close(m.superposition[0], torch.tensor(superposition, dtype=torch.float32),
                               atol=1e-6, rtol=1e-6)


def test_instances_do_not_interact():
    inst = Instances.grid(N, [0.0, 0.9], importance_decay=0.7)
    model = ToyModel(len(inst), N, M)
    x = torch.rand(len(inst), 64, N)
    importance_loss(x, model(x), inst.importance)[0].backward()
    assert model.W_IFH.grad[0].abs().sum() > 0
    assert model.W_IFH.grad[1].abs().sum() == 0 and model.b_IF.grad[1].abs().sum() == 0


@pytest.mark.parametrize("where", ["hidden", "input"])
def test_dropout_on_one_dense_feature_reaches_the_linear_optimum(where):
    """n = m = 1, x ~ U[0, 1] always on, dropout q: the output w^2 x mask / (1 - q) + b stays
    positive, so the optimum is the least-squares line of x on x * mask:
    w^2 = (1 - q) / (1 + 3q), b = 2q / (1 + 3q). Four seeds per rate, the best by the loss
    under dropout (a negative-bias solution is a poor local minimum)."""
    rates = torch.tensor([0.2, 0.5]).repeat_interleave(4)
    none = torch.zeros(8)
    inst = Instances(torch.ones(8), torch.ones(8, 1), rates if where == "hidden" else none,
                     rates if where == "input" else none)
    model, _ = train_toy(inst, 1, progress=False, **FAST)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(8, 1 << 15, 1, generator=gen)
    with torch.no_grad():
        keep = dropout_scale(rates, x.shape, gen, "cpu")
        out = model(x, keep) if where == "hidden" else model(x * keep)
        loss = importance_loss(x, out, inst.importance).reshape(2, 4)
    best = loss.argmin(dim=1) + torch.tensor([0, 4])
    q = torch.tensor([0.2, 0.5])
    torch.testing.assert_close(model.W_IFH.detach()[best, 0, 0] ** 2, (1 - q) / (1 + 3 * q),
                               atol=0.02, rtol=0)
    torch.testing.assert_close(model.b_IF.detach()[best, 0], 2 * q / (1 + 3 * q), atol=0.02,
                               rtol=0)


@pytest.fixture(scope="module")
def tms():
    """n=20, m=5, importance 0.7^i: sparsity {0, 0.9} x hidden dropout {0, 0.3}, 3 seeds."""
    inst = Instances.grid(N, [0.0, 0.9], importance_decay=0.7, hidden_dropout=(0.0, 0.3),
                          repeats=3)
    model, _ = train_toy(inst, M, progress=False, **FAST)
    return inst, measure(model.W_IFH)


def _select(inst: Instances, sparsity: float, dropout: float) -> torch.Tensor:
    return ((1 - inst.feature_probability - sparsity).abs() < 1e-6) \
        & ((inst.hidden_dropout - dropout).abs() < 1e-6)


def test_dense_features_get_no_superposition(tms):
    """Paper: with dense features the model learns the m most important features in
    orthogonal dimensions, like PCA, and ignores the rest."""
    inst, m = tms
    dense = _select(inst, 0.0, 0.0)
    assert m.n_represented[dense].tolist() == [M] * 3
    for norm_F, dims_F, sup_F in zip(m.norm[dense], m.dimensionality[dense],
                                     m.superposition[dense]):
        assert (norm_F > 0.5).nonzero().squeeze(1).tolist() == list(range(M))  # most important
        torch.testing.assert_close(dims_F[:M], torch.ones(M), atol=0.02, rtol=0)
        assert float(sup_F[:M].max()) < 0.02
    torch.testing.assert_close(m.dimensions_per_feature[dense], torch.ones(3), atol=0.02, rtol=0)


def test_sparse_features_are_stored_in_superposition(tms):
    """Paper: at sparsity 0.9 more than m features are represented, at fractional D_i."""
    inst, m = tms
    sparse = _select(inst, 0.9, 0.0)
    assert (m.n_represented[sparse] > M).all()
    assert (m.dimensions_per_feature[sparse] < 0.8).all()
    represented = m.norm[sparse] > 0.5
    assert float(m.dimensionality[sparse][represented].min()) < 0.6


def test_hidden_dropout_lowers_the_number_represented(tms):
    inst, m = tms
    plain = m.n_represented[_select(inst, 0.9, 0.0)].float()
    dropped = m.n_represented[_select(inst, 0.9, 0.3)].float()
    assert float(dropped.mean()) < float(plain.mean())
    assert float(dropped.max()) <= float(plain.min())


def test_phase_diagram_has_the_papers_three_regions(tmp_path: Path):
    """n=2, m=1 (paper, "Phase Change"): dense and less important -> the second feature is
    not represented; dense and more important -> it takes the dimension alone; sparse ->
    both share it in superposition, as an antipodal pair."""
    cfg = PhaseDiagramConfig(out=tmp_path, n_density=3, min_density=0.01, n_importance=2,
                             min_importance=0.2, max_importance=5.0, repeats=8, **FAST)
    res = run_phase_diagram(cfg)
    phase = res["phase"]  # [density 0.01, 0.1, 1][importance 0.2, 5]
    assert phase[2] == [NOT_REPRESENTED, DEDICATED]
    assert phase[0] == [SUPERPOSITION, SUPERPOSITION]
    for w1, w2 in res["W"][0]:
        assert w1 * w2 < 0 and abs(w1) == pytest.approx(abs(w2), rel=0.15)  # antipodal
    assert (tmp_path / "phase_diagram.png").stat().st_size > 0
    assert (tmp_path / "phase_diagram.svg").stat().st_size > 0


def test_second_feature_phase_by_hand():
    norms = torch.tensor([[1.0, 0.1], [0.1, 1.0], [1.0, 1.0], [0.0, 0.0]])
    assert second_feature_phase(norms).tolist() == [NOT_REPRESENTED, DEDICATED, SUPERPOSITION,
                                                    NOT_REPRESENTED]


def test_toy_tms_cli_writes_results_and_plots(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["toy", "tms", "--out", str(out), "--steps", "300", "--lr", "0.01",
                 "--sparsity", "0", "--sparsity", "0.9", "--dropout", "0", "--dropout", "0.2"]) == 0
    assert "features represented" in capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())["instances"]
    assert [r["sparsity"] for r in rows] == pytest.approx([0, 0, 0.9, 0.9])
    assert [r["dropout"] for r in rows] == pytest.approx([0, 0.2, 0, 0.2])
    for r in rows:
        assert len(r["superposition"]) == N and 0 <= r["n_represented"] <= N
        assert r["dimensions_per_feature"] > 0
    assert json.loads((out / "config.json").read_text())["sparsity"] == [0.0, 0.9]
    for stem in ("weights", "dimensionality"):
        assert (out / f"{stem}.png").stat().st_size > 0 and (out / f"{stem}.svg").is_file()
    assert (out / "toy.safetensors").is_file()


def test_toy_dropout_cli_fits_a_line_per_sparsity(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["toy", "dropout", "--out", str(out), "--steps", "300", "--lr", "0.01",
                 "--sparsity", "0.9", "--dropout", "0", "--dropout", "0.4", "--repeats", "2"]) == 0
    assert "fit" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert np.shape(res["features_per_dimension"]) == (1, 2)
    fit = res["linear_fit"][0]
    # two rates: the line passes through the two means
    assert fit["intercept"] == pytest.approx(res["features_per_dimension"][0][0])
    assert fit["intercept"] + 0.4 * fit["slope"] == pytest.approx(res["features_per_dimension"][0][1])
    assert (out / "dropout.png").is_file() and (out / "dropout.svg").is_file()


@pytest.mark.parametrize(("args", "message"), [
    (["tms", "--sparsity", "1.5"], "sparsity and dropout rates must be in [0, 1)"),
    (["dropout", "--dropout", "0.2"], "needs at least two rates"),
    (["phase-diagram", "--min-density", "0"], "grid is empty or out of range"),
])
def test_toy_user_errors_exit_2(tmp_path, capsys, args, message):
    assert main(["toy", *args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
