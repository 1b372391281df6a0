"""The ``sysid`` task: identify a fixed linear MIMO system from its input-output data.

The ground truth is a stable real system of order 6 with 2 inputs and 2 outputs, drawn once
from a fixed seed: three pairs of complex poles with moduli spread over ``(0.5, 0.95)`` and
phases over ``(0.2, pi - 0.2)``, each pair with the same H2 norm, rotated by a random orthogonal
basis change and scaled so that every output has unit steady-state variance under unit white
noise. Inputs are white Gaussian noise; targets are the outputs of

.. math::

    x_k = A x_{k-1} + B u_k, \\qquad y_k = C x_k + D u_k, \\qquad x_0 = 0,

without noise. The truth (HSVs, poles, the error of each balanced truncation) travels with the
task, so a report can say how close a reduced model came to the true order.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from numpy.typing import NDArray

from compressm_core import (
    StateSpace,
    balanced_truncation,
    controllability_gramian,
    h2_norm,
    hankel_singular_values,
    pole_order,
)

__all__ = ["SYSID_OUTPUTS", "SYSID_SEEDS", "sysid_arrays"]

# The system-identification ground truth: fixed, whatever the ``seed`` of `load_task`.
_SYSID_SYSTEM_SEED = 167
_SYSID_DATA_SEED = 2024
_SYSID_ORDER = 6
_SYSID_INPUTS = 2
SYSID_OUTPUTS = 2
_SYSID_LENGTH = 64
_SYSID_TRAIN = 4000
_SYSID_TEST = 1000
_SYSID_MODULI = (0.5, 0.95)
_SYSID_PHASES = (0.2, np.pi - 0.2)
SYSID_SEEDS = (_SYSID_SYSTEM_SEED, _SYSID_DATA_SEED)
"""The seeds of the system and of the data (fixed, whatever the ``seed`` of ``load_task``)."""


def _rotation(modulus: float, phase: float) -> NDArray[np.float64]:
    cos, sin = np.cos(phase), np.sin(phase)
    return modulus * np.array([[cos, -sin], [sin, cos]])


def _sysid_system() -> tuple[NDArray[np.float64], ...]:
    """The fixed ground-truth system ``(A, B, C, D)``; see :func:`load_task`."""
    rng = np.random.default_rng(_SYSID_SYSTEM_SEED)
    n, m, p = _SYSID_ORDER, _SYSID_INPUTS, SYSID_OUTPUTS
    pairs = n // 2
    moduli_edges = np.linspace(*_SYSID_MODULI, pairs + 1)
    moduli = rng.uniform(moduli_edges[:-1], moduli_edges[1:])
    phase_edges = np.linspace(*_SYSID_PHASES, pairs + 1)
    phases = rng.permutation(rng.uniform(phase_edges[:-1], phase_edges[1:]))
    a = np.zeros((n, n))
    b = rng.standard_normal((n, m))
    c = rng.standard_normal((p, n))
    for i in range(pairs):
        block = slice(2 * i, 2 * i + 2)
        a[block, block] = _rotation(float(moduli[i]), float(phases[i]))
        # every pair of modes gets the same H2 norm (split evenly between B and C)
        energy = float(np.asarray(h2_norm(StateSpace(a[block, block], b[block], c[:, block]))))
        b[block] /= energy**0.5
        c[:, block] /= energy**0.5
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a, b, c = q @ a @ q.T, q @ b, c @ q.T
    # unit steady-state variance of every output under unit white noise: diag(C P C^T) = 1
    gram = np.asarray(controllability_gramian(StateSpace(a, b, c)))
    c = c / np.sqrt(np.diag(c @ gram @ c.T))[:, None]
    return a, b, c, np.zeros((p, m))


def _simulate(
    a: NDArray[np.float64],
    b: NDArray[np.float64],
    c: NDArray[np.float64],
    d: NDArray[np.float64],
    u: NDArray[np.float64],
) -> NDArray[np.float64]:
    """Outputs of ``x_k = A x_{k-1} + B u_k, y_k = C x_k + D u_k`` from ``x_0 = 0``."""
    x = np.zeros((u.shape[0], a.shape[0]))
    y = np.empty((*u.shape[:2], c.shape[0]))
    for k in range(u.shape[1]):
        x = x @ a.T + u[:, k] @ b.T
        y[:, k] = x @ c.T + u[:, k] @ d.T
    return y


@functools.lru_cache(maxsize=1)
def sysid_arrays() -> tuple[
    NDArray[Any], NDArray[Any], NDArray[Any], NDArray[Any], dict[str, Any]
]:
    """Training inputs and outputs, test inputs and outputs, and the ground truth (system
    matrices, HSVs, poles, the test MSE of its balanced truncations to every order).

    The arrays are read-only and cached: every call returns the same ones."""
    a, b, c, d = _sysid_system()
    rng = np.random.default_rng(_SYSID_DATA_SEED)
    u = rng.standard_normal((_SYSID_TRAIN + _SYSID_TEST, _SYSID_LENGTH, _SYSID_INPUTS))
    y = _simulate(a, b, c, d, u)
    system = StateSpace(a, b, c, d)
    hsv = np.asarray(hankel_singular_values(system))
    poles = np.linalg.eigvals(a)
    poles = poles[np.asarray(pole_order(poles))]
    u_test, y_test = u[_SYSID_TRAIN:], y[_SYSID_TRAIN:]
    truncation_mse = []
    for r in range(1, _SYSID_ORDER + 1):
        red = balanced_truncation(system, r).system
        y_r = _simulate(np.asarray(red.a), np.asarray(red.b), np.asarray(red.c), d, u_test)
        truncation_mse.append(float(np.mean((y_r - y_test) ** 2)))
    truth = {
        "true_order": _SYSID_ORDER,
        "true_hsv": [float(s) for s in hsv],
        "poles": [[float(z.real), float(z.imag)] for z in poles],
        "pole_moduli": [float(abs(z)) for z in poles],
        "a": a.tolist(),
        "b": b.tolist(),
        "c": c.tolist(),
        "d": d.tolist(),
        "noise_std": 0.0,
        "nonlinearity": None,
        "target_variance": float(np.var(y_test)),
        "truncation_test_mse": truncation_mse,
    }
    for arr in (u, y):
        arr.setflags(write=False)
    return u[:_SYSID_TRAIN], y[:_SYSID_TRAIN], u_test, y_test, truth
