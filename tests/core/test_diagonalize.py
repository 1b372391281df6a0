"""compressm_core.diagonalize: rediagonalize (modal form of a reduced system)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

from compressm_core import (
    ConditioningError,
    DiagonalStateSpace,
    StabilityError,
    StateSpace,
    balanced_truncation,
    frequency_response,
    hankel_singular_values,
    rediagonalize,
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


def _numerical_rank(hsv: object) -> int:
    h = to_np(hsv)
    return int(np.min(np.sum(h > 1e-8 * h[..., :1], axis=-1)))


def test_rediagonalize_preserves_the_transfer_function(xp) -> None:
    @backend_settings(xp)
    @given(specs(max_n=6))
    def check(spec: Spec) -> None:
        sys = to_xp(build(spec), xp)
        reduced = balanced_truncation(sys, _numerical_rank(hankel_singular_values(sys))).system
        diag = rediagonalize(reduced)
        assert isinstance(diag, DiagonalStateSpace)
        assert_rel(markov(diag, 8), markov(reduced, 8), 1e-8)
        radius = np.abs(to_np(diag.poles))
        assert np.all(np.diff(radius, axis=-1) <= 1e-12)

    check()


def test_rediagonalize_real_output_folds_conjugate_pairs(xp) -> None:
    @backend_settings(xp)
    @given(specs(complex_=True, max_n=4, batch=False))
    def check(spec: Spec) -> None:
        sys = to_xp(build(spec), xp)
        hsv = hankel_singular_values(sys, real_output=True)
        reduced = balanced_truncation(sys, _numerical_rank(hsv), real_output=True).system
        diag = rediagonalize(reduced, real_output=True)
        poles = to_np(diag.poles)
        assert poles.shape[-1] <= 2 * spec.n
        assert np.all(poles.imag >= 0)
        omega = xp.asarray(np.linspace(0.0, np.pi, 7))
        assert_close(
            frequency_response(diag, omega, real_output=True),
            frequency_response(reduced, omega),
            1e-7,
            xp=xp,
        )

    check()


def test_rediagonalize_is_deterministic_and_balances_modes(xp) -> None:
    rng = np.random.default_rng(3)
    a = np.diag([0.9, 0.5j, -0.5j, 0.2])
    v = np.eye(4) + 0.2 * rng.normal(size=(4, 4))
    sys = StateSpace(v @ a @ np.linalg.inv(v), rng.normal(size=(4, 2)), rng.normal(size=(1, 4)))
    d1 = to_np(rediagonalize(to_xp(sys, xp)))
    np.testing.assert_allclose(d1.poles, [0.9, 0.5j, -0.5j, 0.2], atol=1e-12)
    np.testing.assert_allclose(
        np.linalg.norm(d1.b, axis=-1), np.linalg.norm(d1.c, axis=-2), rtol=1e-10
    )
    pivots = d1.b[np.arange(4), np.argmax(np.abs(d1.b), axis=-1)]
    np.testing.assert_allclose(pivots.imag, 0, atol=1e-12)
    assert np.all(pivots.real > 0)


def test_rediagonalize_checks(xp) -> None:
    b, c = np.ones((2, 1)), np.ones((1, 2))
    unstable = to_xp(StateSpace(np.array([[1.2, 0.0], [0.0, 0.5]]), b, c), xp)
    with pytest.raises(StabilityError, match="modulus 1.2"):
        rediagonalize(unstable)
    with pytest.warns(RuntimeWarning, match="clipped 1 pole"):
        clipped = rediagonalize(unstable, on_unstable="clip", max_radius=0.99)
    assert np.abs(to_np(clipped.poles)).max() == pytest.approx(0.99)
    defective = to_xp(StateSpace(np.array([[0.5, 1.0], [0.0, 0.5]]), b, c), xp)
    with pytest.raises(ConditioningError, match="condition number"):
        rediagonalize(defective)
    real_pos = to_xp(StateSpace(np.array([[0.5, 0.0], [0.0, 0.3]]), b, c), xp)
    with pytest.warns(RuntimeWarning, match="rotated 2 pole"):
        rotated = rediagonalize(real_pos, min_phase=1e-3)
    np.testing.assert_allclose(np.angle(to_np(rotated.poles)), 1e-3, rtol=1e-9)
    with pytest.raises(TypeError, match="dense StateSpace"):
        rediagonalize(DiagonalStateSpace(xp.asarray([0.5]), xp.ones((1, 1)), xp.ones((1, 1))))
