"""`saelab decompose` end to end: a real store from a tiny model, a saved SAE, codes on disk."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

import saelab as sl
from conftest import store_with_sae
from saelab.coding import LatentScale


@pytest.fixture(scope="module")
def store_and_sae(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("decompose")
    store, sae = store_with_sae(tiny_model_dir, root, tokens=1200, n_latents=256, seed=1)
    sl.write_sae(sae, root / "sae")
    return root, store, sae


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "saelab", "decompose", *args],
                          capture_output=True, text=True)


@pytest.mark.parametrize("method", ["gp", "encoder"])
def test_decompose_cli_saves_the_api_codes_and_their_fvu(store_and_sae, method):
    """Plumbing, not correctness: the command saves what `sl.decompose` computes (the codes
    themselves are held to coding/reference.py in test_coding.py), and prints their FVU and
    L0, recomputed here from the formula."""
    root, store, sae = store_and_sae
    out = root / f"{method}.safetensors"
    k = ["--k", "16"] if method == "gp" else []
    proc = run("--sae", str(root / "sae"), "--activations", str(root / "acts"), "--method",
               method, *k, "--tokens", "1000", "--batch-size", "300", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    codes = sl.SparseCode.load(out)
    x = store[:1000]
    expected = sl.decompose(x, sae, method, k=16 if method == "gp" else None)
    assert_close(codes.to_dense(256), expected.to_dense(256), atol=1e-5, rtol=1e-4)
    x_hat = codes.decode(sae.W_dec.detach(), sae.b_dec.detach())
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(dim=0)) ** 2).sum()
    assert f"FVU {fvu:.4f}" in proc.stdout
    assert f"L0 {codes.l0().float().mean():.2f}" in proc.stdout


def test_encoder_scaled_fits_on_held_out_rows_and_saves_the_scale(store_and_sae):
    """Plumbing: the scale is fitted on the last --fit-tokens rows only (fit_scale itself is
    held to a numpy least-squares fit in test_coding.py), and the codes of the other rows are
    the encoder's times the saved scale."""
    root, store, sae = store_and_sae
    out = root / "scaled.safetensors"
    proc = run("--sae", str(root / "sae"), "--activations", str(root / "acts"), "--method",
               "encoder-scaled", "--fit-tokens", "400", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    scale = LatentScale.load(root / "scaled.scale.safetensors")
    assert_close(scale.scale, sl.coding.fit_scale(sae, store[len(store) - 400:]).scale)
    codes = sl.SparseCode.load(out)
    assert len(codes) == len(store) - 400
    with torch.no_grad():
        expected = sae.encode(store[:len(store) - 400]) * scale.scale
    assert_close(codes.to_dense(256), expected, atol=1e-5, rtol=1e-4)


def test_width_mismatch_is_one_clear_error(store_and_sae):
    root, _, _ = store_and_sae
    sl.write_sae(sl.saes.TopKSAE(32, 64, k=4), root / "narrow")
    proc = run("--sae", str(root / "narrow"), "--activations", str(root / "acts"), "--k", "4",
               "--out", str(root / "x.safetensors"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "differ in width" in proc.stderr and "activations of width 32" in proc.stderr


def test_turning_the_bf16_screen_off_changes_no_selection(store_and_sae):
    """--no-bf16-screen computes every correlation in float32; the screen must pick the same
    latents (omp at k 16 on a width-64 model screens from its 9th step on)."""
    root, store, sae = store_and_sae
    codes = []
    for flag in ([], ["--no-bf16-screen"]):
        out = root / f"omp{len(flag)}.safetensors"
        proc = run("--sae", str(root / "sae"), "--activations", str(root / "acts"), "--method",
                   "omp", "--k", "16", "--tokens", "600", "--out", str(out), *flag)
        assert proc.returncode == 0, proc.stderr
        codes.append(sl.SparseCode.load(out))
    assert torch.equal(codes[0].indices, codes[1].indices)
    assert_close(codes[0].values, codes[1].values, atol=1e-5, rtol=1e-4)
