"""saelab's own layout, SAELens v6's: `cfg.json` + `sae_weights.safetensors`.

`saelab train` writes it, so that SAELens loads saelab's SAEs as they are. Reading is tolerant
of every SAELens version: pre-6 field names (`hook_point`, `activation_fn_str`, a boolean
`normalize_activations`), `log_threshold`, a fine-tuning `scaling_factor`, TopK decoder-norm
rescaling, and a known input-norm factor are all folded into plain weights, so the SAE that
comes back takes raw activations. Extra keys are dropped with a log line.

Two helpers the other readers in `saelab.formats` share live here too, because this module
must not import `formats` (which imports it): `read_safetensors`, which turns a broken file
into one clear error, and `build_sae`, which checks every tensor's shape.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.errors import SaelabError
from saelab.io import atomic_write, read_json, write_json
from saelab.saes.base import REGISTRY, SAE

log = logging.getLogger(__name__)

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
SCALER = "activation_scaler.json"  # SAELens training checkpoints keep the input-norm factor here
# SAELens keys its parsing on this: without it a file is read as pre-6 and loses its metadata.
SAELENS_LAYOUT_VERSION = "6.0.0"
_TO_SAELENS = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu",
               "batchtopk": "jumprelu"}
_FROM_SAELENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}


def save_sae(sae: SAE, folder: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write `sae` to `folder` (weights first, config last, each atomically)."""
    from safetensors.torch import save

    folder = Path(folder)
    tensors = {name: p.detach().cpu().contiguous() for name, p in sae.state_dict().items()}
    if sae.architecture == "batchtopk":  # SAELens reads it as JumpReLU: one threshold a latent
        tensors["threshold"] = tensors["threshold"].expand(sae.n_latents).contiguous()
    data = save(tensors)
    atomic_write(folder / WEIGHTS, lambda f: f.write(data))
    cfg = {"architecture": _TO_SAELENS[sae.architecture], "d_in": sae.d_model,
           "d_sae": sae.n_latents, "dtype": str(sae.W_dec.dtype).removeprefix("torch."),
           "device": "cpu", "apply_b_dec_to_input": sae.apply_b_dec_to_input,
           "normalize_activations": "none", **sae.hyperparameters(),
           "metadata": {"model_name": sae.model, "hook_name": sae.site,
                        "sae_lens_version": SAELENS_LAYOUT_VERSION,
                        "saelab_architecture": sae.architecture, **(metadata or {})}}
    write_json(folder / CFG, cfg)
    return folder


def load_sae(folder: str | Path, device: str | torch.device = "cpu", *,
             input_scale: float | None = None) -> SAE:
    """An SAE from a folder in the SAELens layout (any version).

    `input_scale` is the factor that brings raw activations to mean squared norm d_model; it
    is needed only by an SAE trained on inputs normalised so (`expected_average_only_in`)
    whose folder does not record the factor."""
    folder = Path(folder)
    if not (folder / CFG).is_file() or not (folder / WEIGHTS).is_file():
        raise SaelabError(f"{folder} is not an SAE folder", expected=f"{CFG} + {WEIGHTS}",
                          found=", ".join(sorted(p.name for p in folder.iterdir()))
                          if folder.is_dir() else "no such folder",
                          fix="point at a folder written by `saelab train` or SAELens")
    cfg = saelens_config(folder)
    name = _architecture(cfg, folder)
    state = read_safetensors(folder / WEIGHTS, device)
    state = _fold_extras(state, cfg, folder / WEIGHTS)
    sae = build_sae(name, state, source=folder / WEIGHTS, k=cfg.get("k"),
                    apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
                    site=cfg["metadata"].get("hook_name"),
                    model=cfg["metadata"].get("model_name"))
    if (cfg.get("d_in"), cfg.get("d_sae")) != (sae.d_model, sae.n_latents):
        raise SaelabError(f"{folder / WEIGHTS} does not match its {CFG}",
                          expected=f"d_in {cfg.get('d_in')}, d_sae {cfg.get('d_sae')}",
                          found=f"tensors of d_model {sae.d_model}, n_latents {sae.n_latents}",
                          fix="the two files come from different SAEs: download them again")
    scale = _input_scale(cfg, folder, input_scale)
    if scale is not None:
        sae.fold_input_scale(scale)
    return sae


def saelens_config(folder: Path) -> dict[str, Any]:
    """`cfg.json` in v6 form: pre-6 field names renamed, metadata gathered in `metadata`."""
    cfg = read_config(folder / CFG)
    meta = dict(cfg.get("metadata") or {})
    for old, new in (("hook_point", "hook_name"), ("activation_fn_str", "activation_fn")):
        if old in cfg:
            cfg.setdefault(new, cfg.pop(old))
    for key in ("hook_name", "model_name"):
        if key in cfg:
            meta.setdefault(key, cfg.pop(key))
    if cfg.get("activation_fn") == "topk":  # pre-6 TopK: a standard SAE with a topk activation
        cfg["architecture"] = "topk"
        cfg.setdefault("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    norm = cfg.get("normalize_activations")
    if isinstance(norm, bool) or norm is None:
        cfg["normalize_activations"] = "expected_average_only_in" if norm else "none"
    cfg["metadata"] = meta
    cfg.setdefault("architecture", "standard")
    return cfg


def _architecture(cfg: dict[str, Any], folder: Path) -> str:
    name = cfg["metadata"].get("saelab_architecture") or _FROM_SAELENS.get(cfg["architecture"])
    if name not in REGISTRY:
        raise SaelabError(f"{folder} holds an SAE architecture saelab cannot run",
                          expected=", ".join(_FROM_SAELENS), found=str(cfg["architecture"]),
                          fix="convert it to one of these with SAELens, or open an issue")
    if name in ("topk", "batchtopk") and not isinstance(cfg.get("k"), int):
        raise SaelabError(f"{folder / CFG} has no k for its {name} SAE",
                          expected="an integer field k", found=repr(cfg.get("k")),
                          fix="add the k the SAE was trained with to cfg.json")
    return name


def _fold_extras(state: dict[str, Tensor], cfg: dict[str, Any], source: Path
                 ) -> dict[str, Tensor]:
    """Fold SAELens's optional tensors and switches into W_enc, b_enc, W_dec, threshold."""
    if "log_threshold" in state:  # JumpReLU trained in log space
        state["threshold"] = state.pop("log_threshold").exp()
    if not {"W_enc", "b_enc", "W_dec"} <= set(state):
        return state  # build_sae names what is missing
    fold_code_scale(state, source)
    if cfg.get("rescale_acts_by_decoder_norm"):
        norm_L = state["W_dec"].norm(dim=1)  # TopK ranked pre * ||W_dec_j||, decoded / ||W_dec_j||
        state["W_enc"] = state["W_enc"] * norm_L
        state["b_enc"] = state["b_enc"] * norm_L
        state["W_dec"] = state["W_dec"] / norm_L[:, None]
    return state


def fold_code_scale(state: dict[str, Tensor], source: Path) -> None:
    """Fold a `scaling_factor` (SAELens fine-tuning, some Gemma Scope files), which decode
    multiplied the codes by, into W_dec's rows."""
    scaling = state.pop("scaling_factor", state.pop("finetuning_scaling_factor", None))
    if scaling is None:
        return
    n_latents = state["W_dec"].shape[0]
    if scaling.numel() not in (1, n_latents) or scaling.dim() > 1:
        raise SaelabError(f"{source}: scaling_factor has the wrong shape",
                          expected=f"a scalar or [{n_latents}] (n_latents)",
                          found=str(list(scaling.shape)), fix="download the file again")
    state["W_dec"] = state["W_dec"] * scaling.reshape(-1, 1)


def _input_scale(cfg: dict[str, Any], folder: Path, given: float | None) -> float | None:
    norm = cfg["normalize_activations"]
    if norm == "none":
        return None
    if norm != "expected_average_only_in":
        raise SaelabError(f"{folder} normalises each token before encoding ({norm})",
                          expected="normalize_activations none or expected_average_only_in",
                          found=norm, fix="saelab's coders work on raw activations; fold the "
                          "normalisation into the weights with SAELens first")
    if (folder / SCALER).is_file():
        return float(read_config(folder / SCALER)["scaling_factor"])
    if given is None:
        raise SaelabError(f"{folder} was trained on inputs scaled to mean squared norm d_in, "
                          "by a factor its files do not record",
                          expected=f"{SCALER} beside it, or the factor",
                          found="normalize_activations: expected_average_only_in",
                          fix="pass input_scale= (sqrt(d_model / mean squared norm) of your "
                          "activations; `saelab decompose` uses the store's norm_scale)")
    return given


def read_config(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or one clear error if the file is broken."""
    try:
        cfg = read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SaelabError(f"cannot read {path}", expected="a JSON object",
                          found=f"{type(err).__name__}: {err}",
                          fix="the file is damaged or truncated: download or write it again"
                          ) from err
    if not isinstance(cfg, dict):
        raise SaelabError(f"cannot read {path}", expected="a JSON object",
                          found=type(cfg).__name__, fix="download or write it again")
    return cfg


def read_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Every tensor of a safetensors file, or one clear error if it is truncated or damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise SaelabError(f"cannot read {path}", expected="a complete safetensors file",
                          found=f"{type(err).__name__}: {err} ({_size(path)})",
                          fix="the file is truncated or damaged: download or write it again"
                          ) from err


def _size(path: Path) -> str:
    return f"{path.stat().st_size} bytes" if path.is_file() else "no such file"


def build_sae(name: str, state: dict[str, Tensor], *, source: Path, k: int | None = None,
              apply_b_dec_to_input: bool, site: str | None, model: str | None) -> SAE:
    """A `name` SAE holding `state` (saelab's tensor names and orientation), every tensor's
    presence and shape checked against W_dec's [n_latents, d_model] first."""
    _missing([] if "W_dec" in state else ["W_dec"], state, source)
    if state["W_dec"].dim() != 2:
        raise SaelabError(f"{source}: W_dec is not a matrix", expected="[n_latents, d_model]",
                          found=str(list(state["W_dec"].shape)), fix="download it again")
    n_latents, d_model = state["W_dec"].shape
    kw: dict[str, Any] = {"k": k} if name in ("topk", "batchtopk") else {}
    sae = REGISTRY[name](d_model, n_latents, **kw, apply_b_dec_to_input=apply_b_dec_to_input,
                         site=site, model=model, dtype=state["W_dec"].dtype,
                         device=state["W_dec"].device)
    wanted = sae.state_dict()
    if name == "batchtopk" and state.get("threshold", torch.zeros(())).dim() == 1:
        state["threshold"] = state["threshold"][0]  # one global threshold, stored per latent
    _missing([key for key in wanted if key not in state], state, source)
    if set(state) - set(wanted):
        log.info("%s: ignoring tensors saelab does not use: %s", source,
                 ", ".join(sorted(set(state) - set(wanted))))
    for key, param in wanted.items():
        if state[key].shape != param.shape:
            raise SaelabError(f"{source}: {key} has the wrong shape for the rest of the SAE",
                              expected=f"{key} {list(param.shape)} (d_model {d_model}, "
                              f"n_latents {n_latents}, from W_dec)",
                              found=f"{key} {list(state[key].shape)}",
                              fix="the file is damaged or mixes two SAEs: download it again")
    sae.load_state_dict({key: state[key].to(param.dtype) for key, param in wanted.items()})
    return sae.eval()


def _missing(keys: list[str], state: dict[str, Tensor], source: Path) -> None:
    if keys:
        raise SaelabError(f"{source} lacks tensors the SAE needs",
                          expected=", ".join(keys), found=", ".join(sorted(state)) or "none",
                          fix="the file is incomplete or not an SAE: download it again")
