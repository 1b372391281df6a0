"""compressm_core.layer_batches: a stack of layer systems measured and truncated in batched calls
agrees with the one-system functions (HSVs, Gramian factors, reduced systems, bounds)."""

from __future__ import annotations

import numpy as np
import pytest

import compressm_core.layer_batches as layer_batches
from compressm_core import (
    DiagonalStateSpace,
    ShapeError,
    StabilityError,
    controllability_gramian,
    hankel_singular_values,
    observability_gramian,
)
from compressm_core.layer_batches import measure_layers, plan_layers
from compressm_core.rank import shared_rank_hsv
from compressm_core.reduction import plan_reduction
from tests._helpers import assert_doctests, assert_rel, herm, to_np, to_xp


def _layers(seed: int, k: int, n: int = 6, h: int = 3, channels: int | None = None) -> list:
    """``k`` random stable complex diagonal systems (LRU-like; S4D-like SISO channels)."""
    rng = np.random.default_rng(seed)
    lead = () if channels is None else (channels,)
    m = p = 1 if channels is not None else h
    out = []
    for _ in range(k):
        poles = rng.uniform(0.2, 0.95, (*lead, n)) * np.exp(1j * rng.uniform(0, 3, (*lead, n)))
        b = rng.normal(size=(*lead, n, m)) + 1j * rng.normal(size=(*lead, n, m))
        c = rng.normal(size=(*lead, p, n)) + 1j * rng.normal(size=(*lead, p, n))
        out.append(DiagonalStateSpace(poles, b, c, rng.normal(size=(*lead, p, m))))
    return out


@pytest.mark.parametrize("real_output", [False, True])
@pytest.mark.parametrize("horizon", [None, 12])
def test_measured_stack_equals_each_member(xp, real_output, horizon):
    systems = _layers(0, 3)
    measured = measure_layers(
        [to_xp(s, xp) for s in systems], horizon=horizon, real_output=real_output
    )
    n = 2 * 6 if real_output else 6
    assert measured.hsv.shape == (3, n)
    assert isinstance(measured.hsv, np.ndarray)
    for i, sys in enumerate(systems):
        alone = to_np(hankel_singular_values(sys, horizon=horizon, real_output=real_output))
        assert_rel(measured.hsv[i], alone, 1e-10)
        assert_rel(measured.profile(i), alone, 1e-10)
        # the defining equations of the factors: Lc Lc^H = P, Lo Lo^H = Q
        lc, lo = to_np(measured.controllability)[i], to_np(measured.observability)[i]
        kw = {"horizon": horizon, "real_output": real_output}
        assert_rel(lc @ herm(lc), to_np(controllability_gramian(sys, **kw)), 1e-10)
        assert_rel(lo @ herm(lo), to_np(observability_gramian(sys, **kw)), 1e-10)
        # and the singular values of Lo^H Lc are the HSVs
        u, s, vh = (to_np(x)[i] for x in measured.svd)
        assert_rel(u @ np.diag(s) @ vh, herm(lo) @ lc, 1e-10)


def test_layers_made_of_channels_keep_their_own_profile():
    systems = _layers(1, 2, channels=4)
    measured = measure_layers(systems)
    assert measured.hsv.shape == (2, 4, 6)
    for i, sys in enumerate(systems):
        assert_rel(measured.profile(i), shared_rank_hsv(hankel_singular_values(sys)), 1e-10)


BACKENDS = ["numpy", "torch"]


def _backend(name: str):
    if name == "torch":
        torch = pytest.importorskip("torch")
        from array_api_compat import array_namespace

        return array_namespace(torch.zeros(1))
    return np


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["sqrt", "bfsr"])
@pytest.mark.parametrize("channels", [None, 3])
@pytest.mark.parametrize("vectors", [True, False])
def test_batched_truncation_equals_plan_reduction(backend, method, channels, vectors):
    xp = _backend(backend)
    systems = [to_xp(s, xp) for s in _layers(2, 4, channels=channels)]
    measured = measure_layers(systems, vectors=vectors)
    assert (measured.svd is None) == (not vectors)
    members, rank = [3, 0, 2], 3
    plans = plan_layers(measured, members, rank, method=method)
    assert len(plans) == len(members)
    for member, plan in zip(members, plans, strict=True):
        alone = plan_reduction(systems[member], rank, method=method)
        assert plan.indices is None
        assert plan.bound == pytest.approx(alone.bound, rel=1e-9)
        for got, want in zip(plan.system, alone.system, strict=True):
            assert got.shape == want.shape
            assert_rel(got, want, 1e-7)


def test_batched_real_output_truncation_equals_plan_reduction():
    # members with the same pole pattern (inputs scaled), so every member keeps as many pairs
    base = _layers(3, 1)[0]
    systems = [base._replace(b=base.b * scale) for scale in (1.0, 0.5, 2.0)]
    measured = measure_layers(systems, real_output=True)
    plans = plan_layers(measured, [0, 1, 2], 4)
    for sys, plan in zip(systems, plans, strict=True):
        alone = plan_reduction(sys, 4, real_output=True)
        assert plan.bound == pytest.approx(alone.bound, rel=1e-9)
        for got, want in zip(plan.system, alone.system, strict=True):
            assert_rel(got, want, 1e-7)


def test_bad_input_names_the_argument():
    systems = _layers(4, 2)
    with pytest.raises(ShapeError, match="`systems` must hold at least one"):
        measure_layers([])
    with pytest.raises(ShapeError, match="`systems` must all have the same field shapes"):
        measure_layers([systems[0], _layers(5, 1, n=4)[0]])
    unstable = systems[1]._replace(poles=systems[1].poles * 2)
    with pytest.raises(StabilityError):
        measure_layers([systems[0], unstable])
    measured = measure_layers(systems)
    with pytest.raises(ValueError, match=r"`members` must be positions in \[0, 2\)"):
        plan_layers(measured, [2], 3)
    with pytest.raises(ValueError, match="`members`"):
        plan_layers(measured, [], 3)
    with pytest.raises(ValueError, match="rank"):
        plan_layers(measured, [0], 7)
    with pytest.raises(ValueError, match="`method`"):
        plan_layers(measured, [0], 3, method="qr")


def test_docstring_examples(monkeypatch):
    assert_doctests(layer_batches, monkeypatch)
