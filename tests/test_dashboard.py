"""`saelab dashboard` on a real store of a tiny model: statistics, contexts and logit
effects checked against brute force over dense codes and the model's own unembedding."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import saelab as sl
from conftest import store_with_sae
from saelab.evals import DashboardConfig, latent_dashboard
from saelab.evals.latents import activations_of

N_LATENTS = 128


@pytest.fixture(scope="module")
def store_and_sae(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard")
    store, sae = store_with_sae(tiny_model_dir, root, tokens=900, n_latents=N_LATENTS, seed=4)
    sl.write_sae(sae, root / "sae")
    return root, store, sae


def test_activations_of_equals_the_dense_code():
    code = sl.SparseCode(torch.tensor([[3, 1, 0], [5, 3, 3], [2, 2, 2]]),
                         torch.tensor([[1.5, -2.0, 0.0], [0.5, 4.0, 0.0], [0.0, 0.0, 0.0]]))
    latents = torch.tensor([1, 3, 4])
    assert torch.equal(activations_of(code, latents, 6), code.to_dense(6)[:, latents])


@pytest.mark.parametrize("method", ["encoder", "gp"])
def test_dashboard_matches_brute_force(store_and_sae, method):
    root, store, sae = store_and_sae
    k = 8 if method == "gp" else None
    out = root / f"dash-{method}"
    latent_dashboard(DashboardConfig(sae=str(root / "sae"), activations=root / "acts",
                                     out=out, method=method, k=k, tokens=700,
                                     sample=5, contexts=4, batch_size=256))
    result = json.loads((out / "latents.json").read_text())  # the file a user opens
    dense = sl.decompose(store[:700], sae, method, k=k).to_dense(N_LATENTS)
    assert result["firing_latents"] == int((dense != 0).any(dim=0).sum())
    shown = [entry["latent"] for entry in result["latents"]]
    assert len(shown) == 5 and shown == sorted(shown)
    lm = sl.load_model(store.model)
    W_U = lm.hf_model.get_output_embeddings().weight.detach().double()
    page = (out / "dashboard.html").read_text()
    for entry in result["latents"]:
        acts = dense[:, entry["latent"]]
        assert (acts != 0).any()  # drawn from the firing latents
        assert entry["fires"] == int((acts != 0).sum())
        assert entry["max_abs"] == pytest.approx(float(acts.abs().max()), rel=1e-5)
        assert sum(entry["histogram"]["counts"]) == entry["fires"]
        expected_rows = acts.abs().topk(4).indices.tolist()
        assert [c["row"] for c in entry["contexts"]] == expected_rows
        for ctx in entry["contexts"]:
            top = [t for t in ctx["tokens"] if t["top"]]
            assert len(top) == 1
            assert top[0]["id"] == store.context(ctx["row"]).token_ids[ctx["position"]]
            assert top[0]["activation"] == pytest.approx(float(acts[ctx["row"]]), abs=1e-5)
        effect = W_U @ sae.W_dec.detach()[entry["latent"]].double()
        promotes = [t["id"] for t in entry["logit_effect"]["promotes"]]
        suppresses = [t["id"] for t in entry["logit_effect"]["suppresses"]]
        assert promotes == effect.topk(10).indices.tolist()
        assert suppresses == effect.topk(10, largest=False).indices.tolist()
        assert f"id=\"latent-{entry['latent']}\"" in page


def test_context_tokens_carry_their_own_rows_activations(store_and_sae):
    root, store, sae = store_and_sae
    result = latent_dashboard(DashboardConfig(sae=str(root / "sae"), activations=root / "acts",
                                           out=root / "dash-ctx", latents=(7,), tokens=900,
                                           contexts=3, window=40))
    acts = sl.decompose(store[:900], sae, "encoder").to_dense(N_LATENTS)[:, 7]
    first_stored = store.context_size - store.rows_per_window
    for ctx in result["latents"][0]["contexts"]:
        for offset, tok in enumerate(ctx["tokens"]):
            p = ctx["position"] - min(40, ctx["position"]) + offset
            row = ctx["row"] + p - ctx["position"]
            if p < first_stored or not 0 <= row < 900:
                assert tok["activation"] is None
            else:
                assert tok["activation"] == pytest.approx(float(acts[row]), abs=1e-5)
                assert tok["id"] == store.context(row).token_ids[store.context(row).position]


def test_unknown_latent_is_one_clear_error(store_and_sae):
    root, _, _ = store_and_sae
    proc = subprocess.run([sys.executable, "-m", "saelab", "dashboard", "--sae",
                           str(root / "sae"), "--activations", str(root / "acts"), "--out",
                           str(root / "bad"), "--latents", "3,500", "--tokens", "100"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no such latent" in proc.stderr and "--latents 500" in proc.stderr
    assert f"0..{N_LATENTS - 1}" in proc.stderr
    assert not (root / "bad" / "dashboard.html").exists()
