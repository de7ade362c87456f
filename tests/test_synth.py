"""Synthetic ground truth: the store, the firing model against its definition, support
recovery against the incoherence bound (Tropp 2004), and recovery scores by hand."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal, norm

import saelab
from saelab.cli import main
from saelab.toys.recovery import direction_recovery, support_scores
from saelab.toys.store import SyntheticTruth
from saelab.toys.synthetic import (
    SyntheticSpec,
    coherence,
    feature_directions,
    firing_probability,
    parents,
    sample,
    seeded,
)
from saelab.verbs.synth import SynthConfig, run_synth
from saelab.verbs.width_sweep import WidthSweepConfig, run_width_sweep

pytestmark = pytest.mark.usefixtures("one_thread")


def _draw(spec: SyntheticSpec, n: int):
    directions, p = feature_directions(spec), firing_probability(spec)
    x, code = sample(spec, directions, p, n, seeded(spec.seed, 1))
    active = code.to_dense(spec.n_features) != 0  # [n, n_features]
    return directions, p, x, code, active


def test_synth_writes_a_store_that_activation_store_reads(tmp_path, capsys):
    args = ["synth", "--out", str(tmp_path), "--d-model", "32", "--n-features", "96", "--k", "3",
            "--tokens", "5000", "--shard-tokens", "2000", "--noise", "0.01"]
    assert main(args) == 0
    assert "5000 tokens x 32 (float32) from 96 true features, mean L0 3.00" in capsys.readouterr().out
    store = saelab.ActivationStore(tmp_path)
    assert (len(store), store.d_model, store.site, store.model) == (5000, 32, "synthetic",
                                                                    "synthetic")
    assert [s["rows"] for s in store.manifest["shards"]] == [2000, 2000, 1000]
    store.verify()
    truth = SyntheticTruth.load(tmp_path)
    assert truth.directions.shape == (96, 32)
    codes = truth.codes(1990, 2010)  # straddles a shard boundary
    residual = store[1990:2010] - codes.decode(truth.directions)
    assert float(residual.std()) == pytest.approx(0.01, rel=0.2)  # only the noise is left
    assert store.context(7).token_ids == [-1] and store.context(7).window == 7
    batch = next(store.batches(512, seed=0))
    assert batch.shape == (512, 32)
    # the same command again finds the finished store; another config is refused
    assert main(args) == 0
    assert main([*args[:-2], "--noise", "0.02"]) == 2
    assert "made with other settings" in capsys.readouterr().err
    assert json.loads((tmp_path / "synth.json").read_text())["config"]["noise"] == 0.01


def test_synth_is_a_function_of_its_config(tmp_path):
    """A store half gone (manifest and a shard deleted, as after a crash) is generated again
    to the same bytes; another seed gives other bytes."""
    cfg = SynthConfig(out=tmp_path / "a", d_model=16, n_features=40, k=3, tokens=3000,
                      shard_tokens=1000, hierarchy=3)
    first = run_synth(cfg).manifest
    (tmp_path / "a" / "synthetic" / "manifest.json").unlink()
    (tmp_path / "a" / "synthetic" / "acts_00001.npy").unlink()
    again = run_synth(cfg).manifest
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in first["shards"]]
    assert again["model_fingerprint"] == first["model_fingerprint"]
    other = run_synth(dataclasses.replace(cfg, out=tmp_path / "b", seed=1)).manifest
    assert other["shards"][0]["sha256"] != first["shards"][0]["sha256"]


def test_independent_firing_matches_the_rates():
    spec = SyntheticSpec(d_model=16, n_features=64, k=4, frequency="zipf")
    _, p, _, code, active = _draw(spec, 40_000)
    torch.testing.assert_close(p.double(), (1 / torch.arange(1, 65)).double() * 4 / sum(
        1 / i for i in range(1, 65)), rtol=1e-5, atol=0)
    sigma = (p * (1 - p) / len(active)).sqrt()
    assert ((active.float().mean(0) - p).abs() < 5 * sigma + 1e-4).all()
    assert float(code.l0().float().mean()) == pytest.approx(4, abs=0.05)


def test_rates_are_capped_at_one():
    p = firing_probability(SyntheticSpec(d_model=8, n_features=16, k=8, frequency="zipf"))
    assert float(p.max()) == 1.0 and float(p.sum()) == pytest.approx(8)
    assert (p[1:] <= p[:-1]).all()


def test_correlated_firing_follows_the_gaussian_copula():
    rho = 0.6
    spec = SyntheticSpec(d_model=16, n_features=32, k=4, correlation=rho, group_size=8)
    _, p, _, _, active = _draw(spec, 60_000)
    a = active.double()
    threshold = norm.ppf(1 - float(p[0]))
    both = multivariate_normal(cov=[[1, rho], [rho, 1]]).cdf([-threshold, -threshold])
    same_group = float((a[:, 0] * a[:, 1:8].T).mean())  # features 0 and 1..7 share a factor
    other_group = float((a[:, 0] * a[:, 8:].T).mean())
    assert same_group == pytest.approx(both, rel=0.1)
    assert other_group == pytest.approx(float(p[0]) ** 2, rel=0.2)
    assert a.mean(0).numpy() == pytest.approx(p.numpy(), abs=0.005)


def test_hierarchical_children_fire_one_at_a_time_with_their_parent():
    spec = SyntheticSpec(d_model=16, n_features=40, k=4, hierarchy=3)
    _, p, _, code, active = _draw(spec, 20_000)
    parent = parents(spec)
    n_parents = 10
    assert parent[:n_parents].tolist() == [-1] * n_parents
    child_NPH = active[:, n_parents:].reshape(-1, n_parents, 3)
    torch.testing.assert_close(child_NPH.sum(2), active[:, :n_parents].long())
    assert float(code.l0().float().mean()) == pytest.approx(4, abs=0.1)
    torch.testing.assert_close(p[n_parents:], p[parent[n_parents:]] / 3)


def test_incoherent_directions_have_coherence_one_over_sqrt_d():
    D = feature_directions(SyntheticSpec(d_model=64, n_features=128, directions="incoherent"))
    torch.testing.assert_close(D.norm(dim=1), torch.ones(128))
    assert coherence(D) == pytest.approx(1 / 8, abs=1e-6)


def test_bad_settings_are_refused():
    with pytest.raises(saelab.SaelabError, match="one firing structure"):
        SyntheticSpec(exact_k=True, hierarchy=3, n_features=2048)
    with pytest.raises(saelab.SaelabError, match="power of two"):
        SyntheticSpec(d_model=100, n_features=150, directions="incoherent")


@pytest.mark.parametrize("k", [2, 4])
def test_pursuits_recover_true_supports_under_the_incoherence_bound(k):
    """Tropp 2004: OMP recovers every k-sparse code exactly when k < (1 + 1/mu) / 2. With
    mu = 1/16 the bound is 8.5; k = 2 and 4 are well under it. GP shares OMP's selection
    rule but not its exact residual, so it has no such guarantee: it is held to 99%."""
    spec = SyntheticSpec(d_model=256, n_features=512, k=k, exact_k=True, directions="incoherent")
    D, _, x, true, _ = _draw(spec, 2048)
    assert k < (1 + 1 / coherence(D)) / 2 / 2
    omp = support_scores(true, saelab.decompose(x, D, "omp", k=k), 512)
    gp = support_scores(true, saelab.decompose(x, D, "gp", k=k), 512)
    assert (omp.precision, omp.recall) == (1.0, 1.0)
    assert gp.precision >= 0.99 and gp.recall >= 0.99
    if k == 2:
        assert (gp.precision, gp.recall) == (1.0, 1.0)


def test_support_recovery_falls_as_k_grows_past_the_typical_limit():
    """On random directions (d=64, n=512: mu about 0.55, worst-case bound under 2) OMP still
    recovers almost every support at k=4, the typical case being far kinder than the bound,
    but recall falls as k grows toward d / 4: the score can fail."""
    recall = []
    for k in (4, 8, 16):
        spec = SyntheticSpec(d_model=64, n_features=512, k=k, exact_k=True)
        D, _, x, true, _ = _draw(spec, 1024)
        recall.append(support_scores(true, saelab.decompose(x, D, "omp", k=k), 512).recall)
    assert (1 + 1 / coherence(D)) / 2 < 2
    assert recall[0] > 0.99 and recall[2] < 0.9
    assert recall == sorted(recall, reverse=True)


def test_support_scores_by_hand():
    true = saelab.SparseCode(torch.tensor([[0, 1, 2], [3, 0, 0]]),
                             torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]))
    # row 0: finds 0 and 1 (hits) and 5 (miss); row 1: finds 3 twice (two hits) and 4 (miss)
    found = saelab.SparseCode(torch.tensor([[0, 1, 5], [3, 3, 4]]),
                              torch.tensor([[0.5, 2.0, 1.0], [1.0, 1.0, 1.0]]))
    s = support_scores(true, found, 6)
    assert s.precision == pytest.approx(4 / 6) and s.recall == pytest.approx(3 / 4)
    # latents 0..5 standing for features 1, 0, -, 3, 3, - (relabelled dictionary)
    s = support_scores(true, found, 6, latent_feature=torch.tensor([1, 0, -1, 3, 3, -1]))
    assert s.precision == pytest.approx(5 / 6) and s.recall == pytest.approx(3 / 4)


def test_direction_recovery_by_hand():
    D = feature_directions(SyntheticSpec(d_model=64, n_features=100))
    perfect = direction_recovery(D, D[torch.randperm(100)] * 3.0)  # order and scale free
    assert (perfect.mean_max_cosine, perfect.fraction_recovered) == pytest.approx((1.0, 1.0))
    # half the features, each with a perpendicular error at cosine 0.95: 50 recovered
    noise = torch.nn.functional.normalize(torch.randn(50, 64), dim=1)
    noise -= (noise * D[:50]).sum(1, keepdim=True) * D[:50]
    noise = torch.nn.functional.normalize(noise, dim=1)
    half = direction_recovery(D, 0.95 * D[:50] + math.sqrt(1 - 0.95**2) * noise)
    assert half.fraction_recovered == 0.5 and half.fraction_latents_matched == 1.0
    assert half.best_cosine[:50].numpy() == pytest.approx(np.full(50, 0.95), abs=1e-5)
    assert half.latent_feature.tolist() == list(range(50))


def test_width_sweep_recovers_the_features_once_wide_enough(tmp_path: Path):
    """TopK SAEs on 64 true features: far too narrow (16 latents) recovers none, as wide as
    the truth or wider recovers most; mean max cosine grows with width."""
    main(["synth", "--out", str(tmp_path / "data"), "--d-model", "32", "--n-features", "64",
          "--k", "3", "--tokens", "20000", "--magnitude", "constant"])
    res = run_width_sweep(WidthSweepConfig(activations=tmp_path / "data", out=tmp_path / "run",
                                           widths=(16, 64, 128), tokens=400_000,
                                           batch_size=512))
    rows = {r["width"]: r for r in res["widths"]}
    assert res["k"] == 3
    assert rows[16]["fraction_recovered"] < 0.1
    assert rows[64]["fraction_recovered"] > 0.6 and rows[128]["fraction_recovered"] > 0.85
    mmcs = [rows[w]["mean_max_cosine"] for w in (16, 64, 128)]
    assert mmcs == sorted(mmcs)
    assert rows[128]["encoder_recall"] > rows[16]["encoder_recall"] + 0.5
    assert (tmp_path / "run" / "recovery.png").is_file()
    assert (tmp_path / "run" / "latents_64" / "cfg.json").is_file()
