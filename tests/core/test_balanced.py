"""compressm_core.balanced: balanced realization and truncation (defining equations, the error
bound on every backend)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from array_api_compat import is_jax_namespace
from hypothesis import assume, given

from compressm_core import (
    ConditioningError,
    ShapeError,
    balanced_realization,
    balanced_truncation,
    controllability_gramian,
    h_infinity_norm,
    hankel_error_bound,
    hankel_singular_values,
    observability_gramian,
    real_output_realization,
    select_rank,
    to_dense,
)
from tests._helpers import (
    Spec,
    assert_close,
    assert_rel,
    backend_settings,
    build,
    markov,
    specs,
    to_np,
    to_xp,
)


def _ranks(xp, n: int) -> list[int]:
    """Every rank; two on JAX, whose eager mode compiles each new shape (jit is tested apart)."""
    return sorted({1, n}) if is_jax_namespace(xp) else list(range(1, n + 1))


def test_diagonal_path_equals_dense_path(xp) -> None:
    """The diagonal path and the dense path give the same Gramians and HSVs, and for both
    methods reduced systems with the same Markov parameters and the same error bound."""

    @backend_settings(xp)
    @given(specs(diagonal=True))
    def check(spec: Spec) -> None:
        sys = to_xp(build(spec), xp)
        dense = to_dense(sys)
        for gramian in (controllability_gramian, observability_gramian):
            assert_close(gramian(sys), gramian(dense), 1e-10)
        hsv = to_np(hankel_singular_values(dense))
        assert_close(hankel_singular_values(sys), hankel_singular_values(dense), 1e-9)
        r = max(1, spec.n // 2)
        for method in ("sqrt", "bfsr"):
            red_d = balanced_truncation(sys, r, method=method)
            red_a = balanced_truncation(dense, r, method=method)
            scale = np.abs(markov(sys, 6)).max()
            assert_rel(markov(red_d.system, 6), markov(red_a.system, 6), 1e-7, scale=scale)
            assert_close(red_d.error_bound, red_a.error_bound, 1e-8, scale=np.sum(hsv))

    check()


def test_balanced_gramians_equal_and_diagonal(xp) -> None:
    @backend_settings(xp)
    @given(specs(max_n=6))
    def check(spec: Spec) -> None:
        sys = build(spec)
        hsv = to_np(hankel_singular_values(sys))
        assume(np.all(hsv[..., -1] > 1e-5 * hsv[..., 0]))
        res = balanced_realization(to_xp(sys, xp))
        bal = to_np(res.system)
        p_b = to_np(controllability_gramian(bal))
        q_b = to_np(observability_gramian(bal))
        sigma = np.asarray(hsv)[..., :, None] * np.eye(spec.n)
        assert_rel(p_b, sigma, 1e-6)
        assert_rel(q_b, sigma, 1e-6)
        t, t_inv = to_np(res.T), to_np(res.T_inv)
        assert_rel(t_inv @ t, np.broadcast_to(np.eye(spec.n), t.shape), 1e-7)

    check()


def test_truncation_error_within_bound_for_every_rank(xp) -> None:
    @backend_settings(xp)
    @given(specs(max_n=7))
    def check(spec: Spec) -> None:
        sys = to_xp(build(spec), xp)
        hsv = to_np(hankel_singular_values(sys))
        for rank in _ranks(xp, spec.n):
            if np.min(hsv[..., rank - 1] / hsv[..., 0]) < 1e-9:
                break  # numerically non-minimal beyond this rank
            for method in ("sqrt", "bfsr"):
                res = balanced_truncation(sys, rank, method=method)
                assert tuple(res.system.a.shape[-2:]) == (rank, rank)
                eye = np.broadcast_to(np.eye(rank), (*spec.batch, rank, rank))
                tol = 1e-12 * np.max(hsv[..., 0] / hsv[..., rank - 1])
                assert_close(res.T_inv @ res.T, eye, tol, xp=xp, dtype=res.T.dtype)
                err = to_np(h_infinity_norm(sys, res.system))
                bound = to_np(res.error_bound)
                assert_close(res.error_bound, hankel_error_bound(res.hsv, rank), 1e-12)
                slack = 1e-9 * np.sum(hsv, axis=-1)  # rounding, relative to the system's gain
                assert np.all(err <= bound * (1 + 1e-7) + slack), (rank, method, err, bound)
                assert np.all(bound >= 2 * np.sum(hsv[..., rank:], axis=-1))
                if rank < spec.n:  # no system of order r is closer than sigma_{r+1}
                    assert np.all(err >= hsv[..., rank] * (1 - 1e-6) - slack), (rank, method)

    check()


def test_real_output_truncation(xp) -> None:
    """The exact real reduction and the paper's complex one both bound the real-output error."""

    @backend_settings(xp)
    @given(specs(complex_=True, max_n=5))
    def check(spec: Spec) -> None:
        sys = to_xp(build(spec), xp)
        n_real = 2 * spec.n
        hsv_real = hankel_singular_values(sys, real_output=True)
        assert_close(hsv_real, hankel_singular_values(real_output_realization(sys)), 1e-8, xp=xp)
        ratio = to_np(hsv_real) / to_np(hsv_real)[..., :1]
        for rank in _ranks(xp, n_real - 1):
            if np.min(ratio[..., rank - 1]) < 1e-9:
                break
            res = balanced_truncation(sys, rank, real_output=True)
            assert not np.iscomplexobj(to_np(res.system.a))
            err = to_np(h_infinity_norm(sys, res.system, real_output=True))
            slack = 1e-9 * np.sum(to_np(hsv_real), axis=-1)
            assert np.all(err <= to_np(res.error_bound) * (1 + 1e-7) + slack)
        hsv = to_np(hankel_singular_values(sys))
        for rank in _ranks(xp, spec.n):
            if np.min(hsv[..., rank - 1] / hsv[..., 0]) < 1e-9:
                break
            res = balanced_truncation(sys, rank)
            err = to_np(h_infinity_norm(sys, res.system, real_output=True))
            slack = 1e-9 * np.sum(hsv, axis=-1)
            assert np.all(err <= to_np(res.error_bound) * (1 + 1e-7) + slack)

    check()


def test_full_rank_truncation_reproduces_system(xp) -> None:
    sys = to_xp(build(Spec(6, 2, 3, 0.95, True, False, (3,), 7)), xp)
    res = balanced_truncation(sys, 6)
    assert_rel(markov(res.system, 10), markov(sys, 10), 1e-8)
    roundoff = 10 * 6 * np.finfo(np.float64).eps * to_np(res.hsv)[..., 0]  # no tail at full rank
    assert_close(res.error_bound, roundoff, 1e-12, xp=xp)


def test_finite_horizon_truncation_matches_first_steps(xp) -> None:
    """Time-limited Gramians keep what the first L steps see, at a lower rank."""
    rng = np.random.default_rng(4)
    n = 24
    slow = 0.999 * np.exp(1j * rng.uniform(0.1, 3.0, n // 2))
    fast = rng.uniform(0.3, 0.7, n // 2) * np.exp(1j * rng.uniform(0.1, 3.0, n // 2))
    poles = np.concatenate([slow, fast])
    b = rng.normal(size=(n, 1)) + 0j
    b[: n // 2] *= 0.05  # slow modes: small per step, large over an infinite horizon
    c = rng.normal(size=(1, n)) + 0j
    sys_np = build(Spec(1, 1, 1, 0.5, True, True, (), 0))._replace(poles=poles, b=b, c=c, d=None)
    sys = to_xp(sys_np, xp)
    horizon, rank = 10, 4  # P_L has rank <= L m = 10
    err_l = np.abs(
        markov(balanced_truncation(sys, rank, horizon=horizon).system, horizon)
        - markov(sys_np, horizon)
    ).max()
    err_inf = np.abs(
        markov(balanced_truncation(sys, rank).system, horizon) - markov(sys_np, horizon)
    ).max()
    assert err_l < err_inf


def test_non_minimal_sqrt_refuses(xp) -> None:
    sys = to_xp(
        build(Spec(3, 1, 1, 0.5, False, True, (), 1))._replace(
            b=np.array([[1.0], [0.0], [1.0]]), c=np.array([[1.0, 1.0, 0.0]])
        ),
        xp,
    )
    with pytest.raises(ConditioningError, match="smaller `rank`"):
        balanced_realization(sys)


def test_rank_and_method_validation(xp) -> None:
    sys = to_xp(build(Spec(4, 1, 1, 0.5, False, True, (), 1)), xp)
    with pytest.raises(ValueError, match=r"`rank` must be in \[1, 4\]; received 5"):
        balanced_truncation(sys, 5)
    with pytest.raises(ValueError, match=r"`rank` must be in \[1, 4\]; received 0"):
        balanced_truncation(sys, 0)
    with pytest.raises(TypeError, match="`rank` must be an integer"):
        balanced_truncation(sys, 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`method` must be 'sqrt' or 'bfsr'"):
        balanced_truncation(sys, 2, method="svd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`horizon` must be in \[1, "):
        hankel_singular_values(sys, horizon=0)


def test_tau_selects_the_rank_in_one_call(xp) -> None:
    sys = to_xp(build(Spec(10, 2, 2, 0.95, True, True, (3,), 21)), xp)
    hsv = to_np(hankel_singular_values(sys))
    res = balanced_truncation(sys, tau=0.1)
    want = max(select_rank(row, tau=0.1) for row in hsv)
    assert tuple(res.system.a.shape) == (3, want, want)
    assert_close(res.hsv, hsv, 1e-12, xp=xp)
    with pytest.raises(TypeError, match="exactly one of `rank` and `tau`"):
        balanced_truncation(sys, 3, tau=0.1)


def test_complex32_truncation_dtypes() -> None:
    torch = pytest.importorskip("torch")
    sys = build(Spec(4, 1, 1, 0.8, True, True, (), 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "ComplexHalf support is experimental"
        half = type(sys)(
            *(None if f is None else torch.tensor(f, dtype=torch.complex32) for f in sys)
        )
    res = balanced_truncation(half, 2)
    assert res.hsv.dtype == torch.float32
    assert res.error_bound.dtype == torch.float32
    assert res.system.a.dtype == torch.complex64


def test_tau_accepts_any_real_number(xp) -> None:
    sys = to_xp(build(Spec(10, 2, 2, 0.95, True, True, (), 21)), xp)
    hsv = to_np(hankel_singular_values(sys))
    want = select_rank(hsv, tau=0.2)
    for tau in (np.float32(0.2), np.float64(0.2), 0.2):
        assert select_rank(hsv, tau=tau) == want  # type: ignore[arg-type]
        assert tuple(balanced_truncation(sys, tau=tau).system.a.shape) == (want, want)
    assert select_rank(hsv, tau=np.int64(0)) == hsv.shape[-1]
    for bad in (True, np.bool_(False), np.float32("nan"), 1.0, "0.2"):
        with pytest.raises(ValueError, match=r"`tau` must be a number in \[0, 1\); received"):
            balanced_truncation(sys, tau=bad)  # type: ignore[arg-type]


def test_a_system_without_states_is_refused_by_name(xp) -> None:
    sys = build(Spec(1, 1, 1, 0.5, False, True, (), 0))
    empty = to_xp(sys._replace(poles=sys.poles[:0], b=sys.b[:0], c=sys.c[:, :0]), xp)
    assert float(hankel_error_bound(hankel_singular_values(empty), 0)) == 0.0
    for kwargs in ({"tau": 0.1}, {"rank": 1}):
        with pytest.raises(ShapeError, match="`sys` must have at least one state to balance"):
            balanced_truncation(empty, **kwargs)  # type: ignore[arg-type]


def test_error_bound_covers_round_off(xp) -> None:
    """Ranks whose discarded HSVs are below n eps sigma_1: the measured error is round-off,
    up to 150 times 2 sum(tail) here; the bound's round-off term covers it (no extra slack)."""
    jax = is_jax_namespace(xp)  # eager JAX compiles every shape: the 150x rank only
    for seed, diagonal in [(0, True)] if jax else [(0, True), (0, False)]:
        sys = to_xp(build(Spec(20, 1, 1, 0.6, True, diagonal, (), seed)), xp)
        hsv = to_np(hankel_singular_values(sys))
        for rank in [19] if jax else range(1, 21):
            if hsv[rank - 1] / hsv[0] <= 20 * np.finfo(np.float64).eps:
                break  # refused: the projection does not exist
            res = balanced_truncation(sys, rank)
            err = float(to_np(h_infinity_norm(sys, res.system)))
            assert err <= float(to_np(res.error_bound)), (seed, diagonal, rank)
