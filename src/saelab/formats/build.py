"""An SAE from the tensors a file gave, whatever the layout: every reader in `formats` ends
here, so every tensor's presence and shape is checked the same way, against W_dec's
[n_latents, d_model], and the class says which settings it needs (`hyperparameter_names`)
and how it stores its tensors (`import_state`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import Tensor

from saelab.errors import SaelabError
from saelab.saes.base import SAE

log = logging.getLogger(__name__)


def build_sae(cls: type[SAE], state: dict[str, Tensor], *, source: Path,
              hyperparameters: dict[str, Any], apply_b_dec_to_input: bool, site: str | None,
              model: str | None) -> SAE:
    """A `cls` SAE holding `state` (saelab's tensor names and orientation) and the
    `hyperparameters` the file records."""
    _missing([] if "W_dec" in state else ["W_dec"], state, source)
    if state["W_dec"].dim() != 2:
        raise SaelabError(f"{source}: W_dec is not a matrix", expected="[n_latents, d_model]",
                          found=str(list(state["W_dec"].shape)), fix="download it again")
    n_latents, d_model = state["W_dec"].shape
    absent = [name for name in cls.hyperparameter_names if hyperparameters.get(name) is None]
    if absent:
        raise SaelabError(f"{source}: the config does not say the {cls.architecture} SAE's "
                          + ", ".join(absent), expected=f"fields {', '.join(absent)}",
                          found="none", fix="add what the SAE was trained with to its config")
    try:
        sae = cls(d_model, n_latents, **{n: hyperparameters[n] for n in cls.hyperparameter_names},
                  apply_b_dec_to_input=apply_b_dec_to_input, site=site, model=model,
                  dtype=state["W_dec"].dtype, device=state["W_dec"].device)
    except ValueError as err:  # a setting the class rejects (k >= n_latents, ...)
        raise SaelabError(f"{source}: the config's settings do not fit the SAE",
                          expected=f"settings a {cls.architecture} SAE of {n_latents} latents "
                          "takes", found=str(err), fix="correct the config") from err
    state = cls.import_state(state)
    wanted = sae.state_dict()
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


def _missing(keys: list[str], state: dict[str, Tensor], source: Path) -> None:
    if keys:
        raise SaelabError(f"{source} lacks tensors the SAE needs",
                          expected=", ".join(keys), found=", ".join(sorted(state)) or "none",
                          fix="the file is incomplete or not an SAE: download it again")
