"""SAELens v6's layout, saelab's own: `cfg.json` + `sae_weights.safetensors`.

`saelab train` writes it, so that SAELens loads saelab's SAEs as they are. Reading is tolerant
of every SAELens version: pre-6 field names (`hook_point`, `activation_fn_str`, a boolean
`normalize_activations`), `log_threshold`, a fine-tuning `scaling_factor`, TopK decoder-norm
rescaling, and a known input-norm factor are all folded into plain weights, so the SAE that
comes back takes raw activations. Extra keys are dropped with a log line.

Which architecture a file holds: saelab records its own name (`metadata.saelab_architecture`,
any registered class, a user's included); a file SAELens wrote names SAELens's, read through
`FROM_SAELENS`. Writing asks the class for SAELens's name (`saelens_architecture`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import Tensor

from saelab.errors import SaelabError
from saelab.formats.build import build_sae, fold_code_scale
from saelab.io import atomic_write, read_json, read_safetensors, write_json
from saelab.saes.base import REGISTRY, SAE

log = logging.getLogger(__name__)

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
SCALER = "activation_scaler.json"  # SAELens training checkpoints keep the input-norm factor here
# SAELens keys its parsing on this: without it a file is read as pre-6 and loses its metadata.
SAELENS_LAYOUT_VERSION = "6.0.0"
# SAELens's architecture names -> saelab's, for files without saelab's own record
FROM_SAELENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}


def write(sae: SAE, folder: Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write `sae` to `folder` (weights first, config last, each atomically); `metadata`
    goes into cfg.json's metadata beside saelab's own."""
    from safetensors.torch import save

    tensors = {name: t.cpu().contiguous() for name, t in sae.export_state().items()}
    data = save(tensors)
    atomic_write(folder / WEIGHTS, lambda f: f.write(data))
    cfg = {"architecture": sae.saelens_architecture or sae.architecture, "d_in": sae.d_model,
           "d_sae": sae.n_latents, "dtype": str(sae.W_dec.dtype).removeprefix("torch."),
           "device": "cpu", "apply_b_dec_to_input": sae.apply_b_dec_to_input,
           "normalize_activations": "none", **sae.hyperparameters(),
           "metadata": {"model_name": sae.model, "hook_name": sae.site,
                        "sae_lens_version": SAELENS_LAYOUT_VERSION,
                        "saelab_architecture": sae.architecture, **(metadata or {})}}
    write_json(folder / CFG, cfg)
    return folder


def read(folder: Path, *, input_scale: float | None = None) -> SAE:
    """An SAE from a folder in the SAELens layout (any version).

    `input_scale` is the factor that brings raw activations to mean squared norm d_model; it
    is needed only by an SAE trained on inputs normalised so (`expected_average_only_in`)
    whose folder does not record the factor."""
    cfg = saelens_config(folder)
    cls = _architecture(cfg, folder)
    state = read_safetensors(folder / WEIGHTS)
    state = _fold_extras(state, cfg, folder / WEIGHTS)
    sae = build_sae(cls, state, source=folder / WEIGHTS, hyperparameters=cfg,
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
    cfg = read_json(folder / CFG)
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


def _architecture(cfg: dict[str, Any], folder: Path) -> type[SAE]:
    own = cfg["metadata"].get("saelab_architecture")
    if own is not None and own not in REGISTRY:
        raise SaelabError(f"{folder} holds a saelab SAE of an architecture not registered here",
                          expected="one of " + ", ".join(sorted(REGISTRY)), found=repr(own),
                          fix="import the module that registers it "
                          "(saelab.register_architecture) before loading")
    name = own or FROM_SAELENS.get(cfg["architecture"])
    if name is None:
        raise SaelabError(f"{folder} holds an SAE architecture saelab cannot run",
                          expected="SAELens " + ", ".join(FROM_SAELENS),
                          found=str(cfg["architecture"]),
                          fix="convert it to one of these with SAELens, or open an issue")
    return REGISTRY[name]


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
        factor = read_json(folder / SCALER).get("scaling_factor")
        if isinstance(factor, bool) or not isinstance(factor, int | float) or factor <= 0:
            raise SaelabError(f"{folder / SCALER} holds no input-norm factor",
                              expected="a positive number scaling_factor", found=repr(factor),
                              fix="write the factor the SAE was trained with into it")
        return float(factor)
    if given is None:
        raise SaelabError(f"{folder} was trained on inputs scaled to mean squared norm d_in, "
                          "by a factor its files do not record",
                          expected=f"{SCALER} beside it, or the factor",
                          found="normalize_activations: expected_average_only_in",
                          fix="pass input_scale= (sqrt(d_model / mean squared norm) of your "
                          "activations; `saelab decompose` uses the store's norm_scale)")
    return given
