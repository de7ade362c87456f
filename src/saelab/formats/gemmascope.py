"""Gemma Scope (JumpReLU SAEs on Gemma 2 and, as Gemma Scope 2, on Gemma 3).

Gemma Scope 1: `params.npz` with `W_enc` [d_model, n_latents], `W_dec`, `b_enc`, `b_dec`,
`threshold`, in `layer_L/width_W/average_l0_N/` of a repository named for the site
(`gemma-scope-2b-pt-res` / `-mlp` / `-att`). Gemma Scope 2: `params.safetensors` with the same
tensors in lower case (`w_enc`, `w_dec`), in `resid_post[_all]/layer_L_width_W_l0_S/` (also
`attn_out`, `mlp_out`) of one repository per model, sometimes beside a `config.json` naming
the Hugging Face module read (`hf_hook_point_in`). Both encode raw activations (no `b_dec`
subtraction): z = pre * (pre > threshold) * (pre > 0), pre = x W_enc + b_enc. Transcoders
(which read one site and write another) are refused: a saelab SAE reconstructs its input.
"""

from __future__ import annotations

import re
from pathlib import Path

from saelab.errors import SaelabError
from saelab.formats.build import build_sae, fold_code_scale
from saelab.formats.files import read_npz
from saelab.formats.sites import site_from_module
from saelab.io import read_json, read_safetensors
from saelab.saes import SAE, JumpReluSAE

NPZ, SAFETENSORS, CONFIG = "params.npz", "params.safetensors", "config.json"
# The site each release's kind of SAE reads, in saelab's names.
_V1_KINDS = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "attn.hook_z"}
_V2_KINDS = {"resid_post": "hook_resid_post", "mlp_out": "hook_mlp_out",
             "attn_out": "attn.hook_z"}
_KEYS = {"w_enc": "W_enc", "w_dec": "W_dec"}  # Gemma Scope 2's lower-case names


def read(folder: Path) -> SAE:
    """The JumpReLU SAE in a Gemma Scope folder (`params.npz` or `params.safetensors`)."""
    if (folder / NPZ).is_file():
        source, tensors = folder / NPZ, read_npz(folder / NPZ)
        site, model = _v1_site(folder)
    else:
        source, tensors = folder / SAFETENSORS, read_safetensors(folder / SAFETENSORS)
        site, model = _v2_site(folder)
    state = {_KEYS.get(key, key): value for key, value in tensors.items()}
    if "W_dec" in state:
        fold_code_scale(state, source)
    return build_sae(JumpReluSAE, state, source=source, hyperparameters={},
                     apply_b_dec_to_input=False, site=site, model=model)


def _v1_site(folder: Path) -> tuple[str | None, str | None]:
    """Site and model from the path: `.../gemma-scope-2b-pt-res/layer_12/width_16k/...`
    (a Hugging Face cache names the repository `models--google--gemma-scope-2b-pt-res`)."""
    text = folder.resolve().as_posix() + "/"
    layer = re.search(r"/layer_(\d+)/", text)
    release = re.search(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att)[-/]", text)
    model = f"google/gemma-2-{release[1]}" + ("-it" if release[2] == "it" else "") \
        if release else None
    if not (layer and release):
        return None, model
    return f"blocks.{layer[1]}.{_V1_KINDS[release[3]]}", model


def _v2_site(folder: Path) -> tuple[str | None, str | None]:
    """Site and model from `config.json` when there is one, else from the path
    (`.../gemma-scope-2-1b-pt/resid_post/layer_12_width_16k_l0_small/`)."""
    cfg = read_json(folder / CONFIG) if (folder / CONFIG).is_file() else {}
    text = folder.resolve().as_posix() + "/"
    if "transcoder" in text or "hf_hook_point_out" in cfg or "affine_connection" in cfg:
        raise SaelabError(f"{folder} holds a transcoder, not an SAE",
                          expected="an SAE that reconstructs the activations it reads",
                          found="a transcoder (reads one site, writes another)",
                          fix="pick an SAE folder (resid_post, mlp_out or attn_out)")
    release = re.search(r"gemma-scope-2-(\w+?)-(pt|it)[-/]", text)
    model = cfg.get("model_name") or (_gemma3_id(release[1], release[2]) if release else None)
    if "hf_hook_point_in" in cfg:
        path, _, side = str(cfg["hf_hook_point_in"]).rpartition(".")
        return site_from_module(path, "in" if side == "input" else "out", "gemma-3"), model
    found = re.search(r"/(resid_post|mlp_out|attn_out)(?:_all)?/layer_(\d+)_", text)
    return (f"blocks.{found[2]}.{_V2_KINDS[found[1]]}" if found else None), model


def _gemma3_id(size: str, variant: str) -> str:
    # the pretrained 270M model is published without the -pt suffix
    suffix = "" if (size, variant) == ("270m", "pt") else f"-{variant}"
    return f"google/gemma-3-{size}{suffix}"
