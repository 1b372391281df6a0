"""The evaluation methods of the selective statistics (compressm_core._selective_kernels):
the chunked log-space kernel against the float64 loop over time and a direct evaluation of the
defining recursion, the choice of method, and the cumulative log-sum-exp helper of _xp."""

from __future__ import annotations

import numpy as np
import pytest
from array_api_compat import is_jax_namespace

from compressm_core import BackendCapabilityError, _selective_kernels, _xp
from compressm_core.selective_statistics import (
    SelectiveStatistics,
    init_selective_statistics,
    update_selective_statistics,
)
from tests._helpers import assert_close, assert_rel, selective_inputs, to_np, to_xp

FIELDS = SelectiveStatistics._fields


def _direct(dt, a, b, c) -> dict[str, np.ndarray]:
    """The defining recursions, one mode and one sequence at a time, in float64 Python floats.

    p_t = a_t^2 p_{t-1} + (dt_t B_t)^2, q_s = sum_{t >= s} prod_{s < j <= t} a_j^2 C_t^2,
    summed with p_s q_s over all samples (the backward sum for q, unlike the kernels).
    """
    dt, a, b, c = (np.asarray(to_np(x), dtype=np.float64) for x in (dt, a, b, c))
    batch, steps, channels = dt.shape
    states = a.shape[1]
    width = channels // (b.shape[2] if b.ndim == 4 else 1)
    out = {k: np.zeros((channels, states)) for k in ("controllability", "observability", "energy")}
    for i in range(batch):
        for d in range(channels):
            g = d // width
            for n in range(states):
                bn = b[i, :, g, n] if b.ndim == 4 else b[i, :, n]
                cn = c[i, :, g, n] if c.ndim == 4 else c[i, :, n]
                pole2 = np.exp(2 * dt[i, :, d] * a[d, n])
                p = np.zeros(steps)
                q = np.zeros(steps)
                for t in range(steps):
                    p[t] = (pole2[t] * p[t - 1] if t else 0.0) + (dt[i, t, d] * bn[t]) ** 2
                for t in reversed(range(steps)):
                    q[t] = (pole2[t + 1] * q[t + 1] if t + 1 < steps else 0.0) + cn[t] ** 2
                out["controllability"][d, n] += p.sum()
                out["observability"][d, n] += q.sum()
                out["energy"][d, n] += (p * q).sum()
    return out


def _update(inputs, method: str, block: int | None = 32, stats=None) -> SelectiveStatistics:
    dt, a, b, c = inputs
    acc = init_selective_statistics(a) if stats is None else stats
    return update_selective_statistics(acc, dt, a, b, c, time_block=block, method=method)


def _methods(xp) -> list[str]:
    return ["chunked", "doubling"] + ([] if is_jax_namespace(xp) else ["sequential"])


@pytest.mark.parametrize("groups", [None, 2])
def test_methods_match_direct_recursion(xp, groups) -> None:
    """Tiny layers, with zero steps, inputs and outputs: every method gives the sums of the
    directly evaluated recursions (observability summed backwards in time)."""
    dt, a, b, c = (to_np(x) for x in selective_inputs(np, groups=groups, steps=9, batch=2))
    dt[0, 3:5, :] = 0.0
    dt[1, :, 0] = 0.0
    b[0, 2, ...] = 0.0
    b[1, ...] = 0.0
    c[0, 6:, ...] = 0.0
    want = _direct(dt, a, b, c)
    inputs = [to_xp(x, xp) for x in (dt, a, b, c)]
    blocks = (4,) if is_jax_namespace(xp) else (1, 4, None)  # JAX compiles every shape
    for method in _methods(xp):
        for block in blocks:
            got = _update(inputs, method, block)
            for key, value in want.items():
                assert_close(getattr(got, key), value, 1e-12, xp=xp)


def test_chunked_matches_float64_loop_on_long_sequences(xp) -> None:
    """2048 steps in chunks of 32 and in one chunk, groups: 1e-12 of the loop over time."""
    if is_jax_namespace(xp):
        pytest.skip("JAX has no in-place loop; compared with the doubling scan under jit below")
    inputs = selective_inputs(xp, groups=2, batch=2, steps=2048, channels=4, states=3)
    want = _update(inputs, "sequential")
    for block in (32, None):
        got = _update(inputs, "chunked", block)
        for key in FIELDS:
            assert_close(getattr(got, key), getattr(want, key), 1e-12)


def test_chunked_survives_fast_decay() -> None:
    """2 |A| dt up to 400 per step: the log-products S reach thousands within a chunk of 32 and
    -2e4 over the sequence, far beyond exp's range (exp(-S) overflows). Zero dt in between."""
    rng = np.random.default_rng(11)
    batch, steps, channels, states = 2, 160, 3, 4
    dt = rng.uniform(0.0, 2.0, (batch, steps, channels))
    dt[:, 40:50, :] = 0.0
    a = -rng.uniform(1.0, 100.0, (channels, states))
    b, c = rng.normal(size=(2, batch, steps, states))
    assert float(np.max(np.cumsum(2 * dt[..., None] * -a, axis=1))) > 2e4
    want = _direct(dt, a, b, c)
    for block in (32, None):
        got = _update((dt, a, b, c), "chunked", block)
        assert all(np.isfinite(getattr(got, key)).all() for key in FIELDS)
        for key, value in want.items():
            # relative error about eps * |S|
            assert_rel(getattr(got, key), value, 1e-12)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_chunked_float32_inputs_match_float64_reference(backend: str) -> None:
    """float32 activations with a float64 accumulator: both eager methods agree with the float64
    evaluation of the same float32 values to float32 accuracy, over 1024 steps."""
    rng = np.random.default_rng(3)
    batch, steps, channels, states = 2, 1024, 4, 8
    dt = rng.uniform(1e-4, 0.5, size=(batch, steps, channels)).astype(np.float32)
    a = -np.exp(rng.uniform(-2.0, 2.0, size=(channels, states))).astype(np.float32)
    b, c = rng.normal(size=(2, batch, steps, 2, states)).astype(np.float32)
    reference = _update([x.astype(np.float64) for x in (dt, a, b, c)], "sequential")
    inputs = [dt, a, b, c]
    if backend == "torch":
        torch = pytest.importorskip("torch")
        inputs = [torch.asarray(x) for x in inputs]
    stats = init_selective_statistics(inputs[1])
    for method in ("chunked", "sequential"):
        got = _update(inputs, method, stats=stats)
        assert got.energy.dtype == stats.count.dtype
        for key in FIELDS:
            assert_rel(getattr(got, key), getattr(reference, key), 2e-6)


def test_chunked_split_batches_merge() -> None:
    """Sums over a batch equal the sums over its parts, for the chunked method too."""
    inputs = selective_inputs(np, groups=2, batch=5, steps=40)
    whole = _update(inputs, "chunked", 16)
    dt, a, b, c = inputs
    stats = init_selective_statistics(a)
    for part in (slice(0, 2), slice(2, 5)):
        stats = _update((dt[part], a, b[part], c[part]), "chunked", 16, stats=stats)
    for x, y in zip(stats, whole, strict=True):
        assert_rel(x, y, 1e-13)


def test_chunked_under_jit_equals_doubling() -> None:
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    inputs = selective_inputs(jnp, groups=2, steps=50)

    def run(method: str):
        return jax.jit(lambda *x: tuple(_update(x, method, 16)))(*inputs)

    for got, want in zip(run("chunked"), run("doubling"), strict=True):
        assert_close(got, want, 1e-12)


def test_method_choice_and_errors(xp) -> None:
    inputs = selective_inputs(xp)
    work = init_selective_statistics(inputs[1]).count.dtype
    chosen = _selective_kernels.resolve_method("auto", inputs[0], work, xp)
    if is_jax_namespace(xp):
        assert chosen == "doubling"
        with pytest.raises(BackendCapabilityError, match="`method='sequential'` updates"):
            _update(inputs, "sequential")
    else:
        # host memory: the loop; accelerators: chunked (not testable on a CPU-only machine)
        assert chosen == ("sequential" if _xp.is_cpu(inputs[0]) else "chunked")
    assert _selective_kernels.resolve_method("chunked", inputs[0], work, xp) == "chunked"
    with pytest.raises(ValueError, match="`method` must be one of 'auto', .*; received 'fast'"):
        _update(inputs, "fast")


def test_auto_uses_chunked_off_host() -> None:
    """array_api_strict's second device stands in for an accelerator: 'auto' chunks, and the
    standard-only cumulative log-sum-exp gives the loop's sums."""
    xps = pytest.importorskip("array_api_strict")
    dev = xps.Device("device1")
    dt, a, b, c = (xps.asarray(to_np(x), device=dev) for x in selective_inputs(np, steps=21))
    assert _selective_kernels.resolve_method("auto", dt, xps.float64, xps) == "chunked"
    got = _update((dt, a, b, c), "auto", 8)
    want = _update(selective_inputs(np, steps=21), "sequential")
    assert got.energy.device == dev
    for x, y in zip(got, want, strict=True):
        assert_rel(x, y, 1e-12)


def test_cumulative_logsumexp(xp) -> None:
    """Against log(cumsum(exp(x))) where that is representable, with -inf (zero) terms, and
    where exp(x) overflows (shifted by a constant: logcumsumexp(x + k) = logcumsumexp(x) + k)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 17, 2))
    x[0, :4, 0] = -np.inf
    x[1, 5, 1] = -np.inf
    want = np.cumsum(np.exp(x), axis=1)
    got = _xp.cumulative_logsumexp(to_xp(x, xp), 1, xp)
    assert_close(xp.exp(got), want, 1e-14, xp=xp, dtype=xp.float64)
    assert bool(xp.all(got[0, :4, 0] == -xp.inf))
    assert bool(xp.all(xp.isfinite(got[0, 4:, 0])))
    big = _xp.cumulative_logsumexp(to_xp(x + 1e4, xp), -2, xp)
    assert_close(xp.exp(big - 1e4), want, 1e-11, xp=xp, dtype=xp.float64)
