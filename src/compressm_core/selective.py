"""Gramian statistics and state importance for selective (Mamba-style) state-space layers.

A selective layer has, per channel :math:`d` and state index :math:`n`, the scalar recursion

.. math::

    h_t[d, n] = a_t[d, n]\\, h_{t-1}[d, n] + \\Delta_t[d]\\, B_t[n]\\, u_t[d], \\qquad
    y_t[d] = \\sum_n C_t[n]\\, h_t[d, n], \\qquad h_{-1} = 0,

with :math:`a_t[d, n] = \\exp(\\Delta_t[d] A[d, n])` and :math:`A = -\\exp(A_{\\log}) < 0`. Every
channel is a single-input single-output time-varying system with diagonal state matrix; ``B_t``
and ``C_t`` are shared by all channels (or by the channels of one group). Because they are
shared, the only reduction a stock layer can represent is one set of state indices kept by
every channel, so what is needed is a score per state index.

Two families of statistics are collected over calibration sequences, batch by batch, without a
second forward pass and without ever forming ``(batch, L, D, N, N)`` arrays:

- the time-averaged diagonals of the time-varying Gramians of the state ``h_t`` and the
  resulting per-mode Hankel scores (:func:`selective_gramians`);
- the averages that define the paper's mean-LTI surrogate (:func:`mean_lti_surrogate`).

:func:`state_importance` turns either into one score per state index, and
:func:`select_state_indices` picks the indices to keep. None of these scores carries the
balanced-truncation error bound of the LTI case.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
from array_api_compat import is_jax_namespace, is_torch_namespace

from . import _xp
from ._typing import Array, DType, Namespace
from ._validation import check_finite, check_int, check_stable_poles
from .errors import ShapeError
from .ordering import ULPS, tolerant_argsort
from .systems import DiagonalStateSpace

__all__ = [
    "SelectiveGramians",
    "SelectiveStatistics",
    "finalize_selective_statistics",
    "init_selective_statistics",
    "mean_lti_surrogate",
    "merge_selective_statistics",
    "select_state_indices",
    "selective_gramians",
    "state_importance",
    "update_selective_statistics",
]


class SelectiveStatistics(NamedTuple):
    """Running sums over calibration samples, the state of the streaming accumulator.

    A *sample* is one (sequence, time step) pair. Every field is a plain sum over samples, so
    two accumulators merge exactly by addition (:func:`merge_selective_statistics`). With
    :math:`p_s, q_s` the Gramian diagonals defined in :func:`selective_gramians`:

    Attributes
    ----------
    count : () array
        Number of samples, :math:`\\sum 1`.
    controllability : (D, N) array
        :math:`\\sum p_s`.
    observability : (D, N) array
        :math:`\\sum q_s`.
    energy : (D, N) array
        :math:`\\sum p_s q_s`.
    poles : (D, N) array
        :math:`\\sum \\exp(\\Delta_s[d] A[d, n])`.
    b : (D, N) array
        :math:`\\sum \\Delta_s[d] B_s[n]`.
    c : (D, N) array
        :math:`\\sum C_s[n]` (the output vector of channel ``d``'s group).
    """

    count: Array
    controllability: Array
    observability: Array
    energy: Array
    poles: Array
    b: Array
    c: Array


class SelectiveGramians(NamedTuple):
    """Time-averaged Gramian diagonals, per-mode Hankel scores and the mean-LTI surrogate.

    Attributes
    ----------
    controllability : (D, N) array
        :math:`\\bar p = \\operatorname{mean}_{\\text{samples}} p_s`, the averaged diagonal of
        the reachability Gramian of :math:`h_s`.
    observability : (D, N) array
        :math:`\\bar q = \\operatorname{mean} q_s`, the averaged diagonal of the observability
        Gramian of :math:`h_s`.
    scores : (D, N) array
        :math:`\\sqrt{\\operatorname{mean}\\, p_s q_s}`, the root-mean-square Hankel singular
        value of mode ``(d, n)`` taken in isolation.
    surrogate : DiagonalStateSpace
        Mean-LTI surrogate, ``D`` single-input single-output channels: ``poles (D, N)``,
        ``b (D, N, 1)``, ``c (D, 1, N)`` (see :func:`mean_lti_surrogate`).
    """

    controllability: Array
    observability: Array
    scores: Array
    surrogate: DiagonalStateSpace


def _shape(x: Array) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def _check_inputs(
    dt: Array, a: Array, b: Array, c: Array, xp: Namespace
) -> tuple[int, int, int, int, int]:
    """Check shapes and dtypes; return ``(batch, L, D, N, G)``."""
    for x, name in ((dt, "dt"), (a, "a"), (b, "b"), (c, "c")):
        if not xp.isdtype(x.dtype, ("real floating", "integral")):
            msg = f"`{name}` must have a real dtype; received {x.dtype}."
            raise TypeError(msg)
    if a.ndim != 2:
        msg = f"`a` must have shape (D, N) (channels, states); received shape {_shape(a)}."
        raise ShapeError(msg)
    channels, states = _shape(a)
    if dt.ndim != 3 or int(dt.shape[-1]) != channels:
        msg = (
            f"`dt` must have shape (batch, L, D) = (batch, L, {channels}) to match `a`; "
            f"received shape {_shape(dt)}."
        )
        raise ShapeError(msg)
    batch, steps = _shape(dt)[:2]
    if b.ndim not in (3, 4) or _shape(b)[:2] != (batch, steps) or int(b.shape[-1]) != states:
        msg = (
            f"`b` must have shape (batch, L, N) = ({batch}, {steps}, {states}) or "
            f"(batch, L, G, N) = ({batch}, {steps}, G, {states}) to match `dt` and `a`; "
            f"received shape {_shape(b)}."
        )
        raise ShapeError(msg)
    if _shape(c) != _shape(b):
        msg = f"`c` must have the shape of `b`, {_shape(b)}; received shape {_shape(c)}."
        raise ShapeError(msg)
    groups = int(b.shape[2]) if b.ndim == 4 else 1
    if groups == 0 or channels % groups:
        msg = (
            f"The number of groups G = {groups} of `b` and `c` must divide the number of "
            f"channels D = {channels} of `a`."
        )
        raise ShapeError(msg)
    return batch, steps, channels, states, groups


def _per_channel(x: Array, channels: int, groups: int, xp: Namespace) -> Array:
    """``(batch, T, [G,] N)`` -> ``(batch, T, D, N)`` (or ``(batch, T, 1, N)`` for ``G = 1``).

    Channel ``d`` belongs to group ``d // (D // G)`` (consecutive channels share a group).
    """
    batch, steps, states = int(x.shape[0]), int(x.shape[1]), int(x.shape[-1])
    if groups == 1:
        return xp.reshape(x, (batch, steps, 1, states))
    spread = xp.broadcast_to(
        x[:, :, :, None, :], (batch, steps, groups, channels // groups, states)
    )
    return xp.reshape(spread, (batch, steps, channels, states))


def _scan(alpha: Array, beta: Array, xp: Namespace) -> tuple[Array, Array]:
    """Inclusive scan ``x_t = alpha_t x_{t-1} + beta_t`` (``x_{-1} = 0``) along axis -3.

    Hillis-Steele doubling: ``ceil(log2 T)`` levels of elementwise products, no loop over
    time. Returns the running products ``prod_{j <= t} alpha_j`` and ``x``. Every ``alpha``
    lies in ``[0, 1]``, so the products only shrink (no overflow). ``beta`` may carry extra
    leading axes (several right-hand sides share ``alpha``).
    """
    steps = int(alpha.shape[-3])
    shift = 1
    while shift < steps:
        alpha_prev = xp.concat(
            [xp.ones_like(alpha[..., :shift, :, :]), alpha[..., : steps - shift, :, :]], axis=-3
        )
        beta_prev = xp.concat(
            [xp.zeros_like(beta[..., :shift, :, :]), beta[..., : steps - shift, :, :]], axis=-3
        )
        beta = alpha * beta_prev + beta
        alpha = alpha * alpha_prev
        shift *= 2
    return alpha, beta


def _check_statistics(stats: SelectiveStatistics, channels: int, states: int) -> None:
    if stats.count.ndim != 0:
        msg = f"`stats.count` must be a 0-D array; received shape {_shape(stats.count)}."
        raise ShapeError(msg)
    for name, field in zip(stats._fields[1:], stats[1:], strict=True):
        if _shape(field) != (channels, states):
            msg = (
                f"`stats.{name}` must have shape (D, N) = ({channels}, {states}) to match `a`; "
                f"received shape {_shape(field)}."
            )
            raise ShapeError(msg)


def _accumulate(
    stats: SelectiveStatistics,
    dt: Array,
    a: Array,
    b: Array,
    c: Array,
    time_block: int | None,
    xp: Namespace | None,
    *,
    gramians: bool,
) -> SelectiveStatistics:
    """Validated body of :func:`update_selective_statistics` (``gramians=False``: means only)."""
    if not isinstance(stats, SelectiveStatistics):
        msg = f"`stats` must be a SelectiveStatistics; received {type(stats).__name__}."
        raise TypeError(msg)
    xp = _xp.namespace(*stats, dt, a, b, c, xp=xp)
    batch, steps, channels, states, groups = _check_inputs(dt, a, b, c, xp)
    _check_statistics(stats, channels, states)
    block = steps if time_block is None else check_int(time_block, "time_block", low=1, high=2**62)
    if _use_stepwise(dt, xp):
        return _accumulate_stepwise(
            stats, dt, a, b, c, channels, groups, max(block, 1), xp, gramians=gramians
        )
    work = stats.count.dtype
    dt, a, b, c = (xp.astype(x, work) for x in (dt, a, b, c))
    sums = stats._asdict()
    zeros = xp.zeros((batch, channels, states), dtype=work, device=_xp.device_of(a))
    carry_p = carry_r = carry_m = zeros
    for lo in range(0, steps, block):
        hi = min(lo + block, steps)
        step_dt = dt[:, lo:hi, :][..., None]  # (batch, T, D, 1)
        pole = xp.exp(step_dt * a)  # a_t = exp(dt_t A), (batch, T, D, N)
        drive = step_dt * _per_channel(b[:, lo:hi, ...], channels, groups, xp)
        out = _per_channel(c[:, lo:hi, ...], channels, groups, xp)
        sums["poles"] = sums["poles"] + xp.sum(pole, axis=(0, 1))
        sums["b"] = sums["b"] + xp.sum(drive, axis=(0, 1))
        sums["c"] = sums["c"] + xp.sum(out, axis=(0, 1))
        if not gramians:
            continue
        alpha = pole * pole
        # p_t = alpha_t p_{t-1} + b~_t^2 and m_t = alpha_t m_{t-1} + 1 share alpha; then
        # r_t = alpha_t r_{t-1} + p_t. decay = prod_{j <= t} alpha_j carries the block's start.
        decay, pm = _scan(alpha, xp.stack([drive * drive, xp.ones_like(alpha)]), xp)
        p = pm[0, ...] + decay * carry_p[:, None, :, :]
        m = pm[1, ...] + decay * carry_m[:, None, :, :]
        r = _scan(alpha, p, xp)[1] + decay * carry_r[:, None, :, :]
        gamma = out * out
        sums["controllability"] = sums["controllability"] + xp.sum(p, axis=(0, 1))
        sums["observability"] = sums["observability"] + xp.sum(gamma * m, axis=(0, 1))
        sums["energy"] = sums["energy"] + xp.sum(gamma * r, axis=(0, 1))
        carry_p, carry_r, carry_m = p[:, -1, :, :], r[:, -1, :, :], m[:, -1, :, :]
    sums["count"] = sums["count"] + batch * steps
    return SelectiveStatistics(**sums)


def _use_stepwise(dt: Array, xp: Namespace) -> bool:
    """Sequential loop over time on eager backends; the doubling scan for JAX and tracing."""
    return not (is_jax_namespace(xp) or _xp.is_traced(dt))


def _step_dtype(work: DType, arrays: tuple[Array, ...], xp: Namespace) -> DType:
    """Precision of the per-step recursions of the sequential path.

    float32 when every input is real floating of at most single precision (activations of a
    float32 or mixed-precision model), else the accumulator's precision ``work``.
    """
    names = ("float32", "float16", "bfloat16")
    low = [getattr(xp, name) for name in names if hasattr(xp, name)]
    if work != xp.float32 and all(x.dtype in low for x in arrays):
        return xp.float32
    return work


def _mean_sums(
    dt: Array, b: Array, c: Array, channels: int, groups: int, xp: Namespace
) -> tuple[Array, Array]:
    """``sum_s dt_s[d] B_s[n]`` and ``sum_s C_s[n]`` over all samples, as ``(D, N)`` arrays.

    Neither needs a recursion: the first is one matrix product per group over the
    ``batch * L`` samples, the second a sum over them.
    """
    samples = int(dt.shape[0]) * int(dt.shape[1])
    states = int(b.shape[-1])
    width = channels // groups
    dt_g = xp.reshape(dt, (samples, groups, width))
    b_g = xp.reshape(b, (samples, groups, states))
    c_g = xp.reshape(c, (samples, groups, states))
    drive = xp.matmul(xp.permute_dims(dt_g, (1, 2, 0)), xp.permute_dims(b_g, (1, 0, 2)))
    out = xp.broadcast_to(xp.sum(c_g, axis=0)[:, None, :], (groups, width, states))
    return xp.reshape(drive, (channels, states)), xp.reshape(out, (channels, states))


def _dense_copy(x: Array, dtype: DType, xp: Namespace) -> Array:
    """A copy of ``x`` in ``dtype`` laid out in row-major order.

    Forward hooks pass transposed views (Mamba's ``(batch, D, L)`` tensors as ``(batch, L, D)``);
    ``astype`` keeps their strides, and elementwise results then inherit a layout in which one
    time step is scattered through memory. Assigning into a fresh array fixes the layout.
    """
    out = xp.empty(_shape(x), dtype=dtype, device=_xp.device_of(x))
    out[...] = x
    return out


def _add_product(acc: Array, x: Array, y: Array, xp: Namespace) -> None:
    """``acc += x * y`` in place (one fused pass on PyTorch, a temporary elsewhere)."""
    if is_torch_namespace(xp):
        acc.addcmul_(x, y)
    else:
        acc += x * y


def _accumulate_stepwise(
    stats: SelectiveStatistics,
    dt: Array,
    a: Array,
    b: Array,
    c: Array,
    channels: int,
    groups: int,
    block: int,
    xp: Namespace,
    *,
    gramians: bool,
) -> SelectiveStatistics:
    """Sequential form of :func:`_accumulate` for eager backends: one step at a time.

    The same recursions, ``p_t = a_t^2 p_{t-1} + b~_t^2``, ``m_t = a_t^2 m_{t-1} + 1``,
    ``r_t = a_t^2 r_{t-1} + p_t``, updated in place on ``(batch, D, N)`` buffers: ``O(L)`` work,
    no temporary with a long time axis (the doubling scan costs ``O(L log L)`` and allocates
    blocks of ``(batch, T, D, N)``; it is kept for JAX, where a loop over time would be
    unrolled). The poles of ``block`` steps are computed together; the running sums over time
    are kept per sequence in the step precision (:func:`_step_dtype`) and folded into the
    accumulator's precision once per block, so no sum in single precision spans more than
    ``block`` steps.
    """
    batch, steps = int(dt.shape[0]), int(dt.shape[1])
    states = int(a.shape[-1])
    work = stats.count.dtype
    step = _step_dtype(work, (dt, a, b, c), xp)
    dev = _xp.device_of(a)
    sums = stats._asdict()
    dt_w, b_w, c_w = (xp.astype(x, work) for x in (dt, b, c))
    drive_sum, out_sum = _mean_sums(dt_w, b_w, c_w, channels, groups, xp)
    sums["b"] = sums["b"] + drive_sum
    sums["c"] = sums["c"] + out_sum
    sums["count"] = sums["count"] + batch * steps
    dt, a, b, c = (_dense_copy(x, step, xp) for x in (dt, a, b, c))
    shape = (batch, channels, states) if gramians else (0,)  # the means need no buffers
    p, m, r, acc_p, acc_q, acc_e = (xp.zeros(shape, dtype=step, device=dev) for _ in range(6))
    for lo in range(0, steps, block):
        hi = min(lo + block, steps)
        step_dt = dt[:, lo:hi, :, None]  # (batch, T, D, 1)
        alpha = xp.exp(step_dt * a)  # a_t = exp(dt_t A), (batch, T, D, N)
        sums["poles"] = sums["poles"] + xp.astype(xp.sum(alpha, axis=(0, 1)), work)
        if not gramians:
            continue
        alpha *= alpha
        # b~_t^2 = dt_t^2 B_t^2 and C_t^2 as factors, (batch, T, D, 1) and (batch, T, D or 1, N)
        dt2 = step_dt * step_dt
        drive = _per_channel(b[:, lo:hi, ...], channels, groups, xp)
        drive = drive * drive
        out = _per_channel(c[:, lo:hi, ...], channels, groups, xp)
        gamma = out * out
        for t in range(hi - lo):
            alpha_t = alpha[:, t, ...]
            p *= alpha_t
            _add_product(p, dt2[:, t, ...], drive[:, t, ...], xp)
            m *= alpha_t
            m += 1
            r *= alpha_t
            r += p
            acc_p += p
            _add_product(acc_q, gamma[:, t, ...], m, xp)
            _add_product(acc_e, gamma[:, t, ...], r, xp)
        for key, acc in (
            ("controllability", acc_p),
            ("observability", acc_q),
            ("energy", acc_e),
        ):
            sums[key] = sums[key] + xp.sum(xp.astype(acc, work), axis=0)
            acc *= 0
    return SelectiveStatistics(**sums)


def init_selective_statistics(a: Array, *, xp: Namespace | None = None) -> SelectiveStatistics:
    """Empty accumulator (all sums zero) for a layer with state matrix ``A`` of shape ``(D, N)``.

    Parameters
    ----------
    a : (D, N) array
        Continuous-time diagonal state matrix of the layer, :math:`A = -\\exp(A_{\\log})`; only
        its shape and device are used.
    xp : array_namespace, optional
        Namespace override.

    Returns
    -------
    SelectiveStatistics
        Zeros in the working precision (float64 where the device has it) on ``a``'s device.
    """
    xp = _xp.namespace(a, xp=xp)
    if a.ndim != 2:
        msg = f"`a` must have shape (D, N) (channels, states); received shape {_shape(a)}."
        raise ShapeError(msg)
    dev = _xp.device_of(a)
    work = _xp.working_dtype(xp, dev, complex_=False)
    zero = xp.zeros((), dtype=work, device=dev)
    sums = [xp.zeros(_shape(a), dtype=work, device=dev) for _ in range(6)]
    return SelectiveStatistics(zero, *sums)


def update_selective_statistics(
    stats: SelectiveStatistics,
    dt: Array,
    a: Array,
    b: Array,
    c: Array,
    *,
    time_block: int | None = 32,
    xp: Namespace | None = None,
) -> SelectiveStatistics:
    """Add one batch of whole sequences to the running sums (pure: returns a new accumulator).

    For every sequence, channel ``d``, state ``n`` and step ``s`` it evaluates the Gramian
    diagonals :math:`p_s, q_s` of :func:`selective_gramians` and adds :math:`p_s`,
    :math:`q_s`, :math:`p_s q_s`, :math:`\\exp(\\Delta_s A)`, :math:`\\Delta_s B_s` and
    :math:`C_s` to the sums in ``stats``. The observability diagonal looks into the future of
    each sequence, so every call must receive whole sequences; batches of sequences may be split
    freely (the result does not depend on how the batch is split).

    Parameters
    ----------
    stats : SelectiveStatistics
        Accumulator from :func:`init_selective_statistics` or a previous update.
    dt : (batch, L, D) array
        Step sizes :math:`\\Delta_t[d] \\ge 0` (after ``softplus``).
    a : (D, N) array
        Continuous-time state matrix :math:`A = -\\exp(A_{\\log})`, real and negative.
    b : (batch, L, N) or (batch, L, G, N) array
        Input projections :math:`B_t`, shared by all channels, or by the ``D / G`` consecutive
        channels of each of ``G`` groups (Mamba2: channels are heads, ``a`` repeats each head's
        scalar over ``N``).
    c : (batch, L, N) or (batch, L, G, N) array
        Output projections :math:`C_t`, same layout as ``b``.
    time_block : int or None, optional
        Steps processed together (``None``: the whole sequence). Eager NumPy, PyTorch and
        other backends run the recursions one step at a time, in place (``O(L)`` work); a block
        is the span whose poles are computed at once and after which the running sums are
        folded into the accumulator. JAX and traced code evaluate the recursions of a block by
        a doubling scan (``ceil(log2 T)`` levels) and chain blocks by a Python loop carrying
        three ``(batch, D, N)`` states. Peak memory is a few arrays of ``(batch, T, D, N)``
        elements.
    xp : array_namespace, optional
        Namespace override.

    Returns
    -------
    SelectiveStatistics
        ``stats`` plus the contribution of this batch.

    Raises
    ------
    ShapeError
        If the shapes of ``dt``, ``a``, ``b``, ``c`` and ``stats`` disagree.
    TypeError
        If an input is complex.

    Notes
    -----
    Precision: the sums are accumulated in ``stats``' dtype. With float32 (or half precision)
    inputs and a float64 accumulator, the per-step recursions run in float32 and are folded
    into the float64 sums once per block; every recursion is a contraction with non-negative
    terms, so the relative error stays near float32 rounding (about 1e-6) however long the
    sequence. Pass float64 inputs for float64 throughout.

    Only shapes are checked: no value is read back from the device, so the update can run in
    forward hooks of a training loop without synchronisation. Non-finite inputs propagate into
    the sums and are reported by :func:`finalize_selective_statistics`. The Gramian sums use the
    forward-only identities

    .. math::

        \\sum_s q_s = \\sum_t C_t^2\\, m_t, \\quad m_t = a_t^2 m_{t-1} + 1, \\qquad
        \\sum_s p_s q_s = \\sum_t C_t^2\\, r_t, \\quad r_t = a_t^2 r_{t-1} + p_t,

    so no backward pass over time and no stored history beyond one block is needed. Cost
    ``O(batch L D N)`` elementwise operations on eager backends (about ten per sample and
    mode), ``O(batch L D N log T)`` for the doubling scan. The cost is proportional to the
    number of sequences: to make it cheaper, pass a subset of the batch (every field is a sum
    over sequences, so a subset estimates the same averages from fewer samples).
    """
    return _accumulate(stats, dt, a, b, c, time_block, xp, gramians=True)


def merge_selective_statistics(
    first: SelectiveStatistics, second: SelectiveStatistics, *, xp: Namespace | None = None
) -> SelectiveStatistics:
    """Combine two accumulators (exact, associative and commutative: fieldwise sums).

    Use it to combine statistics collected on different devices, processes or data shards.

    Parameters
    ----------
    first, second : SelectiveStatistics
        Accumulators of the same layer.
    xp : array_namespace, optional
        Namespace override.

    Returns
    -------
    SelectiveStatistics
        The statistics of the union of both sample sets.

    Raises
    ------
    ShapeError
        If the two accumulators have different shapes.
    """
    _xp.namespace(*first, *second, xp=xp)
    for name, x, y in zip(first._fields, first, second, strict=True):
        if _shape(x) != _shape(y):
            msg = (
                f"`second.{name}` must have the shape of `first.{name}`, {_shape(x)}; received "
                f"shape {_shape(y)}."
            )
            raise ShapeError(msg)
    return SelectiveStatistics(*(x + y for x, y in zip(first, second, strict=True)))


def finalize_selective_statistics(
    stats: SelectiveStatistics, *, xp: Namespace | None = None
) -> SelectiveGramians:
    """Turn running sums into averaged Gramian diagonals, scores and the mean-LTI surrogate.

    Divides every sum by the number of samples (see :func:`selective_gramians` for the
    definitions) and takes :math:`\\sqrt{\\operatorname{mean}\\, p_s q_s}` as the score.

    Parameters
    ----------
    stats : SelectiveStatistics
        Accumulated statistics.
    xp : array_namespace, optional
        Namespace override.

    Returns
    -------
    SelectiveGramians
        In the working precision of the accumulator.

    Raises
    ------
    ValueError
        If ``stats`` holds no samples.
    StabilityError
        If a sum is not finite (non-finite inputs were accumulated).

    Notes
    -----
    Both checks read values back and are skipped under ``jax.jit``.
    """
    if not isinstance(stats, SelectiveStatistics):
        msg = f"`stats` must be a SelectiveStatistics; received {type(stats).__name__}."
        raise TypeError(msg)
    xp = _xp.namespace(*stats, xp=xp)
    count = stats.count
    if not _xp.is_traced(count) and not float(count) > 0:
        msg = "`stats` must hold at least one sample; received an empty accumulator."
        raise ValueError(msg)
    for name, field in zip(stats._fields, stats, strict=True):
        check_finite(field, f"stats.{name}", xp)
    surrogate = DiagonalStateSpace(
        stats.poles / count, (stats.b / count)[..., None], (stats.c / count)[..., None, :]
    )
    return SelectiveGramians(
        stats.controllability / count,
        stats.observability / count,
        xp.sqrt(stats.energy / count),
        surrogate,
    )


def selective_gramians(
    dt: Array,
    a: Array,
    b: Array,
    c: Array,
    *,
    time_block: int | None = 32,
    xp: Namespace | None = None,
) -> SelectiveGramians:
    """Time-averaged Gramian diagonals and per-mode Hankel scores of a selective layer.

    Mode ``(d, n)`` is the scalar time-varying system
    :math:`h_s = a_s h_{s-1} + \\tilde b_s u_s`, :math:`y_s = c_s h_s` with
    :math:`a_s = \\exp(\\Delta_s[d] A[d, n])`, :math:`\\tilde b_s = \\Delta_s[d] B_s[n]` and
    :math:`c_s = C_s[n]` (Euler input, as in Mamba), over a sequence of ``L`` steps from
    :math:`h_{-1} = 0`. The diagonals of the reachability Gramian of :math:`h_s` (inputs
    :math:`u_0, \\dots, u_s`) and of its observability Gramian (outputs
    :math:`y_s, \\dots, y_{L-1}`) are

    .. math::

        p_s = a_s^2 p_{s-1} + \\tilde b_s^2,\\ p_{-1} = 0, \\qquad
        q_s = a_{s+1}^2 q_{s+1} + c_s^2,\\ q_{L-1} = c_{L-1}^2 .

    The Hankel operator that maps the inputs up to step ``s`` to the outputs from step ``s`` on
    through this one mode has rank one and singular value :math:`\\sqrt{p_s q_s}`. Averages are
    over all samples, i.e. every sequence in the batch and every split time
    :math:`s = 0, \\dots, L-1`:

    .. math::

        \\bar p = \\operatorname{mean}_{\\text{seq}, s} p_s, \\qquad
        \\bar q = \\operatorname{mean}_{\\text{seq}, s} q_s, \\qquad
        \\text{score} = \\sqrt{\\operatorname{mean}_{\\text{seq}, s} p_s q_s} .

    Parameters
    ----------
    dt : (batch, L, D) array
        Step sizes :math:`\\Delta_t[d]`.
    a : (D, N) array
        Continuous-time state matrix :math:`A = -\\exp(A_{\\log})`.
    b : (batch, L, N) or (batch, L, G, N) array
        Input projections, shared by all channels (or per group).
    c : (batch, L, N) or (batch, L, G, N) array
        Output projections, same layout as ``b``.
    time_block : int or None, optional
        Steps evaluated together by the doubling scan (see
        :func:`update_selective_statistics`); ``None`` for the whole sequence.
    xp : array_namespace, optional
        Namespace override.

    Returns
    -------
    SelectiveGramians
        ``(controllability, observability, scores, surrogate)``, each Gramian field
        ``(D, N)``, in float64 where the device has it.

    Raises
    ------
    ShapeError
        If the shapes disagree.

    Notes
    -----
    The score is **mode-wise**, not balanced: it uses only the diagonals of the per-channel
    ``N x N`` Gramians and so ignores the coupling between modes of one channel (the
    off-diagonal entries). It is exact for a channel with one state, and for constant
    parameters and long sequences it tends to the LTI quantity
    :math:`\\sqrt{P_{nn} Q_{nn}} = |\\tilde b c| / (1 - a^2)`. Its square, summed over ``n``,
    is the mean squared Frobenius norm of the Hankel operators without the cross terms. This
    is a one-pass convenience for
    ``finalize_selective_statistics(update_selective_statistics(init_selective_statistics(a),
    ...))``.

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core import selective_gramians
    >>> dt = np.full((1, 400, 1), 0.1)             # batch 1, L = 400, D = 1
    >>> a = -np.array([[1.0, 5.0]])                # N = 2 states
    >>> b = c = np.ones((1, 400, 2))
    >>> g = selective_gramians(dt, a, b, c)
    >>> pole = np.exp(0.1 * a)
    >>> lti = 0.1 / (1 - pole**2)                  # |b~ c| / (1 - a^2)
    >>> bool(np.allclose(g.scores, lti, rtol=0.05))
    True
    """
    stats = init_selective_statistics(a, xp=xp)
    stats = update_selective_statistics(stats, dt, a, b, c, time_block=time_block, xp=xp)
    return finalize_selective_statistics(stats, xp=xp)


def mean_lti_surrogate(
    dt: Array,
    a: Array,
    b: Array,
    c: Array,
    *,
    time_block: int | None = 32,
    xp: Namespace | None = None,
) -> DiagonalStateSpace:
    """The paper's mean-LTI surrogate: one time-invariant SISO system per channel.

    The discretised transition, input and output of the selective layer are averaged over
    every sequence and step of the calibration data:

    .. math::

        \\bar\\lambda[d, n] = \\operatorname{mean}_{\\text{seq}, t}
            \\exp(\\Delta_t[d] A[d, n]), \\quad
        \\bar b[d, n] = \\operatorname{mean}_{\\text{seq}, t} \\Delta_t[d] B_t[n], \\quad
        \\bar c[d, n] = \\operatorname{mean}_{\\text{seq}, t} C_t[n],

    giving channel ``d`` the system
    :math:`h_t = \\operatorname{diag}(\\bar\\lambda[d]) h_{t-1} + \\bar b[d] u_t`,
    :math:`y_t = \\bar c[d]^T h_t`. Its Hankel singular values per channel are
    ``hankel_singular_values(mean_lti_surrogate(...))``, shape ``(D, N)``.

    Parameters
    ----------
    dt : (batch, L, D) array
        Step sizes :math:`\\Delta_t[d]`.
    a : (D, N) array
        Continuous-time state matrix :math:`A = -\\exp(A_{\\log})`.
    b : (batch, L, N) or (batch, L, G, N) array
        Input projections.
    c : (batch, L, N) or (batch, L, G, N) array
        Output projections.
    time_block : int or None, optional
        Steps averaged at once (bounds the ``(batch, T, D, N)`` temporary).
    xp : array_namespace, optional
        Namespace override.

    Returns
    -------
    DiagonalStateSpace
        ``poles (D, N)``, ``b (D, N, 1)``, ``c (D, 1, N)``, ``d = None``, in float64 where the
        device has it; the same as ``selective_gramians(...).surrogate``.

    Raises
    ------
    ShapeError
        If the shapes disagree.

    Notes
    -----
    What is averaged, and why:

    - the **discretised** pole :math:`\\exp(\\Delta_t A)`, the transition the layer actually
      applies, not :math:`A` or :math:`\\Delta_t` alone. A mean of numbers in :math:`(0, 1)`
      stays in :math:`(0, 1)`, so the surrogate is stable whenever every
      :math:`\\Delta_t A < 0`. By convexity (Jensen) it is at least
      :math:`\\exp(\\bar\\Delta A)`: the surrogate remembers longer than a layer run at the
      average step size;
    - the **product** :math:`\\Delta_t B_t`, the input vector the layer applies (Euler input),
      which differs from :math:`\\bar\\Delta \\bar B` when step size and projection correlate;
    - :math:`C_t` alone.

    ``B_t`` and ``C_t`` are linear in the layer input, so their means can be small or cancel
    even when every step is strongly driven; the surrogate then looks nearly uncontrollable.
    :func:`selective_gramians` averages energies (squares) instead and does not cancel.
    """
    stats = init_selective_statistics(a, xp=xp)
    stats = _accumulate(stats, dt, a, b, c, time_block, xp, gramians=False)
    return finalize_selective_statistics(stats, xp=xp).surrogate


def _aggregate(
    per_channel: Array,
    aggregate: str,
    groups: int | None,
    xp: Namespace,
) -> Array:
    channels, states = _shape(per_channel)
    g = 1 if groups is None else groups
    x = xp.reshape(per_channel, (g, channels // g, states))
    if aggregate == "sum":
        out = xp.sum(x, axis=-2)
    elif aggregate == "energy":
        out = xp.sqrt(xp.sum(x * x, axis=-2))
    else:
        total = xp.sum(x, axis=-1, keepdims=True)
        safe = xp.where(total > 0, total, xp.ones_like(total))
        out = xp.sum(xp.where(total > 0, x / safe, xp.zeros_like(x)), axis=-2)
    return out[0, :] if groups is None else out


def state_importance(
    gramians: SelectiveGramians,
    *,
    method: Literal["gramian", "mean_lti", "random"] = "gramian",
    aggregate: Literal["sum", "energy", "normalized"] = "sum",
    groups: int | None = None,
    seed: int = 0,
    xp: Namespace | None = None,
) -> Array:
    """One importance score per state index, shared by all channels (or by each group).

    A selective layer whose ``B`` and ``C`` projections are shared by its channels can only
    keep the same state indices in every channel. This function reduces per-channel,
    per-state scores :math:`s_{d, n}` to one score per index :math:`n`.

    Per-channel scores, by ``method``:

    - ``"gramian"``: :math:`s_{d,n} = \\sqrt{\\operatorname{mean}_{\\text{seq}, s} p_s q_s}`,
      the RMS Hankel singular value of mode ``(d, n)`` of the time-varying layer
      (``gramians.scores``);
    - ``"mean_lti"``: the mode-wise score of the mean-LTI surrogate,
      :math:`s_{d,n} = \\sqrt{P_{nn} Q_{nn}} = |\\bar b_{d,n} \\bar c_{d,n}| /
      (1 - |\\bar\\lambda_{d,n}|^2)` (diagonals of its infinite-horizon Gramians);
    - ``"random"``: independent uniform scores from a NumPy generator seeded with ``seed``
      (the ablation baseline); ``aggregate`` is ignored.

    Aggregation over the channels of a group, by ``aggregate``:

    - ``"sum"``: :math:`\\sum_d s_{d,n}` (scores add like the HSV sums of the paper's rank
      rule);
    - ``"energy"``: :math:`\\sqrt{\\sum_d s_{d,n}^2}` (the mode's share of the summed squared
      Hankel norms);
    - ``"normalized"``: :math:`\\sum_d s_{d,n} / \\sum_{n'} s_{d,n'}` (each channel votes with
      weight one; all-zero channels do not vote).

    Parameters
    ----------
    gramians : SelectiveGramians
        From :func:`selective_gramians` or :func:`finalize_selective_statistics`.
    method : {"gramian", "mean_lti", "random"}, optional
        Per-channel score.
    aggregate : {"sum", "energy", "normalized"}, optional
        Reduction over channels.
    groups : int, optional
        Number of groups ``G`` of consecutive channels with their own index set (Mamba2
        ``ngroups``); ``None`` for one index set for all channels.
    seed : int, optional
        Seed of the ``"random"`` method.
    xp : array_namespace, optional
        Namespace override.

    Returns
    -------
    (N,) or (G, N) array
        Non-negative scores; larger means more important.

    Raises
    ------
    ValueError
        If ``method`` or ``aggregate`` is unknown, or ``groups`` does not divide ``D``.
    StabilityError
        For ``"mean_lti"`` when a surrogate pole has modulus ``>= 1``.

    Notes
    -----
    None of these scores comes with a guarantee for a selective layer. The balanced-truncation
    bound :math:`\\|G - G_r\\|_\\infty \\le 2 \\sum_{i > r} \\sigma_i` holds for LTI systems
    and balanced coordinates; here the system varies with the input, the scores are mode-wise
    (the kept states are a subset of the original coordinates, not balanced ones), and they
    describe the calibration data only. Dropping indices is modal truncation guided by
    Hankel-type scores: check the effect on validation data.
    """
    if not isinstance(gramians, SelectiveGramians):
        msg = f"`gramians` must be a SelectiveGramians; received {type(gramians).__name__}."
        raise TypeError(msg)
    if method not in ("gramian", "mean_lti", "random"):
        msg = f"`method` must be 'gramian', 'mean_lti' or 'random'; received {method!r}."
        raise ValueError(msg)
    if aggregate not in ("sum", "energy", "normalized"):
        msg = f"`aggregate` must be 'sum', 'energy' or 'normalized'; received {aggregate!r}."
        raise ValueError(msg)
    scores = gramians.scores
    xp = _xp.namespace(scores, xp=xp)
    channels, states = _shape(scores)
    if groups is not None:
        groups = check_int(groups, "groups", low=1, high=channels)
        if channels % groups:
            msg = f"`groups` must divide the number of channels D = {channels}; received {groups}."
            raise ValueError(msg)
    if method == "random":
        check_int(seed, "seed", low=0, high=2**63 - 1)
        shape = (states,) if groups is None else (groups, states)
        draw = np.random.default_rng(seed).random(shape)
        return xp.astype(_xp.from_host(draw, like=scores, xp=xp), scores.dtype)
    if method == "mean_lti":
        poles, b, c, _ = gramians.surrogate
        check_stable_poles(poles, "gramians.surrogate.poles", xp)
        scores = xp.abs(b[..., 0] * c[..., 0, :]) / (1 - xp.abs(poles) ** 2)
    return _aggregate(scores, aggregate, groups, xp)


def select_state_indices(importance: Array, rank: int, *, xp: Namespace | None = None) -> Array:
    """Indices of the ``rank`` most important states, in increasing index order.

    Parameters
    ----------
    importance : (..., N) array
        Scores from :func:`state_importance` (real; larger is more important).
    rank : int
        Number of states to keep, in ``[1, N]`` (a host-side decision, e.g. from
        :func:`select_rank` on the sorted scores).
    xp : array_namespace, optional
        Namespace override.

    Returns
    -------
    (..., rank) integer array
        Sorted indices to keep, e.g. for slicing ``A_log[:, idx]`` and the ``B``/``C`` rows of
        the input projection. Scores within a few hundred ulps of each other (relative to the
        largest) tie, and ties are broken towards the lower index, so rounding noise in the
        scores never decides which state is kept. Traceable: the shape depends only on
        ``rank``.

    Raises
    ------
    ShapeError
        If ``importance`` is 0-D.
    ValueError
        If ``rank`` is outside ``[1, N]``.
    """
    xp = _xp.namespace(importance, xp=xp)
    if importance.ndim < 1:
        msg = f"`importance` must have shape (..., N); received shape {_shape(importance)}."
        raise ShapeError(msg)
    rank = check_int(rank, "rank", low=1, high=int(importance.shape[-1]))
    scale = xp.max(xp.abs(importance), axis=-1, keepdims=True)
    tol = ULPS * float(xp.finfo(importance.dtype).eps) * scale
    order = tolerant_argsort([-importance], tol=tol, xp=xp)
    return xp.sort(order[..., :rank], axis=-1)
