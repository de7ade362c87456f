"""Bootstrap intervals over windows against scipy.stats.bootstrap, paired differences against
a hand computation from float64 reference losses, and the per-window sums' round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import tiny_lm
from saelab.coding import decompose
from saelab.evals import fvu
from saelab.evals.intervals import interval, paired_difference, resample_counts, weighted
from saelab.evals.sweep import CoderSpec, run_sweep
from saelab.evals.windows import METRICS, load_columns, save_columns
from saelab.saes import TopKSAE
from test_evals import LAST, reference_losses, windows


def ratio_columns(seed: int, n: int = 40):
    """Per-window sums of a ratio metric: numerators with a window effect, and counts."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, 30, n).astype(float)
    return {"loss": tokens * (1 + rng.gamma(2.0, 0.5, n)), "clean": tokens * 1.0,
            "positions": tokens}


def test_counts_draw_every_window_with_replacement():
    counts = resample_counts(7, resamples=5000, seed=3)
    assert counts.shape == (5000, 7) and (counts.sum(axis=1) == 7).all()
    np.testing.assert_allclose(counts.mean(axis=0), 1.0, atol=0.05)  # each window equally
    np.testing.assert_allclose(counts.var(axis=0), 6 / 7, rtol=0.1)  # multinomial variance


def test_interval_agrees_with_scipy_bootstrap_on_the_same_windows():
    cols = ratio_columns(0)
    metric = METRICS["delta_loss"]
    ours = interval(metric, cols, resample_counts(40, resamples=20000, seed=1))

    def statistic(loss, clean, positions, axis=-1):
        return (loss.sum(axis) - clean.sum(axis)) / positions.sum(axis)

    ref = stats.bootstrap((cols["loss"], cols["clean"], cols["positions"]), statistic,
                          paired=True, vectorized=True, n_resamples=20000, method="percentile",
                          confidence_level=0.95, rng=np.random.default_rng(2))
    width = ref.confidence_interval.high - ref.confidence_interval.low
    assert ours.value == pytest.approx(statistic(cols["loss"], cols["clean"],
                                                 cols["positions"]), rel=1e-12)
    assert ours.low == pytest.approx(ref.confidence_interval.low, abs=0.05 * width)
    assert ours.high == pytest.approx(ref.confidence_interval.high, abs=0.05 * width)
    assert width > 0.01  # a real spread, not a degenerate interval


def test_paired_difference_is_narrower_than_unpaired_when_windows_share_difficulty():
    a = ratio_columns(0)
    b = {**a, "loss": a["loss"] * 0.98}  # b: 2 % lower loss on every window
    counts = resample_counts(40, resamples=4000, seed=0)
    diff = paired_difference(METRICS["delta_loss"], b, a, counts)
    separate = [interval(METRICS["delta_loss"], c, counts) for c in (a, b)]
    assert diff.high < 0 and diff.excludes_zero  # b is lower on every resample
    assert diff.high - diff.low < 0.5 * (separate[0].high - separate[0].low)


def test_sweep_intervals_and_paired_differences_by_hand(tiny_tokenizer, tmp_path):
    """A sweep's per-window sums against the float64 reference losses of each window; its
    paired difference and interval against the same resamples computed by hand."""
    lm = tiny_lm("llama", tiny_tokenizer)
    lm.hf_model.double()
    sae = TopKSAE(64, 96, k=4, dtype=torch.float64).init_random(seed=0)
    ids = windows(lm, n=6, t=10, seed=7)
    specs = [CoderSpec("encoder"), CoderSpec("gp", 4, nonnegative=True), CoderSpec("mp", 4)]
    sweep = run_sweep(lm, sae, LAST, ids.numpy(), specs, matched_k=4, batch_tokens=20)
    x_BD = lm.read(ids, [LAST])[LAST][:, 1:].reshape(-1, 64)
    per_window, x_hats = {}, {}
    for spec in specs:
        code = decompose(x_BD.float(), sae, spec.coder, k=spec.k, nonnegative=spec.nonnegative)
        x_hat = code.decode(sae.W_dec.detach(), sae.b_dec.detach()).view(6, 9, 64)
        clean_ce, ce, _ = reference_losses(lm, ids, x_hat)
        per_window[spec.label] = (ce.sum(axis=1), clean_ce.sum(axis=1))
        x_hats[spec.label] = x_hat.reshape(-1, 64)
        np.testing.assert_allclose(sweep.columns[spec.label]["loss"], ce.sum(axis=1), rtol=1e-6)
    rows = {r["label"]: r for r in sweep.results["rows"]}
    assert rows["nn-gp k=4"]["nonnegative"] and rows["nn-gp k=4"]["name"] == "nn-gp"
    counts = resample_counts(6)  # the sweep's own resamples (the default seed)
    for label in ("nn-gp k=4", "mp k=4"):
        (ce, clean), (enc, _) = per_window[label], per_window["encoder"]
        diff = rows[label]["vs_encoder"]["delta_loss"]
        assert diff["value"] == pytest.approx((ce.sum() - enc.sum()) / (6 * 8), rel=1e-6)
        draws = counts @ (ce - enc) / (counts.sum(axis=1) * 8)
        low, high = np.percentile(draws, [2.5, 97.5])
        assert diff["low"] == pytest.approx(low, rel=1e-5, abs=1e-9)
        assert diff["high"] == pytest.approx(high, rel=1e-5, abs=1e-9)
        assert diff["excludes_zero"] == (low > 0 or high < 0)
        delta = (counts @ (ce - clean)) / (counts.sum(axis=1) * 8)
        np.testing.assert_allclose(rows[label]["intervals"]["delta_loss"],
                                   np.percentile(delta, [2.5, 97.5]), rtol=1e-5)
    assert "vs_encoder" not in rows["encoder"]
    save_columns(sweep.columns, tmp_path / "w.npz")
    back = load_columns(tmp_path / "w.npz")
    assert back.keys() == sweep.columns.keys()
    for label, cols in sweep.columns.items():
        for name, col in cols.items():
            np.testing.assert_array_equal(back[label][name], col)
    for label, x_hat in x_hats.items():  # the windows' FVU is the one definition's
        assert METRICS["fvu"](weighted(back[label], np.ones(6))) == pytest.approx(
            fvu(x_BD, x_hat), rel=1e-6)
