"""Time-varying Gramians, the selective (Mamba) fast path, state importance and streaming."""

from __future__ import annotations

import doctest

import array_api_compat
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import compressm_core
from compressm_core import (
    DiagonalStateSpace,
    ShapeError,
    StabilityError,
    controllability_gramian,
    hankel_singular_values,
    importance,
    observability_gramian,
    selective_statistics,
    time_varying,
)
from compressm_core.selective import (
    SelectiveGramians,
    SelectiveStatistics,
    finalize_selective_statistics,
    init_selective_statistics,
    mean_lti_surrogate,
    merge_selective_statistics,
    select_state_indices,
    selective_gramians,
    state_importance,
    update_selective_statistics,
)
from compressm_core.time_varying import time_varying_gramians
from tests._helpers import (
    Spec,
    assert_rel,
    backend_settings,
    build,
    dense_np,
    specs,
    to_np,
    to_xp,
)


def _cases(xp) -> settings:
    return backend_settings(xp, jax_examples=1)


def _skip_jax(xp) -> None:
    if array_api_compat.is_jax_namespace(xp):
        pytest.skip("JAX compiles every new shape eagerly; covered by the other backends")


def _h(x: np.ndarray) -> np.ndarray:
    return np.conj(np.swapaxes(x, -1, -2))


def _sequences(spec: Spec, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``L`` different systems of one structure, stacked along the time axis."""
    systems = [build(spec._replace(seed=(spec.seed + 7919 * t) % 2**32)) for t in range(steps)]
    axis = -2 if spec.diagonal else -3
    a = np.stack([s[0] for s in systems], axis=axis)
    b = np.stack([s.b for s in systems], axis=-3)
    c = np.stack([s.c for s in systems], axis=-3)
    return a, b, c


def _dense_a(a: np.ndarray, diagonal: bool) -> np.ndarray:
    return a[..., None, :] * np.eye(a.shape[-1]) if diagonal else a


# --- generic time-varying Gramians -------------------------------------------------------------


def test_recursion_residuals(xp) -> None:
    @_cases(xp)
    @given(specs(max_n=5), st.integers(2, 9))
    def check(spec: Spec, steps: int) -> None:
        a, b, c = _sequences(spec, steps)
        tv = {}
        for key, sl in (("all", slice(None)), ("head", slice(None, -1)), ("tail", slice(1, None))):
            a_sl = a[..., sl, :] if spec.diagonal else a[..., sl, :, :]
            args = (to_xp(a_sl, xp), to_xp(b[..., sl, :, :], xp), to_xp(c[..., sl, :, :], xp))
            tv[key] = to_np(time_varying_gramians(*args, diagonal=spec.diagonal))
        ad = _dense_a(a, spec.diagonal)
        a_last, b_last = ad[..., -1, :, :], b[..., -1, :, :]
        p_rec = a_last @ tv["head"].controllability @ _h(a_last) + b_last @ _h(b_last)
        a_first, c_first = ad[..., 0, :, :], c[..., 0, :, :]
        q_rec = _h(a_first) @ tv["tail"].observability @ a_first + _h(c_first) @ c_first
        assert_rel(tv["all"].controllability, p_rec, 1e-10)
        assert_rel(tv["all"].observability, q_rec, 1e-10)

    check()


def test_constant_matrices_equal_time_limited_lti(xp) -> None:
    @_cases(xp)
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
        assert_rel(p, controllability_gramian(sys_xp, horizon=steps), 1e-10)
        assert_rel(q, observability_gramian(sys_xp, horizon=steps), 1e-10)

    check()


def test_constant_matrices_converge_to_lti(xp) -> None:
    _skip_jax(xp)
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
    @_cases(xp)
    @given(specs(diagonal=True, max_n=5), st.integers(1, 7))
    def check(spec: Spec, steps: int) -> None:
        a, b, c = _sequences(spec, steps)
        diag = time_varying_gramians(to_xp(a, xp), to_xp(b, xp), to_xp(c, xp), diagonal=True)
        dense = time_varying_gramians(
            to_xp(_dense_a(a, True), xp), to_xp(b, xp), to_xp(c, xp), diagonal=False
        )
        assert_rel(diag.controllability, dense.controllability, 1e-12)
        assert_rel(diag.observability, dense.observability, 1e-12)

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
    assert_rel(p, explicit.controllability, 1e-12)


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


# --- selective fast path -----------------------------------------------------------------------


@st.composite
def selective_layers(draw, *, max_batch=2, max_steps=6, max_channels=3, max_states=3):
    batch = draw(st.integers(1, max_batch))
    steps = draw(st.integers(1, max_steps))
    groups = draw(st.sampled_from([None, 1, 2]))
    channels = draw(st.integers(1, max_channels)) * (groups or 1)
    states = draw(st.integers(1, max_states))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    dt = rng.uniform(0.01, 1.0, size=(batch, steps, channels))
    a = -np.exp(rng.uniform(-1.0, 1.5, size=(channels, states)))
    bc_shape = (batch, steps, states) if groups is None else (batch, steps, groups, states)
    b, c = rng.normal(size=bc_shape), rng.normal(size=bc_shape)
    block = draw(st.one_of(st.none(), st.integers(1, steps + 1)))
    return dt, a, b, c, block


def _group_of(x: np.ndarray, channels: int) -> np.ndarray:
    """(batch, L, [G,] N) -> (batch, L, D, N)."""
    if x.ndim == 3:
        return np.broadcast_to(x[:, :, None, :], (*x.shape[:2], channels, x.shape[-1]))
    return np.repeat(x, channels // x.shape[2], axis=2)


def _naive(dt, a, b, c):
    """Per-mode Gramian diagonals by explicit sums of products (no recursion)."""
    _, steps, channels = dt.shape
    pole = np.exp(dt[..., None] * a)
    drive = dt[..., None] * _group_of(b, channels)
    out = _group_of(c, channels)
    p = np.zeros(pole.shape)
    q = np.zeros(pole.shape)
    for s in range(steps):
        for k in range(s + 1):
            phi = np.prod(pole[:, k + 1 : s + 1], axis=1)
            p[:, s] += phi**2 * drive[:, k] ** 2
        for t in range(s, steps):
            phi = np.prod(pole[:, s + 1 : t + 1], axis=1)
            q[:, s] += phi**2 * out[:, t] ** 2
    mean = lambda x: x.mean(axis=(0, 1))  # noqa: E731
    surrogate = (mean(pole), mean(drive), mean(out))
    return mean(p), mean(q), np.sqrt(mean(p * q)), surrogate


def test_selective_matches_naive_reference(xp) -> None:
    @_cases(xp)
    @given(selective_layers())
    def check(layer) -> None:
        dt, a, b, c, block = layer
        g = selective_gramians(*(to_xp(x, xp) for x in (dt, a, b, c)), time_block=block)
        p, q, scores, (poles, bbar, cbar) = _naive(dt, a, b, c)
        assert isinstance(g, SelectiveGramians)
        assert g.scores.dtype == xp.float64
        assert_rel(g.controllability, p, 1e-12)
        assert_rel(g.observability, q, 1e-12)
        assert_rel(g.scores, scores, 1e-12)
        assert_rel(g.surrogate.poles, poles, 1e-12)
        assert_rel(g.surrogate.b, bbar[..., None], 1e-12)
        assert_rel(g.surrogate.c, cbar[..., None, :], 1e-12)
        surrogate = mean_lti_surrogate(*(to_xp(x, xp) for x in (dt, a, b, c)), time_block=block)
        for got, want in zip(surrogate[:3], g.surrogate[:3], strict=True):
            assert_rel(got, want, 1e-14)

    check()


def test_selective_matches_generic_recursion() -> None:
    """Each mode's p_s, q_s are diagonals of the full N x N LTV Gramians of its channel."""
    rng = np.random.default_rng(4)
    steps, channels, states = 5, 2, 3
    dt = rng.uniform(0.05, 0.8, size=(1, steps, channels))
    a = -np.exp(rng.uniform(-1, 1, size=(channels, states)))
    b, c = rng.normal(size=(1, steps, states)), rng.normal(size=(1, steps, states))
    energy = np.zeros((channels, states))
    for d in range(channels):
        poles = np.exp(dt[0, :, d, None] * a[d])  # (L, N)
        drive = (dt[0, :, d, None] * b[0])[..., None]  # (L, N, 1)
        out = c[0][:, None, :]  # (L, 1, N)
        for s in range(steps):
            p_s = time_varying_gramians(
                poles[: s + 1], drive[: s + 1], out[: s + 1], diagonal=True
            )[0]
            # state h_s observed from step s on: x_0 = h_s, A_t = a_{s+1+t}, C_t = c_{s+t}
            a_tail = np.concatenate([poles[s + 1 :], np.ones((1, states))])
            q_s = time_varying_gramians(a_tail, drive[s:], out[s:], diagonal=True)[1]
            energy[d] += np.diagonal(p_s) * np.diagonal(q_s) / steps
    g = selective_gramians(dt, a, b, c)
    assert_rel(g.scores, np.sqrt(energy), 1e-12)


def test_constant_parameters_closed_form_and_lti_limit(xp) -> None:
    _skip_jax(xp)
    step, steps = 0.2, 300
    a = -np.array([[0.5, 2.0, 8.0], [1.0, 3.0, 0.3]])
    b_vec, c_vec = np.array([1.0, -0.5, 2.0]), np.array([0.3, 1.0, -1.0])
    dt = np.full((1, steps, 2), step)
    b = np.tile(b_vec, (1, steps, 1))
    c = np.tile(c_vec, (1, steps, 1))
    g = selective_gramians(*(to_xp(x, xp) for x in (dt, a, b, c)))
    lam2 = np.exp(2 * step * a)
    s = np.arange(steps)[:, None, None]
    p = (step * b_vec) ** 2 * (1 - lam2 ** (s + 1)) / (1 - lam2)
    q = c_vec**2 * (1 - lam2 ** (steps - s)) / (1 - lam2)
    assert_rel(g.controllability, p.mean(0), 1e-12)
    assert_rel(g.observability, q.mean(0), 1e-12)
    assert_rel(g.scores, np.sqrt((p * q).mean(0)), 1e-12)
    # long sequences: the score of each mode tends to its LTI Hankel singular value
    modes = DiagonalStateSpace(
        to_xp(np.exp(step * a)[..., None], xp),
        to_xp((step * b_vec)[None, :, None, None] * np.ones((2, 3, 1, 1)), xp),
        to_xp(c_vec[None, :, None, None] * np.ones((2, 3, 1, 1)), xp),
    )
    hsv = to_np(hankel_singular_values(modes))[..., 0]
    assert_rel(g.scores, hsv, 0.1)


def test_mean_lti_surrogate_by_hand(xp) -> None:
    dt = np.array([[[0.1, 0.5], [0.3, 0.2]], [[0.2, 0.1], [0.4, 0.6]]])  # (2, 2, 2)
    a = -np.array([[1.0, 2.0, 4.0], [0.5, 1.5, 3.0]])
    rng = np.random.default_rng(2)
    b, c = rng.normal(size=(2, 2, 3)), rng.normal(size=(2, 2, 3))
    sys = mean_lti_surrogate(*(to_xp(x, xp) for x in (dt, a, b, c)))
    poles = np.zeros((2, 3))
    bbar = np.zeros((2, 3))
    for i in range(2):
        for t in range(2):
            poles += np.exp(dt[i, t][:, None] * a) / 4
            bbar += dt[i, t][:, None] * b[i, t] / 4
    cbar = c.mean(axis=(0, 1))
    assert_rel(sys.poles, poles, 1e-14)
    assert_rel(sys.b, bbar[..., None], 1e-14)
    assert_rel(sys.c, np.broadcast_to(cbar, (2, 1, 3)), 1e-14)
    assert sys.d is None
    hsv = hankel_singular_values(sys)
    assert tuple(hsv.shape) == (2, 3)
    one = DiagonalStateSpace(sys.poles[:, :1], sys.b[:, :1, :], sys.c[:, :, :1])
    by_hand = np.abs(bbar[:, 0] * cbar[0]) / (1 - poles[:, 0] ** 2)
    assert_rel(hankel_singular_values(one)[:, 0], by_hand, 1e-12)


# --- state importance --------------------------------------------------------------------------


def _layer(xp, *, groups=None, seed=0, batch=3, steps=5, channels=4, states=6):
    rng = np.random.default_rng(seed)
    dt = rng.uniform(0.01, 1.0, size=(batch, steps, channels))
    a = -np.exp(rng.uniform(-1.0, 1.5, size=(channels, states)))
    shape = (batch, steps, states) if groups is None else (batch, steps, groups, states)
    return tuple(to_xp(x, xp) for x in (dt, a, rng.normal(size=shape), rng.normal(size=shape)))


def test_state_importance_rules(xp) -> None:
    g = selective_gramians(*_layer(xp))
    s = to_np(g.scores)
    assert_rel(state_importance(g), s.sum(0), 1e-14)
    assert_rel(state_importance(g, aggregate="energy"), np.sqrt((s**2).sum(0)), 1e-14)
    normalized = (s / s.sum(-1, keepdims=True)).sum(0)
    assert_rel(state_importance(g, aggregate="normalized"), normalized, 1e-14)
    grouped = state_importance(g, groups=2)
    assert tuple(grouped.shape) == (2, 6)
    assert_rel(grouped, s.reshape(2, 2, 6).sum(1), 1e-14)
    poles, b, c = (to_np(x) for x in g.surrogate[:3])
    modal = np.abs(b[..., 0] * c[:, 0, :]) / (1 - poles**2)
    assert_rel(state_importance(g, method="mean_lti"), modal.sum(0), 1e-12)
    for method in ("gramian", "mean_lti"):
        first = to_np(state_importance(g, method=method))
        assert np.array_equal(first, to_np(state_importance(g, method=method)))
        assert np.all(first >= 0)


def test_random_importance_is_seeded(xp) -> None:
    g = selective_gramians(*_layer(xp))
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


# --- streaming ---------------------------------------------------------------------------------


def _assert_stats_close(first: SelectiveStatistics, second: SelectiveStatistics) -> None:
    for x, y in zip(first, second, strict=True):
        assert_rel(x, y, 1e-13)


def test_streaming_equals_one_pass(xp) -> None:
    dt, a, b, c = _layer(xp, groups=2, batch=5, steps=7)
    one_pass = update_selective_statistics(init_selective_statistics(a), dt, a, b, c)
    parts = [slice(0, 2), slice(2, 3), slice(3, 5)]
    stream = init_selective_statistics(a)
    shards = []
    for sl in parts:
        stream = update_selective_statistics(stream, dt[sl, ...], a, b[sl, ...], c[sl, ...])
        shards.append(
            update_selective_statistics(
                init_selective_statistics(a), dt[sl, ...], a, b[sl, ...], c[sl, ...]
            )
        )
    _assert_stats_close(stream, one_pass)
    left = merge_selective_statistics(merge_selective_statistics(shards[0], shards[1]), shards[2])
    right = merge_selective_statistics(shards[0], merge_selective_statistics(shards[1], shards[2]))
    _assert_stats_close(left, one_pass)
    _assert_stats_close(right, one_pass)
    assert float(one_pass.count) == 35
    final = finalize_selective_statistics(stream)
    direct = selective_gramians(dt, a, b, c, time_block=3)
    for got, want in zip(final[:3], direct[:3], strict=True):
        assert_rel(got, want, 1e-13)


def test_low_precision_inputs_accumulate_in_float64() -> None:
    """float32 activations: float32 recursions, sums folded into the float64 accumulator."""
    torch = pytest.importorskip("torch")
    dt, a, b, c = (np.asarray(x, dtype=np.float32) for x in _layer(np))
    stats = update_selective_statistics(
        init_selective_statistics(torch.asarray(a, dtype=torch.float64)),
        *(torch.asarray(x) for x in (dt, a, b, c)),
    )
    assert stats.energy.dtype == torch.float64
    # the same float32 values in float64 throughout
    reference = selective_gramians(*(x.astype(np.float64) for x in (dt, a, b, c)))
    got = finalize_selective_statistics(stats)
    for field in ("controllability", "observability", "scores"):
        assert_rel(getattr(got, field), getattr(reference, field), 1e-6)
    # the means need no recursion and are summed in float64
    assert_rel(got.surrogate.b, reference.surrogate.b, 1e-12)
    assert_rel(got.surrogate.c, reference.surrogate.c, 1e-12)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_float32_recursions_on_long_sequences(backend: str) -> None:
    """Slow modes (a_t close to 1) over 4096 steps: the float32 recursions stay within 1e-4
    of float64, since every recursion is a contraction with non-negative terms."""
    rng = np.random.default_rng(3)
    batch, steps, channels, states = 2, 4096, 3, 8
    dt = rng.uniform(1e-4, 2e-2, size=(batch, steps, channels))
    a = -np.exp(rng.uniform(-2.0, 2.0, size=(channels, states)))
    b, c = rng.normal(size=(2, batch, steps, states))
    inputs = [x.astype(np.float32) for x in (dt, a, b, c)]
    exact = selective_gramians(*(x.astype(np.float64) for x in inputs))
    if backend == "torch":
        torch = pytest.importorskip("torch")
        inputs = [torch.asarray(x) for x in inputs]
        acc = init_selective_statistics(torch.asarray(a))
    else:
        acc = init_selective_statistics(a)
    got = finalize_selective_statistics(update_selective_statistics(acc, *inputs))
    assert got.scores.dtype == acc.count.dtype
    for field in ("controllability", "observability", "scores"):
        assert_rel(getattr(got, field), getattr(exact, field), 1e-4)


# --- errors ------------------------------------------------------------------------------------


def test_selective_errors(xp) -> None:
    dt, a, b, c = _layer(xp)
    with pytest.raises(ShapeError, match=r"`a` must have shape \(D, N\)"):
        selective_gramians(dt, a[0, :], b, c)
    with pytest.raises(
        ShapeError, match=r"`dt` must have shape \(batch, L, D\) = \(batch, L, 4\)"
    ):
        selective_gramians(dt[..., :3], a, b, c)
    with pytest.raises(ShapeError, match="`b` must have shape"):
        selective_gramians(dt, a, b[..., :5], c)
    with pytest.raises(ShapeError, match="`b` must have shape"):
        selective_gramians(dt, a, b[:, :4, :], c)
    with pytest.raises(ShapeError, match="`c` must have the shape of `b`"):
        selective_gramians(dt, a, b, c[..., :5])
    grouped = xp.reshape(xp.concat([b, b, b], axis=-1), (3, 5, 3, 6))
    with pytest.raises(ShapeError, match="G = 3 of `b` and `c` must divide .* D = 4"):
        selective_gramians(dt, a, grouped, grouped)
    with pytest.raises(ValueError, match=r"`time_block` must be in \[1, "):
        selective_gramians(dt, a, b, c, time_block=0)
    stats = init_selective_statistics(a[:, :5])
    with pytest.raises(ShapeError, match=r"`stats.controllability` must have shape \(D, N\)"):
        update_selective_statistics(stats, dt, a, b, c)
    with pytest.raises(ShapeError, match="`second.controllability` must have the shape"):
        merge_selective_statistics(stats, init_selective_statistics(a))
    with pytest.raises(ValueError, match="`stats` must hold at least one sample"):
        finalize_selective_statistics(init_selective_statistics(a))
    with pytest.raises(TypeError, match="`stats` must be a SelectiveStatistics"):
        update_selective_statistics((1, 2), dt, a, b, c)
    bad = update_selective_statistics(init_selective_statistics(a), dt * xp.nan, a, b, c)
    with pytest.raises(StabilityError, match="`stats.controllability` must contain only finite"):
        finalize_selective_statistics(bad)
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


def test_complex_inputs_are_rejected() -> None:
    dt, a, b, c = _layer(np)
    with pytest.raises(TypeError, match="`b` must have a real dtype"):
        selective_gramians(dt, a, b + 0j, c)


# --- tracing, devices, docs --------------------------------------------------------------------


def test_jit_equals_eager() -> None:
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    dt, a, b, c = _layer(jnp, groups=2, steps=6)
    eager = selective_gramians(dt, a, b, c, time_block=4)
    jitted = jax.jit(lambda *x: selective_gramians(*x, time_block=4))(dt, a, b, c)
    for got, want in zip(jitted[:3], eager[:3], strict=True):
        assert_rel(got, want, 1e-13)
    imp = jax.jit(lambda g: state_importance(g, method="mean_lti"))(eager)
    assert_rel(imp, state_importance(eager, method="mean_lti"), 1e-13)
    seq = _sequences(Spec(3, 2, 1, 0.9, True, False, (), 1), 5)
    args = [jnp.asarray(x) for x in seq]
    got = jax.jit(time_varying_gramians)(*args)
    assert_rel(got.controllability, time_varying_gramians(*args).controllability, 1e-13)


def test_device_is_preserved() -> None:
    xps = pytest.importorskip("array_api_strict")
    dev = xps.Device("device1")
    dt, a, b, c = (xps.asarray(to_np(x), device=dev) for x in _layer(np))
    g = selective_gramians(dt, a, b, c)
    assert g.scores.device == dev
    assert g.surrogate.poles.device == dev
    assert state_importance(g, method="random").device == dev
    assert select_state_indices(state_importance(g), 2).device == dev
    seq = _sequences(Spec(2, 1, 1, 0.9, False, True, (), 1), 3)
    p, _ = time_varying_gramians(*(xps.asarray(x, device=dev) for x in seq), diagonal=True)
    assert p.device == dev


@pytest.mark.parametrize("module", [time_varying, selective_statistics, importance])
def test_docstring_examples(module, monkeypatch: pytest.MonkeyPatch) -> None:
    # The examples import from the package top level, like every other example in the core.
    for name in module.__all__:
        monkeypatch.setattr(compressm_core, name, getattr(module, name), raising=False)
    failures, _ = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert failures == 0


def test_stepwise_update_equals_doubling_scan(monkeypatch) -> None:
    """The eager per-step loop and the blocked doubling scan (JAX's path) give the same sums."""
    rng = np.random.default_rng(5)
    batch, steps, channels, states = 2, 37, 6, 4
    dt = rng.uniform(1e-3, 0.2, (batch, steps, channels))
    a = -rng.uniform(0.5, 4.0, (channels, states))
    b = rng.normal(size=(batch, steps, 2, states))
    c = rng.normal(size=(batch, steps, 2, states))
    stepwise = update_selective_statistics(init_selective_statistics(a), dt, a, b, c)
    monkeypatch.setattr(selective_statistics, "_use_stepwise", lambda dt, xp: False)
    for block in (1, 5, 32, None):
        scanned = update_selective_statistics(
            init_selective_statistics(a), dt, a, b, c, time_block=block
        )
        for got, want in zip(scanned, stepwise, strict=True):
            assert_rel(got, want, 1e-12)
