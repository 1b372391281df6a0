"""compressm_core.hankel: Hankel singular values, their defining equations and invariances."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given

from compressm_core import (
    StateSpace,
    controllability_gramian,
    hankel_singular_values,
    observability_gramian,
)
from tests._helpers import (
    Spec,
    assert_close,
    assert_rel,
    backend_settings,
    build,
    dense_np,
    specs,
    to_np,
    to_xp,
)


def test_hsv_real_sorted_and_match_sqrt_eig_pq(xp) -> None:
    @backend_settings(xp)
    @given(specs())
    def check(spec: Spec) -> None:
        sys = build(spec)
        hsv_xp = hankel_singular_values(to_xp(sys, xp))
        hsv = to_np(hsv_xp)
        assert hsv.shape == (*spec.batch, spec.n)
        assert np.isrealobj(hsv)
        assert np.all(hsv >= 0)
        assert np.all(np.diff(hsv, axis=-1) <= 0)
        p = to_np(controllability_gramian(sys))
        q = to_np(observability_gramian(sys))
        ref = np.sort(np.sqrt(np.abs(np.linalg.eigvals(p @ q))), axis=-1)[..., ::-1]
        assert_close(hsv_xp, ref, 1e-6, xp=xp)
        # sum_i sigma_i^2 = trace(P Q)
        assert_rel(np.sum(hsv**2, axis=-1), np.trace(p @ q, axis1=-2, axis2=-1).real, 1e-8)

    check()


def test_hsv_invariant_under_similarity(xp) -> None:
    @backend_settings(xp)
    @given(specs(diagonal=False))
    def check(spec: Spec) -> None:
        sys = build(spec)
        a, b, c, d = dense_np(sys)
        rng = np.random.default_rng(spec.seed + 1)
        t = np.eye(spec.n) + 0.5 * rng.normal(size=(spec.n, spec.n)) / np.sqrt(spec.n)
        t_inv = np.linalg.inv(t)
        moved = StateSpace(t_inv @ a @ t, t_inv @ b, c @ t, d)
        h1 = hankel_singular_values(to_xp(sys, xp))
        h2 = hankel_singular_values(to_xp(moved, xp))
        assert_close(h2, h1, 1e-8)

    check()


def test_half_precision_hsvs_are_float32_and_finite(xp) -> None:
    """float16 and bfloat16 systems get float32 HSVs: in float16 these (up to 2.5e5) overflow."""
    names = [name for name in ("float16", "bfloat16") if hasattr(xp, name)]
    if not names:
        pytest.skip("no half-precision dtype in this namespace")
    rng = np.random.default_rng(0)
    poles = np.linspace(0.1, 0.99, 8)
    b, c = 100 * rng.normal(size=(8, 2)), 100 * rng.normal(size=(1, 8))
    for name in names:
        dtype = getattr(xp, name)
        sys = build(Spec(8, 2, 1, 0.5, False, True, (), 0))._replace(poles=poles, b=b, c=c)
        half = type(sys)(*(None if f is None else xp.astype(xp.asarray(f), dtype) for f in sys))
        hsv = hankel_singular_values(half)
        assert hsv.dtype == xp.float32, name
        rounded = (None if f is None else to_np(xp.astype(f, xp.float64)) for f in half)
        exact = hankel_singular_values(type(sys)(*rounded))
        assert float(to_np(exact)[0]) > 65504  # beyond float16
        assert_close(hsv, exact, 1e-6, xp=xp, dtype=xp.float32)


def test_complex32_hsvs_are_real() -> None:
    torch = pytest.importorskip("torch")
    sys = build(Spec(4, 1, 1, 0.8, True, True, (), 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "ComplexHalf support is experimental"
        half = type(sys)(
            *(None if f is None else torch.tensor(f, dtype=torch.complex32) for f in sys)
        )
    hsv = hankel_singular_values(half)
    assert hsv.dtype == torch.float32


def test_a_system_without_states_has_no_hsvs(xp) -> None:
    sys = build(Spec(1, 1, 1, 0.5, False, True, (), 0))
    empty = to_xp(sys._replace(poles=sys.poles[:0], b=sys.b[:0], c=sys.c[:, :0]), xp)
    assert tuple(hankel_singular_values(empty).shape) == (0,)
