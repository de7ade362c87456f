"""Encoder-based coders: the SAE's own code, and the two obvious fixes for its shrinkage.

- `encoder`: what the SAE's encoder gives.
- `encoder-refit`: the encoder's support, weights re-fitted by least squares on it.
- `encoder-scaled`: the encoder's code times a post-hoc scale (one global, or one per latent)
  fitted on held-out activations; the fit (`LatentScale`) is saved and reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from saelab.coding.code import SparseCode
from saelab.coding.dictionary import Dictionary, SAELike, as_dictionary
from saelab.coding.linalg import nnls, solve_masked
from saelab.errors import SaelabError
from saelab.io import atomic_write, read_safetensors


def encoder_code(d: Dictionary, x_BD: Tensor) -> SparseCode:
    """The SAE's encoder on raw activations, as a sparse code (nothing dropped)."""
    if d.sae is None:
        raise SaelabError("the encoder methods need an SAE", expected="an SAE (W_dec, b_dec, "
                          "encode)", found="a bare W_dec tensor", fix="pass the SAE itself, or "
                          "use an inference-time method: mp, gp, omp")
    sae_dtype = d.sae.W_dec.dtype
    with torch.no_grad():
        codes_BL = d.sae.encode(x_BD.to(sae_dtype)).to(x_BD.dtype)
    return SparseCode.from_dense(codes_BL)


def refit(d: Dictionary, x_BD: Tensor, code: SparseCode, nonnegative: bool) -> SparseCode:
    """Least squares (or NNLS) of x - b_dec on the code's support, with W_dec as given."""
    rows_BKD = d.W_dec[code.indices]
    live_BK = code.values != 0
    gram_BKK = rows_BKD @ rows_BKD.transpose(1, 2)
    y_BK = torch.einsum("bkd,bd->bk", rows_BKD, x_BD - d.b_dec)
    values = nnls(gram_BKK, y_BK, live_BK) if nonnegative else solve_masked(gram_BKK, y_BK,
                                                                          live_BK)
    return SparseCode(code.indices, values)


@dataclass(frozen=True)
class LatentScale:
    """A post-hoc scale for an encoder's code: one number, or one per latent."""

    scale: Tensor  # [] for a global scale, [n_latents] per latent

    @property
    def per_latent(self) -> bool:
        return self.scale.dim() == 1

    def apply(self, code: SparseCode) -> SparseCode:
        s = self.scale.to(code.values)
        return SparseCode(code.indices, code.values * (s[code.indices] if self.per_latent else s))

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save

        data = save({"scale": self.scale.detach().cpu().contiguous()},
                    metadata={"format": "saelab-latent-scale/1"})
        atomic_write(Path(path), lambda f: f.write(data))

    @staticmethod
    def load(path: str | Path) -> LatentScale:
        tensors = read_safetensors(Path(path))
        if "scale" not in tensors or tensors["scale"].dim() > 1:
            raise SaelabError(f"{path} is not a saelab scale file",
                              expected="a tensor 'scale', [] or [n_latents]",
                              found=", ".join(f"{k} {list(v.shape)}" for k, v in tensors.items())
                              or "no tensors",
                              fix="write it with LatentScale.save")
        return LatentScale(tensors["scale"])


def fit_scale(sae: SAELike, x: Tensor, *, per_latent: bool = True, min_fires: int = 64,
              dtype: torch.dtype = torch.float32, max_iter: int = 200) -> LatentScale:
    """The scale s minimising ||x - b_dec - (s * z) W_dec||^2 over held-out activations x.

    Global: closed form. Per latent: the normal equations (Z'Z * G) s = h are n_latents
    wide, so they are solved by conjugate gradients from s = 1 using the sparse code for
    every product (B*k*d each); CG never increases the objective, so the fitted scale
    reconstructs its fitting set at least as well as the encoder does. A latent active on
    fewer than `min_fires` rows keeps scale 1: fitted from a handful of tokens its scale
    overfits them (on Gemma 3 270M with 4096 held-out tokens, a free per-latent scale made
    unseen tokens' FVU 4% worse than the encoder's own code).
    """
    d = as_dictionary(sae, dtype=dtype, device=x.device)
    x_BD = x.to(dtype)
    code = encoder_code(d, x_BD)
    target_BD = x_BD - d.b_dec
    rows_BKD = d.W_dec[code.indices]  # [B, K, D]
    v_BK = code.values
    if not per_latent:
        x_hat_BD = torch.einsum("bk,bkd->bd", v_BK, rows_BKD)
        den = (x_hat_BD * x_hat_BD).sum()
        return LatentScale((x_hat_BD * target_BD).sum() / den if den > 0 else den.new_ones(()))

    def normal_matvec(s_L: Tensor) -> Tensor:  # (Z'Z * G) s, through the sparse code
        x_hat_BD = torch.einsum("bk,bkd->bd", v_BK * s_L[code.indices], rows_BKD)
        back_BK = v_BK * torch.einsum("bkd,bd->bk", rows_BKD, x_hat_BD)
        return torch.zeros_like(s_L).index_add_(0, code.indices.reshape(-1), back_BK.reshape(-1))

    h_L = torch.zeros(d.n_latents, dtype=x_BD.dtype, device=x_BD.device).index_add_(
        0, code.indices.reshape(-1),
        (v_BK * torch.einsum("bkd,bd->bk", rows_BKD, target_BD)).reshape(-1))
    fires_L = torch.zeros_like(h_L).index_add_(0, code.indices.reshape(-1),
                                               (v_BK != 0).to(h_L.dtype).reshape(-1))
    free_L = (fires_L >= min_fires).to(h_L.dtype)  # CG on the subspace of these latents
    s_L = torch.ones_like(h_L)
    r_L = (h_L - normal_matvec(s_L)) * free_L
    p_L, rr = r_L.clone(), r_L @ r_L
    eps = torch.finfo(h_L.dtype)
    tol = (100 * eps.eps) ** 2 * (h_L @ h_L).clamp(min=eps.tiny)
    for _ in range(max_iter):
        if rr <= tol:
            break
        Ap_L = normal_matvec(p_L) * free_L
        alpha = rr / (p_L @ Ap_L)
        s_L, r_L = s_L + alpha * p_L, r_L - alpha * Ap_L
        rr, rr_old = r_L @ r_L, rr
        p_L = r_L + (rr / rr_old) * p_L
    return LatentScale(s_L)
