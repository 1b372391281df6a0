"""compressm_core.importance: one score per state of a selective layer, and the states to keep."""

from __future__ import annotations

import numpy as np
import pytest

from compressm_core import ShapeError, StabilityError, importance
from compressm_core.importance import select_state_indices, state_importance
from compressm_core.selective_statistics import selective_gramians
from tests._helpers import assert_close, assert_doctests, selective_inputs, to_np


def test_state_importance_rules(xp) -> None:
    g = selective_gramians(*selective_inputs(xp))
    s = to_np(g.scores)
    assert_close(state_importance(g), s.sum(0), 1e-14, xp=xp)
    assert_close(state_importance(g, aggregate="energy"), np.sqrt((s**2).sum(0)), 1e-14, xp=xp)
    normalized = (s / s.sum(-1, keepdims=True)).sum(0)
    assert_close(state_importance(g, aggregate="normalized"), normalized, 1e-14, xp=xp)
    grouped = state_importance(g, groups=2)
    assert tuple(grouped.shape) == (2, 6)
    assert_close(grouped, s.reshape(2, 2, 6).sum(1), 1e-14, xp=xp)
    poles, b, c = (to_np(x) for x in g.surrogate[:3])
    modal = np.abs(b[..., 0] * c[:, 0, :]) / (1 - poles**2)
    assert_close(state_importance(g, method="mean_lti"), modal.sum(0), 1e-12, xp=xp)
    for method in ("gramian", "mean_lti"):
        first = to_np(state_importance(g, method=method))
        assert np.array_equal(first, to_np(state_importance(g, method=method)))
        assert np.all(first >= 0)


def test_random_importance_is_seeded(xp) -> None:
    g = selective_gramians(*selective_inputs(xp))
    r0 = to_np(state_importance(g, method="random", seed=0))
    assert r0.shape == (6,)
    assert np.array_equal(r0, to_np(state_importance(g, method="random", seed=0)))
    assert not np.array_equal(r0, to_np(state_importance(g, method="random", seed=1)))
    assert np.all((r0 >= 0) & (r0 < 1))
    assert tuple(state_importance(g, method="random", groups=4).shape) == (4, 6)


def test_select_state_indices(xp) -> None:
    importance = xp.asarray([0.5, 3.0, 1.0, 3.0, 0.0])
    idx = select_state_indices(importance, 3)
    assert to_np(idx).tolist() == [1, 2, 3]
    assert to_np(select_state_indices(importance, 1)).tolist() == [1]  # ties: lower index
    grouped = select_state_indices(xp.asarray([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]), 2)
    assert to_np(grouped).tolist() == [[1, 2], [0, 1]]
    with pytest.raises(ValueError, match=r"`rank` must be in \[1, 5\]; received 6"):
        select_state_indices(importance, 6)
    with pytest.raises(ShapeError, match="`importance` must have shape"):
        select_state_indices(xp.asarray(1.0), 1)


def test_importance_errors(xp) -> None:
    dt, a, b, c = selective_inputs(xp)
    g = selective_gramians(dt, a, b, c)
    with pytest.raises(ValueError, match="`method` must be 'gramian', 'mean_lti' or 'random'"):
        state_importance(g, method="hsv")
    with pytest.raises(ValueError, match="`aggregate` must be"):
        state_importance(g, aggregate="max")
    with pytest.raises(ValueError, match="`groups` must divide"):
        state_importance(g, groups=3)
    with pytest.raises(TypeError, match="`gramians` must be a SelectiveGramians"):
        state_importance(g.scores)
    unstable = g._replace(surrogate=g.surrogate._replace(poles=g.surrogate.poles + 1))
    with pytest.raises(StabilityError, match="`gramians.surrogate.poles` must be Schur stable"):
        state_importance(unstable, method="mean_lti")


def test_jit_equals_eager() -> None:
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    g = selective_gramians(*selective_inputs(jnp, groups=2, steps=6))
    imp = jax.jit(lambda g: state_importance(g, method="mean_lti"))(g)
    assert_close(imp, state_importance(g, method="mean_lti"), 1e-13)


def test_device_is_preserved() -> None:
    xps = pytest.importorskip("array_api_strict")
    dev = xps.Device("device1")
    dt, a, b, c = (xps.asarray(to_np(x), device=dev) for x in selective_inputs(np))
    g = selective_gramians(dt, a, b, c)
    assert state_importance(g, method="random").device == dev
    assert state_importance(g, method="mean_lti").device == dev
    assert select_state_indices(state_importance(g), 2).device == dev


def test_docstring_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    assert_doctests(importance, monkeypatch)
