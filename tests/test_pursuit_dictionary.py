"""The `pursuit` architecture: a dictionary trained with a pursuit in the loop and no
encoder. It recovers planted features; its decoder gradient is dense float64 autograd's on
the same code; its dead-latent rule restarts a latent that never fires; it round-trips
through its files and trains from the CLI."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import saelab as sl
from saelab.coding import Coder
from saelab.saes import PursuitSAE
from test_training import planted_data, train_cli, weights


@pytest.mark.parametrize("pursuit", ["mp", "gp", "omp"])
def test_a_pursuit_dictionary_recovers_planted_features(pursuit):
    """256 true unit directions in 64 dimensions, 4 per row (the width-sweep setting), a
    dictionary of 512 trained on 300,000 rows: every true direction has a row within
    cosine 0.95 of it, and the code is the pursuit's own at k 4."""
    x, true = planted_data()
    cfg = sl.TrainConfig(architecture="pursuit", pursuit=pursuit, n_latents=512, k=4,
                         tokens=300_000, batch_size=512, lr=3e-3, dead_tokens=20_000)
    sae = sl.train(cfg, x)
    cos = (torch.nn.functional.normalize(sae.W_dec.detach(), dim=1) @ true.T).amax(dim=0)
    assert cos.mean() >= 0.95 and (cos > 0.9).float().mean() >= 0.95
    code = Coder(sae.W_dec.detach(), pursuit, k=4, nonnegative=True)(
        (x[:500] - sae.b_dec).detach())
    assert_close(sae.encode(x[:500]), code.to_dense(512))


def test_the_decoder_gradient_is_dense_float64_autograds():
    sae = PursuitSAE(16, 40, k=3, pursuit="gp").init_random(seed=2).double()
    x = torch.randn(64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(dim=0))
    sae.loss(x).loss.backward()
    dense = sae.encode(x).detach()  # the same code, as a constant
    W, b = sae.W_dec.detach().clone().requires_grad_(), sae.b_dec.detach().clone().requires_grad_()
    ((x - (dense @ W + b)) ** 2).sum(dim=1).mean().backward()
    assert_close(sae.W_dec.grad, W.grad, rtol=1e-12, atol=1e-12)
    assert_close(sae.b_dec.grad, b.grad, rtol=1e-12, atol=1e-12)
    used = dense.ne(0).any(dim=0)
    assert (sae.W_dec.grad[~used] == 0).all() and used.sum() < 40  # only rows the batch used


def test_a_latent_that_never_fires_is_restarted_on_a_residual():
    """Data and every other row in the first 8 of 16 dimensions; latent 0 points along
    dimension 15, orthogonal to every residual, so no pursuit picks it. Marked dead, it is
    restarted after the step on the direction of the batch's worst-reconstructed row, and
    then it fires."""
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(256, 16)
    x[:, :8] = torch.randn(256, 8, generator=g)
    sae = PursuitSAE(16, 24, k=2, pursuit="gp").init_random(seed=0)
    with torch.no_grad():
        sae.W_dec[:, 8:] = 0
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
        sae.W_dec[0] = torch.nn.functional.one_hot(torch.tensor(15), 16).float()
    assert not sae.encode(x)[:, 0].any()
    dead = torch.zeros(24, dtype=torch.bool)
    dead[0] = True
    out = sae.loss(x, dead_L=dead)
    residual = (x - out.x_hat).detach()
    worst = residual[residual.norm(dim=1).argmax()]
    sae.after_step()
    assert_close(sae.W_dec[0], worst / worst.norm())
    assert sae.encode(x)[:, 0].any()


def test_pursuit_dictionaries_round_trip_and_train_from_the_cli(tmp_path, store):
    for nonnegative in (True, False):
        sae = PursuitSAE(16, 40, k=3, pursuit="omp", nonnegative=nonnegative).init_random(1)
        sl.formats.write_sae(sae, tmp_path / f"nn{nonnegative}")
        loaded = sl.load_sae(tmp_path / f"nn{nonnegative}")
        assert isinstance(loaded, PursuitSAE) and loaded.hyperparameters() == {
            "k": 3, "pursuit": "omp", "nonnegative": nonnegative}
        x = torch.randn(30, 16)
        assert_close(loaded.encode(x), sae.encode(x))
    run = train_cli(store, tmp_path / "cli", "--tokens", "4000", "--architecture", "pursuit",
                    "--pursuit", "mp", "--no-nonnegative")
    assert run.wait() == 0, run.stderr.read()
    trained = sl.load_sae(tmp_path / "cli")
    assert trained.hyperparameters() == {"k": 4, "pursuit": "mp", "nonnegative": False}
    assert set(weights(tmp_path / "cli")) >= {"W_dec", "b_dec"}
