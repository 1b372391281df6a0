"""pole_order and tolerant_argsort: orderings that rounding noise cannot change."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from compressm_core import (
    StateSpace,
    pole_order,
    rediagonalize,
    select_state_indices,
    tolerant_argsort,
)
from tests._helpers import markov, to_np, to_xp

# equal-modulus conjugate pairs, a repeated pair, repeated and opposite real poles
SPECTRA = {
    "conjugate_pairs": [0.9, 0.5j, -0.5j, 0.5, -0.5, 0.3 + 0.4j, 0.3 - 0.4j, 0.2],
    "repeated": [0.7, 0.7, 0.6j, -0.6j, 0.6j, -0.6j, -0.6, 0.1],
}


def _rule_holds(poles: np.ndarray, tol: float = 1e-9) -> None:
    """Modulus descending; ties by imaginary part descending, then real part descending."""
    for p, q in itertools.pairwise(poles):
        key_p = (-abs(p), -p.imag, -p.real)
        key_q = (-abs(q), -q.imag, -q.real)
        for a, b in zip(key_p, key_q, strict=True):
            if abs(a - b) > tol:
                assert a < b, (poles, p, q)
                break


def _expected(poles: list[complex]) -> np.ndarray:
    """The rule applied to the exact poles (Python's sort on exact keys)."""
    return np.asarray(sorted(poles, key=lambda p: (-abs(p), -p.imag, -p.real)), dtype=complex)


@pytest.mark.parametrize("name", sorted(SPECTRA))
@pytest.mark.parametrize("seed", range(6))
def test_rediagonalize_order_is_a_property_of_the_system(xp, name: str, seed: int) -> None:
    poles = np.asarray(SPECTRA[name], dtype=complex)
    n = poles.size
    rng = np.random.default_rng(seed)
    v = np.eye(n) + 0.3 * rng.normal(size=(n, n)) / np.sqrt(n)
    b, c = rng.normal(size=(n, 2)), rng.normal(size=(1, n))
    expected = _expected(list(poles))
    results = []
    for scale in (0.0, 1e-15, -1e-15):
        jitter = 1 + scale * rng.uniform(0.5, 1.0, size=n)  # relative perturbation of each pole
        a = v @ np.diag(poles * jitter) @ np.linalg.inv(v)
        out = to_np(rediagonalize(to_xp(StateSpace(a, b, c), xp)))
        _rule_holds(out.poles)
        np.testing.assert_allclose(out.poles, expected, atol=1e-10)
        results.append(out)
    # the perturbations change neither the order nor the input-output map; with distinct poles
    # the modes themselves (scaling and phase of each b_i) are the same too
    for other in results[1:]:
        np.testing.assert_allclose(other.poles, results[0].poles, atol=1e-10)
        np.testing.assert_allclose(markov(other, 6), markov(results[0], 6), atol=1e-8)
        if name == "conjugate_pairs":
            np.testing.assert_allclose(other.b, results[0].b, atol=1e-8)


def test_pole_order_breaks_rounding_ties_by_the_rule(xp) -> None:
    eps = np.finfo(float).eps
    poles = np.array([0.2, -0.5j * (1 + 3 * eps), 0.9, 0.5j, 0.5 * (1 - 2 * eps), -0.5])
    order = to_np(pole_order(xp.asarray(poles)))
    assert order.tolist() == [2, 3, 4, 5, 1, 0]
    # batched: each member ordered on its own
    both = np.stack([poles, poles[::-1]])
    order2 = to_np(pole_order(xp.asarray(both)))
    assert order2[0].tolist() == [2, 3, 4, 5, 1, 0]
    np.testing.assert_array_equal(both[1][order2[1]], poles[order])


def test_pole_order_real_poles_and_distinct_moduli(xp) -> None:
    poles = np.array([0.1, -0.8, 0.8, 0.3])
    assert to_np(pole_order(xp.asarray(poles))).tolist() == [2, 1, 3, 0]
    # a genuine difference larger than the tolerance is respected
    close = np.array([0.5, 0.5 + 1e-9])
    assert to_np(pole_order(xp.asarray(close))).tolist() == [1, 0]


def test_tolerant_argsort_is_stable_lexicographic(xp) -> None:
    k1 = np.array([1.0, 0.0, 1.0 + 1e-17, 0.0, 2.0])
    k2 = np.array([5.0, 1.0, 4.0, 1.0, 0.0])
    got = to_np(tolerant_argsort([xp.asarray(k1), xp.asarray(k2)], tol=1e-12))
    assert got.tolist() == [1, 3, 2, 0, 4]
    with pytest.raises(ValueError, match="`keys` must hold at least one array"):
        tolerant_argsort([], tol=1e-12)


def test_select_state_indices_ignores_rounding_noise(xp) -> None:
    eps = np.finfo(float).eps
    base = np.array([1.0, 3.0, 3.0, 2.0, 3.0])
    for noise in (np.zeros(5), np.array([0, 4, -4, 0, 2]) * eps):
        idx = to_np(select_state_indices(xp.asarray(base * (1 + noise)), 2))
        assert idx.tolist() == [1, 2]  # ties go to the lower index, whatever the noise
