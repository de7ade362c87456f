"""Pretrained-SAE formats, checked against the libraries that define them.

saelab's files are loaded by SAELens, sparsify and dictionary_learning themselves, and theirs
(written by their own code) by saelab; both must give the same codes and reconstructions
(max abs diff <= 1e-5). Gemma Scope has no loader of its own: its params.npz is checked
against a numpy JumpReLU written from the published formula. Every conversion round-trips,
every broken file gets its own error, and the hub path runs on a Hugging Face cache folder
laid out as huggingface_hub lays it out, offline.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close

import saelab as sl
from conftest import store_with_sae, tiny_hf_model
from saelab.cli import main
from saelab.errors import SaelabError
from saelab.formats import load_sae, write_sae
from saelab.formats.releases import gemma_scope, saelens_directory
from saelab.formats.sites import module_for_site, site_from_module
from saelab.lm.sites import list_sites
from saelab.saes import REGISTRY, SAE

D, N, K = 24, 96, 6
ARCHS = ["relu", "topk", "batchtopk", "jumprelu"]
FORMATS = ["saelens", "sparsify", "dictionary_learning"]
SITE, MODEL = "blocks.3.hook_resid_post", "EleutherAI/pythia-70m-deduped"


def peer(name: str) -> ModuleType:
    """A peer library; `make` installs them, so in CI a missing one fails instead of skipping."""
    if os.environ.get("CI"):
        return importlib.import_module(name)
    return pytest.importorskip(name, reason="install the peers: make install")


def exact(a: torch.Tensor, b: torch.Tensor) -> None:
    """Max abs difference <= 1e-5 (no relative slack)."""
    assert_close(a.detach().float(), b.detach().float(), atol=1e-5, rtol=0)


def random_sae(arch: str, *, subtract_b_dec: bool = True, seed: int = 0) -> SAE:
    """An SAE with every tensor random and non-zero, so no convention can hide."""
    g = torch.Generator().manual_seed(seed)
    kw = {"k": K} if arch in ("topk", "batchtopk") else {}
    sae = REGISTRY[arch](D, N, **kw, apply_b_dec_to_input=subtract_b_dec, site=SITE,
                         model=MODEL).init_random(seed)
    with torch.no_grad():
        sae.b_enc.copy_(0.3 * torch.randn(N, generator=g))
        sae.b_dec.copy_(torch.randn(D, generator=g))
        if arch == "jumprelu":
            sae.threshold.copy_(0.5 + torch.rand(N, generator=g))
        if arch == "batchtopk":
            sae.threshold.fill_(0.8)
    return sae.eval()


def inputs(seed: int = 1, n: int = 64) -> torch.Tensor:
    return 2 * torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def dense(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return torch.zeros(len(values), N).scatter_(1, indices, values.float())


# --- saelab -> the peers -------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_loads_saelab_saes_with_equal_outputs(arch, tmp_path):
    sae_lens = peer("sae_lens")
    ours = random_sae(arch, subtract_b_dec=arch != "jumprelu")
    sl.write_sae(ours, tmp_path)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    x = inputs()
    exact(theirs.encode(x), ours.encode(x))
    exact(theirs.decode(theirs.encode(x)), ours(x))
    assert theirs.cfg.metadata.hook_name == SITE  # v6 metadata survives SAELens's parsing
    assert theirs.cfg.metadata.model_name == MODEL


@pytest.mark.parametrize("subtract_b_dec", [True, False])
def test_sparsify_loads_saelab_topk_with_equal_outputs(subtract_b_dec, tmp_path):
    sparsify = peer("sparsify")
    ours = random_sae("topk", subtract_b_dec=subtract_b_dec)
    folder = write_sae(ours, tmp_path, "sparsify")
    assert folder == tmp_path / "layers.3"  # the hookpoint: block 3's output module
    coders = sparsify.SparseCoder.load_many(str(tmp_path), local=True)
    theirs = coders["layers.3"]
    x = inputs()
    top = theirs.encode(x)
    exact(dense(top.top_acts, top.top_indices), ours.encode(x))
    exact(theirs.decode(top.top_acts, top.top_indices), ours(x))


@pytest.mark.parametrize("arch", ARCHS)
def test_dictionary_learning_loads_saelab_saes_with_equal_outputs(arch, tmp_path):
    utils = peer("dictionary_learning.utils")
    ours = random_sae(arch, subtract_b_dec=arch != "relu")  # relu: b_dec folded into b_enc
    write_sae(ours, tmp_path, "dictionary_learning")
    theirs, config = utils.load_dictionary(str(tmp_path), "cpu")
    x = inputs()
    # dictionary_learning's AutoEncoder normalises decoder rows as it loads (relu's start at
    # norm 0.1 and are not kept at 1), moving their norms into the codes
    norms = ours.W_dec.norm(dim=1) if arch == "relu" else torch.ones(N)
    assert arch != "relu" or not torch.allclose(norms, torch.ones(N))
    exact(theirs.encode(x), ours.encode(x) * norms)
    exact(theirs(x), ours(x))
    assert config["trainer"]["submodule_name"] == "resid_post_layer_3"


# --- the peers -> saelab -------------------------------------------------------------------

def saelens_sae(kind: str, *, seed: int = 0, **cfg):
    """An SAELens SAE of `kind` with random weights of unit scale (decoder rows not unit
    norm, so decoder-norm rescaling matters)."""
    sae_lens = peer("sae_lens")
    classes = {"standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
               "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
               "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig)}
    cls, cfg_cls = classes[kind]
    config = cfg_cls(d_in=D, d_sae=N, **cfg)
    config.metadata.hook_name, config.metadata.model_name = SITE, MODEL
    sae = cls(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            scale = {"b_enc": 0.3, "b_dec": 1.0, "threshold": 1.0}.get(name, D**-0.5)
            p.copy_(scale * torch.randn(p.shape, generator=g))
            if name == "threshold":
                p.abs_().add_(0.5)
    return sae


@pytest.mark.parametrize("kind,cfg", [
    ("standard", {}), ("standard", {"apply_b_dec_to_input": False}), ("topk", {"k": K}),
    ("topk", {"k": K, "rescale_acts_by_decoder_norm": True}), ("jumprelu", {})])
def test_saelab_loads_saelens_saes_with_equal_outputs(kind, cfg, tmp_path):
    theirs = saelens_sae(kind, **cfg)
    theirs.save_model(tmp_path)
    ours = load_sae(tmp_path)
    x = inputs()
    exact(ours.encode(x), theirs.encode(x))
    exact(ours(x), theirs.decode(theirs.encode(x)))
    assert (ours.site, ours.model) == (SITE, MODEL)


def test_pre_6_saelens_field_names_load_as_saelens_reads_them(tmp_path):
    sae_lens = peer("sae_lens")
    saelens_sae("topk", k=K).save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    old = {"architecture": "standard", "d_in": D, "d_sae": N, "dtype": "torch.float32",
           "device": "cpu", "hook_point": SITE, "hook_point_layer": 3, "model_name": MODEL,
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
           "normalize_activations": False, "apply_b_dec_to_input": cfg["apply_b_dec_to_input"]}
    (tmp_path / "cfg.json").write_text(json.dumps(old))
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    ours = load_sae(tmp_path)
    assert (ours.architecture, ours.k, ours.site, ours.model) == ("topk", K, SITE, MODEL)
    x = inputs()
    exact(ours.encode(x), theirs.encode(x))
    exact(ours(x), theirs.decode(theirs.encode(x)))


def test_jumprelu_log_threshold_loads_as_saelens_reads_it(tmp_path):
    sae_lens = peer("sae_lens")
    saelens_sae("jumprelu").save_model(tmp_path)
    tensors = sl.io.read_safetensors(tmp_path / "sae_weights.safetensors")
    tensors["log_threshold"] = tensors.pop("threshold").log()
    save_file(tensors, tmp_path / "sae_weights.safetensors")
    # SAELens converts log_threshold only in its training classes
    theirs = sae_lens.TrainingSAE.load_from_disk(tmp_path)
    ours, x = load_sae(tmp_path), inputs()
    assert (ours.encode(x) > 0).any()
    exact(ours.encode(x), theirs.encode(x))
    exact(ours(x), theirs.decode(theirs.encode(x)))


def test_saelens_input_norm_factor_is_folded_into_the_weights(tmp_path):
    theirs = saelens_sae("standard", normalize_activations="expected_average_only_in")
    theirs.save_model(tmp_path)
    x, scale = inputs(), 0.37
    with pytest.raises(SaelabError, match="input_scale"):
        load_sae(tmp_path)  # the factor is not in the folder and was not given
    given = load_sae(tmp_path, input_scale=scale)
    (tmp_path / "activation_scaler.json").write_text(json.dumps({"scaling_factor": scale}))
    recorded = load_sae(tmp_path)
    for ours in (given, recorded):  # SAELens leaves the scaling to the caller: x * s in, / s out
        exact(ours.encode(x), theirs.encode(x * scale) / scale)
        exact(ours(x), theirs.decode(theirs.encode(x * scale)) / scale)


def test_saelab_loads_a_sparsify_run_with_equal_outputs(tmp_path):
    sparsify = peer("sparsify")
    coder = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(k=K, num_latents=N))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (D**-0.5 if p.dim() == 2 else 1.0))
    coder.save_to_disk(tmp_path / "layers.3")
    (tmp_path / "config.json").write_text(json.dumps({"model": MODEL}))
    ours = load_sae(tmp_path)  # the run folder: its one hookpoint is found
    x = inputs()
    top = coder.encode(x)
    exact(ours.encode(x), dense(top.top_acts, top.top_indices))
    exact(ours(x), coder.decode(top.top_acts, top.top_indices))
    assert (ours.architecture, ours.k, ours.site, ours.model) == ("topk", K, SITE, MODEL)


@pytest.fixture(scope="module")
def dictionary_learning_run(tmp_path_factory):
    """Four dictionaries trained 20 steps and saved by dictionary_learning's own trainSAE,
    on activations it normalises (so its bias rescaling at save is exercised too)."""
    peer("dictionary_learning")
    from dictionary_learning.trainers import (
        BatchTopKTrainer,
        JumpReluTrainer,
        StandardTrainer,
        TopKTrainer,
    )
    from dictionary_learning.training import trainSAE

    root = tmp_path_factory.mktemp("dictionary_learning")
    common = {"steps": 20, "activation_dim": D, "dict_size": N, "layer": 3, "lm_name": MODEL,
              "device": "cpu", "warmup_steps": 5}
    configs = [{"trainer": StandardTrainer, **common, "sparsity_warmup_steps": 5},
               {"trainer": TopKTrainer, **common, "k": K, "threshold_start_step": 5},
               {"trainer": BatchTopKTrainer, **common, "k": K, "threshold_start_step": 5,
                "submodule_name": "mlp_out_layer_2"},
               {"trainer": JumpReluTrainer, **common, "sparsity_warmup_steps": 5}]
    g = torch.Generator().manual_seed(0)
    data = (7 * torch.randn(128, D, generator=g) + 3 for _ in range(200))
    trainSAE(data, configs, steps=20, save_dir=str(root), normalize_activations=True,
             device="cpu")
    return root


@pytest.mark.parametrize("trainer,arch,site", [
    (0, "relu", SITE), (1, "topk", SITE), (2, "batchtopk", "blocks.2.hook_mlp_out"),
    (3, "jumprelu", SITE)])
def test_saelab_loads_dictionary_learning_checkpoints_with_equal_outputs(
        dictionary_learning_run, trainer, arch, site):
    from dictionary_learning.utils import load_dictionary

    folder = dictionary_learning_run / f"trainer_{trainer}"
    theirs, _ = load_dictionary(str(folder), "cpu")
    ours = load_sae(folder)
    assert (ours.architecture, ours.site, ours.model) == (arch, site, MODEL)
    x = 7 * inputs() + 3
    codes = theirs.encode(x)
    assert (codes > 0).any()
    exact(ours.encode(x), codes)
    exact(ours(x), theirs(x))


# --- Gemma Scope ---------------------------------------------------------------------------

def gemma_scope_params(seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights under the published key names and shapes, float32."""
    rng = np.random.default_rng(seed)
    W_dec = rng.standard_normal((N, D)).astype(np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    return {"W_enc": W_dec.T.copy(), "W_dec": W_dec,
            "b_enc": (0.3 * rng.standard_normal(N)).astype(np.float32),
            "b_dec": rng.standard_normal(D).astype(np.float32),
            "threshold": (0.5 + rng.random(N)).astype(np.float32)}


def jumprelu_reference(params: dict[str, np.ndarray], x: np.ndarray):
    """Gemma Scope's encoder as published, in float64: no b_dec subtraction; a
    `scaling_factor`, where a file has one, multiplies the codes before decoding."""
    p = {key: value.astype(np.float64) for key, value in params.items()}
    pre = x @ p["W_enc"] + p["b_enc"]
    codes = (pre > p["threshold"]) * np.maximum(pre, 0)
    return codes, (codes * p.get("scaling_factor", 1.0)) @ p["W_dec"] + p["b_dec"]


@pytest.mark.parametrize("scaling", [False, True])
def test_gemma_scope_npz_matches_the_numpy_jumprelu(tmp_path, scaling):
    folder = tmp_path / "gemma-scope-2b-pt-mlp" / "layer_12" / "width_16k" / "average_l0_82"
    folder.mkdir(parents=True)
    params = gemma_scope_params()
    if scaling:
        params["scaling_factor"] = np.linspace(0.5, 1.5, N, dtype=np.float32)
    np.savez(folder / "params.npz", **params)
    sae = load_sae(folder / "params.npz")
    x = inputs().double().numpy()
    codes, x_hat = jumprelu_reference(params, x)
    assert (codes > 0).mean() > 0.05
    exact(sae.encode(torch.from_numpy(x).float()), torch.from_numpy(codes))
    exact(sae(torch.from_numpy(x).float()), torch.from_numpy(x_hat))
    assert (sae.architecture, sae.apply_b_dec_to_input) == ("jumprelu", False)
    assert (sae.site, sae.model) == ("blocks.12.hook_mlp_out", "google/gemma-2-2b")


@pytest.mark.parametrize("config,site", [
    ({"architecture": "jump_relu", "model_name": "gemma-v3-1b-pt",
      "hf_hook_point_in": "model.layers.5.self_attn.o_proj.input"}, "blocks.5.attn.hook_z"),
    (None, "blocks.5.hook_mlp_out")])
def test_gemma_scope_2_safetensors_matches_the_numpy_jumprelu(tmp_path, config, site):
    folder = tmp_path / "gemma-scope-2-1b-pt" / "mlp_out_all" / "layer_5_width_16k_l0_small"
    folder.mkdir(parents=True)
    params = gemma_scope_params(seed=1)
    save_file({key.lower(): torch.from_numpy(v) for key, v in params.items()},
              folder / "params.safetensors")
    if config:
        (folder / "config.json").write_text(json.dumps(config))
    sae = load_sae(folder)
    x = inputs(seed=2).double().numpy()
    codes, x_hat = jumprelu_reference(params, x)
    exact(sae.encode(torch.from_numpy(x).float()), torch.from_numpy(codes))
    exact(sae(torch.from_numpy(x).float()), torch.from_numpy(x_hat))
    assert sae.site == site
    assert sae.model == (config["model_name"] if config else "google/gemma-3-1b-pt")


def test_gemma_scope_release_names_resolve_as_saelens_lists_them():
    peer("sae_lens")
    directory = saelens_directory()
    checked = 0
    for release, entry in directory.items():
        if not release.startswith("gemma-scope") or entry["conversion_func"] not in (
                "gemma_2", "gemma_3") or release.endswith("canonical"):
            continue
        if gemma_scope(release, "x") is None:  # transcoders: no rule, SAELens's list only
            assert "transcoder" in release
            continue
        for sae in entry["saes"]:
            assert gemma_scope(release, sae["id"]) == (entry["repo_id"], sae["path"], None)
            checked += 1
    assert checked > 1000


# --- site names ----------------------------------------------------------------------------

@pytest.mark.parametrize("family,model", [
    ("llama", "meta-llama/Llama-3.2-1B"), ("gemma2", "google/gemma-2-2b"), ("gpt2", "gpt2"),
    ("gpt_neox", "EleutherAI/pythia-70m-deduped")])
def test_module_paths_and_sites_translate_both_ways(family, model, tiny_tokenizer):
    """Against saelab's site table on real (tiny) models: a site read at a module's output
    has a sparsify hookpoint naming that very module of the base model, and back."""
    hf = tiny_hf_model(family, tiny_tokenizer)
    for site in list_sites(hf.config):
        hookpoint = module_for_site(site.name, model)
        if site.side == "in":  # sparsify hooks outputs only
            assert hookpoint is None
            continue
        assert hf.base_model.get_submodule(hookpoint) is hf.get_submodule(site.module_path)
        assert site_from_module(hookpoint, "out", model) == site.name
        assert site_from_module(site.module_path, "out", model) == site.name


# --- round trips and the CLI ---------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("subtract_b_dec", [True, False])
def test_every_conversion_round_trips(arch, fmt, subtract_b_dec, tmp_path):
    sae = random_sae(arch, subtract_b_dec=subtract_b_dec, seed=3)
    if fmt == "sparsify" and arch != "topk":
        with pytest.raises(SaelabError, match="sparsify has no"):
            write_sae(sae, tmp_path, fmt)
        return
    back = load_sae(write_sae(sae, tmp_path, fmt))
    assert (back.architecture, back.hyperparameters(), back.site, back.model) == (
        arch, sae.hyperparameters(), SITE, MODEL)
    x = inputs(seed=4)
    exact(back.encode(x), sae.encode(x))
    exact(back(x), sae(x))
    exact(back.W_dec, sae.W_dec)


def test_convert_and_info_on_the_command_line(tmp_path, capsys):
    folder = tmp_path / "gemma-scope-9b-pt-res" / "layer_20" / "width_16k" / "average_l0_71"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **gemma_scope_params())
    assert main(["convert", str(folder), "--to", "dictionary_learning",
                 "--out", str(tmp_path / "dl")]) == 0
    capsys.readouterr()
    # the converted file, as dictionary_learning itself loads it, against numpy's JumpReLU
    theirs, _ = peer("dictionary_learning.utils").load_dictionary(str(tmp_path / "dl"), "cpu")
    x = inputs().double().numpy()
    codes, x_hat = jumprelu_reference(gemma_scope_params(), x)
    with torch.no_grad():
        x32 = torch.from_numpy(x).float()
        exact(theirs.encode(x32), torch.from_numpy(codes))
        exact(theirs(x32), torch.from_numpy(x_hat))
    assert main(["info", str(tmp_path / "dl")]) == 0
    info = capsys.readouterr().out
    assert "dictionary_learning" in info and "jumprelu" in info
    assert "blocks.20.hook_resid_post of google/gemma-2-9b" in info
    assert f"{N} latents x d_model {D}" in info and "ae.pt" in info
    assert main(["convert", str(folder), "--to", "sparsify", "--out", str(tmp_path / "s")]) == 2
    assert "sparsify has no jumprelu SAE" in capsys.readouterr().err
    assert main(["convert", str(folder), "--out", str(tmp_path / "dl")]) == 2
    assert "already holds an SAE in the dictionary_learning layout" in capsys.readouterr().err


# --- broken files --------------------------------------------------------------------------

class RunsCode:
    """Unpickling this would touch a file: a stand-in for any code a pickle can carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def saelens_folder(path: Path) -> Path:
    sl.write_sae(random_sae("topk"), path)
    return path


def dictionary_learning_folder(path: Path) -> Path:
    return write_sae(random_sae("topk"), path, "dictionary_learning")


def gemma_scope_folder(path: Path, drop: str | None = None, **change) -> Path:
    params = {**gemma_scope_params(), **change}
    path.mkdir(parents=True)
    np.savez(path / "params.npz", **{k: v for k, v in params.items() if k != drop})
    return path


def case_truncated_safetensors(tmp: Path) -> Path:
    truncate(saelens_folder(tmp) / "sae_weights.safetensors")
    return tmp


def case_truncated_npz(tmp: Path) -> Path:
    truncate(gemma_scope_folder(tmp) / "params.npz")
    return tmp


def case_truncated_ae_pt(tmp: Path) -> Path:
    truncate(dictionary_learning_folder(tmp) / "ae.pt")
    return tmp


def case_missing_key(tmp: Path) -> Path:
    return gemma_scope_folder(tmp, drop="threshold")


def case_shape_mismatch(tmp: Path) -> Path:
    return gemma_scope_folder(tmp, b_enc=np.zeros(N + 1, np.float32))


def case_scaling_factor_shape(tmp: Path) -> Path:
    return gemma_scope_folder(tmp, scaling_factor=np.ones(N - 1, np.float32))


def case_config_mismatch(tmp: Path) -> Path:
    cfg = json.loads((saelens_folder(tmp) / "cfg.json").read_text())
    (tmp / "cfg.json").write_text(json.dumps({**cfg, "d_in": D + 8}))
    return tmp


def case_pickle_with_code(tmp: Path) -> Path:
    folder = dictionary_learning_folder(tmp)
    state = torch.load(folder / "ae.pt", weights_only=True)
    torch.save({**state, "payload": RunsCode(tmp / "code-ran")}, folder / "ae.pt")
    return folder


def case_truncated_config(tmp: Path) -> Path:
    truncate(saelens_folder(tmp) / "cfg.json")
    return tmp


def case_per_token_normalisation(tmp: Path) -> Path:
    cfg = json.loads((saelens_folder(tmp) / "cfg.json").read_text())
    (tmp / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    return tmp


def case_gemma_scope_transcoder(tmp: Path) -> Path:
    folder = tmp / "gemma-scope-2-1b-pt" / "transcoder_all" / "layer_3_width_16k_l0_big"
    folder.mkdir(parents=True)
    save_file({k.lower(): torch.from_numpy(v) for k, v in gemma_scope_params().items()},
              folder / "params.safetensors")
    return folder


def case_sparsify_groupmax(tmp: Path) -> Path:
    folder = write_sae(random_sae("topk"), tmp, "sparsify")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "activation": "groupmax"}))
    return folder


def case_gated_dictionary(tmp: Path) -> Path:
    folder = dictionary_learning_folder(tmp)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["trainer"]["dict_class"] = "GatedAutoEncoder"
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def case_no_sae(tmp: Path) -> Path:
    tmp.mkdir()
    (tmp / "notes.txt").write_text("nothing here")
    return tmp


def case_several_saes(tmp: Path) -> Path:
    saelens_folder(tmp / "a")
    dictionary_learning_folder(tmp / "b")
    return tmp


def case_unknown_release(tmp: Path) -> str:
    return "no-such-release:layer_1"


BROKEN = {
    case_truncated_safetensors: "truncated or damaged",
    case_truncated_npz: "truncated or damaged",
    case_truncated_ae_pt: "truncated or damaged",
    case_truncated_config: "damaged or truncated",
    case_missing_key: "lacks tensors the SAE needs(.|\n)*expected: threshold",
    case_shape_mismatch: "b_enc has the wrong shape(.|\n)*found:    b_enc \\[97\\]",
    case_scaling_factor_shape: "scaling_factor has the wrong shape",
    case_config_mismatch: "does not match its cfg.json",
    case_pickle_with_code: "needs arbitrary code to load; saelab will not run it",
    case_per_token_normalisation: "normalises each token",
    case_gemma_scope_transcoder: "holds a transcoder",
    case_sparsify_groupmax: "sparsify coder saelab cannot run",
    case_gated_dictionary: "names a dictionary saelab cannot run",
    case_no_sae: "holds no SAE(.|\n)*notes.txt",
    case_several_saes: "holds several SAEs(.|\n)*found:    a, b",
    case_unknown_release: "unknown SAE release 'no-such-release'",
}


@pytest.mark.parametrize("make", BROKEN, ids=lambda f: f.__name__.removeprefix("case_"))
def test_each_bad_file_gets_its_error(make, tmp_path):
    spec = make(tmp_path / "sae")
    with pytest.raises(SaelabError, match=BROKEN[make]):
        load_sae(spec)
    assert not (tmp_path / "sae" / "code-ran").exists()


# --- the hub, offline, from a Hugging Face cache -------------------------------------------

def add_to_hf_cache(home: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """Lay `files` out as huggingface_hub's cache does: content-addressed blobs, a snapshot of
    relative symlinks per commit, and refs/main naming the commit."""
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


HUB_SCRIPT = """
import json, sys
import saelab as sl
out = {}
for spec in sys.argv[1:]:
    try:
        sae = sl.load_sae(spec)
        out[spec] = [sae.architecture, sae.site, sae.model, sae.W_dec.sum().item()]
    except sl.SaelabError as err:
        out[spec] = str(err)
print(json.dumps(out))
"""


def test_hub_specs_load_from_the_hugging_face_cache_offline(tmp_path):
    params = gemma_scope_params()
    npz = tmp_path / "params.npz"
    np.savez(npz, **params)
    sub = "layer_12/width_16k/average_l0_82"
    add_to_hf_cache(tmp_path / "hf", "google/gemma-scope-2b-pt-res",
                    {f"{sub}/params.npz": npz.read_bytes(), "README.md": b"Gemma Scope"})
    saelens_folder(tmp_path / "s")
    add_to_hf_cache(tmp_path / "hf", "someone/saes", {
        f"run/{p.name}": p.read_bytes() for p in (tmp_path / "s").iterdir()})
    specs = [f"hf://google/gemma-scope-2b-pt-res/{sub}", f"gemma-scope-2b-pt-res:{sub}",
             "hf://someone/saes/run", "hf://someone/missing/run"]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", HUB_SCRIPT, *specs], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    gemma = ["jumprelu", "blocks.12.hook_resid_post", "google/gemma-2-2b",
             pytest.approx(float(params["W_dec"].sum()), abs=1e-3)]
    assert got[specs[0]] == gemma and got[specs[1]] == gemma
    assert got[specs[2]][:3] == ["topk", SITE, MODEL]
    assert "cannot fetch someone/missing/run" in got[specs[3]]
    assert "HF_HUB_OFFLINE is set" in got[specs[3]] and str(tmp_path / "hf") in got[specs[3]]


# --- decompose with a loaded SAE -----------------------------------------------------------

def test_decompose_runs_with_saes_of_other_layouts(tiny_model_dir, tmp_path):
    store, sae = store_with_sae(tiny_model_dir, tmp_path, tokens=600, n_latents=128, seed=2)
    folder = write_sae(sae, tmp_path / "sparsify", "sparsify")
    assert folder.name == "layers.1"
    out = tmp_path / "codes.safetensors"
    assert main(["decompose", "--sae", str(tmp_path / "sparsify"), "--activations",
                 str(tmp_path / "acts"), "--method", "encoder", "--out", str(out)]) == 0
    expected = sl.decompose(store[:], sae, "encoder")
    assert_close(sl.SparseCode.load(out).to_dense(128), expected.to_dense(128))
    # an SAELens SAE trained on normalised inputs, factor not recorded: the store's is used
    sl.write_sae(sae, tmp_path / "normalised")
    cfg = json.loads((tmp_path / "normalised" / "cfg.json").read_text())
    cfg["normalize_activations"] = "expected_average_only_in"
    (tmp_path / "normalised" / "cfg.json").write_text(json.dumps(cfg))
    assert main(["decompose", "--sae", str(tmp_path / "normalised"), "--activations",
                 str(tmp_path / "acts"), "--method", "encoder", "--out", str(out)]) == 0
    scale = store.normalisation["norm_scale"]
    assert scale != pytest.approx(1.0)
    with torch.no_grad():
        codes_BL = sae.encode(store[:] * scale) / scale  # what SAELens computes, in raw units
    assert_close(sl.SparseCode.load(out).to_dense(128), codes_BL, atol=1e-5, rtol=1e-4)
