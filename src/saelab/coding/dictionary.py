"""A dictionary as the coders see it: decoder rows, a bias, and (for an SAE) its encoder.

`coding` never imports `saes`: anything with `W_dec`, `b_dec` and `encode` is an SAE here,
and a bare `W_dec` tensor is a dictionary without bias or encoder.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from saelab.errors import SaelabError

_UNIT_NORM_RTOL = 1e-3  # decoder rows within this of norm 1 count as unit norm


@runtime_checkable
class SAELike(Protocol):
    """What `decompose` needs of an SAE: its dictionary and its encoder."""

    @property
    def W_dec(self) -> Tensor:  # [n_latents, d_model]
        ...

    @property
    def b_dec(self) -> Tensor:  # [d_model]
        ...

    def encode(self, x_BD: Tensor, /) -> Tensor:  # [batch, d_model] -> [batch, n_latents]
        ...


@dataclass(frozen=True)
class Dictionary:
    """Decoder rows as given, their unit-norm copy (what pursuit selects with), and the norms.

    Pursuit works on unit-norm rows; a code found on them is divided by the norms, so that
    `code.decode(W_dec, b_dec)` reconstructs with the rows exactly as the user gave them.
    """

    W_dec: Tensor  # [n_latents, d_model], as given (in the compute dtype)
    b_dec: Tensor  # [d_model] (zeros for a bare W_dec)
    unit_LD: Tensor  # [n_latents, d_model], rows scaled to norm 1 (zero rows stay zero)
    norms_L: Tensor  # [n_latents]
    sae: SAELike | None

    @property
    def n_latents(self) -> int:
        return self.W_dec.shape[0]

    @property
    def d_model(self) -> int:
        return self.W_dec.shape[1]


def as_dictionary(source: Tensor | SAELike, *, dtype: torch.dtype, device: torch.device,
                  warn: bool = True) -> Dictionary:
    """Wrap a `W_dec` tensor or an SAE, checking shapes and finiteness, warning on row norms."""
    if isinstance(source, Tensor):
        W_dec, b_dec, sae = source, None, None
    elif isinstance(source, SAELike):
        W_dec, b_dec, sae = source.W_dec, source.b_dec, source
    else:
        raise SaelabError("cannot decompose with this dictionary",
                          expected="a W_dec tensor [n_latents, d_model] or an SAE "
                          "(W_dec, b_dec, encode)", found=type(source).__name__,
                          fix="pass sae.W_dec, or an SAE from saelab.load_sae / saelab.train")
    W_dec = W_dec.detach().to(device=device, dtype=dtype)
    if W_dec.dim() != 2:
        raise SaelabError("the dictionary must be a matrix", expected="W_dec [n_latents, d_model]",
                          found=f"shape {tuple(W_dec.shape)}", fix="pass the decoder weight")
    if not torch.isfinite(W_dec).all():
        raise SaelabError("the dictionary holds NaN or inf", expected="finite decoder rows",
                          found="non-finite values in W_dec", fix="check the SAE file")
    b_dec = (torch.zeros(W_dec.shape[1], dtype=dtype, device=device) if b_dec is None
             else b_dec.detach().to(device=device, dtype=dtype))
    norms_L = W_dec.norm(dim=1)
    unit_LD = W_dec / torch.where(norms_L > 0, norms_L, 1).unsqueeze(1)
    live = norms_L > 0
    if warn and live.any() and ((norms_L[live] - 1).abs() > _UNIT_NORM_RTOL).any():
        warnings.warn(
            f"dictionary rows are not unit norm (norms {norms_L[live].min():.4g} to "
            f"{norms_L[live].max():.4g}); saelab selects latents with normalised copies of the "
            "rows and rescales the codes, so codes decode with W_dec exactly as given",
            stacklevel=3)
    return Dictionary(W_dec, b_dec, unit_LD, norms_L, sae)
