"""dictionary_learning (Marks, Karvonen, Mueller et al.): `ae.pt`, a torch state dict, beside
`config.json` {"trainer": {`dict_class`, `activation_dim`, `dict_size`, `k`, `layer`,
`lm_name`, `submodule_name`, ...}, "buffer": {...}}, one `trainer_i/` folder per SAE.

| dict_class | tensors | encoder | saelab |
|---|---|---|---|
| AutoEncoder | `bias` (= b_dec), `encoder.weight` [n, d], `encoder.bias`, `decoder.weight` [d, n] | ReLU((x - bias) W + b) | relu |
| AutoEncoderNew | `encoder.*`, `decoder.weight`, `decoder.bias` (= b_dec) | ReLU(x W + b) | relu |
| AutoEncoderTopK | `encoder.*`, `decoder.weight`, `b_dec`, buffers `k`, `threshold` | top k of ReLU((x - b_dec) W + b) | topk |
| BatchTopKSAE | as TopK; inference keeps what exceeds the global `threshold` | | batchtopk |
| MatryoshkaBatchTopKSAE | `W_enc` [d, n], `b_enc`, `W_dec` [n, d], `b_dec`, `threshold` | as BatchTopK | batchtopk |
| JumpReluAutoEncoder | `W_enc`, `b_enc`, `W_dec`, `b_dec`, `threshold` | no b_dec subtraction | jumprelu |

`ae.pt` is read with `torch.load(weights_only=True)` only. The site is read from
`submodule_name` or the folder names SAEBench uses (`resid_post_layer_12/trainer_0`), else,
as SAELens reads these files, the output of block `layer`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.errors import SaelabError
from saelab.formats.bias import encoder_bias
from saelab.formats.build import build_sae
from saelab.formats.files import read_torch
from saelab.io import atomic_write, read_json, write_json
from saelab.lm.sites import SITE_PATTERN
from saelab.saes import REGISTRY, SAE

AE, CONFIG = "ae.pt", "config.json"
# dict_class -> (saelab architecture, whether its encoder subtracts b_dec first)
CLASSES = {"AutoEncoder": ("relu", True), "AutoEncoderNew": ("relu", False),
           "AutoEncoderTopK": ("topk", True), "BatchTopKSAE": ("batchtopk", True),
           "MatryoshkaBatchTopKSAE": ("batchtopk", True),
           "JumpReluAutoEncoder": ("jumprelu", False)}
# saelab architecture -> the dict_class it is written as
WRITTEN_AS = {"relu": "AutoEncoder", "topk": "AutoEncoderTopK", "batchtopk": "BatchTopKSAE",
              "jumprelu": "JumpReluAutoEncoder"}
# dict_classes that store saelab's own tensor names (the others: nn.Linear's)
_OWN_NAMES = {"MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder"}
# dictionary_learning tensor name -> (saelab name, whether it is stored transposed)
_NAMES = {"encoder.weight": ("W_enc", True), "decoder.weight": ("W_dec", True),
          "encoder.bias": ("b_enc", False), "bias": ("b_dec", False),
          "decoder.bias": ("b_dec", False)}
_KINDS = {"resid_post": "hook_resid_post", "mlp_out": "hook_mlp_out",
          "attn_out": "hook_attn_out"}


def read(folder: Path) -> SAE:
    """The SAE in a dictionary_learning trainer folder (`ae.pt` + `config.json`)."""
    if not (folder / CONFIG).is_file():
        raise SaelabError(f"{folder} has {AE} but no {CONFIG}", expected=f"{AE} + {CONFIG}",
                          found=AE, fix=f"copy the {CONFIG} written beside it by training")
    trainer = read_json(folder / CONFIG).get("trainer")
    if not isinstance(trainer, dict) or trainer.get("dict_class") not in CLASSES:
        raise SaelabError(f"{folder / CONFIG} names a dictionary saelab cannot run",
                          expected="trainer.dict_class one of " + ", ".join(CLASSES),
                          found=repr(trainer.get("dict_class") if isinstance(trainer, dict)
                                     else trainer),
                          fix="convert it with dictionary_learning")
    name, subtracts = CLASSES[trainer["dict_class"]]
    raw = read_torch(folder / AE)
    k = int(raw["k"]) if "k" in raw else trainer.get("k")
    state: dict[str, Tensor] = {}
    for key, value in raw.items():
        new, transposed = _NAMES.get(key, (key, False))
        state[new] = value.T if transposed else value
    # a TopK's optional inference threshold is left out by the builder: its encode ignores it
    return build_sae(REGISTRY[name], state, source=folder / AE, hyperparameters={"k": k},
                     apply_b_dec_to_input=subtracts, site=_site(trainer, folder),
                     model=trainer.get("lm_name"))


def _site(trainer: dict[str, Any], folder: Path) -> str | None:
    submodule = str(trainer.get("submodule_name") or "")
    if SITE_PATTERN.match(submodule):
        return submodule
    for text in (submodule, folder.parent.name, folder.name):
        found = re.search(r"(resid_post|mlp_out|attn_out)_layer_(\d+)", text)
        if found:
            return f"blocks.{found[2]}.{_KINDS[found[1]]}"
    layer = trainer.get("layer")
    return f"blocks.{layer}.hook_resid_post" if isinstance(layer, int) else None


def write(sae: SAE, out: Path) -> Path:
    """`out/ae.pt` + `out/config.json`, loadable by dictionary_learning's own classes."""
    dict_class = WRITTEN_AS.get(sae.architecture)
    if dict_class is None:
        raise SaelabError(f"dictionary_learning has no counterpart of a {sae.architecture} SAE",
                          expected="an SAE of architecture " + ", ".join(WRITTEN_AS),
                          found=sae.architecture, fix="convert to saelens instead")
    ours = sae.state_dict()
    _, subtracts = CLASSES[dict_class]
    if dict_class in _OWN_NAMES:
        state = {**ours, "b_enc": encoder_bias(sae, subtracts)}
    else:
        state = {"encoder.weight": ours["W_enc"].T, "encoder.bias": encoder_bias(sae, subtracts),
                 "decoder.weight": ours["W_dec"].T,
                 ("bias" if dict_class == "AutoEncoder" else "b_dec"): ours["b_dec"]}
    if "k" in sae.hyperparameter_names:  # threshold -1: dictionary_learning's "unset"
        state["k"] = torch.tensor(sae.hyperparameters()["k"], dtype=torch.int32)
        state["threshold"] = ours.get("threshold", torch.tensor(-1.0)).float()
    state = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    atomic_write(out / AE, lambda f: torch.save(state, f))
    write_json(out / CONFIG, {"trainer": _trainer_config(sae, dict_class)})
    return out


def _trainer_config(sae: SAE, dict_class: str) -> dict[str, Any]:
    match = SITE_PATTERN.match(sae.site or "")
    kind = {hook: word for word, hook in _KINDS.items()}.get(match.group(2) if match else "")
    return {"trainer_class": "saelab", "dict_class": dict_class,
            "activation_dim": sae.d_model, "dict_size": sae.n_latents,
            **({"k": sae.hyperparameters()["k"]} if "k" in sae.hyperparameters() else {}),
            "layer": int(match.group(1)) if match else None, "lm_name": sae.model,
            "submodule_name": f"{kind}_layer_{match.group(1)}" if kind and match else sae.site}
