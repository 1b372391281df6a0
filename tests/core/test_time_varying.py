"""compressm_core.time_varying: Gramians of time-varying systems (defining recursions)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from compressm_core import (
    ShapeError,
    StabilityError,
    controllability_gramian,
    observability_gramian,
    time_varying,
)
from compressm_core.time_varying import time_varying_gramians
from tests._helpers import (
    Spec,
    assert_close,
    assert_doctests,
    backend_settings,
    build,
    dense_np,
    herm,
    skip_jax,
    specs,
    time_varying_sequences,
    to_np,
    to_xp,
)


def _dense_a(a: np.ndarray, diagonal: bool) -> np.ndarray:
    return a[..., None, :] * np.eye(a.shape[-1]) if diagonal else a


def test_recursion_residuals(xp) -> None:
    @backend_settings(xp, jax_examples=1)
    @given(specs(max_n=5), st.integers(2, 9))
    def check(spec: Spec, steps: int) -> None:
        a, b, c = time_varying_sequences(spec, steps)
        tv = {}
        for key, sl in (("all", slice(None)), ("head", slice(None, -1)), ("tail", slice(1, None))):
            a_sl = a[..., sl, :] if spec.diagonal else a[..., sl, :, :]
            args = (to_xp(a_sl, xp), to_xp(b[..., sl, :, :], xp), to_xp(c[..., sl, :, :], xp))
            tv[key] = time_varying_gramians(*args, diagonal=spec.diagonal)
        ad = _dense_a(a, spec.diagonal)
        a_last, b_last = ad[..., -1, :, :], b[..., -1, :, :]
        p_rec = a_last @ to_np(tv["head"].controllability) @ herm(a_last) + b_last @ herm(b_last)
        a_first, c_first = ad[..., 0, :, :], c[..., 0, :, :]
        q_rec = herm(a_first) @ to_np(tv["tail"].observability) @ a_first + herm(c_first) @ c_first
        assert_close(tv["all"].controllability, p_rec, 1e-10, xp=xp)
        assert_close(tv["all"].observability, q_rec, 1e-10, xp=xp)

    check()


def test_constant_matrices_equal_time_limited_lti(xp) -> None:
    @backend_settings(xp, jax_examples=1)
    @given(specs(max_n=5))
    def check(spec: Spec) -> None:
        sys = build(spec)
        steps = 1 + spec.seed % 12
        first = sys[0]
        a = np.stack([first] * steps, axis=-2 if spec.diagonal else -3)
        b = np.stack([sys.b] * steps, axis=-3)
        c = np.stack([sys.c] * steps, axis=-3)
        p, q = time_varying_gramians(
            to_xp(a, xp), to_xp(b, xp), to_xp(c, xp), diagonal=spec.diagonal
        )
        sys_xp = to_xp(sys, xp)
        assert_close(p, controllability_gramian(sys_xp, horizon=steps), 1e-10, xp=xp)
        assert_close(q, observability_gramian(sys_xp, horizon=steps), 1e-10, xp=xp)

    check()


def test_constant_matrices_converge_to_lti(xp) -> None:
    skip_jax(xp)
    sys = build(Spec(4, 2, 2, 0.8, True, False, (2,), 3))
    a, b, c, _ = dense_np(sys)
    sys_xp = to_xp(sys, xp)
    p_inf, q_inf = controllability_gramian(sys_xp), observability_gramian(sys_xp)
    errors = []
    for steps in (4, 16, 200):
        seq = [np.stack([x] * steps, axis=-3) for x in (a, b, c)]
        p, q = time_varying_gramians(*(to_xp(x, xp) for x in seq))
        errors.append(
            np.abs(to_np(p) - to_np(p_inf)).max() + np.abs(to_np(q) - to_np(q_inf)).max()
        )
        assert p.dtype == xp.complex128
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-10 * np.abs(to_np(p_inf)).max()


def test_diagonal_equals_dense(xp) -> None:
    @backend_settings(xp, jax_examples=1)
    @given(specs(diagonal=True, max_n=5), st.integers(1, 7))
    def check(spec: Spec, steps: int) -> None:
        a, b, c = time_varying_sequences(spec, steps)
        diag = time_varying_gramians(to_xp(a, xp), to_xp(b, xp), to_xp(c, xp), diagonal=True)
        dense = time_varying_gramians(
            to_xp(_dense_a(a, True), xp), to_xp(b, xp), to_xp(c, xp), diagonal=False
        )
        assert_close(diag.controllability, dense.controllability, 1e-12, xp=xp)
        assert_close(diag.observability, dense.observability, 1e-12, xp=xp)

    check()


def test_form_is_inferred_and_broadcast(xp) -> None:
    rng = np.random.default_rng(0)
    a = 0.5 * rng.normal(size=(3, 2))  # L = 3, n = 2: diagonal
    b = rng.normal(size=(4, 3, 2, 1))  # batch 4
    c = rng.normal(size=(3, 1, 2))
    p, q = time_varying_gramians(to_xp(a, xp), to_xp(b, xp), to_xp(c, xp))
    assert tuple(p.shape) == (4, 2, 2)
    assert tuple(q.shape) == (4, 2, 2)
    explicit = time_varying_gramians(
        to_xp(_dense_a(a, True), xp), to_xp(b, xp), to_xp(c, xp), diagonal=False
    )
    assert_close(p, explicit.controllability, 1e-12, xp=xp)


def test_time_varying_errors(xp) -> None:
    a, b, c = (xp.asarray(x) for x in (np.ones((3, 3)), np.ones((3, 3, 1)), np.ones((3, 1, 3))))
    cube = xp.ones((3, 3, 3))  # dense (L, n, n) or a batch of 3 diagonal (L, n)
    with pytest.raises(ShapeError, match="pass `diagonal=True` or `diagonal=False`"):
        time_varying_gramians(cube, b, c)
    assert tuple(time_varying_gramians(cube, b, c, diagonal=True)[0].shape) == (3, 3, 3)
    assert tuple(time_varying_gramians(cube, b, c, diagonal=False)[0].shape) == (3, 3)
    with pytest.raises(ShapeError, match=r"`a_seq` must have shape \(\.\.\., 3, 3, 3\)"):
        time_varying_gramians(a, b, c, diagonal=False)
    with pytest.raises(ShapeError, match="`c_seq` must have shape"):
        time_varying_gramians(a, b, xp.ones((2, 1, 3)), diagonal=True)
    with pytest.raises(ShapeError, match="`b_seq` must have shape"):
        time_varying_gramians(a, xp.ones((3, 1)), c)
    with pytest.raises(ShapeError, match="`a_seq` must have shape .* \\(dense\\) or"):
        time_varying_gramians(xp.ones((4, 3)), b, c)
    with pytest.raises(ShapeError, match="at least one time step"):
        time_varying_gramians(xp.ones((0, 3)), xp.ones((0, 3, 1)), xp.ones((0, 1, 3)))
    with pytest.raises(StabilityError, match="`b_seq` must contain only finite"):
        time_varying_gramians(a, b * xp.nan, c, diagonal=True)


def test_jit_equals_eager() -> None:
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    seq = time_varying_sequences(Spec(3, 2, 1, 0.9, True, False, (), 1), 5)
    args = [jnp.asarray(x) for x in seq]
    got = jax.jit(time_varying_gramians)(*args)
    eager = time_varying_gramians(*args).controllability
    assert_close(got.controllability, eager, 1e-13)


def test_device_is_preserved() -> None:
    xps = pytest.importorskip("array_api_strict")
    dev = xps.Device("device1")
    seq = time_varying_sequences(Spec(2, 1, 1, 0.9, False, True, (), 1), 3)
    p, q = time_varying_gramians(*(xps.asarray(x, device=dev) for x in seq), diagonal=True)
    assert p.device == dev
    assert q.device == dev


def test_docstring_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    assert_doctests(time_varying, monkeypatch)
