"""Coding an activation store with an SAE: the check that the two belong together, and the
batch loop every verb that codes stored rows runs (decompose, dashboard, ...)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab.activations import ActivationStore
from saelab.coding import Coder, SparseCode
from saelab.errors import SaelabError
from saelab.saes import SAE

ALLOW_FLAG = "--allow-mismatch"  # the CLI's way past the site/model check


def check_sae_fits_store(sae: SAE, store: ActivationStore, *, allow_mismatch: bool = False
                         ) -> None:
    """The SAE reads activations as wide as the store's (always checked), from the same
    site and model when the SAE records them (unless `allow_mismatch`). Model names are
    compared by their last path component, so `google/gemma-3-270m` (Gemma Scope) matches
    a store of the embedded `gemma-3-270m`."""
    if sae.d_model != store.d_model:
        raise SaelabError("the SAE and the activations differ in width",
                          expected=f"activations of width {sae.d_model} (the SAE's d_model)",
                          found=f"{store.d_model} at {store.site} in {store.path}",
                          fix="use the store of the site the SAE was trained on")
    if allow_mismatch:
        return
    if sae.site is not None and sae.site != store.site:
        raise SaelabError("the SAE was trained at another site than the store's",
                          expected=f"activations at {sae.site} (the SAE's site)",
                          found=f"{store.site} in {store.path}",
                          fix=f"use a store of {sae.site}, or pass {ALLOW_FLAG} "
                          "(allow_mismatch=True) to code these anyway")
    if sae.model is not None and _model_key(sae.model) != _model_key(store.model):
        raise SaelabError("the SAE was trained on another model than the store's",
                          expected=f"activations of {sae.model} (the SAE's model)",
                          found=f"{store.model} in {store.path}",
                          fix=f"use a store of that model, or pass {ALLOW_FLAG} "
                          "(allow_mismatch=True) to code these anyway")


def _model_key(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1].removesuffix(".gguf").lower()


def coded_batches(store: ActivationStore, coder: Coder, n: int, batch_size: int, device: str,
                  desc: str) -> Iterator[tuple[Tensor, SparseCode]]:
    """(rows, their code) for the store's first n rows, batch by batch, with a progress bar."""
    with tqdm(total=n, unit="tok", desc=desc, disable=None) as bar:
        for i in range(0, n, batch_size):
            x_BD = store[i:min(i + batch_size, n)].to(device, torch.float32)
            yield x_BD, coder(x_BD)
            bar.update(len(x_BD))


def code_rows(store: ActivationStore, coder: Coder, n: int, batch_size: int, device: str,
              desc: str) -> SparseCode:
    """The code of the store's first n rows, on the CPU (the dashboards' and the judge's)."""
    return SparseCode.cat([SparseCode(code.indices.cpu(), code.values.cpu()) for _, code in
                           coded_batches(store, coder, n, batch_size, device, desc)])
