"""select_rank, hankel_error_bound and rediagonalize."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from compressm_core import (
    ConditioningError,
    DiagonalStateSpace,
    StabilityError,
    StateSpace,
    balanced_truncation,
    frequency_response,
    hankel_error_bound,
    hankel_singular_values,
    rediagonalize,
    select_rank,
    select_ranks,
)
from compressm_core.errors import ShapeError
from compressm_core.rank import shared_rank_hsv
from tests._helpers import Spec, assert_rel, backend_settings, build, markov, specs, to_np, to_xp

hsv_lists = st.lists(st.floats(0, 1e3), min_size=1, max_size=40).map(
    lambda v: np.sort(np.asarray(v))[::-1]
)


@given(hsv_lists, st.floats(0, 0.999))
def test_select_rank_is_the_smallest_rank_keeping_the_energy(hsv: np.ndarray, tau: float) -> None:
    for energy, e in (("sum", hsv), ("squared", hsv**2)):
        r = select_rank(hsv, tau=tau, energy=energy)
        assert isinstance(r, int)
        assert 1 <= r <= hsv.size
        total = e.sum()
        if total == 0:
            assert r == 1
            continue
        kept = np.cumsum(e)
        assert kept[r - 1] >= (1 - tau) * kept[-1]
        if r > 1:
            assert kept[r - 2] < (1 - tau) * kept[-1]


def test_select_rank_paper_rule_differs_from_squared() -> None:
    hsv = np.array([8.0, 4.0, 2.0, 1.0, 1.0])
    assert select_rank(hsv, tau=0.2) == 3  # 14/16 >= 0.8
    assert select_rank(hsv, tau=0.2, energy="squared") == 2  # 80/86 >= 0.8


def test_select_rank_monotone_in_tau(xp) -> None:
    hsv = xp.asarray(np.geomspace(1, 1e-6, 30))
    ranks = [select_rank(hsv, tau=t) for t in (0.0, 0.01, 0.05, 0.1, 0.5, 0.9)]
    assert ranks == sorted(ranks, reverse=True)
    assert ranks[0] == 30


def test_shared_rank_hsv_bounds_every_members_truncation(xp) -> None:
    """The per-index maximum of a batch's HSVs: descending, and its bound (2 * tail(p) plus the
    round-off term at p_1) bounds every member's balanced-truncation bound, so it bounds the
    batch's H-infinity error."""
    rng = np.random.default_rng(0)
    poles = rng.uniform(0.1, 0.95, size=(4, 6)) * np.exp(1j * rng.uniform(-3, 3, size=(4, 6)))
    sys = DiagonalStateSpace(
        poles, rng.normal(size=(4, 6, 1)) + 0j, rng.normal(size=(4, 1, 6)) + 0j
    )
    hsv = to_np(hankel_singular_values(to_xp(sys, xp)))
    profile = to_np(shared_rank_hsv(xp.asarray(hsv)))
    np.testing.assert_array_equal(profile, hsv.max(axis=0))
    assert np.all(np.diff(profile) <= 0)
    for rank in range(1, 6):
        bound = np.asarray(balanced_truncation(sys, rank).error_bound)
        shared = float(hankel_error_bound(profile, rank))
        assert np.all(bound <= shared * (1 + 1e-12))
        assert shared <= 2 * profile[rank:].sum() + 1e-12 * profile[0]  # the tail dominates
    np.testing.assert_array_equal(to_np(shared_rank_hsv(xp.asarray(hsv[1]))), hsv[1])
    with pytest.raises(ShapeError, match=r"`hsv` must have shape \(\.\.\., n\)"):
        shared_rank_hsv(xp.asarray(1.0))


@pytest.mark.parametrize("tau", [-0.1, 1.0, 1.5, float("nan"), True, np.bool_(False), "0.1"])
def test_select_rank_rejects_tau(tau: float) -> None:
    with pytest.raises(ValueError, match=r"`tau` must be a number in \[0, 1\)"):
        select_rank(np.ones(3), tau=tau)


def test_select_rank_rejects_bad_hsv() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        select_rank(np.array([1.0, -1.0]), tau=0.1)
    with pytest.raises(ValueError, match="1-D"):
        select_rank(np.ones((2, 2)), tau=0.1)
    with pytest.raises(ValueError, match="`energy` must be"):
        select_rank(np.ones(2), tau=0.1, energy="cubed")  # type: ignore[arg-type]


@given(st.lists(hsv_lists, min_size=1, max_size=6), st.floats(0, 0.999))
def test_select_ranks_is_select_rank_of_every_row(rows: list[np.ndarray], tau: float) -> None:
    n = min(r.size for r in rows)
    batch = np.stack([r[:n] for r in rows])
    ranks = select_ranks(batch, tau=tau)
    assert ranks.shape == (len(rows),)
    assert ranks.tolist() == [select_rank(r, tau=tau) for r in batch]
    cube = select_ranks(np.stack([batch, batch[::-1]]), tau=tau, energy="squared")
    assert cube.shape == (2, len(rows))
    assert cube[1].tolist() == [select_rank(r, tau=tau, energy="squared") for r in batch[::-1]]


def test_select_ranks_on_any_backend_and_its_errors(xp) -> None:
    hsv = xp.asarray([[4.0, 3.0, 2.0, 1.0], [9.0, 0.5, 0.3, 0.2]])
    np.testing.assert_array_equal(select_ranks(hsv, tau=0.3), [2, 1])
    with pytest.raises(ShapeError, match="non-empty last axis"):
        select_ranks(xp.asarray(1.0), tau=0.1)
    with pytest.raises(ShapeError, match="select_ranks"):
        select_rank(hsv, tau=0.1)  # the 1-D function points to the batched one


def test_hankel_error_bound(xp) -> None:
    hsv = xp.asarray([[4.0, 2.0, 1.0], [3.0, 0.5, 0.25]])
    roundoff = 10 * 3 * np.finfo(to_np(hsv).dtype).eps * np.array([4.0, 3.0])  # c n eps sigma_1
    assert_rel(hankel_error_bound(hsv, 1), np.array([6.0, 1.5]) + roundoff, 1e-7)
    assert_rel(hankel_error_bound(hsv, 3), roundoff, 1e-6)
    with pytest.raises(ValueError, match=r"`rank` must be in \[0, 3\]"):
        hankel_error_bound(hsv, 4)


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
        assert_rel(
            frequency_response(diag, omega, real_output=True),
            frequency_response(reduced, omega),
            1e-7,
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
