"""The coding engine against references: saelab.coding.reference (the pursuits one row at a
time, in float64), itself pinned to scikit-learn's OMP, scipy's NNLS and a numpy brute force;
and least squares in numpy."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from scipy.optimize import nnls as scipy_nnls
from sklearn.linear_model import orthogonal_mp
from torch.testing import assert_close

import saelab.coding as sc
from saelab import SaelabError
from saelab.coding import reference
from saelab.coding.correlations import BlockedGram, Correlations
from saelab.coding.linalg import IncrementalCholesky
from saelab.coding.selection import CorrelationSelector, ScreenSelector, gram_pays, screen_error
from saelab.coding.state import PursuitState
from saelab.saes import TopKSAE

PURSUITS = ["mp", "gp", "omp"]


def unit_dictionary(n_latents: int, d_model: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n_latents, d_model, generator=g, dtype=torch.float64)
    return W / W.norm(dim=1, keepdim=True)


def gaussian(batch: int, d_model: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, d_model, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def planted(W: torch.Tensor, batch: int, k: int, nonnegative: bool, seed: int = 2):
    """k-sparse signals on W with magnitudes in [1, 2] (random signs unless non-negative)."""
    g = torch.Generator().manual_seed(seed)
    support = torch.stack([torch.randperm(W.shape[0], generator=g)[:k] for _ in range(batch)])
    mags = 1 + torch.rand(batch, k, generator=g, dtype=torch.float64)
    if not nonnegative:
        mags *= torch.where(torch.rand(batch, k, generator=g) < 0.5, -1.0, 1.0).double()
    return sc.SparseCode(support, mags).decode(W), support


def brute_force(x: np.ndarray, W: np.ndarray, k: int, method: str, nonnegative: bool):
    """One row, float64, dense, straight from the algorithm's definition."""
    z, r, support = np.zeros(W.shape[0]), x.copy(), []
    for _ in range(k):
        c = W @ r
        score = c.copy() if nonnegative else np.abs(c)
        if method != "mp":
            score[support] = -np.inf
        i = int(np.argmax(score))
        if score[i] <= 1e-12:
            break
        if method == "mp":
            z[i] += c[i]
            support = sorted(set(support) | {i})
        else:
            support.append(i)
            g = np.zeros_like(z)
            g[support] = c[support]
            if nonnegative:
                g[(z <= 0) & (g < 0)] = 0
            u = g @ W
            a = (u @ r) / (u @ u)
            if nonnegative:
                neg = g < 0
                a = min(a, np.min(z[neg] / -g[neg], initial=np.inf))
            z = np.maximum(z + a * g, 0) if nonnegative else z + a * g
        r = x - z @ W
    return z


# The engine against reference.py: each pursuit, signed and non-negative, in each of the
# engine's ways to select (float64 or float32; correlations recomputed, kept current through
# the Gram matrix, or screened in bfloat16; and the hand-overs between them).
ENGINES = {  # name: (dtype, gram, bf16_screen)
    "float64": (torch.float64, False, False),
    "float64-gram": (torch.float64, True, False),
    "float32": (torch.float32, False, False),
    "float32-screen": (torch.float32, False, True),
    "float32-gram": (torch.float32, True, False),
    "float32-gram-screen": (torch.float32, True, True),
}
# name: (latents, d_model, k, tol, seed), 24 random rows each. "dense": 12 steps on 128 latents
# in 32 dimensions (test_the_dense_case_takes_every_path says which paths it takes);
# "stopping": 24 latents in 16 dimensions, tol 0.3, so rows stop early, and non-negative rows
# also run out of positive correlations (test_the_stopping_case_stops_rows_every_way).
CASES = {"dense": (128, 32, 12, None, 3), "stopping": (24, 16, 12, 0.3, 2)}


def case_data(case: str):
    n_latents, d_model, k, tol, seed = CASES[case]
    return unit_dictionary(n_latents, d_model, seed), gaussian(24, d_model, 100 + seed), k, tol


@functools.cache
def reference_code(case: str, method: str, nonnegative: bool):
    W, x, k, tol = case_data(case)
    return reference.pursue(x, W, method, k, nonnegative, tol)


def engine_code(case: str, method: str, nonnegative: bool, engine: str) -> sc.SparseCode:
    W, x, k, tol = case_data(case)
    dtype, gram, screen = ENGINES[engine]
    return sc.Coder(W.to(dtype), method, k=k, tol=tol, nonnegative=nonnegative, gram=gram,
                    dtype=dtype, bf16_screen=screen)(x.to(dtype))


def assert_matches_reference(code: sc.SparseCode, ref: sc.SparseCode, gap_B: torch.Tensor,
                             x: torch.Tensor, W: torch.Tensor, dtype: torch.dtype) -> None:
    """Rows where every selection won by more than the engine's rounding (gap > 1e-4 ||x|| in
    float32, 1e-10 in float64; at least 3 rows in 4) hold the same latents in the same slots
    and the same values (to 5e-5, 1e-9). On the other rows, near-ties where the engine may
    take the runner-up, the residual norms agree to 0.02 ||x||."""
    margin, atol = (1e-4, 5e-5) if dtype == torch.float32 else (1e-10, 1e-9)
    clear_B = gap_B > margin
    assert clear_B.float().mean() >= 0.75
    assert torch.equal(code.indices[clear_B], ref.indices[clear_B])
    assert_close(code.values[clear_B].double(), ref.values[clear_B], atol=atol, rtol=0)
    fit_B = (x - code.decode(W.to(code.values.dtype)).double()).norm(dim=1)
    ref_fit_B = (x - ref.decode(W)).norm(dim=1)
    assert ((fit_B - ref_fit_B).abs() <= 0.02 * x.norm(dim=1))[~clear_B].all()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("nonnegative", [False, True])
@pytest.mark.parametrize("method", PURSUITS)
@pytest.mark.parametrize("case", CASES)
def test_engine_matches_the_reference(case, method, nonnegative, engine):
    W, x, _, _ = case_data(case)
    assert_matches_reference(engine_code(case, method, nonnegative, engine),
                             *reference_code(case, method, nonnegative), x, W,
                             ENGINES[engine][0])


@pytest.mark.parametrize("nonnegative", [False, True])
def test_the_comparison_tells_wrong_variants_apart(nonnegative, monkeypatch):
    """The comparison above fails for gradient pursuit held to the reference of another pursuit
    (omp, mp), of the other sign constraint, of gradient pursuit without its exact line
    search (a unit step instead), or to its own reference with the weights 0.1% off (the
    same selections), in float64 and in float32."""
    W, x, k, _ = case_data("dense")
    right, gap_B = reference_code("dense", "gp", nonnegative)
    wrong = [reference_code("dense", "omp", nonnegative), reference_code("dense", "mp", nonnegative),
             reference_code("dense", "gp", not nonnegative),
             (sc.SparseCode(right.indices, right.values * 1.001), gap_B)]
    monkeypatch.setattr(reference, "line_search", lambda u_D, r_D: 1.0)
    wrong.append(reference.pursue(x, W, "gp", k, nonnegative))
    for engine in ("float64", "float32"):
        code = engine_code("dense", "gp", nonnegative, engine)
        for ref, gap_B in wrong:
            with pytest.raises(AssertionError):
                assert_matches_reference(code, ref, gap_B, x, W, ENGINES[engine][0])


def test_the_dense_case_takes_every_path(monkeypatch):
    """In the dense case, gradient pursuit with the Gram matrix updates correlations through it
    and then recomputes them (past 10 slots in 32 dimensions) or, when it may screen, hands
    over to the screen (past 4 slots); without the Gram matrix it recomputes or screens from
    the start. The first correlations are one recompute on every path that keeps them."""
    calls: dict[str, int] = {}

    def spy(cls, name):
        inner = getattr(cls, name)

        def counted(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return inner(*args, **kwargs)
        monkeypatch.setattr(cls, name, counted)

    spy(Correlations, "sub_gram_rows_")
    spy(Correlations, "recompute_")
    spy(ScreenSelector, "select")
    _, d_model, k, _, _ = CASES["dense"]
    expected = {"float32-gram": {"sub_gram_rows_": 10, "recompute_": 1 + k - 10},
                "float32-gram-screen": {"sub_gram_rows_": 4, "recompute_": 1, "select": k - 5},
                "float32": {"recompute_": k}, "float32-screen": {"select": k}}
    for engine, counts in expected.items():
        calls.clear()
        engine_code("dense", "gp", False, engine)
        assert calls == counts, engine
    assert gram_pays(10, d_model, screens=False) and not gram_pays(11, d_model, screens=False)
    assert gram_pays(4, d_model, screens=True) and not gram_pays(5, d_model, screens=True)


@pytest.mark.parametrize("nonnegative", [False, True])
def test_the_stopping_case_stops_rows_every_way(nonnegative):
    """Gradient pursuit's reference rows in the stopping case end at tol, at k, and
    (non-negative) above tol with no positive correlation left off the support."""
    W, x, k, tol = case_data("stopping")
    code, _ = reference_code("stopping", "gp", nonnegative)
    r_BD = x - code.decode(W)
    at_tol_B = r_BD.norm(dim=1) <= tol * x.norm(dim=1)
    steps_B = torch.tensor([len(set(row)) for row in code.indices.tolist()])  # gp: one slot a step
    assert at_tol_B.any() and (steps_B == k).any()
    if nonnegative:
        off_support_BL = (r_BD @ W.T).scatter(1, code.indices, -torch.inf)
        assert ((off_support_BL.amax(dim=1) <= 0) & ~at_tol_B & (steps_B < k)).any()


@pytest.mark.parametrize("nonnegative", [False, True])
def test_the_reference_matches_independent_solvers(nonnegative):
    """reference.py itself: omp against scikit-learn (signed) or scipy's NNLS on its support,
    mp and gp against the numpy brute force above."""
    W, x = unit_dictionary(128, 32), gaussian(24, 32)
    omp, _ = reference.pursue(x, W, "omp", 10, nonnegative)
    if nonnegative:
        for row in range(len(x)):
            assert len(set(omp.indices[row].tolist())) == 10  # no padding slots
            z, _ = scipy_nnls(W[omp.indices[row]].T.numpy(), x[row].numpy())
            np.testing.assert_allclose(omp.values[row].numpy(), z, atol=1e-10)
    else:
        ref = orthogonal_mp(W.T.numpy(), x.T.numpy(), n_nonzero_coefs=10).T
        np.testing.assert_allclose(omp.to_dense(128).numpy(), ref, atol=1e-10, rtol=0)
    for method in ("mp", "gp"):
        code, _ = reference.pursue(x, W, method, 10, nonnegative)
        brute = np.stack([brute_force(row, W.numpy(), 10, method, nonnegative)
                          for row in x.numpy()])
        np.testing.assert_allclose(code.to_dense(128).numpy(), brute, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gram", [False, True])
def test_omp_matches_scikit_learn(dtype, gram):
    W, x = unit_dictionary(256, 64), gaussian(100, 64)
    code = sc.decompose(x.to(dtype), W.to(dtype), "omp", k=12, gram=gram, dtype=dtype)
    ref = orthogonal_mp(W.T.numpy(), x.T.numpy(), n_nonzero_coefs=12).T
    ours = code.to_dense(256).double().numpy()
    assert ((ours != 0) == (ref != 0)).all()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gram", [False, True])
def test_omp_matches_scikit_learn_on_long_supports_stopped_by_tolerance(dtype, gram):
    """Rows stop at 31-43 slots: the Cholesky factor regrows past 16 and 32 slots while rows
    of different lengths share it."""
    W, x = unit_dictionary(512, 128), gaussian(100, 128)
    x = x / x.norm(dim=1, keepdim=True)  # scikit-learn's tol is one squared norm for all rows
    code = sc.decompose(x.to(dtype), W.to(dtype), "omp", k=60, tol=0.3, gram=gram, dtype=dtype)
    ref = orthogonal_mp(W.T.numpy(), x.T.numpy(), tol=0.3**2).T
    ours = code.to_dense(512).double().numpy()
    lengths = (ref != 0).sum(axis=1)
    assert lengths.min() > IncrementalCholesky.GROW and lengths.max() > 2 * IncrementalCholesky.GROW
    assert ((ours != 0) == (ref != 0)).all()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["mp", "gp"])
@pytest.mark.parametrize("nonnegative", [False, True])
def test_mp_and_gp_match_a_float64_brute_force(method, nonnegative):
    W, x = unit_dictionary(128, 32), gaussian(24, 32)
    code = sc.decompose(x, W, method, k=10, nonnegative=nonnegative, dtype=torch.float64)
    ref = np.stack([brute_force(row, W.numpy(), 10, method, nonnegative) for row in x.numpy()])
    np.testing.assert_allclose(code.to_dense(128).numpy(), ref, atol=1e-9, rtol=0)


@pytest.mark.parametrize("method", PURSUITS)
@pytest.mark.parametrize("nonnegative", [False, True])
def test_residual_norm_never_increases(method, nonnegative):
    W, x = unit_dictionary(512, 48), gaussian(64, 48).float()
    code = sc.decompose(x, W, method, k=30, nonnegative=nonnegative, return_trace=True)
    norms = code.trace.residual_norm
    assert norms.shape == (31, 64)
    assert (norms[1:] <= norms[:-1] * (1 + 1e-5)).all()
    assert_close(norms[-1], (x - code.decode(W.float())).norm(dim=1), atol=1e-4, rtol=1e-4)
    if nonnegative:
        assert (code.values >= 0).all()


@pytest.mark.parametrize("method", ["omp", "gp"])
@pytest.mark.parametrize("nonnegative", [False, True])
def test_exact_recovery_of_planted_sparse_codes(method, nonnegative):
    W = unit_dictionary(512, 256)
    x, support = planted(W, 64, 4, nonnegative)
    code = sc.decompose(x, W, method, k=4, nonnegative=nonnegative)
    found = code.indices.sort(dim=1).values
    assert torch.equal(found, support.sort(dim=1).values)
    if method == "omp":  # exact weights too
        assert_close(code.decode(W.float()), x.float(), atol=1e-4, rtol=0)


def test_nonnegative_omp_solves_nnls_on_its_support():
    W, x = unit_dictionary(200, 40), gaussian(30, 40)
    code = sc.decompose(x, W, "omp", k=15, nonnegative=True, dtype=torch.float64)
    assert (code.values >= 0).all()
    for row in range(len(x)):
        z, _ = scipy_nnls(W[code.indices[row]].T.numpy(), x[row].numpy())
        np.testing.assert_allclose(code.values[row].numpy(), z, atol=1e-8)


@pytest.mark.parametrize("method", PURSUITS)
def test_gram_path_chunking_and_dtype_agree(method):
    W, x = unit_dictionary(300, 40), gaussian(50, 40)
    base = sc.decompose(x, W, method, k=10, gram=False, dtype=torch.float64)
    for other in (sc.decompose(x, W, method, k=10, gram=True, dtype=torch.float64),
                  sc.decompose(x, W, method, k=10, chunk_size=7, dtype=torch.float64)):
        assert_close(other.to_dense(300), base.to_dense(300), atol=1e-9, rtol=0)
    single = sc.decompose(x.float(), W.float(), method, k=10)
    assert_close(single.to_dense(300).double(), base.to_dense(300), atol=1e-4, rtol=0)


@pytest.mark.parametrize("nonnegative", [False, True])
def test_blocked_correlations_match_dense_float64(nonnegative):
    """Blocks of 16 over 300 latents (the last one padded): the Gram update, the gather and
    the selection against dense numpy."""
    W, r = unit_dictionary(300, 40), gaussian(64, 40)
    gram = BlockedGram(W, width=16)
    c = Correlations.of(r, W, gram)
    G, dense = (W @ W.T).numpy(), (r @ W.T).numpy()
    g = torch.Generator().manual_seed(3)
    idx = torch.stack([torch.randperm(300, generator=g)[:5] for _ in range(64)])
    dz = torch.randn(64, 5, generator=g, dtype=torch.float64)
    c.sub_gram_rows_(idx, dz, gram)
    dense -= np.einsum("bm,bml->bl", dz.numpy(), G[idx.numpy()])
    np.testing.assert_allclose(c.gather(idx).numpy(), np.take_along_axis(dense, idx.numpy(), 1),
                               atol=1e-12)
    live = torch.arange(5).expand(64, 5) < torch.randint(0, 6, (64, 1), generator=g)
    idx = torch.where(live, idx, idx[:, :1])  # unused slots repeat slot 0's latent
    for exclude in (False, True):
        score, best = c.best(idx, live, exclude, nonnegative)
        ref = dense.copy() if nonnegative else np.abs(dense)
        if exclude:
            for b in range(64):
                ref[b, idx[b][live[b]].numpy()] = 0
        assert best.tolist() == ref.argmax(axis=1).tolist()
        np.testing.assert_allclose(score.numpy(), ref.max(axis=1), atol=1e-12)
    np.testing.assert_allclose(c.gather(idx).numpy(), np.take_along_axis(dense, idx.numpy(), 1),
                               atol=1e-12)  # the search restored what it zeroed


def test_bf16_screen_stays_within_its_error_bound():
    """|screen - c| <= screen_error(d) ||r|| for every latent, against float64, including the
    worst case for the bound (r along a dictionary row)."""
    W = unit_dictionary(2048, 256)
    r = torch.cat([gaussian(64, 256), 2.9 * W[:64], 1e-3 * gaussian(8, 256, seed=4)])
    screen = r.float().bfloat16() @ W.float().bfloat16().T
    err = (screen.double() - r @ W.T).abs().amax(dim=1)
    bound = screen_error(256) * r.norm(dim=1)
    assert (err <= bound).all()
    assert (err > 0.1 * bound).any()  # the bound is not vacuous


@pytest.mark.parametrize("nonnegative", [False, True])
def test_screened_selection_equals_float32_where_the_screen_cannot_tell(nonnegative):
    """Clusters of near-duplicate rows (cosines ~ 1 - 5e-5: apart in float32, tied in
    bfloat16) of 12 (more than the first 8 candidates, fewer than the 64 after) and of 80
    (more than both). The bound must send such rows on to more candidates and then to the
    float32 recompute, and every selection must equal the float32 one."""
    base = unit_dictionary(16, 64).float()
    sizes = [12] * 8 + [80] * 8
    jitter = unit_dictionary(sum(sizes), 64, seed=5).float()
    W = torch.repeat_interleave(base, torch.tensor(sizes), dim=0) + 1e-2 * jitter
    W = W / W.norm(dim=1, keepdim=True)
    x = base[torch.arange(40) % 16] + 0.05 * gaussian(40, 64).float()
    state = PursuitState(x, W, 4, nonnegative=nonnegative, tol=None, trace=False)
    screen = ScreenSelector(W.bfloat16())
    _, screened_B, screened_value_B = screen.select(state, exclude_support=False)
    _, plain_B, plain_value_B = CorrelationSelector(state, None).select(state,
                                                                        exclude_support=False)
    more, recomputed = screen.unsettled
    assert more > recomputed > 0
    assert torch.equal(screened_B, plain_B)
    assert_close(screened_value_B, plain_value_B, atol=1e-6, rtol=0)
    for method in PURSUITS:
        screened, plain = (sc.decompose(x, W, method, k=6, nonnegative=nonnegative, gram=False,
                                        bf16_screen=flag) for flag in (True, False))
        assert torch.equal(screened.indices, plain.indices)
        assert_close(screened.values, plain.values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("gram", [False, True])
def test_matching_pursuit_traces_steps_that_only_re_pick(gram):
    """One row, 16 latents, 40 steps: most steps re-pick a latent, so no row adds a slot."""
    W, x = unit_dictionary(16, 8), gaussian(1, 8).float()
    code = sc.decompose(x, W.float(), "mp", k=40, gram=gram, return_trace=True)
    picks = code.trace.selected[:, 0]
    assert len(picks) == 40 and len(set(picks.tolist())) < 16
    norms = code.trace.residual_norm[:, 0]
    assert (norms[1:] <= norms[:-1] * (1 + 1e-5)).all()
    assert_close(norms[-1], (x - code.decode(W.float())).norm(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", PURSUITS)
def test_rows_that_stop_never_read_uninitialised_memory(method, monkeypatch):
    """A row that stops early (here: exactly 2 x one latent, tol 0.1) keeps its code while the
    batch goes on; with every fresh tensor filled with NaN instead of left as it comes, the
    screened pursuits must still give the unscreened codes."""
    W, x = unit_dictionary(300, 32).float(), gaussian(6, 32).float()
    x[2] = 2 * W[0]
    plain = sc.decompose(x, W, method, k=6, tol=0.1, gram=False, bf16_screen=False)
    fill = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, *a, **kw: fill(t, *a, **kw).fill_(
        torch.nan if t.is_floating_point() else 0))
    screened = sc.decompose(x, W, method, k=6, tol=0.1, gram=False, return_trace=True)
    assert torch.isfinite(screened.values).all()
    assert torch.isfinite(screened.trace.residual_norm).all()
    assert_close(screened.to_dense(300), plain.to_dense(300), atol=1e-5, rtol=0)


def test_tolerance_stops_each_row_when_reached():
    W, x = unit_dictionary(256, 32), gaussian(80, 32)
    code = sc.decompose(x, W, "gp", k=32, tol=0.4, dtype=torch.float64, return_trace=True)
    rel = code.trace.residual_norm / x.norm(dim=1)
    l0 = code.l0()
    assert len(set(l0.tolist())) > 3  # rows stop at different steps
    for row in range(len(x)):
        n = int(l0[row])
        assert rel[n, row] <= 0.4 < rel[n - 1, row]  # stopped at the first step below tol
        assert (code.trace.selected[n:, row] == -1).all()


@pytest.mark.parametrize("method", PURSUITS)
def test_trace_span_cosine_matches_a_projection(method):
    W, x = unit_dictionary(128, 24), gaussian(10, 24)
    code = sc.decompose(x, W, method, k=8, dtype=torch.float64, return_trace=True)
    sel, cos = code.trace.selected, code.trace.span_cosine
    for row in range(len(x)):
        chosen: list[int] = []
        for step in range(8):
            i = int(sel[step, row])
            if i in chosen:  # matching pursuit picked it again
                assert cos[step, row] == 1
                continue
            if chosen:
                A = W[chosen].T.numpy()
                proj = A @ np.linalg.lstsq(A, W[i].numpy(), rcond=None)[0]
                assert cos[step, row].item() == pytest.approx(np.linalg.norm(proj), abs=1e-8)
            else:
                assert cos[step, row] == 0
            chosen.append(i)


def test_non_unit_rows_warn_and_codes_decode_with_the_rows_as_given():
    W, x = unit_dictionary(128, 24), gaussian(10, 24)
    scales = torch.linspace(0.5, 3, 128, dtype=torch.float64)[:, None]
    with pytest.warns(UserWarning, match="not unit norm.*normalised copies"):
        scaled = sc.decompose(x, W * scales, "omp", k=6, dtype=torch.float64)
    plain = sc.decompose(x, W, "omp", k=6, dtype=torch.float64)
    assert_close(scaled.decode(W * scales), plain.decode(W))


@pytest.fixture(scope="module")
def sae() -> TopKSAE:
    model = TopKSAE(24, 96, k=6, dtype=torch.float64).init_random(seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        model.b_dec.copy_(0.3 * torch.randn(24, generator=g, dtype=torch.float64))
        model.b_enc.copy_(0.1 * torch.randn(96, generator=g, dtype=torch.float64))
        model.W_enc.mul_(0.7)  # a shrinking encoder, as trained SAEs have
    return model


def test_encoder_method_is_the_saes_own_code(sae):
    x = gaussian(40, 24)
    code = sc.decompose(x, sae, "encoder", dtype=torch.float64)
    assert_close(code.to_dense(96), sae.encode(x).detach())
    assert_close(code.decode(sae.W_dec.detach(), sae.b_dec.detach()), sae(x).detach())


@pytest.mark.parametrize("nonnegative", [False, True])
def test_encoder_refit_is_least_squares_on_the_encoders_support(sae, nonnegative):
    x = gaussian(40, 24)
    enc = sc.decompose(x, sae, "encoder", dtype=torch.float64)
    code = sc.decompose(x, sae, "encoder-refit", nonnegative=nonnegative, dtype=torch.float64)
    target = (x - sae.b_dec).detach().numpy()
    for row in range(len(x)):
        S = enc.indices[row][enc.values[row] != 0]
        A = sae.W_dec[S].detach().T.numpy()
        ref = scipy_nnls(A, target[row])[0] if nonnegative else np.linalg.lstsq(A, target[row],
                                                                                rcond=None)[0]
        got = code.to_dense(96)[row, S].numpy()
        np.testing.assert_allclose(got, ref, atol=1e-8)


@pytest.mark.parametrize("per_latent", [False, True])
def test_encoder_scaled_never_worse_than_the_encoder_where_fitted(sae, per_latent, tmp_path):
    x_fit = gaussian(300, 24, seed=5)
    scale = sc.fit_scale(sae, x_fit, per_latent=per_latent, dtype=torch.float64)
    W, b = sae.W_dec.detach(), sae.b_dec.detach()

    def mse(code):
        return ((x_fit - code.decode(W, b)) ** 2).sum().item()

    enc = sc.decompose(x_fit, sae, "encoder", dtype=torch.float64)
    scaled = sc.decompose(x_fit, sae, "encoder-scaled", scale=scale, dtype=torch.float64)
    assert mse(scaled) < mse(enc)
    scale.save(tmp_path / "scale.safetensors")
    back = sc.LatentScale.load(tmp_path / "scale.safetensors")
    assert torch.equal(back.scale, scale.scale)
    assert (back.shift is None) == (scale.shift is None) and (
        scale.shift is None or torch.equal(back.shift, scale.shift))


@pytest.mark.parametrize("min_fires", [1, 6])
@pytest.mark.parametrize("shift", [False, True])
def test_per_latent_scale_is_the_least_squares_optimum(sae, min_fires, shift):
    """Against a dense float64 least-squares fit of one scale (and one shift) per latent
    active on at least `min_fires` rows, the others held at scale 1 and shift 0."""
    x = gaussian(120, 24, seed=6)
    fitted = sc.fit_scale(sae, x, dtype=torch.float64, min_fires=min_fires, shift=shift)
    scale = fitted.scale
    z = sae.encode(x).detach().numpy()
    W, target = sae.W_dec.detach().numpy(), (x - sae.b_dec).detach().numpy()
    fires = (z != 0).sum(axis=0)
    free = np.flatnonzero(fires >= min_fires)
    held = np.setdiff1d(np.arange(96), free)
    target = target - z[:, held] @ W[held]  # the held latents at scale 1
    columns = [(z[:, j:j + 1] * W[j]).ravel() for j in free]
    if shift:
        columns += [((z[:, j:j + 1] != 0) * W[j]).ravel() for j in free]
    design = np.stack(columns, axis=1)
    ref = np.linalg.lstsq(design, target.ravel(), rcond=None)[0]
    ours = np.concatenate([scale[free].numpy()] + (
        [fitted.shift[free].numpy()] if shift else []))
    best = ((design @ ref - target.ravel()) ** 2).sum()
    assert ((design @ ours - target.ravel()) ** 2).sum() == pytest.approx(best, rel=1e-6)
    assert (scale[held] == 1).all()
    assert (fitted.shift is None) == (not shift)
    if shift and min_fires == 1:
        return  # a latent active on one row has no unique (scale, shift): the optimum suffices
    np.testing.assert_allclose(scale[free].numpy(), ref[:len(free)], rtol=1e-6, atol=1e-6)
    if shift:
        np.testing.assert_allclose(fitted.shift[free].numpy(), ref[len(free):], rtol=1e-6,
                                   atol=1e-6)
        assert (fitted.shift[held] == 0).all()
    assert min_fires == 1 or 0 < len(held) - (fires == 0).sum() < 96  # some held for real


def test_pursuit_on_an_sae_subtracts_b_dec(sae):
    x = gaussian(20, 24)
    with_sae = sc.decompose(x, sae, "gp", k=5, dtype=torch.float64)
    bare = sc.decompose(x - sae.b_dec.detach(), sae.W_dec.detach(), "gp", k=5,
                        dtype=torch.float64)
    assert_close(with_sae.decode(sae.W_dec.detach(), sae.b_dec.detach()),
                 bare.decode(sae.W_dec.detach()) + sae.b_dec.detach())


def test_sparse_code_round_trips(tmp_path):
    W, x = unit_dictionary(64, 16), gaussian(12, 16).float()
    code = sc.decompose(x, W, "omp", k=5)
    dense = code.to_dense(64)
    assert torch.equal(code.l0(), (dense != 0).sum(dim=1))
    again = sc.SparseCode.from_dense(dense)
    assert torch.equal(again.to_dense(64), dense)
    assert_close(code.decode(W.float()), dense @ W.float())
    code.save(tmp_path / "codes.safetensors", metadata={"method": "omp"})
    loaded = sc.SparseCode.load(tmp_path / "codes.safetensors")
    assert torch.equal(loaded.indices, code.indices) and torch.equal(loaded.values, code.values)
    both = sc.SparseCode.cat([code, sc.SparseCode.from_dense(dense[:3], k=2)])
    assert both.k == 5 and len(both) == 15
    assert torch.equal(both.to_dense(64)[:12], dense)


def test_errors_say_what_to_do(sae, tmp_path):
    W, x = unit_dictionary(64, 16), gaussian(4, 16)
    cases = [
        (lambda: sc.decompose(x[:, :8], W, "gp", k=3), "differ in width"),
        (lambda: sc.decompose(x.clone().index_fill_(0, torch.tensor([2]), torch.nan), W, "gp",
                              k=3), "first at row 2"),
        (lambda: sc.decompose(x, W, "omp", k=17), "omp cannot select k=17"),
        (lambda: sc.decompose(x, W, "lasso", k=3), "encoder | encoder-refit"),
        (lambda: sc.decompose(x, W, "gp"), "needs a stopping rule"),
        (lambda: sc.decompose(x, W, "encoder"), "need an SAE"),
        (lambda: sc.decompose(gaussian(4, 24), sae, "encoder-scaled"), "fit_scale"),
        (lambda: sc.decompose(gaussian(4, 24), sae, "encoder", k=4), "encoder's own support"),
        (lambda: sc.decompose(x, W, "gp", k=3, tol=2.0), "0 < tol < 1"),
        (lambda: sc.SparseCode.load(tmp_path / "missing.safetensors"), "cannot read .*missing.safetensors"),
    ]
    for call, message in cases:
        with pytest.raises(SaelabError, match=message.replace("|", r"\|")):
            call()
