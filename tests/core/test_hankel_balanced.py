"""HSVs and balanced truncation: defining equations and invariances on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from array_api_compat import is_jax_namespace
from hypothesis import assume, given

from compressm_core import (
    ConditioningError,
    StateSpace,
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
    assert_rel,
    backend_settings,
    build,
    dense_np,
    markov,
    specs,
    to_np,
    to_xp,
)


def _ranks(xp, n: int) -> list[int]:
    """Every rank; two on JAX, whose eager mode compiles each new shape (jit is tested apart)."""
    return sorted({1, n}) if is_jax_namespace(xp) else list(range(1, n + 1))


def _h(x: np.ndarray) -> np.ndarray:
    return np.conj(np.swapaxes(x, -1, -2))


@given(specs())
def test_hsv_real_sorted_and_match_sqrt_eig_pq(xp, spec: Spec) -> None:
    sys = build(spec)
    hsv = to_np(hankel_singular_values(to_xp(sys, xp)))
    assert hsv.shape == (*spec.batch, spec.n)
    assert np.isrealobj(hsv)
    assert np.all(hsv >= 0)
    assert np.all(np.diff(hsv, axis=-1) <= 0)
    p = to_np(controllability_gramian(sys))
    q = to_np(observability_gramian(sys))
    ref = np.sort(np.sqrt(np.abs(np.linalg.eigvals(p @ q))), axis=-1)[..., ::-1]
    assert_rel(hsv, ref, 1e-6)


@given(specs(diagonal=False))
def test_hsv_invariant_under_similarity(xp, spec: Spec) -> None:
    sys = build(spec)
    a, b, c, d = dense_np(sys)
    rng = np.random.default_rng(spec.seed + 1)
    t = np.eye(spec.n) + 0.5 * rng.normal(size=(spec.n, spec.n)) / np.sqrt(spec.n)
    t_inv = np.linalg.inv(t)
    moved = StateSpace(t_inv @ a @ t, t_inv @ b, c @ t, d)
    h1 = hankel_singular_values(to_xp(sys, xp))
    h2 = hankel_singular_values(to_xp(moved, xp))
    assert_rel(h2, h1, 1e-8)


def test_diagonal_path_equals_dense_path(xp) -> None:
    @backend_settings(xp)
    @given(specs(diagonal=True))
    def check(spec: Spec) -> None:
        sys = to_xp(build(spec), xp)
        assert_rel(hankel_singular_values(sys), hankel_singular_values(to_dense(sys)), 1e-9)
        r = max(1, spec.n // 2)
        red_d = balanced_truncation(sys, r).system
        red_a = balanced_truncation(to_dense(sys), r).system
        assert_rel(markov(red_d, 6), markov(red_a, 6), 1e-7, scale=np.abs(markov(sys, 6)).max())

    check()


@given(specs(max_n=6))
def test_balanced_gramians_equal_and_diagonal(xp, spec: Spec) -> None:
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
                assert_rel(
                    res.T_inv @ res.T, eye, 1e-12 * np.max(hsv[..., 0] / hsv[..., rank - 1])
                )
                err = to_np(h_infinity_norm(sys, res.system))
                bound = to_np(res.error_bound)
                assert_rel(bound, to_np(hankel_error_bound(res.hsv, rank)), 1e-12)
                slack = 1e-9 * np.sum(hsv, axis=-1)  # rounding, relative to the system's gain
                assert np.all(err <= bound * (1 + 1e-7) + slack), (rank, method, err, bound)

    check()


def test_real_output_truncation(xp) -> None:
    """The exact real reduction and the paper's complex one both bound the real-output error."""

    @backend_settings(xp)
    @given(specs(complex_=True, max_n=5))
    def check(spec: Spec) -> None:
        sys = to_xp(build(spec), xp)
        n_real = 2 * spec.n
        hsv_real = hankel_singular_values(sys, real_output=True)
        assert_rel(hsv_real, hankel_singular_values(real_output_realization(sys)), 1e-8)
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
    assert_rel(res.error_bound, np.zeros(3), 0, scale=1.0)


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
    assert_rel(res.hsv, hsv, 1e-12)
    with pytest.raises(TypeError, match="exactly one of `rank` and `tau`"):
        balanced_truncation(sys, 3, tau=0.1)
