"""compressm_core.selective_statistics: per-mode Gramian diagonals of selective (Mamba) layers,
their streaming accumulator and the mean LTI surrogate."""

from __future__ import annotations

import numpy as np
import pytest
from array_api_compat import is_jax_namespace
from hypothesis import given
from hypothesis import strategies as st

from compressm_core import (
    DiagonalStateSpace,
    ShapeError,
    StabilityError,
    hankel_singular_values,
    selective_statistics,
)
from compressm_core.selective_statistics import (
    SelectiveGramians,
    SelectiveStatistics,
    finalize_selective_statistics,
    init_selective_statistics,
    mean_lti_surrogate,
    merge_selective_statistics,
    selective_gramians,
    update_selective_statistics,
)
from compressm_core.time_varying import time_varying_gramians
from tests._helpers import (
    assert_close,
    assert_doctests,
    assert_rel,
    backend_settings,
    selective_inputs,
    skip_jax,
    to_np,
    to_xp,
)


@st.composite
def selective_layers(draw, *, max_batch=2, max_steps=6, max_channels=3, max_states=3):
    """NumPy inputs of :func:`selective_inputs` of a drawn size, and a drawn ``time_block``."""
    batch = draw(st.integers(1, max_batch))
    steps = draw(st.integers(1, max_steps))
    groups = draw(st.sampled_from([None, 1, 2]))
    channels = draw(st.integers(1, max_channels)) * (groups or 1)
    states = draw(st.integers(1, max_states))
    seed = draw(st.integers(0, 2**32 - 1))
    dt, a, b, c = selective_inputs(
        np, groups=groups, seed=seed, batch=batch, steps=steps, channels=channels, states=states
    )
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


def _assert_stats_close(first: SelectiveStatistics, second: SelectiveStatistics) -> None:
    for x, y in zip(first, second, strict=True):
        assert_rel(x, y, 1e-13)


def test_selective_matches_naive_reference(xp) -> None:
    methods = ["auto", "chunked", "doubling"] + ([] if is_jax_namespace(xp) else ["sequential"])

    @backend_settings(xp, jax_examples=1)
    @given(selective_layers(), st.sampled_from(methods))
    def check(layer, method) -> None:
        dt, a, b, c, block = layer
        inputs = [to_xp(x, xp) for x in (dt, a, b, c)]
        g = selective_gramians(*inputs, time_block=block, method=method)
        p, q, scores, (poles, bbar, cbar) = _naive(dt, a, b, c)
        assert isinstance(g, SelectiveGramians)
        assert g.scores.dtype == xp.float64
        assert_close(g.controllability, p, 1e-12, xp=xp)
        assert_close(g.observability, q, 1e-12, xp=xp)
        assert_close(g.scores, scores, 1e-12, xp=xp)
        assert_close(g.surrogate.poles, poles, 1e-12, xp=xp)
        assert_close(g.surrogate.b, bbar[..., None], 1e-12, xp=xp)
        assert_close(g.surrogate.c, cbar[..., None, :], 1e-12, xp=xp)
        surrogate = mean_lti_surrogate(*inputs, time_block=block)
        for got, want in zip(surrogate[:3], g.surrogate[:3], strict=True):
            assert_close(got, want, 1e-14, xp=xp)

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
    skip_jax(xp)
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
    assert_close(g.controllability, p.mean(0), 1e-12, xp=xp)
    assert_close(g.observability, q.mean(0), 1e-12, xp=xp)
    assert_close(g.scores, np.sqrt((p * q).mean(0)), 1e-12, xp=xp)
    # long sequences: the score of each mode tends to its LTI Hankel singular value
    modes = DiagonalStateSpace(
        to_xp(np.exp(step * a)[..., None], xp),
        to_xp((step * b_vec)[None, :, None, None] * np.ones((2, 3, 1, 1)), xp),
        to_xp(c_vec[None, :, None, None] * np.ones((2, 3, 1, 1)), xp),
    )
    hsv = to_np(hankel_singular_values(modes))[..., 0]
    assert_close(g.scores, hsv, 0.1, xp=xp)


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
    assert_close(sys.poles, poles, 1e-14, xp=xp)
    assert_close(sys.b, bbar[..., None], 1e-14, xp=xp)
    assert_close(sys.c, np.broadcast_to(cbar, (2, 1, 3)), 1e-14, xp=xp)
    assert sys.d is None
    hsv = hankel_singular_values(sys)
    assert tuple(hsv.shape) == (2, 3)
    one = DiagonalStateSpace(sys.poles[:, :1], sys.b[:, :1, :], sys.c[:, :, :1])
    by_hand = np.abs(bbar[:, 0] * cbar[0]) / (1 - poles[:, 0] ** 2)
    assert_close(hankel_singular_values(one)[:, 0], by_hand, 1e-12, xp=xp)


def test_streaming_equals_one_pass(xp) -> None:
    dt, a, b, c = selective_inputs(xp, groups=2, batch=5, steps=7)
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
        assert_close(got, want, 1e-13, xp=xp)


def test_low_precision_inputs_accumulate_in_float64() -> None:
    """float32 activations: float32 recursions, sums folded into the float64 accumulator."""
    torch = pytest.importorskip("torch")
    dt, a, b, c = (np.asarray(x, dtype=np.float32) for x in selective_inputs(np))
    stats = update_selective_statistics(
        init_selective_statistics(torch.asarray(a, dtype=torch.float64)),
        *(torch.asarray(x) for x in (dt, a, b, c)),
    )
    assert stats.energy.dtype == torch.float64
    # the same float32 values in float64 throughout
    reference = selective_gramians(*(x.astype(np.float64) for x in (dt, a, b, c)))
    got = finalize_selective_statistics(stats)
    for field in ("controllability", "observability", "scores"):
        assert_close(getattr(got, field), getattr(reference, field), 1e-6, xp=torch)
    # the means need no recursion and are summed in float64
    assert_close(got.surrogate.b, reference.surrogate.b, 1e-12, xp=torch)
    assert_close(got.surrogate.c, reference.surrogate.c, 1e-12, xp=torch)


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
        namespace = torch
    else:
        acc = init_selective_statistics(a)
        namespace = np
    got = finalize_selective_statistics(update_selective_statistics(acc, *inputs))
    assert got.scores.dtype == acc.count.dtype
    for field in ("controllability", "observability", "scores"):
        want = getattr(exact, field)
        assert_close(getattr(got, field), want, 1e-4, xp=namespace, dtype=acc.count.dtype)


def test_selective_errors(xp) -> None:
    dt, a, b, c = selective_inputs(xp)
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


def test_complex_inputs_are_rejected() -> None:
    dt, a, b, c = selective_inputs(np)
    with pytest.raises(TypeError, match="`b` must have a real dtype"):
        selective_gramians(dt, a, b + 0j, c)


def test_jit_equals_eager() -> None:
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    dt, a, b, c = selective_inputs(jnp, groups=2, steps=6)
    eager = selective_gramians(dt, a, b, c, time_block=4)
    jitted = jax.jit(lambda *x: selective_gramians(*x, time_block=4))(dt, a, b, c)
    for got, want in zip(jitted[:3], eager[:3], strict=True):
        assert_close(got, want, 1e-13)


def test_device_is_preserved() -> None:
    xps = pytest.importorskip("array_api_strict")
    dev = xps.Device("device1")
    dt, a, b, c = (xps.asarray(to_np(x), device=dev) for x in selective_inputs(np))
    g = selective_gramians(dt, a, b, c)
    assert g.scores.device == dev
    assert g.surrogate.poles.device == dev


def test_docstring_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    assert_doctests(selective_statistics, monkeypatch)


def test_stepwise_update_equals_doubling_scan() -> None:
    """The eager per-step loop and the blocked doubling scan (JAX's path) give the same sums."""
    rng = np.random.default_rng(5)
    batch, steps, channels, states = 2, 37, 6, 4
    dt = rng.uniform(1e-3, 0.2, (batch, steps, channels))
    a = -rng.uniform(0.5, 4.0, (channels, states))
    b = rng.normal(size=(batch, steps, 2, states))
    c = rng.normal(size=(batch, steps, 2, states))
    stepwise = update_selective_statistics(init_selective_statistics(a), dt, a, b, c)
    for block in (1, 5, 32, None):
        scanned = update_selective_statistics(
            init_selective_statistics(a), dt, a, b, c, time_block=block, method="doubling"
        )
        for got, want in zip(scanned, stepwise, strict=True):
            assert_rel(got, want, 1e-12)
