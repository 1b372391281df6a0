"""solve_discrete_lyapunov on every backend: residuals, batching, method ladder."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

from compressm_core import ConditioningError, ShapeError, StabilityError, solve_discrete_lyapunov
from tests._helpers import (
    Spec,
    assert_close,
    assert_rel,
    backend_settings,
    build,
    dense_np,
    specs,
    to_np,
)


def _q(a: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = rng.normal(size=a.shape)
    if np.iscomplexobj(a):
        g = g + 1j * rng.normal(size=a.shape)
    return g @ np.conj(np.swapaxes(g, -1, -2))


def test_residual_stable(xp) -> None:
    @backend_settings(xp)
    @given(specs(max_n=10, diagonal=False))
    def check(spec: Spec) -> None:
        a, *_ = dense_np(build(spec))
        q = _q(a, spec.seed)
        x = solve_discrete_lyapunov(xp.asarray(a), xp.asarray(q))
        x_np = to_np(x)
        res = a @ x_np @ np.conj(np.swapaxes(a, -1, -2)) - x_np + q
        assert_rel(res, np.zeros_like(res), 1e-9, scale=np.abs(x_np).max())
        assert_rel(x_np, np.conj(np.swapaxes(x_np, -1, -2)), 1e-10)

    check()


def test_residual_unstable(xp) -> None:
    """A need not be stable: any equation with a unique solution is solved."""

    @backend_settings(xp)
    @given(specs(max_n=6, diagonal=False, batch=False, min_radius=1.05, max_radius=3.0))
    def check(spec: Spec) -> None:
        a, *_ = dense_np(build(spec))
        q = _q(a, spec.seed)
        x = to_np(solve_discrete_lyapunov(xp.asarray(a), xp.asarray(q)))
        res = a @ x @ np.conj(a.T) - x + q
        assert_rel(res, np.zeros_like(res), 1e-8, scale=np.abs(a).max() ** 2 * np.abs(x).max())

    check()


def test_batch_broadcasts_q(xp) -> None:
    rng = np.random.default_rng(1)
    a = 0.3 * rng.normal(size=(3, 4, 4))
    q = np.eye(4)
    x = to_np(solve_discrete_lyapunov(xp.asarray(a), xp.asarray(q)))
    assert x.shape == (3, 4, 4)
    for i in range(3):
        res = a[i] @ x[i] @ a[i].T - x[i] + q
        assert np.abs(res).max() < 1e-12


def test_empty(xp) -> None:
    x = solve_discrete_lyapunov(xp.zeros((0, 0)), xp.zeros((0, 0)))
    assert tuple(x.shape) == (0, 0)


@pytest.mark.parametrize("method", ["smith", "kronecker", "scipy"])
def test_methods_agree(method: str) -> None:
    rng = np.random.default_rng(2)
    a = 0.25 * (rng.normal(size=(5, 5)) + 1j * rng.normal(size=(5, 5)))
    q = np.eye(5)
    ref = solve_discrete_lyapunov(a, q, method="kronecker")
    assert_rel(solve_discrete_lyapunov(a, q, method=method), ref, 1e-11)


def test_float32_input_keeps_dtype_and_accuracy(xp) -> None:
    rng = np.random.default_rng(3)
    a = (0.3 * rng.normal(size=(6, 6))).astype(np.float32)
    q = np.eye(6, dtype=np.float32)
    x = solve_discrete_lyapunov(xp.asarray(a), xp.asarray(q))
    assert x.dtype == xp.float32
    ref = solve_discrete_lyapunov(a.astype(np.float64), q.astype(np.float64))
    assert_close(x, ref.astype(np.float32), 1e-6, xp=xp)


def test_no_unique_solution_raises(xp) -> None:
    with pytest.raises(ConditioningError, match="no unique solution"):
        solve_discrete_lyapunov(xp.eye(3), xp.eye(3))


def test_smith_refuses_unstable() -> None:
    with pytest.raises(ConditioningError, match="not Schur stable"):
        solve_discrete_lyapunov(2 * np.eye(2), np.eye(2), method="smith")


def test_bad_inputs(xp) -> None:
    with pytest.raises(ShapeError, match="`a` must be a"):
        solve_discrete_lyapunov(xp.ones((2, 3)), xp.eye(2))
    with pytest.raises(ShapeError, match="`q` must have the size of `a`"):
        solve_discrete_lyapunov(xp.eye(2), xp.eye(3))
    a = xp.asarray([[0.5, float("nan")], [0.0, 0.1]])
    with pytest.raises(StabilityError, match="`a` must contain only finite values"):
        solve_discrete_lyapunov(a, xp.eye(2))
    with pytest.raises(ValueError, match="`method` must be"):
        solve_discrete_lyapunov(xp.eye(2) / 2, xp.eye(2), method="bartels")  # type: ignore[arg-type]
