"""Evaluation against float64 references on a tiny real model, and `compare` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.special import log_softmax, logsumexp, rel_entr, softmax

import saelab as sl
from conftest import FAMILIES, tiny_lm
from saelab.cli import main
from saelab.coding import SparseCode
from saelab.evals import (
    LatentUsage,
    ReconstructionMetrics,
    clean_pass,
    jaccard,
    order_cosines,
    spliced_loss,
    top_kept,
)
from saelab.evals.sweep import TOP_M, CoderSpec, run_sweep
from saelab.evals.vocab import head_scores
from saelab.formats import write_sae
from saelab.lm import Unembedding
from saelab.reports import PLOTS
from saelab.saes import TopKSAE

LAST = "blocks.2.hook_resid_post"  # tiny llama's last residual: the head reads it directly


@pytest.fixture(scope="module")
def lm64(tiny_tokenizer):
    lm = tiny_lm("llama", tiny_tokenizer)
    lm.hf_model.double()
    return lm


def windows(lm, n=3, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, lm.hf_model.config.vocab_size, (n, t), generator=g)
    ids[:, 0] = lm.bos_token_id
    return ids


def perturbed(activations, seed=1):
    """The site's activations plus float64 gaussian noise (std 0.5): a replacement that
    changes the loss."""
    g = torch.Generator().manual_seed(seed)
    return activations + 0.5 * torch.randn(activations.shape, generator=g, dtype=torch.float64)


def head_logprobs(lm, resid):
    """Reference: the tiny llama's final norm and head on a residual stream, in float64."""
    model = lm.hf_model
    with torch.no_grad():
        logits = model.lm_head(model.model.norm(resid.double()))
    return log_softmax(logits.numpy(), axis=-1)


def reference_losses(lm, ids, replacement):
    """Cross-entropy and KL at positions 1 .. T-2 with the last residual's positions 1.. set
    to `replacement`, from first principles (numpy, float64)."""
    clean_resid = lm.read(ids, [LAST])[LAST]
    spliced_resid = clean_resid.clone()
    spliced_resid[:, 1:] = replacement
    clean_lp = head_logprobs(lm, clean_resid)[:, 1:-1]
    spliced_lp = head_logprobs(lm, spliced_resid)[:, 1:-1]
    targets = ids[:, 2:].numpy()[..., None]
    ce = -np.take_along_axis(spliced_lp, targets, -1)[..., 0]
    clean_ce = -np.take_along_axis(clean_lp, targets, -1)[..., 0]
    kl = rel_entr(np.exp(clean_lp), np.exp(spliced_lp)).sum(-1)
    return clean_ce, ce, kl


def test_delta_loss_and_kl_equal_a_float64_reference(lm64):
    ids = windows(lm64)
    clean = clean_pass(lm64, LAST, ids)
    replacement = perturbed(clean.activations)
    ce, kl = spliced_loss(lm64, LAST, clean, replacement)
    ref_clean, ref_ce, ref_kl = reference_losses(lm64, ids, replacement)
    np.testing.assert_allclose(clean.loss.numpy(), ref_clean, rtol=1e-6)
    np.testing.assert_allclose(ce.numpy(), ref_ce, rtol=1e-6)
    np.testing.assert_allclose(kl.numpy(), ref_kl, rtol=1e-6, atol=1e-12)
    assert (ce - clean.loss).abs().mean() > 1e-3  # the splice did change the loss


def test_identity_reconstruction_gives_zero_delta_loss(lm64):
    clean = clean_pass(lm64, LAST, windows(lm64, seed=2))
    ce, kl = spliced_loss(lm64, LAST, clean, clean.activations)
    assert torch.equal(ce, clean.loss)
    assert kl.abs().max() < 1e-12


def test_head_scores_in_slices_equal_full_logits_in_float64():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(9, 6, generator=g, dtype=torch.float64)
    unembed = Unembedding(torch.randn(50, 6, generator=g, dtype=torch.float64) * 2,
                          torch.randn(50, generator=g, dtype=torch.float64))
    targets = torch.randint(0, 50, (9,), generator=g)
    scores = head_scores(h, unembed, targets, expected=True, slice_size=7)  # 8 uneven slices
    logits = (h @ unembed.weight.T + unembed.bias).numpy()
    np.testing.assert_allclose(scores.lse.numpy(), logsumexp(logits, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(scores.target.numpy(), logits[np.arange(9), targets.numpy()],
                               rtol=1e-12)
    np.testing.assert_allclose(scores.expected.numpy(),
                               softmax(logits, axis=-1) @ unembed.weight.numpy(), rtol=1e-10)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_head_is_affine_except_where_logits_are_soft_capped(family, tiny_tokenizer):
    lm = tiny_lm(family, tiny_tokenizer)
    capped = lm.hf_model.config.to_dict().get("final_logit_softcapping") is not None
    assert (lm.unembedding() is None) == capped


def test_a_soft_capped_head_scores_against_full_logits(tiny_tokenizer):
    """Gemma 2 caps its logits (tanh), so the clean pass keeps the probabilities instead."""
    lm = tiny_lm("gemma2", tiny_tokenizer)
    lm.hf_model.double()
    assert lm.unembedding() is None
    ids = windows(lm)
    clean = clean_pass(lm, LAST, ids)
    replacement = perturbed(clean.activations)
    ce, kl = spliced_loss(lm, LAST, clean, replacement)

    def put(x):
        out = x.clone()
        out[:, 1:] = replacement
        return out

    clean_lp = log_softmax(lm.logits(ids).numpy(), axis=-1)[:, 1:-1]
    spliced_lp = log_softmax(lm.logits(ids, splice={LAST: put}).numpy(), axis=-1)[:, 1:-1]
    targets = ids[:, 2:].numpy()[..., None]
    np.testing.assert_allclose(ce.numpy(), -np.take_along_axis(spliced_lp, targets, -1)[..., 0],
                               rtol=1e-6)
    np.testing.assert_allclose(kl.numpy(), rel_entr(np.exp(clean_lp), np.exp(spliced_lp)).sum(-1),
                               rtol=1e-6, atol=1e-12)
    same, kl0 = spliced_loss(lm, LAST, clean, clean.activations)
    assert torch.equal(same, clean.loss) and kl0.abs().max() < 1e-12


def test_fvu_and_l0_stream_equal_float64_formulas():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=g) * 3 + 1
    x_hat = x + torch.randn(300, 16, generator=g)
    values = torch.randn(300, 5, generator=g) * (torch.rand(300, 5, generator=g) > 0.3)
    code = SparseCode(torch.randint(0, 40, (300, 5), generator=g), values)
    m = ReconstructionMetrics()
    for i in range(0, 300, 70):  # uneven batches
        m.update(x[i:i + 70], x_hat[i:i + 70], code[i:i + 70])
    r = m.result()
    xn, hn = x.double().numpy(), x_hat.double().numpy()
    assert r["fvu"] == pytest.approx(((xn - hn) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum(),
                                     rel=1e-10)
    cos = (xn * hn).sum(1) / np.linalg.norm(xn, axis=1) / np.linalg.norm(hn, axis=1)
    assert r["cosine"] == pytest.approx(cos.mean(), rel=1e-10)
    assert r["l0"] == pytest.approx((values.numpy() != 0).sum(1).mean())
    assert sum(r["l0_histogram"].values()) == 300


def random_code(seed, batch=64, k=6, n=30):
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(batch, k, generator=g) * (torch.rand(batch, k, generator=g) > 0.25)
    return SparseCode(torch.randint(0, n, (batch, k), generator=g), values)


def test_usage_counts_each_latent_once_per_token():
    code, n = random_code(0), 30
    usage = LatentUsage(n)
    usage.update(code[:20])
    usage.update(code[20:])
    sets = [{int(i) for i, v in zip(row_i, row_v, strict=True) if v != 0}
            for row_i, row_v in zip(code.indices, code.values, strict=True)]
    expected = np.array([sum(j in s for s in sets) for j in range(n)]) / len(sets)
    np.testing.assert_allclose(usage.density().numpy(), expected)
    assert usage.result()["dead"] == int((expected == 0).sum())


def latent_set(code: SparseCode, r: int) -> set[int]:
    """Row r's latents with a non-zero value, as a Python set."""
    return {int(i) for i, v in zip(code.indices[r], code.values[r], strict=True) if v != 0}


def set_jaccard(p: set[int], q: set[int]) -> float:
    return len(p & q) / len(p | q) if p | q else 1.0


def top_latents(code: SparseCode, r: int, m: int) -> list[int]:
    """Row r's m latents of largest |value| (fewer if it has fewer non-zeros)."""
    live = [(abs(float(v)), int(i)) for i, v in zip(code.indices[r], code.values[r],
                                                    strict=True) if v != 0]
    return [i for _, i in sorted(live, reverse=True)[:m]]


def kept_share(top: list[int], q: set[int]) -> float:
    return sum(i in q for i in top) / max(len(top), 1)


def test_supports_and_overlap_against_python_sets():
    a, b, n = random_code(1), random_code(2), 30
    sa, sb = a.support(n), b.support(n)
    for r in range(len(a)):
        assert set(sa[r].nonzero().squeeze(1).tolist()) == latent_set(a, r)
    counts = [sum(j in latent_set(a, r) for r in range(len(a))) for j in range(n)]
    assert a.firing_counts(n, chunk=7).tolist() == counts  # chunks of rows: same sums
    expected = [set_jaccard(latent_set(a, r), latent_set(b, r)) for r in range(len(a))]
    np.testing.assert_allclose(jaccard(sa, sb).numpy(), expected)
    for m in (1, 3):  # the m largest |values| of a, and how many of them b's support holds
        kept = [kept_share(top_latents(a, r, m), latent_set(b, r)) for r in range(len(a))]
        np.testing.assert_allclose(top_kept(a, sb, m).numpy(), kept)


def test_order_cosines_equal_least_squares_projections():
    g = torch.Generator().manual_seed(3)
    W = torch.nn.functional.normalize(torch.randn(50, 12, generator=g, dtype=torch.float64), dim=1)
    code = random_code(4, batch=10, k=5, n=50)
    cos = order_cosines(SparseCode(code.indices, code.values.double()), W)
    for r in range(10):
        order = [int(j) for j in code.values[r].argsort(descending=True) if code.values[r, j] > 0]
        for step, j in enumerate(order):
            w = W[code.indices[r, j]]
            if step == 0:
                assert cos[r, 0] == pytest.approx(0.0, abs=1e-7)
                continue
            span = W[code.indices[r, order[:step]]].T
            proj = span @ (torch.linalg.pinv(span) @ w)  # a re-picked latent: rank-deficient
            assert cos[r, step].item() == pytest.approx(proj.norm().item(), abs=1e-7)
        assert torch.isnan(cos[r, len(order):]).all()
    capped = order_cosines(SparseCode(code.indices, code.values.double()), W, slots=3)
    assert torch.equal(capped[:, :3].nan_to_num(-1), cos[:, :3].nan_to_num(-1))
    assert torch.isnan(capped[:, 3:]).all()  # past the 3 largest: not followed


def test_sweep_against_float64_losses_and_python_set_overlaps(lm64):
    """Every number of a sweep from an independent route: the losses from reference_losses
    (numpy, float64) on each coder's reconstruction, the overlaps from Python sets of each
    token's latents (the sweep averages two batches of 18 tokens: the same as over all 36)."""
    sae = TopKSAE(64, 96, k=4, dtype=torch.float64).init_random(seed=0)
    ids = windows(lm64, n=4, t=10, seed=5)
    specs = [CoderSpec("encoder"), CoderSpec("gp", 4), CoderSpec("omp", 4)]
    out = run_sweep(lm64, sae, LAST, ids.numpy(), specs, matched_k=4, batch_tokens=20).results
    x_BD = lm64.read(ids, [LAST])[LAST][:, 1:].reshape(-1, 64).float()
    codes = [sl.decompose(x_BD, sae, spec.coder, k=spec.k) for spec in specs]
    clean_ce, zero_ce, _ = reference_losses(lm64, ids, torch.zeros(4, 9, 64, dtype=torch.float64))
    assert out["clean_loss"] == pytest.approx(clean_ce.mean(), rel=1e-9)
    assert out["zero_ablation_loss"] == pytest.approx(zero_ce.mean(), rel=1e-9)
    for row, code in zip(out["rows"], codes, strict=True):
        x_hat = code.decode(sae.W_dec.detach(), sae.b_dec.detach()).view(4, 9, 64)
        _, ce, _ = reference_losses(lm64, ids, x_hat)
        assert row["loss"] == pytest.approx(ce.mean(), rel=1e-6)
        recovered = (zero_ce.mean() - ce.mean()) / (zero_ce.mean() - clean_ce.mean())
        assert row["loss_recovered"] == pytest.approx(recovered, rel=1e-5)
        assert row["tokens"] == 36 and row["l0"] <= 4

    sets = [[latent_set(code, r) for r in range(36)] for code in codes]
    jac = np.array(out["overlap"]["jaccard"])
    for i, a in enumerate(sets):
        for j, b in enumerate(sets):
            expected = np.mean([set_jaccard(p, q) for p, q in zip(a, b, strict=True)])
            assert jac[i, j] == pytest.approx(expected, abs=1e-6)  # float32 ratios
    assert jac[0, 1] < 1  # the pursuits do not simply repeat the encoder here
    tops = [top_latents(codes[0], r, TOP_M) for r in range(36)]
    for spec, b in zip(specs, sets, strict=True):
        expected = np.mean([kept_share(top, q) for top, q in zip(tops, b, strict=True)])
        assert out["overlap"]["encoder_top_kept"][spec.label] == pytest.approx(expected,
                                                                               abs=1e-6)


@pytest.fixture(scope="module")
def tiny_sae_dir(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("tiny-sae")
    sae = TopKSAE(64, 128, k=4, site="blocks.1.hook_resid_post").init_random(seed=0)
    write_sae(sae, folder)
    return folder


def test_compare_writes_every_file_and_one_row_per_coder_and_l0(tmp_path, tiny_model_dir,
                                                                  tiny_sae_dir):
    out = tmp_path / "run"
    code = main(["compare", "--sae", str(tiny_sae_dir), "--model", str(tiny_model_dir),
                 "--tokens", "150", "--fit-tokens", "45", "--context-size", "16",
                 "--k", "2,8", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    pursuit_ks = sorted({2, 8, results["matched_k"]})
    expected = {(c, None) for c in ("encoder", "encoder-refit", "encoder-scaled")} | {
        (c, k) for c in ("mp", "gp", "omp") for k in pursuit_ks}
    assert {(r["coder"], r["k"]) for r in results["rows"]} == expected
    assert len(results["rows"]) == len(expected)
    for r in results["rows"]:
        assert all(np.isfinite(r[key]) for key in ("l0", "fvu", "delta_loss", "loss_recovered",
                                                   "kl"))
    for stem in PLOTS:
        assert (out / f"{stem}.png").stat().st_size > 1000
        assert (out / f"{stem}.svg").read_text().lstrip().startswith("<?xml")
    page = (out / "report.html").read_text()
    assert "<svg" in page and "http" not in page.split("<svg")[0]
    assert f"{results['encoder_l0']:.1f} latents per token" in page
    assert (out / "config.json").is_file() and (out / "scale.safetensors").is_file()
    before = (out / "results.json").stat().st_mtime_ns  # the same command again: read back
    assert main(["compare", "--sae", str(tiny_sae_dir), "--model", str(tiny_model_dir),
                 "--tokens", "150", "--fit-tokens", "45", "--context-size", "16",
                 "--k", "2,8", "--out", str(out)]) == 0
    assert (out / "results.json").stat().st_mtime_ns == before


def test_evaluate_scores_one_coder(tmp_path, tiny_model_dir, tiny_sae_dir):
    out = tmp_path / "eval"
    assert main(["evaluate", "--sae", str(tiny_sae_dir), "--model", str(tiny_model_dir),
                 "--coder", "gp", "--k", "3", "--tokens", "60", "--fit-tokens", "15",
                 "--context-size", "16", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["coder"], r["k"]) for r in rows] == [("gp", 3)]
    assert 0 < rows[0]["l0"] <= 3


def test_compare_refuses_an_sae_of_another_width(tmp_path, tiny_model_dir, capsys):
    folder = tmp_path / "wide"
    write_sae(TopKSAE(32, 64, k=4, site="blocks.1.hook_resid_post").init_random(), folder)
    code = main(["compare", "--sae", str(folder), "--model", str(tiny_model_dir),
                 "--out", str(tmp_path / "x")])
    assert code == 2
    assert "site width 32" in capsys.readouterr().err


@pytest.mark.gguf
def test_quick_demo_reports_finite_numbers(tmp_path):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "saelab", "demo", "--quick", "--out",
                          str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    store = sl.ActivationStore(tmp_path / "activations" / "blocks.6.hook_resid_post")
    assert (store.model, store.d_model) == ("gemma-3-270m", 640)
    results = json.loads((tmp_path / "compare" / "results.json").read_text())
    assert results["rows"] and all(np.isfinite(r["fvu"]) and np.isfinite(r["delta_loss"])
                                   for r in results["rows"])
    assert results["clean_loss"] < results["zero_ablation_loss"]
    assert str(tmp_path / "compare" / "report.html") in run.stdout
    pages = {m: json.loads((tmp_path / f"dashboard-{m}" / "latents.json").read_text())
             for m in ("encoder", "nn-gp")}
    shown = [[e["latent"] for e in page["latents"]] for page in pages.values()]
    assert len(shown[0]) == 4 and shown[0] == shown[1]  # the same latents under both coders
    for entry in pages["encoder"]["latents"]:
        assert entry["fires"] > 0 and entry["contexts"]
        assert len(entry["logit_effect"]["promotes"]) == 10  # Gemma's own unembedding
    assert str(tmp_path / "dashboard-nn-gp" / "dashboard.html") in run.stdout


def test_loss_gradient_is_the_derivative_of_the_spliced_loss(lm64):
    """g . v against a central finite difference of the summed cross-entropy along v."""
    ids = windows(lm64, n=2, t=9, seed=4)
    x = lm64.read(ids, [LAST])[LAST][:, 1:]
    g = lm64.loss_gradient(ids, LAST)
    assert g.shape == x.shape
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def summed_loss(replacement):
        _, ce, _ = reference_losses(lm64, ids, replacement)
        return ce.sum()

    # the model's norms compute in float32 whatever its dtype, so the difference quotient is
    # float32-noisy below eps 1e-4; at 1e-3 it is within 2e-4 of the derivative
    eps = 1e-3
    numeric = (summed_loss(x + eps * v) - summed_loss(x - eps * v)) / (2 * eps)
    assert float((g * v).sum()) == pytest.approx(numeric, rel=1e-3)
    assert (g[:, -1] == 0).all()  # the last position predicts nothing scored
    assert (g[:, :-1].abs().sum(dim=-1) > 0).all()


def test_sweep_attribution_and_principal_share_by_hand(lm64):
    sae = TopKSAE(64, 96, k=4, dtype=torch.float64).init_random(seed=1)
    ids = windows(lm64, n=3, t=10, seed=6)
    x = lm64.read(ids, [LAST])[LAST][:, 1:]
    U = torch.linalg.qr(torch.randn(64, 5, generator=torch.Generator().manual_seed(0),
                                    dtype=torch.float64))[0]
    out = run_sweep(lm64, sae, LAST, ids.numpy(), [CoderSpec("encoder"), CoderSpec("gp", 3)],
                    matched_k=4, attribution=True, principal=U).results
    g = lm64.loss_gradient(ids, LAST)
    for row, spec in zip(out["rows"], ("encoder", "gp"), strict=True):
        code = sl.decompose(x.reshape(-1, 64).float(), sae, spec, k=None if spec == "encoder"
                            else 3)
        err = code.decode(sae.W_dec.detach(), sae.b_dec.detach()).view_as(x) - x
        assert row["attributed_delta_loss"] == pytest.approx(float((g * err).sum()) / (3 * 8),
                                                             rel=1e-6)
        assert row["error_top_share"] == pytest.approx(
            float((err @ U).pow(2).sum() / err.pow(2).sum()), rel=1e-6)
    plain = run_sweep(lm64, sae, LAST, ids.numpy(), [CoderSpec("encoder")], matched_k=4).results
    assert plain["rows"][0]["attributed_delta_loss"] is None
    assert "attributed_delta_loss" not in plain["rows"][0]["intervals"]
