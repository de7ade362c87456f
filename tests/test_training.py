"""SAE losses against the papers' formulas in float64, recovery of planted directions,
save/load, kill-and-resume, and a two-process run against one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import saelab as sl
from saelab.saes import BatchTopKSAE, JumpReluSAE, ReluSAE, TopKSAE, sparse
from saelab.saes.jumprelu import BANDWIDTH

D, L, B = 16, 48, 32


def random_sae(cls, **kw):
    sae = cls(D, L, dtype=torch.float64, **kw).init_random(seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        sae.b_enc.copy_(0.2 * torch.randn(L, generator=g, dtype=torch.float64))
        sae.b_dec.copy_(0.3 * torch.randn(D, generator=g, dtype=torch.float64))
        sae.W_dec.mul_(torch.linspace(0.5, 1.5, L, dtype=torch.float64)[:, None])
    return sae


def data(seed=3):
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def np_params(sae):
    return {k: v.detach().numpy() for k, v in sae.state_dict().items()}


def reconstruction(p, z):
    return z @ p["W_dec"] + p["b_dec"]


def pre_acts(p, x):
    return (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]


def test_relu_loss_is_mse_plus_decoder_weighted_l1():
    sae, x = random_sae(ReluSAE), data()
    p, xn = np_params(sae), x.numpy()
    z = np.maximum(pre_acts(p, xn), 0)
    mse = ((xn - reconstruction(p, z)) ** 2).sum(1).mean()
    l1 = (z * np.linalg.norm(p["W_dec"], axis=1)).sum(1).mean()
    out = sae.loss(x, sparsity_coef=0.7)
    assert out.loss.item() == pytest.approx(mse + 0.7 * l1, rel=1e-12)


@pytest.mark.parametrize("cls", [TopKSAE, BatchTopKSAE])
def test_topk_losses_are_mse_plus_auxk(cls):
    sae, x = random_sae(cls, k=5), data()
    p, xn = np_params(sae), x.numpy()
    pre = pre_acts(p, xn)
    z = np.zeros_like(pre)
    if cls is TopKSAE:  # the k largest of each row
        top = np.argsort(-pre, axis=1)[:, :5]
        np.put_along_axis(z, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
    else:  # the k * batch largest of the batch
        flat = np.maximum(pre, 0).ravel()
        keep = np.argsort(-flat)[: 5 * B]
        z.ravel()[keep] = flat[keep]
    e = xn - reconstruction(p, z)
    dead = np.zeros(L, bool)
    dead[::3] = True  # 16 dead latents; k_aux = min(d_model / 2, 16) = 8
    dead_pre = np.where(dead, pre, -np.inf)
    aux_idx = np.argsort(-dead_pre, axis=1)[:, :8]
    z_aux = np.zeros_like(pre)
    np.put_along_axis(z_aux, aux_idx, np.maximum(np.take_along_axis(pre, aux_idx, 1), 0), 1)
    auxk = ((e - z_aux @ p["W_dec"]) ** 2).sum(1).mean()
    out = sae.train().loss(x, sparsity_coef=0.0, dead_L=torch.from_numpy(dead))
    assert out.terms["mse"].item() == pytest.approx((e**2).sum(1).mean(), rel=1e-12)
    assert out.loss.item() == pytest.approx((e**2).sum(1).mean() + auxk / 32, rel=1e-12)
    if cls is BatchTopKSAE:  # the inference threshold starts at the smallest kept activation
        assert sae.threshold.item() == pytest.approx(flat[keep].min())


@pytest.mark.parametrize("subtract_b_dec", [True, False])
def test_topk_sparse_backward_equals_dense_autograd(subtract_b_dec):
    """TopK trains with hand-written sparse gradients; a dense float64 autograd graph of the
    same loss (top-k by scatter, AuxK by masking) is the reference."""
    sae = random_sae(TopKSAE, k=5)
    sae.apply_b_dec_to_input = subtract_b_dec
    x, dead = data(), torch.zeros(L, dtype=torch.bool)
    dead[1::4] = True
    out = sae.train().loss(x, dead_L=dead)
    out.loss.backward()
    sparse = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()

    pre = (x - sae.b_dec if subtract_b_dec else x) @ sae.W_enc + sae.b_enc
    top, idx = pre.topk(5, dim=1)
    z = torch.zeros_like(pre).scatter(1, idx, torch.relu(top))
    x_hat = z @ sae.W_dec + sae.b_dec
    a_top, a_idx = pre.masked_fill(~dead, -torch.inf).topk(8, dim=1)
    z_aux = torch.zeros_like(pre).scatter(1, a_idx, torch.relu(a_top))
    e = (x - x_hat).detach()
    dense = (x - x_hat).pow(2).sum(1).mean() + (e - z_aux @ sae.W_dec).pow(2).sum(1).mean() / 32
    dense.backward()
    assert out.loss.item() == pytest.approx(dense.item(), rel=1e-12)
    for name, p in sae.named_parameters():
        assert_close(sparse[name], p.grad, rtol=1e-10, atol=1e-12, msg=name)
    assert out.l0.item() == pytest.approx((z > 0).sum(1).double().mean().item())
    assert torch.equal(out.fired, (z > 0).any(0))


def dense_reference(sae, x, architecture, coef):
    """The architecture's loss as a dense float64 autograd graph, from its paper's formula
    (top-k and batch top-k by scatter, JumpReLU's step as a constant), and its gradients."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    if architecture == "batchtopk":
        flat = torch.relu(pre).flatten()
        top, idx = flat.topk(5 * B)
        z = torch.zeros_like(flat).scatter(0, idx, top).view_as(pre)
    elif architecture == "jumprelu":
        z = torch.relu(pre) * (torch.relu(pre) > sae.threshold).detach()
    else:
        z = torch.relu(pre)
    x_hat = z @ sae.W_dec + sae.b_dec
    loss = (x - x_hat).pow(2).sum(1).mean()
    if architecture == "relu":
        loss = loss + coef * (z * sae.W_dec.norm(dim=1)).sum(1).mean()
    sae.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
    sae.zero_grad()
    return loss, z, grads


@pytest.mark.parametrize("density", [1.0, 0.0], ids=["sparse", "dense"])
@pytest.mark.parametrize("architecture", ["relu", "batchtopk", "jumprelu"])
def test_sparse_backward_equals_dense_autograd(architecture, density, monkeypatch):
    """Every architecture's training gradients, sparse path (`density` 1: never too dense)
    and dense fallback (0: always too dense), against dense float64 autograd; JumpReLU's
    threshold against the paper's estimator, with thresholds on both sides of eps / 2
    (where every zero pre-activation is in the window)."""
    monkeypatch.setattr(sparse, "SPARSE_DENSITY", density)
    cls = {"relu": ReluSAE, "batchtopk": BatchTopKSAE, "jumprelu": JumpReluSAE}[architecture]
    sae = random_sae(cls, **({"k": 5} if architecture == "batchtopk" else {}))
    coef = 0.3
    if architecture == "jumprelu":
        with torch.no_grad():
            sae.threshold.copy_(torch.linspace(0.01, 0.9, L, dtype=torch.float64))
    x = data()
    out = sae.train().loss(x, sparsity_coef=coef)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in sae.named_parameters()}
    loss, z, expected = dense_reference(sae, x, architecture, coef)
    if architecture == "jumprelu":
        pre, theta = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach(), sae.threshold
        e = (x - (z @ sae.W_dec + sae.b_dec)).detach()
        kernel = ((pre - theta).abs() / BANDWIDTH < 0.5) / BANDWIDTH
        expected["threshold"] = ((-theta * kernel * (-2 / B * e @ sae.W_dec.T)).sum(0)
                                 - coef / B * kernel.sum(0)).detach()
        loss = loss + coef * (z > 0).sum(1).double().mean()
        assert (kernel[:, theta < BANDWIDTH / 2] > 0).any()  # the low latents' zeros count
        assert ((kernel > 0) & (z == 0)).any() and ((kernel > 0) & (z > 0)).any()
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-12)
    assert set(got) == set(expected)
    for name in got:
        assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)
    assert out.l0.item() == pytest.approx((z > 0).sum(1).double().mean().item())
    assert torch.equal(out.fired, (z > 0).any(0))


@pytest.mark.parametrize("per_row", [1, 4, 1000])
def test_batch_top_k_from_per_token_candidates_equals_one_top_k(per_row):
    """BatchTopK selects from each token's top candidates; tokens holding more of the batch's
    top entries than their candidates (planted: rows 3 and 7) give their whole row."""
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(40, 300, generator=g, dtype=torch.float64)
    pre[3] += 4.0
    pre[7, :50] += 6.0
    for n in (40 * 5, 40 * 300):
        code = sparse.top_k_of_batch(pre, n, per_row=per_row)
        top, flat = torch.relu(pre).view(-1).topk(n)
        expected = torch.zeros_like(pre).view(-1).scatter_(0, flat, top).view_as(pre)
        got = torch.zeros_like(pre)
        got[code.rows, code.cols] = code.acts
        assert torch.equal(got, expected)
        assert len(code.rows) == n and bool((code.rows.diff() >= 0).all())


def test_the_sparse_path_refuses_codes_too_dense_for_it():
    pre = torch.zeros(100, 100)
    pre[:, : int(100 * sparse.SPARSE_DENSITY)] = 1.0
    assert sparse.above(pre, 0.0) is not None
    pre[0, -1] = 1.0  # one entry over the share
    assert sparse.above(pre, 0.0) is None


def test_jumprelu_loss_and_its_straight_through_threshold_gradient():
    sae, x = random_sae(JumpReluSAE), data()
    with torch.no_grad():
        sae.threshold.copy_(torch.linspace(0.05, 0.9, L, dtype=torch.float64))
    p, xn = np_params(sae), x.numpy()
    pre = np.maximum(pre_acts(p, xn), 0)
    theta = p["threshold"]
    z = pre * (pre > theta)
    e = xn - reconstruction(p, z)
    lam = 0.3
    loss = (e**2).sum(1).mean() + lam * (pre > theta).sum(1).mean()
    out = sae.loss(x, sparsity_coef=lam)
    assert out.loss.item() == pytest.approx(loss, rel=1e-12)
    out.loss.backward()
    # Rajamanoharan et al. 2024, eqs. 11-12, with a rectangle kernel of width epsilon.
    kernel = (np.abs((pre - theta) / BANDWIDTH) < 0.5) / BANDWIDTH
    dloss_dz = -2 / B * e @ p["W_dec"].T
    expected = (-theta * kernel * dloss_dz).sum(0) + lam / B * (-kernel).sum(0)
    np.testing.assert_allclose(sae.threshold.grad.numpy(), expected, rtol=1e-10, atol=1e-12)


def planted_data(n_rows=60_000, d=64, n_true=256, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    true = torch.nn.functional.normalize(torch.randn(n_true, d, generator=g), dim=1)
    idx = torch.argsort(torch.rand(n_rows, n_true, generator=g), dim=1)[:, :k]
    mags = 0.5 + 1.5 * torch.rand(n_rows, k, generator=g)
    return (mags[:, :, None] * true[idx]).sum(1), true


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "jumprelu"])
def test_sparse_saes_recover_planted_directions(architecture):
    x, true = planted_data()
    cfg = sl.TrainConfig(architecture=architecture, n_latents=512, k=4, tokens=600_000,
                         batch_size=512, lr=3e-3, dead_tokens=20_000)
    sae = sl.train(cfg, x)
    cos = (torch.nn.functional.normalize(sae.W_dec.detach(), dim=1) @ true.T).amax(dim=0)
    assert cos.mean() >= 0.95
    l0 = (sae.encode(x[:4000]) > 0).sum(1).float().mean()
    assert 3 <= l0 <= 5


@pytest.mark.parametrize("cls", [ReluSAE, TopKSAE, BatchTopKSAE, JumpReluSAE])
def test_folding_the_input_scale_is_exact(cls):
    sae = random_sae(cls, **({"k": 5} if cls in (TopKSAE, BatchTopKSAE) else {}))
    with torch.no_grad():
        sae.threshold.fill_(0.2) if hasattr(sae, "threshold") else None
    x = data()
    normalised = sae(x * 3.0).detach() / 3.0
    sae.fold_input_scale(3.0)
    assert_close(sae(x).detach(), normalised)


def test_a_trained_sae_works_on_raw_activations_and_round_trips(tmp_path):
    x = 5.0 * planted_data(n_rows=4000)[0] + 1.0
    cfg = sl.TrainConfig(architecture="topk", n_latents=128, k=4, tokens=40_000,
                         batch_size=500, log_every=1)
    sae = sl.train(cfg, x, out=tmp_path / "run")
    loaded = sl.load_sae(tmp_path / "run")
    assert_close(loaded(x[:100]), sae(x[:100]))
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    fvu = ((x - sae(x).detach()) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert fvu.item() == pytest.approx(last["fvu"], abs=0.03)  # trained normalised, runs raw
    assert_close(sae.W_dec.norm(dim=1), torch.ones(128))
    again = sl.train(cfg, x, out=tmp_path / "run")  # a finished run is loaded, not retrained
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(),
                                                 loaded.state_dict().values()))


def test_snapshots_are_the_run_at_their_tokens_and_leave_it_unchanged(tmp_path):
    """A snapshot holds the weights a hand-driven Trainer has after the step its tokens are
    reached (20 steps for 10,000 tokens; 41 for 20,250, which no step ends on), folded for
    raw activations; and a run that writes snapshots ends with the weights of one that
    does not."""
    x = 5.0 * planted_data(n_rows=4000)[0] + 1.0
    cfg = sl.TrainConfig(architecture="topk", n_latents=128, k=4, tokens=40_000,
                         batch_size=500, snapshot_tokens=(10_000, 20_250))
    sae = sl.train(cfg, x, out=tmp_path / "run")
    plain = sl.train(sl.TrainConfig(**{**cfg.__dict__, "snapshot_tokens": ()}), x)
    assert all(torch.equal(a, b) for a, b in zip(sae.state_dict().values(),
                                                 plain.state_dict().values()))
    data = sl.training.TrainingData(x)
    trainer = sl.Trainer(cfg, data)
    held = {}
    while trainer.steps_done < 41:
        epoch, offset = divmod(trainer.steps_done, data.n // cfg.batch_size)
        for index in data.global_batches(cfg.batch_size, cfg.seed, epoch, offset):
            trainer.step(trainer.batch(index))
            if trainer.steps_done in (20, 41):
                held[trainer.steps_done] = {k: v.clone() for k, v in
                                            trainer.sae.state_dict().items()}
            if trainer.steps_done == 41:
                break
    for tokens, step in ((10_000, 20), (20_250, 41)):
        folder = tmp_path / "run" / "snapshots" / str(tokens)
        snap = sl.load_sae(folder)
        assert torch.equal(snap.W_dec, held[step]["W_dec"])
        assert torch.equal(snap.W_enc, held[step]["W_enc"])
        trainer.sae.load_state_dict(held[step])
        scale = data.input_scale
        assert_close(snap(x[:200]), trainer.sae(x[:200] * scale).detach() / scale)
        meta = json.loads((folder / "cfg.json").read_text())
        assert meta["metadata"]["training_tokens"] == step * cfg.batch_size
    assert not torch.equal(sl.load_sae(tmp_path / "run" / "snapshots" / "20250").W_dec,
                           sae.W_dec)
    with pytest.raises(sl.SaelabError, match="must fall within the run"):
        sl.TrainConfig(tokens=40_000, batch_size=500, snapshot_tokens=(40_001,))


def test_a_run_recorded_before_a_setting_existed_resumes_at_its_default(tmp_path):
    """config.json without `nonnegative` (as an older saelab wrote it): the same run is
    read back; with the setting away from its default, it is refused."""
    x = planted_data(n_rows=2000)[0]
    cfg = sl.TrainConfig(n_latents=64, k=4, tokens=1000, batch_size=500)
    sl.train(cfg, x, tmp_path / "r")
    run = json.loads((tmp_path / "r" / "config.json").read_text())
    del run["config"]["nonnegative"]
    (tmp_path / "r" / "config.json").write_text(json.dumps(run))
    assert torch.equal(sl.train(cfg, x, tmp_path / "r").W_dec,
                       sl.load_sae(tmp_path / "r").W_dec)
    with pytest.raises(sl.SaelabError, match="found: +nonnegative=None"):
        sl.train(sl.TrainConfig(n_latents=64, k=4, tokens=1000, batch_size=500,
                                nonnegative=False), x, tmp_path / "r")


def test_training_errors(tmp_path):
    x = planted_data(n_rows=2000)[0]
    with pytest.raises(sl.SaelabError, match="k in 1..63"):
        sl.TrainConfig(architecture="topk", n_latents=64, k=64)
    with pytest.raises(sl.SaelabError, match="differs from --d-model"):
        sl.train(sl.TrainConfig(n_latents=64, k=4, d_model=32, tokens=1000), x)
    bad = x.clone()
    bad[7, 3] = torch.nan
    with pytest.raises(sl.SaelabError, match="NaN"):
        sl.train(sl.TrainConfig(n_latents=64, k=4, tokens=1000), bad)
    sl.train(sl.TrainConfig(n_latents=64, k=4, tokens=1000, batch_size=500), x, tmp_path / "r")
    with pytest.raises(sl.SaelabError, match="(?s)holds a training run made with other settings.*found: +k=4"):
        sl.train(sl.TrainConfig(n_latents=64, k=5, tokens=1000, batch_size=500), x,
                 tmp_path / "r")


def train_cli(store, out, *extra, runner=(sys.executable, "-m", "saelab")):
    args = [*runner, "train", "--activations", str(store), "--out", str(out), "--architecture",
            "topk", "--n-latents", "128", "--k", "4", "--batch-size", "100", "--lr", "1e-3",
            "--dead-tokens", "2000", "--checkpoint-every", "20", *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "sae_weights.safetensors"))


@pytest.mark.parametrize("run", ["topk", "steered", "pursuit"])
def test_kill_and_resume_gives_identical_weights(store, tmp_path, run):
    """Also for a ReLU run steered to a target L0 (the controller's state is in the
    checkpoint, or the resumed run's coefficients and weights would differ), and for a
    dictionary trained with gradient pursuit in the loop (its dead-latent restarts too)."""
    steered = run == "steered"
    steps = ["--tokens", "100000"]  # 1000 steps
    if steered:
        steps += ["--architecture", "relu", "--target-l0", "8"]
    if run == "pursuit":
        steps += ["--architecture", "pursuit", "--pursuit", "gp"]
    assert train_cli(store, tmp_path / "whole", *steps).wait() == 0
    run = train_cli(store, tmp_path / "killed", *steps)
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    run.send_signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL  # it really was killed mid-run
    assert not (tmp_path / "killed" / "cfg.json").exists()
    resumed = train_cli(store, tmp_path / "killed", *steps)
    assert resumed.wait() == 0, resumed.stderr.read()
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps_logged = [int(line.split('"step": ')[1].split(",")[0]) for line in
                    (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == sorted(set(steps_logged))  # no step logged twice
    if steered:
        def coefs(run):
            return [json.loads(line)["sparsity_coef"] for line in
                    (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert coefs("killed") == coefs("whole") and len(set(coefs("whole"))) > 10


def free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_two_processes_match_one(store, tmp_path):
    steps = ["--tokens", "6000"]
    assert train_cli(store, tmp_path / "one", *steps).wait() == 0
    torchrun = (os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc-per-node",
                "2", "--master-port", free_port(), "-m", "saelab")
    two = train_cli(store, tmp_path / "two", *steps, runner=torchrun)
    assert two.wait() == 0, two.stderr.read()
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for key in a:
        assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_batchtopk_calibrates_its_threshold_to_k_per_token():
    """`calibrate` sets the threshold to the (k N)-th largest pre-activation of N rows (a
    brute-force top-k over all of them is the reference), and a trained SAE fires k latents
    per token at inference on the data it was calibrated on, within sampling error."""
    sae = random_sae(BatchTopKSAE, k=5)
    x = torch.randn(200, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sae.calibrate(x)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    assert sae.threshold.item() == pre.flatten().topk(5 * 200).values[-1].item()
    x, _ = planted_data(n_rows=20_000)
    cfg = sl.TrainConfig(architecture="batchtopk", n_latents=128, k=4, tokens=200_000,
                         batch_size=500, lr=3e-3)
    trained = sl.train(cfg, x)
    l0 = (trained.encode(x[:8000]) > 0).sum(1).float().mean().item()
    assert l0 == pytest.approx(4, rel=0.05)
