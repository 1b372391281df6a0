"""Gramians: closed form = dense solve, residuals, finite horizon, real-output realization."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

from compressm_core import (
    DiagonalStateSpace,
    controllability_gramian,
    gramian_factors,
    hankel_singular_values,
    observability_gramian,
    real_output_realization,
    to_dense,
)
from tests._helpers import (
    Spec,
    assert_close,
    assert_rel,
    backend_settings,
    build,
    dense_np,
    herm,
    specs,
    to_np,
    to_xp,
)


def test_lyapunov_residuals(xp) -> None:
    @backend_settings(xp)
    @given(specs())
    def check(spec: Spec) -> None:
        sys = build(spec)
        a, b, c, _ = dense_np(sys)
        p = to_np(controllability_gramian(to_xp(sys, xp)))
        q = to_np(observability_gramian(to_xp(sys, xp)))
        scale = max(np.abs(p).max(), 1e-300)
        assert_rel(a @ p @ herm(a) - p + b @ herm(b), np.zeros_like(p), 1e-9, scale=scale)
        scale = max(np.abs(q).max(), 1e-300)
        assert_rel(herm(a) @ q @ a - q + herm(c) @ c, np.zeros_like(q), 1e-9, scale=scale)

    check()


def test_diagonal_equals_dense(xp) -> None:
    @backend_settings(xp)
    @given(specs(diagonal=True))
    def check(spec: Spec) -> None:
        sys = to_xp(build(spec), xp)
        dense = to_dense(sys)
        assert_close(controllability_gramian(sys), controllability_gramian(dense), 1e-9, xp=xp)
        assert_close(observability_gramian(sys), observability_gramian(dense), 1e-9, xp=xp)

    check()


def test_finite_horizon_is_partial_sum(xp) -> None:
    @backend_settings(xp)
    @given(specs(max_n=6, max_radius=0.99))
    def check(spec: Spec) -> None:
        sys = build(spec)
        a, b, c, _ = dense_np(sys)
        horizon = 1 + spec.seed % 13
        p_ref = np.zeros(a.shape, dtype=np.result_type(a, b))
        q_ref = np.zeros(a.shape, dtype=np.result_type(a, c))
        ak = np.broadcast_to(np.eye(spec.n), a.shape)
        for _ in range(horizon):
            p_ref = p_ref + ak @ b @ herm(ak @ b)
            q_ref = q_ref + herm(c @ ak) @ (c @ ak)
            ak = ak @ a
        sys_xp = to_xp(sys, xp)
        assert_close(controllability_gramian(sys_xp, horizon=horizon), p_ref, 1e-10, xp=xp)
        assert_close(observability_gramian(sys_xp, horizon=horizon), q_ref, 1e-10, xp=xp)

    check()


def test_finite_horizon_converges_to_infinite(xp) -> None:
    sys = to_xp(build(Spec(6, 2, 2, 0.9, True, True, (), 5)), xp)
    p_inf = to_np(controllability_gramian(sys))
    p_long = to_np(controllability_gramian(sys, horizon=2000))
    assert_rel(p_long, p_inf, 1e-12)
    p_short = to_np(controllability_gramian(sys, horizon=10))
    assert np.abs(p_short - p_inf).max() > 1e-3 * np.abs(p_inf).max()


def test_real_output_gramians_are_those_of_the_real_realization(xp) -> None:
    @backend_settings(xp)
    @given(specs(complex_=True))
    def check(spec: Spec) -> None:
        sys = to_xp(build(spec), xp)
        real = real_output_realization(sys)
        p = controllability_gramian(sys, real_output=True)
        q = observability_gramian(sys, real_output=True)
        assert p.dtype == xp.float64
        assert_close(p, controllability_gramian(real), 1e-9, xp=xp)
        assert_close(q, observability_gramian(real), 1e-9, xp=xp)

    check()


@pytest.mark.parametrize("horizon", [None, 40])
def test_factors_when_gramian_is_numerically_singular(xp, horizon: int | None) -> None:
    """n = 256 states, 4 inputs: P is numerically singular and a plain Cholesky fails."""
    rng = np.random.default_rng(0)
    n = 256
    poles = rng.uniform(0.5, 0.99, n) * np.exp(1j * rng.uniform(0, np.pi, n))
    b = rng.normal(size=(n, 4)) + 1j * rng.normal(size=(n, 4))
    c = rng.normal(size=(4, n)) + 1j * rng.normal(size=(4, n))
    sys = to_xp(DiagonalStateSpace(poles, b, c), xp)
    p = to_np(controllability_gramian(sys, horizon=horizon))
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(p)
    lc, lo = (to_np(f) for f in gramian_factors(sys, horizon=horizon))
    assert np.all(np.isfinite(lc))
    assert np.all(np.isfinite(lo))
    assert_rel(lc @ herm(lc), p, 1e-10)
    hsv = to_np(hankel_singular_values(sys, horizon=horizon))
    assert np.all(hsv >= 0)
    assert np.all(np.diff(hsv) <= 0)
