"""One entry point for every coder: `Coder(dictionary, method, ...)(x)` and `decompose`.

To see what the pursuits (mp, gp, omp) compute, read reference.py first: the algorithms as
their papers state them, one row at a time; pursuit.py is the batched engine held to it.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

from saelab.coding import encoder as enc
from saelab.coding import pursuit
from saelab.coding.code import SparseCode
from saelab.coding.correlations import BlockedGram
from saelab.coding.dictionary import Dictionary, SAELike, as_dictionary
from saelab.coding.selection import gram_pays
from saelab.errors import SaelabError

# The one list of coder names: every verb, sweep and report takes its names from here.
Method = Literal["encoder", "encoder-refit", "encoder-scaled", "mp", "gp", "omp"]
METHODS: tuple[str, ...] = get_args(Method)
ENCODER_METHODS: tuple[str, ...] = METHODS[:3]  # the encoder and its fixes: its own support
PURSUIT_METHODS: tuple[str, ...] = METHODS[3:]  # inference-time optimisation, at any k
PURSUITS = dict(zip(PURSUIT_METHODS, (pursuit.matching_pursuit, pursuit.gradient_pursuit,
                                      pursuit.orthogonal_matching_pursuit), strict=True))


class CodingPlan(NamedTuple):
    """How a `Coder` will code a batch of a given size."""

    gram: bool
    """Whether pursuits update correlations through the Gram matrix (built on first use)."""
    rows_per_chunk: int
    """Rows coded at once, within the working-memory budget."""
_GRAM_BYTES = 2 * 2**30  # the Gram matrix is kept in memory up to this size ("auto")
_CHUNK_BYTES = 2**30  # working memory for one chunk of rows


class Coder:
    """A coder bound to a dictionary: call it on batches of activations [batch, d_model].

    Build once and reuse: the unit-norm dictionary and (for pursuits) the Gram matrix are
    computed on the first call and kept. `dictionary` is a `W_dec` tensor [n_latents,
    d_model] or an SAE (then `b_dec` is subtracted before coding, and codes decode with
    `code.decode(W_dec, b_dec)`). `bf16_screen` (float32 only) lets pursuits find each step's
    latent through a bfloat16 product checked in float32 once the Gram path stops paying;
    the selection is the float32 one either way (pursuit.py).
    """

    def __init__(self, dictionary: Tensor | SAELike, method: Method | str, *,
                 k: int | None = None, tol: float | None = None, nonnegative: bool = False,
                 scale: enc.LatentScale | None = None, gram: bool | Literal["auto"] = "auto",
                 dtype: torch.dtype = torch.float32, chunk_size: int | None = None,
                 bf16_screen: bool = True) -> None:
        _check_options(method, k, tol, scale, dtype)
        self.source, self.method, self.k, self.tol = dictionary, method, k, tol
        self.nonnegative, self.scale, self.gram, self.dtype = nonnegative, scale, gram, dtype
        self.chunk_size = chunk_size
        self.bf16_screen = bf16_screen and dtype == torch.float32
        self._dict: Dictionary | None = None
        self._gram_matrix: BlockedGram | None = None
        self._screen_LD: Tensor | None = None

    def dictionary(self, device: torch.device) -> Dictionary:
        if self._dict is None or self._dict.W_dec.device != device:
            self._dict = as_dictionary(self.source, dtype=self.dtype, device=device)
            self._gram_matrix = None
            self._screen_LD = (self._dict.unit_LD.to(torch.bfloat16)
                               if self.bf16_screen and self.method in PURSUITS else None)
            if (self.scale is not None and self.scale.per_latent
                    and len(self.scale.scale) != self._dict.n_latents):
                raise SaelabError("the scale does not fit this dictionary",
                                  expected=f"a scale per latent of {self._dict.n_latents}",
                                  found=f"{len(self.scale.scale)} latents' scales",
                                  fix="fit the scale on this SAE (fit_scale), or drop --scale")
            if self.method == "omp" and self.k is not None and self.k > self._dict.d_model:
                raise SaelabError(f"omp cannot select k={self.k} latents in d_model="
                                  f"{self._dict.d_model} dimensions",
                                  expected=f"k <= {self._dict.d_model}", found=f"k={self.k}",
                                  fix="lower --k, or use gp or mp")
        return self._dict

    def plan(self, n_rows: int, device: torch.device | str = "cpu") -> CodingPlan:
        """How a batch of `n_rows` rows on `device` will be coded (nothing is computed but
        the dictionary's unit rows)."""
        d = self.dictionary(torch.device(device))
        gram = self.method in PURSUITS and (self._gram_matrix is not None
                                            or self._wants_gram(d, n_rows))
        return CodingPlan(gram, self.chunk_size or self._rows_per_chunk(d, gram))

    def __call__(self, x: Tensor, *, return_trace: bool = False) -> SparseCode:
        """The sparse code of each row of x [batch, d_model] (with `return_trace`, pursuits
        also record their steps in `code.trace`)."""
        d = self.dictionary(x.device)
        x_BD = _checked_input(x, d).to(self.dtype)
        if return_trace and self.method not in PURSUITS:
            raise SaelabError(f"method {self.method} has no steps to trace",
                              expected="mp, gp or omp", found=self.method,
                              fix="drop return_trace")
        gram = self._gram(d, len(x_BD)) if self.method in PURSUITS else None
        rows = self.chunk_size or self._rows_per_chunk(d, gram is not None)
        return SparseCode.cat([self._code(d, x_BD[i:i + rows], return_trace)
                               for i in range(0, max(len(x_BD), 1), rows)])

    def _code(self, d: Dictionary, x_BD: Tensor, trace: bool) -> SparseCode:
        if self.method in PURSUITS:
            return self._pursue(d, x_BD - d.b_dec, trace)
        code = enc.encoder_code(d, x_BD)
        if self.method == "encoder-refit":
            return enc.refit(d, x_BD, code, self.nonnegative)
        if self.method == "encoder-scaled":
            assert self.scale is not None  # _check_options asks for one
            return self.scale.apply(code)
        return code

    def _pursue(self, d: Dictionary, x_BD: Tensor, trace: bool) -> SparseCode:
        k = self.k or min(d.d_model, d.n_latents)
        p = pursuit.Pursuit.start(x_BD, d.unit_LD, k, gram=self._gram_matrix,
                                  screen_LD=self._screen_LD, nonnegative=self.nonnegative,
                                  tol=self.tol, trace=trace, cholesky=self.method == "omp")
        with torch.no_grad():
            PURSUITS[self.method](p, k)
        state = p.state
        norms_BK = d.norms_L[state.idx_BK]
        values_BK = torch.where(state.live_BK & (norms_BK > 0),
                                state.val_BK / norms_BK.clamp(min=1e-30), 0.0)
        return SparseCode(state.idx_BK, values_BK, state.trace())

    def _gram(self, d: Dictionary, batch: int) -> BlockedGram | None:
        """G = D D' when allowed and worth it: it costs as much as coding n_latents / k rows
        with one GEMM per step, and pays back only on larger batches."""
        if self._gram_matrix is None and self._wants_gram(d, batch):
            self._gram_matrix = BlockedGram(d.unit_LD)
        return self._gram_matrix

    def _wants_gram(self, d: Dictionary, batch: int) -> bool:
        size = d.n_latents**2 * d.unit_LD.element_size()
        k = self.k or d.d_model
        return self.gram is True or (self.gram == "auto" and size <= _GRAM_BYTES
                                     and batch * k >= d.n_latents)

    def _rows_per_chunk(self, d: Dictionary, gram: bool) -> int:
        """Rows per chunk within _CHUNK_BYTES: per row, the correlations and one temporary as
        large (2 n_latents), the k x k factors and NNLS's systems with their temporaries (6 k^2)
        and, on steps without the Gram matrix, the support's directions (k d_model).

        Larger chunks pay most on the Gram path: every step reads all of G (n_latents^2
        floats) once per chunk, whatever its size, so at 16k latents that read is most of a
        step's time until chunks hold thousands of rows (benchmarks/coding.py)."""
        k = self.k or d.d_model
        changed = 1 if self.method == "mp" else k  # slots whose weights a step changes
        stays_on_gram = gram and gram_pays(changed, d.d_model,
                                           screens=self._screen_LD is not None)
        floats = 2 * d.n_latents + (0 if stays_on_gram else k * d.d_model) + 6 * k * k
        return max(_CHUNK_BYTES // (d.unit_LD.element_size() * floats), 1)


def decompose(x: Tensor, dictionary: Tensor | SAELike, method: Method | str, *,
              k: int | None = None, tol: float | None = None, nonnegative: bool = False,
              scale: enc.LatentScale | None = None, gram: bool | Literal["auto"] = "auto",
              dtype: torch.dtype = torch.float32, chunk_size: int | None = None,
              bf16_screen: bool = True, return_trace: bool = False) -> SparseCode:
    """Sparse codes of x [batch, d_model] on `dictionary` by `method`.

    Methods: `encoder` (the SAE's own), `encoder-refit` (its support, least-squares weights),
    `encoder-scaled` (times a fitted `LatentScale`), and inference-time optimisation: `mp`
    (matching pursuit), `gp` (gradient pursuit), `omp` (orthogonal matching pursuit).
    Pursuits stop after `k` selections or once ||r|| <= tol ||x||, per row; `nonnegative`
    keeps weights >= 0. In float32, once a pursuit stops using the Gram matrix it finds each
    step's latent through a bfloat16 screen checked in float32 (`bf16_screen`; the same
    selection, several times cheaper; pursuit.py says how). To code many batches with one
    dictionary, build a `Coder` once.
    """
    return Coder(dictionary, method, k=k, tol=tol, nonnegative=nonnegative, scale=scale,
                 gram=gram, dtype=dtype, chunk_size=chunk_size,
                 bf16_screen=bf16_screen)(x, return_trace=return_trace)


def _check_options(method: str, k: int | None, tol: float | None,
                   scale: enc.LatentScale | None, dtype: torch.dtype) -> None:
    if method not in METHODS:
        raise SaelabError(f"unknown method {method!r}", expected=" | ".join(METHODS),
                          found=repr(method), fix="pick one of those")
    if dtype not in (torch.float32, torch.float64):
        raise SaelabError("pursuits compute in float32 or float64", expected="torch.float32 or "
                          "torch.float64", found=str(dtype), fix="pass dtype=torch.float32")
    if method in PURSUITS:
        if k is None and tol is None:
            raise SaelabError(f"{method} needs a stopping rule", expected="k (latents per row) "
                              "and/or tol (relative residual norm)", found="neither",
                              fix="pass k=32, say")
        if k is not None and k < 1:
            raise SaelabError("k must be positive", expected="k >= 1", found=f"k={k}",
                              fix="pass k >= 1")
        if tol is not None and not 0 < tol < 1:
            raise SaelabError("tol is a relative residual norm", expected="0 < tol < 1",
                              found=f"tol={tol}", fix="pass tol=0.1, say")
    elif k is not None or tol is not None:
        raise SaelabError(f"{method} uses the encoder's own support", expected="no k or tol",
                          found=f"k={k}, tol={tol}", fix="drop k/tol, or use mp, gp or omp")
    if method == "encoder-scaled" and scale is None:
        raise SaelabError("encoder-scaled needs a fitted scale", expected="scale=LatentScale",
                          found="scale=None", fix="fit one on held-out activations with "
                          "saelab.coding.fit_scale(sae, x_heldout)")


def _checked_input(x: Tensor, d: Dictionary) -> Tensor:
    if x.dim() != 2 or x.shape[1] != d.d_model:
        raise SaelabError("activations and dictionary differ in width",
                          expected=f"activations [batch, {d.d_model}] (the dictionary's d_model)",
                          found=f"activations of shape {tuple(x.shape)}",
                          fix="use the dictionary trained on this site, or activations of its site")
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).any(dim=1).nonzero().squeeze(1)
        raise SaelabError("activations hold NaN or inf", expected="finite values",
                          found=f"{len(bad)} bad row(s), first at row {int(bad[0])}",
                          fix="check the model's dtype (float16 overflows) or the store")
    return x
