"""Save and load saelab SAEs in the SAELens v6 layout: `cfg.json` + `sae_weights.safetensors`.

Other libraries' layouts (Gemma Scope, sparsify, dictionary_learning, older SAELens) are read
by `saelab.formats`; this module is the one layout saelab writes by default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from saelab.errors import SaelabError
from saelab.io import atomic_write, read_json, write_json
from saelab.saes.base import REGISTRY, SAE

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
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
                        "saelab_architecture": sae.architecture, **(metadata or {})}}
    write_json(folder / CFG, cfg)
    return folder


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> SAE:
    """An SAE from a folder in the SAELens v6 layout."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CFG).is_file() or not (folder / WEIGHTS).is_file():
        raise SaelabError(f"{folder} is not an SAE folder", expected=f"{CFG} + {WEIGHTS}",
                          found=", ".join(sorted(p.name for p in folder.iterdir()))
                          if folder.is_dir() else "no such folder",
                          fix="point at a folder written by `saelab train` or SAELens")
    cfg = read_json(folder / CFG)
    meta = cfg.get("metadata") or {}
    name = meta.get("saelab_architecture") or _FROM_SAELENS.get(cfg.get("architecture"))
    if name not in REGISTRY:
        raise SaelabError(f"{folder} holds an SAE architecture saelab cannot run",
                          expected=", ".join(_FROM_SAELENS), found=str(cfg.get("architecture")),
                          fix="convert it, or open an issue with the file")
    extra = {"k": cfg["k"]} if name in ("topk", "batchtopk") else {}
    sae = REGISTRY[name](cfg["d_in"], cfg["d_sae"], **extra,
                         apply_b_dec_to_input=cfg.get("apply_b_dec_to_input", True),
                         site=meta.get("hook_name"), model=meta.get("model_name"),
                         dtype=getattr(torch, cfg.get("dtype", "float32")), device=device)
    state = load_file(str(folder / WEIGHTS), device=str(device))
    if name == "batchtopk" and state.get("threshold", torch.zeros(())).dim() == 1:
        state["threshold"] = state["threshold"][0]
    try:
        sae.load_state_dict(state)
    except RuntimeError as err:
        raise SaelabError(f"{folder / WEIGHTS} does not match its {CFG}",
                          expected=f"tensors of a {name} SAE, d_in {cfg['d_in']}, "
                          f"d_sae {cfg['d_sae']}", found=str(err).splitlines()[0],
                          fix="re-save the SAE") from err
    return sae.eval()
