"""compressm_core.rank: the rank rules (select_rank, select_ranks, shared_rank_hsv) and
hankel_error_bound."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from compressm_core import (
    DiagonalStateSpace,
    balanced_truncation,
    hankel_error_bound,
    hankel_singular_values,
    select_rank,
    select_ranks,
)
from compressm_core.errors import ShapeError
from compressm_core.rank import shared_rank_hsv
from tests._helpers import assert_close, to_np, to_xp

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
    assert_close(
        hankel_error_bound(hsv, 1), np.array([6.0, 1.5]) + roundoff, 1e-7, xp=xp, dtype=hsv.dtype
    )
    assert_close(hankel_error_bound(hsv, 3), roundoff, 1e-6, xp=xp, dtype=hsv.dtype)
    with pytest.raises(ValueError, match=r"`rank` must be in \[0, 3\]"):
        hankel_error_bound(hsv, 4)
