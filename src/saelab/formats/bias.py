"""Moving `b_dec` in or out of the encoder, exactly.

Libraries differ on whether the encoder subtracts `b_dec` first (SAELens by default, sparsify,
dictionary_learning's AutoEncoder/TopK/BatchTopK) or not (Gemma Scope, dictionary_learning's
JumpReLU). The two are the same function once b_enc absorbs the shift:
    (x - b_dec) W_enc + b_enc' = x W_enc + b_enc   when   b_enc' = b_enc + b_dec W_enc.
"""

from __future__ import annotations

from torch import Tensor

from saelab.saes.base import SAE


def encoder_bias(sae: SAE, subtract_b_dec: bool) -> Tensor:
    """`b_enc` [n_latents] for an encoder that does (or does not) subtract b_dec first and
    gives the same pre-activations as `sae` (the shift computed in float64)."""
    b_enc_L = sae.b_enc.detach()
    if subtract_b_dec == sae.apply_b_dec_to_input:
        return b_enc_L.clone()
    shift_L = sae.b_dec.detach().double() @ sae.W_enc.detach().double()
    return (b_enc_L.double() + (shift_L if subtract_b_dec else -shift_L)).to(b_enc_L.dtype)
