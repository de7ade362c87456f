"""Sparse-coding benchmark: saelab's pursuits (mp, gp, omp) against their peers, tokens/s and FVU.

One run codes the same synthetic activations on the same dictionary with every method, for
k in {16, 32, 64}, on `torch.set_num_threads(2)` (and 2 BLAS threads for numpy):

- saelab `Coder(W_dec, method, k=k)` for mp, gp and omp with the Gram path on "auto" (on here:
  batch x k >= n_latents and the 1 GiB Gram fits), the same with `gram=False` (one dense GEMM
  per step recomputes the correlations), and the non-negative variants (`nonnegative=True`),
  which are what dictionary_learning and overcomplete compute;
- scikit-learn `orthogonal_mp` (Cholesky OMP, one token at a time) and `orthogonal_mp_gram`
  (on a precomputed float32 Gram); saelab omp must find the same supports on their tokens;
- dictionary_learning `grad_pursuit` (non-negative: argmax of the signed correlations, weights
  clipped at 0), compared with saelab's non-negative gp at equal k;
- overcomplete `MpSAE.encode` and `OMPSAE.encode` (both select the largest signed correlation;
  OMPSAE's weights come from 10 steps of projected-gradient NNLS), compared with saelab's
  non-negative mp and omp. Its package `__init__` imports torchvision, timm, matplotlib and
  opencv for its vision models and plots; none is installed, so the two SAE modules are
  imported directly under a bare `overcomplete` package (they need torch, einops, scipy,
  scikit-learn and Pillow only).

Data: a random dictionary of 16384 unit-norm gaussian rows in 640 dimensions; every token is a
non-negative combination of 64 distinct dictionary rows (uniform, exponential weights) plus
isotropic gaussian noise carrying 5 % of the signal's energy, so a perfect k=64 code leaves an
FVU near 0.05 and smaller k leave the weakest atoms out. FVU = sum ||x - x_hat||^2 / sum
||x - mean(x)||^2 over the tokens a row coded. Slow peers code fewer tokens (the first ones of
the same batch); tokens/s is per token either way.

Timing: the setup (Coder, Gram matrices, models) is built and run once on a few tokens before
the clock starts; then the best of 2-3 timed runs (a third only while a row has used < 30 s).
Floors, from the machine's GEMM rates on [4096, 640] x [640, 16384] (float32, and bfloat16
with float32 accumulation): a pursuit that recomputes the correlations needs one float32 GEMM
per selection, 2 d n k flops per token at the float32 rate (the peers' floor). saelab without
the Gram matrix screens with a bfloat16 GEMM instead (pursuit.py): 2 d n k at the bf16 rate.
The Gram path's cost model (pursuit.py) is one float32 GEMM for the first correlations, then
m*n multiply-adds per token and step for m changed slots (m = 1 for mp, the support size for
gp and omp), priced at the float32 GEMM rate, until m * GRAM_PENALTY >= d / SCREEN_SPEEDUP,
then a bf16 screening GEMM per step. The Gram update's own slowdown per multiply-add against
the float32 GEMM (the penalty) is measured here too. Prints the table and writes JSON (`--out`); runs under
`.venv-bench`, which holds the peers (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
import time
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from common import (
    CpuWatch,
    add_output_args,
    environment,
    finish,
    gemm_times,
    load_average,
    logger,
    out_path,
    render_table,
    timed,
    write_json,
)
from saelab.coding import Coder, SparseCode
from saelab.coding.correlations import BlockedGram, Correlations
from saelab.coding.selection import GRAM_PENALTY, gram_pays

THREADS = 2
SEED = 0
NOISE_SHARE = 0.05  # noise energy / signal energy, per token on average
SAME_SUPPORTS = 0.99  # fraction of tokens with equal supports that counts as "the same"
PEERS = ("numpy", "scikit-learn", "scipy", "dictionary-learning", "overcomplete", "torchvision")
log = logger("coding")


@dataclass(frozen=True)
class Plan:
    """Sizes of one run: the full benchmark, a --quick run of smaller shapes, or a --smoke
    run of tiny ones (one timed run a row)."""

    n_latents: int
    d_model: int
    batch: int
    ks: tuple[int, ...]
    atoms_per_token: int
    tokens: dict[str, int]  # tokens coded per row, by cost class (slow peers code fewer)
    max_repeats: int  # timed runs per row, best kept
    repeat_budget_s: float  # a third run only while the row's timed runs took less
    gemm_reps: int

    @classmethod
    def full(cls) -> Plan:
        return cls(16384, 640, 4096, (16, 32, 64), 64,
                   {"saelab": 4096, "saelab_nogram": 1024, "dictionary_learning": 512,
                    "overcomplete": 512, "sklearn": 256, "sklearn_gram": 16},
                   max_repeats=3, repeat_budget_s=30.0, gemm_reps=5)

    @classmethod
    def quick(cls) -> Plan:
        return cls(2048, 128, 512, (8, 16), 16,
                   {"saelab": 512, "saelab_nogram": 256, "dictionary_learning": 128,
                    "overcomplete": 128, "sklearn": 32, "sklearn_gram": 8},
                   max_repeats=2, repeat_budget_s=5.0, gemm_reps=3)

    @classmethod
    def smoke(cls) -> Plan:
        return cls(1024, 64, 128, (8,), 8,
                   {"saelab": 128, "saelab_nogram": 64, "dictionary_learning": 32,
                    "overcomplete": 32, "sklearn": 8, "sklearn_gram": 4},
                   max_repeats=1, repeat_budget_s=0.0, gemm_reps=1)


# ---------------------------------------------------------------------------------------------
# Data, metrics, timing
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    """The dictionary [n_latents, d_model] (unit rows) and the activations [batch, d_model]."""

    W: Tensor
    x: Tensor


def make_problem(plan: Plan, seed: int = SEED) -> Problem:
    """Activations an SAE could have been trained on: sparse non-negative mixtures of the
    dictionary's own rows plus noise, so the FVU of a k-sparse code reflects how many of the
    planted atoms a method found (pure gaussian inputs would give every method FVU ~ 1)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(plan.n_latents, plan.d_model, generator=g)
    W /= W.norm(dim=1, keepdim=True)
    idx = torch.rand(plan.batch, plan.n_latents, generator=g).topk(plan.atoms_per_token).indices
    mag = torch.empty(plan.batch, plan.atoms_per_token).exponential_(generator=g)
    signal = torch.nn.functional.embedding_bag(idx, W, per_sample_weights=mag, mode="sum")
    sigma = (NOISE_SHARE * signal.pow(2).sum(dim=1).mean() / plan.d_model).sqrt()
    return Problem(W, signal + sigma * torch.randn(signal.shape, generator=g))


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of variance unexplained over these tokens (variance around their mean)."""
    x64, r64 = x.double(), (x - x_hat).double()
    return float(r64.pow(2).sum() / (x64 - x64.mean(dim=0)).pow(2).sum())


def support_mask(code: SparseCode, n_latents: int) -> Tensor:
    """[tokens, n_latents] bool: which latents a token's code uses (zero-valued slots are
    padding, so they do not count)."""
    return code.to_dense(n_latents) != 0


def same_support_fraction(a: SparseCode, b: SparseCode, n_latents: int) -> float:
    """Fraction of tokens (the first min(len) of both) whose two codes use the same latents."""
    n = min(len(a), len(b))
    return float((support_mask(a[:n], n_latents) == support_mask(b[:n], n_latents))
                 .all(dim=1).double().mean())


def best_time(run: Callable[[], Any], plan: Plan) -> tuple[float, list[float], Any]:
    """Best wall time of 2-3 runs (the third only while cheap): the minimum is the least
    disturbed by other processes on the shared cores. Returns (best, all, last result)."""
    times: list[float] = []
    result = None
    while len(times) < plan.max_repeats:
        if len(times) >= 2 and sum(times) > plan.repeat_budget_s:
            break
        t0 = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - t0)
    return min(times), times, result


# ---------------------------------------------------------------------------------------------
# Floors: the GEMM rates, the Gram update's penalty, and each method's floor time per token
# ---------------------------------------------------------------------------------------------

def measure_gemm(problem: Problem, reps: int) -> dict[str, Any]:
    """GEMM rates of x [batch, d] x W' [d, n]: the correlations of a whole batch, the product
    every pursuit step that recomputes them pays (float32), or screens them (bfloat16)."""
    x, W = problem.x, problem.W
    best = min(gemm_times(x, W.T, reps))
    best_h = min(gemm_times(x.bfloat16(), W.bfloat16().T, reps))
    flops = 2 * x.shape[0] * x.shape[1] * W.shape[0]
    return {"shape": [x.shape[0], x.shape[1], W.shape[0]], "best_s": best,
            "flops_per_s": flops / best, "bf16_best_s": best_h, "bf16_flops_per_s": flops / best_h}


def measure_gram_update(problem: Problem, gemm_rate: float, ms: Sequence[int]
                        ) -> dict[str, Any]:
    """Rate of the Gram path's update, c -= dz G[S, :] with m slots a row, as pursuit.py runs
    it (blocked, correlations.py), and its penalty against the float32 GEMM rate per
    multiply-add (selection.py assumes GRAM_PENALTY)."""
    gram = BlockedGram(problem.W)
    c = Correlations.of(problem.x, problem.W, gram)
    B, n = len(problem.x), len(problem.W)
    g = torch.Generator().manual_seed(SEED + 1)
    rows = []
    for m in ms:
        idx = torch.rand(B, n, generator=g).topk(m).indices
        dz = torch.randn(B, m, generator=g)
        best = min(timed(lambda: c.sub_gram_rows_(idx, dz, gram), 3)[0])
        rate = 2 * B * m * n / best
        rows.append({"m": m, "best_s": best, "flops_per_s": rate, "penalty": gemm_rate / rate})
    return {"assumed_penalty": GRAM_PENALTY, "by_m": rows}


def floor_seconds(floor: str, plan: Plan, k: int, gemm: dict[str, Any]) -> float:
    """Seconds per token of a floor (see the module docstring): "recompute" (a float32 GEMM per
    selection), "screen" (a bf16 GEMM per selection), "gram-mp" / "gram-support" (pursuit.py's
    Gram model with 1 or t slots changed at step t), "sklearn-gram" (its Gram OMP: the Gram
    update at every step, float32)."""
    d, n = plan.d_model, plan.n_latents
    f32, bf16 = gemm["flops_per_s"] / 2, gemm["bf16_flops_per_s"] / 2  # multiply-adds/s
    if floor in ("recompute", "screen"):
        return d * n * k / (f32 if floor == "recompute" else bf16)
    seconds = d * n / f32  # the first correlations
    for t in range(1, k + 1):
        m = 1 if floor == "gram-mp" else t
        gram = floor == "sklearn-gram" or gram_pays(m, d, screens=True)
        seconds += m * n / f32 if gram else d * n / bf16
    return seconds


# ---------------------------------------------------------------------------------------------
# Methods: setup (untimed) returns the timed call and the conversion of its output to a code
# ---------------------------------------------------------------------------------------------

@dataclass
class Encoder:
    """What a method's setup returns: the timed call on a batch of tokens, and (untimed) the
    conversion of its raw output to a `SparseCode` on the benchmark's dictionary."""

    run: Callable[[Tensor], Any]
    to_code: Callable[[Any], SparseCode] = lambda code: code
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """One row of the table (per k)."""

    key: str
    library: str
    tokens: str  # Plan.tokens key
    floor: str  # "recompute" | "gram-mp" | "gram-support" | "sklearn-gram"
    setup: Callable[[Problem, int], Encoder]


def saelab_setup(method: str, *, gram: bool | str = "auto", nonnegative: bool = False
                 ) -> Callable[[Problem, int], Encoder]:
    """A `Coder` built once per k and reused, as its docstring asks (it keeps the Gram).
    `gram_used` is its public `plan(rows).gram`: whether the Gram path codes such a batch (it
    built G on the warm-up call if so)."""

    def setup(problem: Problem, k: int) -> Encoder:
        coder = Coder(problem.W, method, k=k, gram=gram, nonnegative=nonnegative)
        rows = 8 if gram is False else -(-len(problem.W) // k)  # batch x k >= n: builds G
        coder(problem.x[:rows])
        return Encoder(coder, info={"gram_used": coder.plan(rows).gram})

    return setup


def dense_to_code(weights_BL: Tensor) -> SparseCode:
    """A peer's dense [tokens, n_latents] weights as a `SparseCode` (all its non-zeros)."""
    return SparseCode.from_dense(weights_BL.float())


def sklearn_setup(problem: Problem, k: int) -> Encoder:
    """scikit-learn's OMP on the design matrix X = W' [d, n], float32; it codes one target at
    a time and, with several targets, copies X for each (its own code)."""
    import numpy as np
    from sklearn.linear_model import orthogonal_mp
    from threadpoolctl import threadpool_limits

    X = problem.W.numpy().T  # F-contiguous: no copy at its check_array

    def run(x: Tensor) -> np.ndarray:
        with threadpool_limits(THREADS), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "ended prematurely"
            return orthogonal_mp(X, np.ascontiguousarray(x.numpy().T), n_nonzero_coefs=k,
                                 precompute=False)

    return Encoder(run, lambda coef: dense_to_code(torch.from_numpy(coef.T.reshape(-1, X.shape[1]))))


def sklearn_gram_setup(problem: Problem, k: int) -> Encoder:
    """scikit-learn's Gram OMP: the float32 Gram G = W W' is precomputed (untimed); the timed
    call forms Xy = W x' and codes. With several targets it copies G (1 GiB) per target."""
    import numpy as np
    from sklearn.linear_model import orthogonal_mp_gram
    from threadpoolctl import threadpool_limits

    G = (problem.W @ problem.W.T).numpy().T  # symmetric; .T is the F-ordered view it wants
    W = problem.W.numpy()

    def run(x: Tensor) -> np.ndarray:
        with threadpool_limits(THREADS), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return orthogonal_mp_gram(G, W @ x.numpy().T, n_nonzero_coefs=k, copy_Gram=False)

    return Encoder(run, lambda coef: dense_to_code(torch.from_numpy(coef.T.reshape(-1, len(W)))))


def dictionary_learning_setup(problem: Problem, k: int) -> Encoder:
    """dictionary_learning's `grad_pursuit(signal, dictionary [d, n], target_l0)`: the
    dictionary laid out as its AutoEncoder's decoder weight is, [d_model, n_latents]."""
    from dictionary_learning.grad_pursuit import grad_pursuit

    D_dn = problem.W.T.contiguous()
    return Encoder(lambda x: grad_pursuit(x, D_dn, target_l0=k), dense_to_code)


def import_overcomplete() -> tuple[type, type]:
    """overcomplete's MpSAE and OMPSAE without its package `__init__`, which imports its
    vision models (torchvision, timm) and plotting (matplotlib, opencv): a bare package
    module stands in, and the SAE submodules import from its directory."""
    if "overcomplete" not in sys.modules:
        spec = importlib.util.find_spec("overcomplete")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("overcomplete is not installed")
        package = types.ModuleType("overcomplete")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["overcomplete"] = package
    from overcomplete.sae.mp_sae import MpSAE
    from overcomplete.sae.omp_sae import OMPSAE

    return MpSAE, OMPSAE


def overcomplete_setup(which: str) -> Callable[[Problem, int], Encoder]:
    """An overcomplete SAE (identity encoder) whose dictionary is W, given through its
    public `dictionary_params={"initializer": W}` (DictionaryLayer's argument), in eval mode
    (the fused dictionary, no dropout); `encode` returns (residual, dense codes)."""

    def setup(problem: Problem, k: int) -> Encoder:
        MpSAE, OMPSAE = import_overcomplete()
        cls = MpSAE if which == "mp" else OMPSAE
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # its torch.tensor(initializer) copy
            sae = cls(problem.W.shape[1], problem.W.shape[0], k=k,
                      dictionary_params={"initializer": problem.W.clone()})
            sae.eval()

        def run(x: Tensor) -> Tensor:
            with torch.no_grad():
                return sae.encode(x)[1]

        return Encoder(run, dense_to_code)

    return setup


METHODS: list[Method] = [
    Method("saelab mp", "saelab", "saelab", "gram-mp", saelab_setup("mp")),
    Method("saelab mp (gram=False)", "saelab", "saelab_nogram", "screen",
           saelab_setup("mp", gram=False)),
    Method("saelab mp (non-neg)", "saelab", "saelab", "gram-mp",
           saelab_setup("mp", nonnegative=True)),
    Method("saelab gp", "saelab", "saelab", "gram-support", saelab_setup("gp")),
    Method("saelab gp (gram=False)", "saelab", "saelab_nogram", "screen",
           saelab_setup("gp", gram=False)),
    Method("saelab gp (non-neg)", "saelab", "saelab", "gram-support",
           saelab_setup("gp", nonnegative=True)),
    Method("saelab omp", "saelab", "saelab", "gram-support", saelab_setup("omp")),
    Method("saelab omp (gram=False)", "saelab", "saelab_nogram", "screen",
           saelab_setup("omp", gram=False)),
    Method("saelab omp (non-neg)", "saelab", "saelab", "gram-support",
           saelab_setup("omp", nonnegative=True)),
    Method("sklearn orthogonal_mp", "scikit-learn", "sklearn", "recompute", sklearn_setup),
    Method("sklearn orthogonal_mp_gram", "scikit-learn", "sklearn_gram", "sklearn-gram",
           sklearn_gram_setup),
    Method("dictionary_learning grad_pursuit", "dictionary-learning", "dictionary_learning",
           "recompute", dictionary_learning_setup),
    Method("overcomplete MpSAE", "overcomplete", "overcomplete", "recompute",
           overcomplete_setup("mp")),
    Method("overcomplete OMPSAE", "overcomplete", "overcomplete", "recompute",
           overcomplete_setup("omp")),
]
SKLEARN = ("sklearn orthogonal_mp", "sklearn orthogonal_mp_gram")
DL_GP = "dictionary_learning grad_pursuit"


def floor_of(method: Method, gram_used: bool) -> str:
    """The method's floor; a saelab Gram row whose Coder did not build G screens."""
    if method.floor.startswith("gram-") and not gram_used:
        return "screen"
    return method.floor


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def run_method(method: Method, problem: Problem, plan: Plan, k: int, gemm: dict[str, Any]
               ) -> tuple[dict[str, Any], SparseCode | None]:
    """Set up (untimed, warmed on a few tokens), time, and score one method at one k."""
    n = min(plan.tokens[method.tokens], len(problem.x))
    row: dict[str, Any] = {"method": method.key, "library": method.library, "k": k,
                           "tokens": n}
    try:
        t0 = time.perf_counter()
        enc = method.setup(problem, k)
        enc.run(problem.x[: min(n, 8)])
        row["setup_s"] = time.perf_counter() - t0
        row.update(enc.info)
        watch = CpuWatch()
        best, times, raw = best_time(lambda: enc.run(problem.x[:n]), plan)
        row["others_cpu_share"] = watch.others_share()
    except Exception as err:  # a peer that cannot run shows why instead of a number
        row["error"] = f"{type(err).__name__}: {err}"
        log(f"{method.key} k={k}: {row['error']}")
        return row, None
    code = enc.to_code(raw)
    floor = floor_of(method, row.get("gram_used", True))
    row.update({"times_s": times, "best_s": best, "tokens_per_s": n / best,
                "fvu": fvu(problem.x[:n], code.decode(problem.W)),
                "l0": float(code.l0().double().mean()),
                "floor": floor, "floor_tokens_per_s": 1 / floor_seconds(floor, plan, k, gemm)})
    row["of_floor"] = row["tokens_per_s"] / row["floor_tokens_per_s"]
    log(f"{method.key} k={k}: {row['tokens_per_s']:,.1f} tok/s on {n} tokens, "
        f"FVU {row['fvu']:.4f}")
    return row, code


def run_k(problem: Problem, plan: Plan, k: int, gemm: dict[str, Any], methods: list[Method]
          ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every method at one k, then the speed-ups and the cross-checks between their codes."""
    rows, codes = [], {}
    for method in methods:
        row, code = run_method(method, problem, plan, k, gemm)
        gc.collect()  # a Coder or sklearn Gram holds 1 GiB: free it before the next row
        rows.append(row)
        if code is not None:
            codes[method.key] = code
    by_key = {r["method"]: r for r in rows if "tokens_per_s" in r}
    sk = max((by_key[m]["tokens_per_s"] for m in SKLEARN if m in by_key), default=None)
    dl = by_key.get(DL_GP, {}).get("tokens_per_s")
    for r in by_key.values():
        r["vs_sklearn"] = r["tokens_per_s"] / sk if sk else None
        r["vs_dictionary_learning_gp"] = r["tokens_per_s"] / dl if dl else None
    return rows, cross_checks(problem, codes, k)


def cross_checks(problem: Problem, codes: dict[str, SparseCode], k: int) -> dict[str, Any]:
    """Same supports and FVU on the same tokens, for each pair that computes the same thing
    (or, for dictionary_learning and OMPSAE, the same problem by another rule)."""
    n_lat = len(problem.W)
    pairs = [("saelab omp", "sklearn orthogonal_mp"), ("saelab omp", "sklearn orthogonal_mp_gram"),
             ("saelab omp (gram=False)", "saelab omp"), ("saelab gp (gram=False)", "saelab gp"),
             ("saelab mp (gram=False)", "saelab mp"), ("saelab mp (non-neg)", "overcomplete MpSAE"),
             ("saelab gp (non-neg)", DL_GP), ("saelab omp (non-neg)", "overcomplete OMPSAE")]
    out: dict[str, Any] = {"k": k, "pairs": []}
    for a, b in pairs:
        if a not in codes or b not in codes:
            continue
        n = min(len(codes[a]), len(codes[b]))
        x = problem.x[:n]
        # scikit-learn's float32 OMP abandons a token it judges linearly dependent (its
        # "ended prematurely" warning): such a token has no k-latent support to agree with
        both_k = (codes[a][:n].l0() == k) & (codes[b][:n].l0() == k)
        out["pairs"].append({
            "a": a, "b": b, "tokens": n,
            "same_support_fraction": same_support_fraction(codes[a], codes[b], n_lat),
            "complete_tokens": int(both_k.sum()),
            "same_support_fraction_complete": same_support_fraction(
                codes[a][:n][both_k], codes[b][:n][both_k], n_lat) if both_k.any() else None,
            "fvu_a": fvu(x, codes[a][:n].decode(problem.W)),
            "fvu_b": fvu(x, codes[b][:n].decode(problem.W))})
    return out


def goals(rows: list[dict[str, Any]], checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goals per k: omp >= 20x the faster scikit-learn OMP at the same supports;
    (non-negative) gp >= 3x dictionary_learning's at equal k and an FVU no worse."""
    out = []
    for chk in checks:
        k = chk["k"]
        at_k = {r["method"]: r for r in rows if r["k"] == k and "tokens_per_s" in r}
        pair = {(p["a"], p["b"]): p for p in chk["pairs"]}
        omp, sk = at_k.get("saelab omp"), pair.get(("saelab omp", "sklearn orthogonal_mp"))
        if omp and omp.get("vs_sklearn") and sk:
            same = sk["same_support_fraction_complete"] or 0.0
            out.append({"k": k, "goal": "omp >= 20x faster sklearn OMP, same supports",
                        "speedup": omp["vs_sklearn"], "same_supports": same,
                        "same_supports_all_tokens": sk["same_support_fraction"],
                        "met": omp["vs_sklearn"] >= 20 and same >= SAME_SUPPORTS})
        gp, dl = at_k.get("saelab gp (non-neg)"), pair.get(("saelab gp (non-neg)", DL_GP))
        if gp and gp.get("vs_dictionary_learning_gp") and dl:
            out.append({"k": k, "goal": "gp (non-neg) >= 3x dictionary_learning gp, FVU <= its",
                        "speedup": gp["vs_dictionary_learning_gp"], "fvu": dl["fvu_a"],
                        "peer_fvu": dl["fvu_b"],
                        "met": gp["vs_dictionary_learning_gp"] >= 3
                        and dl["fvu_a"] <= dl["fvu_b"] * 1.001})
    return out


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------

def _fmt_rate(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:,.2f}" if v < 10 else f"{v:,.1f}"


def _fmt_x(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}x" if v < 100 else f"{v:,.0f}x"


def _fmt_share(v: float) -> str:
    return f"{v:.2f}" if v >= 0.01 else f"{v:.1e}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """The aligned results table, grouped by k."""
    head = ["k", "method", "tokens", "tok/s", "FVU", "L0", "floor tok/s", "of floor",
            "vs sklearn", "vs DL gp", "others CPU"]
    lines: list[list[str]] = []
    for r in rows:
        if lines and lines[-1] and lines[-1][0] != str(r["k"]):
            lines.append([])
        if "error" in r:
            lines.append([str(r["k"]), r["method"], str(r["tokens"]), f"n/a: {r['error']}"])
            continue
        lines.append([str(r["k"]), r["method"], str(r["tokens"]), _fmt_rate(r["tokens_per_s"]),
                      f"{r['fvu']:.4f}", f"{r['l0']:.1f}", _fmt_rate(r["floor_tokens_per_s"]),
                      _fmt_share(r["of_floor"]), _fmt_x(r.get("vs_sklearn")),
                      _fmt_x(r.get("vs_dictionary_learning_gp")),
                      f"{r['others_cpu_share']:.0%}"])
    return render_table(head, lines, left=(1,))


def format_checks(checks: list[dict[str, Any]]) -> str:
    """Support agreement and FVU on the same tokens, one line per pair and k."""
    lines = ["same tokens, same supports? (fraction of tokens whose latent sets are equal)"]
    for chk in checks:
        for p in chk["pairs"]:
            complete = ""
            if p["complete_tokens"] < p["tokens"] and p["same_support_fraction_complete"]:
                complete = (f" ({p['same_support_fraction_complete']:.1%} of the "
                            f"{p['complete_tokens']} where both chose k)")
            lines.append(f"  k={chk['k']:<3} {p['a']:<24} vs {p['b']:<33} {p['tokens']:>5} tokens:"
                         f" same supports {p['same_support_fraction']:6.1%}{complete}, FVU "
                         f"{p['fvu_a']:.4f} vs {p['fvu_b']:.4f}")
    return "\n".join(lines)


def format_goals(goal_rows: list[dict[str, Any]]) -> str:
    lines = ["goals (issue):"]
    for g in goal_rows:
        extra = (f"same supports {g['same_supports']:.1%} of tokens where both chose k "
                 f"({g['same_supports_all_tokens']:.1%} of all)" if "same_supports" in g
                 else f"FVU {g['fvu']:.4f} vs {g['peer_fvu']:.4f}")
        lines.append(f"  k={g['k']:<3} {g['goal']}: {g['speedup']:,.1f}x, {extra} -> "
                     f"{'met' if g['met'] else 'NOT met'}")
    return "\n".join(lines)


def header(plan: Plan, gemm: dict[str, Any], sparse: dict[str, Any], env: dict[str, Any]) -> str:
    """The lines above the table: problem, machine, floors."""
    B, d, n = gemm["shape"]
    pen = ", ".join(f"m={r['m']}: {r['penalty']:.1f}" for r in sparse["by_m"])
    return "\n".join([
        f"Sparse coding, n_latents {plan.n_latents}, d_model {plan.d_model}, batch {plan.batch}, "
        f"{THREADS} threads, {env['cpu']}; {load_average(env)}",
        f"data: {plan.atoms_per_token} of the dictionary's unit rows per token, exponential "
        f"weights, + gaussian noise at {NOISE_SHARE:.0%} of the signal energy",
        f"GEMM [{B},{d}]x[{d},{n}]: float32 {gemm['best_s'] * 1e3:.0f} ms, "
        f"{gemm['flops_per_s'] / 1e9:.0f} GFLOP/s; bfloat16 {gemm['bf16_best_s'] * 1e3:.0f} ms, "
        f"{gemm['bf16_flops_per_s'] / 1e9:.0f} GFLOP/s; blocked Gram update, slowdown per "
        f"multiply-add vs the float32 GEMM: {pen} (selection.py assumes {GRAM_PENALTY})",
        "floors: recompute = one float32 GEMM per selection; screen = one bf16 GEMM per "
        "selection; Gram rows: n(d + sum_t m_t) multiply-adds per token at the float32 rate "
        "(m_t slots changed at step t), a bf16 GEMM per step past the switch; timings are "
        "the best of 2-3 runs, setup (Coder, Gram, model) excluded"])


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(THREADS)
    plan = Plan.smoke() if args.smoke else Plan.quick() if args.quick else Plan.full()
    ks = tuple(args.ks) if args.ks else plan.ks
    methods = [m for m in METHODS if not args.only or any(s in m.key for s in args.only)]
    out = out_path(args, "coding")
    env = environment(THREADS, PEERS)
    log(f"plan {plan}; load average {env['loadavg_start']}")
    problem = make_problem(plan)
    gemm = measure_gemm(problem, plan.gemm_reps)
    sparse = measure_gram_update(problem, gemm["flops_per_s"], sorted({1, 16, max(ks)}))
    log(f"GEMM {gemm['flops_per_s'] / 1e9:.0f} GFLOP/s float32, "
        f"{gemm['bf16_flops_per_s'] / 1e9:.0f} bf16; Gram update penalty "
        f"{[round(r['penalty'], 1) for r in sparse['by_m']]}")
    rows: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    for k in ks:
        k_rows, k_checks = run_k(problem, plan, k, gemm, methods)
        rows += k_rows
        checks.append(k_checks)
    finish(env)
    goal_rows = goals(rows, checks)
    result = {"environment": env, "plan": asdict(plan), "ks": list(ks),
              "data": {"dictionary": "unit-norm gaussian rows", "atoms_per_token":
                       plan.atoms_per_token, "weights": "exponential(1)",
                       "noise_share": NOISE_SHARE, "seed": SEED},
              "gemm": gemm, "sparse": sparse, "rows": rows, "checks": checks,
              "goals": goal_rows}
    result["table"] = format_table(rows)
    print(header(plan, gemm, sparse, env))
    print()
    print(result["table"])
    print()
    print(format_checks(checks))
    print()
    print(format_goals(goal_rows))
    write_json(out, result)
    log(f"wrote {out}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_output_args(parser, "coding", quick="n_latents 2048, d_model 128, batch 512, k 8 and 16",
                    smoke="n_latents 1024, d_model 64, batch 128, k 8, one timed run a row")
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="override the k values")
    parser.add_argument("--only", nargs="+", default=None,
                        help="run only the methods whose name contains one of these strings")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
