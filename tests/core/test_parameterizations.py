"""compressm_core.parameterizations: the LRU and zero-order-hold maps, both ways, on every backend.

The defining equations are checked against independent NumPy formulas (the complex exponential
of the LRU, the matrix exponential of the augmented system for the zero-order hold, the HiPPO-LegS
matrix written entry by entry), the round trips on every backend of the ``xp`` fixture.
"""

from __future__ import annotations

import doctest
import math
import re

import numpy as np
import pytest
import scipy.linalg

import compressm_core.parameterizations as parameterizations
from compressm_core import StabilityError
from compressm_core.parameterizations import (
    check_poles,
    hippo_n_eigenpairs,
    inverse_zoh,
    lru_from_poles,
    lru_to_poles,
    pole_phase,
    zoh,
)
from tests._helpers import to_np

TWO_PI = 2 * math.pi


def _poles(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Poles inside the unit disc, with a real positive one, a real negative one and one near
    the unit circle in every row."""
    radius = rng.uniform(0.05, 0.999, size=shape)
    angle = rng.uniform(-math.pi, math.pi, size=shape)
    poles = radius * np.exp(1j * angle)
    poles[..., 0] = 0.7
    poles[..., 1] = -0.4
    poles[..., 2] = (1 - 1e-9) * np.exp(0.3j)
    return poles


def _lru_parameters(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    """Log-parameters in the range the inverse returns: phase in (0, 2 pi), normalised gamma."""
    radius = rng.uniform(0.05, 0.999, size=n)
    phase = rng.uniform(0.01, TWO_PI - 0.01, size=n)
    return np.log(-np.log(radius)), np.log(phase), 0.5 * np.log1p(-(radius**2))


# --- LRU -------------------------------------------------------------------------------------


def test_lru_to_poles_is_the_complex_exponential() -> None:
    rng = np.random.default_rng(0)
    nu_log, theta_log, gamma_log = (rng.normal(size=(3, 7)) for _ in range(3))
    poles, gamma = lru_to_poles(nu_log, theta_log, gamma_log)
    np.testing.assert_allclose(
        poles, np.exp(-np.exp(nu_log) + 1j * np.exp(theta_log)), rtol=1e-14, atol=1e-15
    )
    np.testing.assert_allclose(gamma, np.exp(gamma_log), rtol=1e-15)
    assert poles.dtype == np.complex128
    assert gamma.dtype == np.float64


def test_lru_from_poles_defining_equations() -> None:
    poles = _poles(np.random.default_rng(1), (4, 9))
    nu_log, theta_log, gamma_log = lru_from_poles(poles)
    radius = np.abs(poles)
    np.testing.assert_allclose(np.exp(-np.exp(nu_log)), radius, rtol=1e-14)
    # gamma^2 = 1 - |λ|^2, accurate also for the pole 1e-9 inside the unit circle
    np.testing.assert_allclose(np.exp(2 * gamma_log), (1 - radius) * (1 + radius), rtol=1e-12)
    phase = np.exp(theta_log)
    assert np.all((phase > 0) & (phase <= TWO_PI))
    np.testing.assert_allclose(np.exp(1j * phase), poles / radius, rtol=0, atol=1e-14)
    np.testing.assert_allclose(phase[..., 0], TWO_PI, rtol=1e-15)  # real positive pole
    np.testing.assert_allclose(phase[..., 1], math.pi, rtol=1e-15)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 6)])
def test_lru_round_trips(xp, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(2)
    poles = _poles(rng, shape)
    params = lru_from_poles(xp.asarray(poles))
    assert all(p.shape == shape for p in params)
    assert all(p.dtype == xp.float64 for p in params)
    back, gamma = lru_to_poles(*params)
    assert back.dtype == xp.complex128
    np.testing.assert_allclose(to_np(back), poles, rtol=0, atol=1e-13)
    np.testing.assert_allclose(to_np(gamma) ** 2 + np.abs(poles) ** 2, 1.0, rtol=1e-12)

    expected = _lru_parameters(rng, 11)
    again = lru_from_poles(lru_to_poles(*(xp.asarray(p) for p in expected))[0])
    for got, want in zip(again, expected, strict=True):
        np.testing.assert_allclose(to_np(got), want, rtol=1e-11, atol=1e-12)


def test_lru_maps_keep_single_precision(xp) -> None:
    nu_log, theta_log, gamma_log = (
        xp.asarray(p, dtype=xp.float32) for p in _lru_parameters(np.random.default_rng(3), 6)
    )
    poles, gamma = lru_to_poles(nu_log, theta_log, gamma_log)
    assert poles.dtype == xp.complex64
    assert gamma.dtype == xp.float32
    assert all(p.dtype == xp.float32 for p in lru_from_poles(poles))
    np.testing.assert_allclose(to_np(lru_from_poles(poles)[0]), to_np(nu_log), atol=1e-4)


def test_lru_from_poles_reads_real_poles_as_complex(xp) -> None:
    nu_log, theta_log, _ = lru_from_poles(xp.asarray(np.array([0.5, -0.25])))
    np.testing.assert_allclose(to_np(nu_log), np.log(-np.log([0.5, 0.25])), rtol=1e-15)
    np.testing.assert_allclose(to_np(theta_log), np.log([TWO_PI, math.pi]), rtol=1e-15)


def test_pole_phase(xp) -> None:
    poles = np.array([1j, -1j, -1.0, 0.5, 0.5 + 0.5j, 1e-300 - 1e-12j])
    phase = to_np(pole_phase(xp.asarray(poles)))
    expected = np.remainder(np.angle(poles), TWO_PI)
    expected[expected == 0] = TWO_PI
    np.testing.assert_allclose(phase, expected, rtol=1e-15)
    assert np.all((phase > 0) & (phase <= TWO_PI))


# --- zero-order hold -------------------------------------------------------------------------


def _continuous(rng: np.random.Generator, n: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    a = -rng.uniform(0.05, 2.0, size=n) + 1j * rng.uniform(-3.0, 3.0, size=n)
    b = rng.normal(size=(n, h)) + 1j * rng.normal(size=(n, h))
    return a, b


def test_zoh_matches_the_matrix_exponential() -> None:
    """``expm(Δ [[a, B], [0, 0]]) = [[exp(Δ a), ∫_0^Δ exp(a s) ds B], [0, I]]``, whose first row
    is ``(λ, B̄)`` (one state at a time)."""
    rng = np.random.default_rng(4)
    n, h = 5, 3
    a, b = _continuous(rng, n, h)
    step = rng.uniform(0.01, 0.5, size=n)
    poles, b_bar = zoh(a, b, step)
    for j in range(n):
        block = np.zeros((1 + h, 1 + h), dtype=complex)
        block[0, 0], block[0, 1:] = a[j], b[j]
        held = scipy.linalg.expm(step[j] * block)
        np.testing.assert_allclose(poles[j], held[0, 0], rtol=1e-13)
        np.testing.assert_allclose(b_bar[j], held[0, 1:], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(poles, np.exp(a * step), rtol=1e-15)
    np.testing.assert_allclose(b_bar, ((np.exp(a * step) - 1) / a)[:, None] * b, rtol=1e-15)


@pytest.mark.parametrize("per_state", [False, True])
def test_zoh_round_trips(xp, per_state: bool) -> None:
    rng = np.random.default_rng(5)
    a, b = _continuous(rng, 8, 4)
    step_np = rng.uniform(0.01, 0.5, size=8) if per_state else 0.1
    step = xp.asarray(step_np) if per_state else step_np
    poles, b_bar = zoh(xp.asarray(a), xp.asarray(b), step)
    assert poles.shape == (8,)
    assert b_bar.shape == (8, 4)
    a2, b2 = inverse_zoh(poles, b_bar, step)
    np.testing.assert_allclose(to_np(a2), a, rtol=1e-12)
    np.testing.assert_allclose(to_np(b2), b, rtol=1e-12)

    disc = _poles(rng, (8,))
    b_bar = rng.normal(size=(8, 4))
    a3, b3 = inverse_zoh(xp.asarray(disc), xp.asarray(b_bar), step)
    assert np.all(to_np(xp.real(a3)) < 0)
    poles3, b_bar3 = zoh(a3, b3, step)
    np.testing.assert_allclose(to_np(poles3), disc, rtol=1e-12)
    np.testing.assert_allclose(to_np(b_bar3), b_bar, rtol=1e-9, atol=1e-12)


def test_zoh_is_batched(xp) -> None:
    rng = np.random.default_rng(6)
    a, b = _continuous(rng, 6, 2)
    a, b = a.reshape(2, 3), b.reshape(2, 3, 2)
    poles, b_bar = zoh(xp.asarray(a), xp.asarray(b), 0.2)
    np.testing.assert_allclose(to_np(poles), np.exp(0.2 * a), rtol=1e-15)
    np.testing.assert_allclose(to_np(b_bar), ((np.exp(0.2 * a) - 1) / a)[..., None] * b)


# --- HiPPO-N ---------------------------------------------------------------------------------


def _hippo_legs(size: int) -> np.ndarray:
    a = np.zeros((size, size))
    for n in range(size):
        for k in range(n):
            a[n, k] = -math.sqrt((2 * n + 1) * (2 * k + 1))
        a[n, n] = -(n + 1)
    return a


@pytest.mark.parametrize("size", [1, 2, 7, 32])
def test_hippo_n_eigenpairs(size: int) -> None:
    p = np.sqrt(np.arange(size) + 0.5)
    normal = _hippo_legs(size) + np.outer(p, p)
    lam, v = hippo_n_eigenpairs(size)
    assert isinstance(lam, np.ndarray)
    assert lam.shape == (size,)
    assert v.shape == (size, size)
    np.testing.assert_allclose(lam.real, -0.5, rtol=0, atol=1e-15)
    assert np.all(np.diff(lam.imag) >= 0)
    np.testing.assert_allclose(v.conj().T @ v, np.eye(size), atol=1e-12)
    np.testing.assert_allclose(v @ np.diag(lam) @ v.conj().T, normal, atol=1e-11 * size)


def test_hippo_n_eigenpairs_on_other_backends(xp) -> None:
    lam, v = hippo_n_eigenpairs(9, xp=xp)
    assert lam.dtype == xp.complex128
    lam_np, _ = hippo_n_eigenpairs(9)
    np.testing.assert_allclose(to_np(lam), lam_np, atol=1e-12)
    v = to_np(v)  # eigenvector phases may differ between backends, S may not
    p = np.sqrt(np.arange(9) + 0.5)
    normal = _hippo_legs(9) + np.outer(p, p)
    np.testing.assert_allclose(v @ np.diag(lam_np) @ v.conj().T, normal, atol=1e-10)
    np.testing.assert_allclose(v.conj().T @ v, np.eye(9), atol=1e-12)


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("poles", "message"),
    [
        (
            [0.5, 1.0],
            "The reduced LRU has poles outside 0 < |lambda| < 1 (max |lambda| = 1, min 0.5); "
            "its parameters would be non-finite.",
        ),
        (
            [0.5j, 0.0],
            "The reduced LRU has poles outside 0 < |lambda| < 1 (max |lambda| = 0.5, min 0); "
            "its parameters would be non-finite.",
        ),
        ([0.5, math.nan], "The reduced LRU has non-finite poles."),
        ([math.inf, 0.5], "The reduced LRU has non-finite poles."),
    ],
)
def test_bad_poles_raise(xp, poles: list[float], message: str) -> None:
    arr = xp.asarray(np.asarray(poles, dtype=complex))
    for call in (
        lambda: check_poles(arr, "LRU"),
        lambda: lru_from_poles(arr),
        lambda: inverse_zoh(arr, xp.ones((2, 1), dtype=xp.complex128), 0.1, what="LRU"),
    ):
        with pytest.raises(StabilityError, match=re.escape(message)):
            call()


def test_check_poles_names_the_system_and_returns_the_moduli(xp) -> None:
    radius = check_poles(xp.asarray(np.array([0.6 + 0.4j, -0.25])))
    np.testing.assert_allclose(to_np(radius), [abs(0.6 + 0.4j), 0.25], rtol=1e-15)
    with pytest.raises(StabilityError, match=r"^The reduced system has poles outside"):
        check_poles(xp.asarray(np.array([1.5, 0.5])))
    with pytest.raises(StabilityError, match=r"^The reduced S5 layer has poles outside"):
        inverse_zoh(xp.asarray(np.array([1.5 + 0j])), xp.ones((1, 1), dtype=xp.complex128), 1.0)


def test_inverse_zoh_refuses_poles_that_clip_eigs_would_move(xp) -> None:
    poles = xp.asarray(np.exp(np.array([-1e-5 + 0.1j, -0.5 + 0j])))
    b_bar = xp.ones((2, 3), dtype=xp.complex128)
    message = "The reduced S5 layer has Re(Lambda) > -1e-4, which `clip_eigs` would change."
    with pytest.raises(StabilityError, match=re.escape(message)):
        inverse_zoh(poles, b_bar, 1.0, clip_eigs=True)
    a, _ = inverse_zoh(poles, b_bar, 1.0)  # without clip_eigs the pole is representable
    np.testing.assert_allclose(to_np(a), [-1e-5 + 0.1j, -0.5], rtol=1e-9)
    a, _ = inverse_zoh(poles, b_bar, 0.01, clip_eigs=True)  # Re(a) = -1e-3 with a smaller step
    np.testing.assert_allclose(to_np(a), [-1e-3 + 10j, -50], rtol=1e-9)


# --- tracing and examples --------------------------------------------------------------------


def test_forward_maps_trace_under_jax_jit() -> None:
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    nu_log, theta_log, gamma_log = (
        jnp.asarray(p) for p in _lru_parameters(np.random.default_rng(7), 4)
    )
    poles, gamma = jax.jit(lru_to_poles)(nu_log, theta_log, gamma_log)
    np.testing.assert_allclose(
        np.asarray(poles), np.asarray(lru_to_poles(nu_log, theta_log, gamma_log)[0])
    )
    a = jnp.asarray([-0.5 + 1j, -2.0 + 0j])
    b = jnp.ones((2, 3), dtype=jnp.complex128)
    got = jax.jit(zoh)(a, b, jnp.asarray([0.1, 0.2]))
    want = zoh(np.asarray(a), np.asarray(b), np.asarray([0.1, 0.2]))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-15)
    np.testing.assert_allclose(np.asarray(gamma), np.exp(np.asarray(gamma_log)))


def test_docstring_examples() -> None:
    failures, tried = doctest.testmod(parameterizations, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert tried > 0
    assert failures == 0
