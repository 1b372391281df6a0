"""The recursions behind the selective statistics, evaluated three ways.

Private helpers of :mod:`compressm_core.selective_statistics`: each ``accumulate_*`` function
adds the sums of one batch of whole sequences to a dict of running sums (the fields of
``SelectiveStatistics``) and returns a new dict. :func:`accumulate_stepwise` runs the
recursions one step at a time, in place (``O(L)`` work; eager arrays in host memory);
:func:`accumulate_chunked` evaluates a chunk of steps by cumulative log-sum-exps over time and
chains chunks by a carry (a fixed number of whole-array operations per chunk; eager arrays on
accelerators, where each operation is a kernel launch); :func:`accumulate_scan` evaluates a
chunk by a doubling scan (JAX and traced code, where a loop over time would be unrolled).
:func:`resolve_method` picks one (``method`` of ``update_selective_statistics``). On PyTorch
the in-place products use ``Tensor.addcmul_``, reached through the arrays themselves: this
module imports no framework.
"""

from __future__ import annotations

from array_api_compat import is_jax_namespace, is_torch_namespace

from . import _xp
from ._typing import Array, DType, Namespace
from .errors import BackendCapabilityError

__all__ = [
    "KERNELS",
    "METHODS",
    "accumulate_chunked",
    "accumulate_scan",
    "accumulate_stepwise",
    "resolve_method",
]

METHODS = ("auto", "chunked", "doubling", "sequential")
"""The values of ``method`` of :func:`compressm_core.update_selective_statistics`."""


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


def accumulate_scan(
    sums: dict[str, Array],
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
) -> dict[str, Array]:
    """Add the sums of whole sequences by the blocked doubling scan (JAX, traced code).

    Blocks of ``block`` steps are evaluated by :func:`_scan` and chained by a Python loop
    carrying three ``(batch, D, N)`` states; the inputs are cast to the precision of the sums.
    Returns a new dict; ``gramians=False`` adds the means only.
    """
    batch, steps = int(dt.shape[0]), int(dt.shape[1])
    states = int(a.shape[-1])
    sums = dict(sums)
    work = sums["count"].dtype
    dt, a, b, c = (xp.astype(x, work) for x in (dt, a, b, c))
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
    return sums


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
    out = xp.empty(tuple(int(s) for s in x.shape), dtype=dtype, device=_xp.device_of(x))
    out[...] = x
    return out


def _add_product(acc: Array, x: Array, y: Array, xp: Namespace) -> None:
    """``acc += x * y`` in place (one fused pass on PyTorch, a temporary elsewhere)."""
    if is_torch_namespace(xp):
        acc.addcmul_(x, y)
    else:
        acc += x * y


def accumulate_stepwise(
    sums: dict[str, Array],
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
) -> dict[str, Array]:
    """Add the sums of whole sequences one step at a time (eager backends); a new dict.

    The recursions of :func:`accumulate_scan`, ``p_t = a_t^2 p_{t-1} + b~_t^2``,
    ``m_t = a_t^2 m_{t-1} + 1``, ``r_t = a_t^2 r_{t-1} + p_t``, updated in place on
    ``(batch, D, N)`` buffers: ``O(L)`` work, no temporary with a long time axis (the doubling
    scan costs ``O(L log L)`` and allocates blocks of ``(batch, T, D, N)``; it is kept for JAX,
    where a loop over time would be unrolled). The poles of ``block`` steps are computed
    together; the running sums over time are kept per sequence in the step precision
    (:func:`_step_dtype`) and folded into the accumulator's precision once per block, so no sum
    in single precision spans more than ``block`` steps.
    """
    batch, steps = int(dt.shape[0]), int(dt.shape[1])
    states = int(a.shape[-1])
    work = sums["count"].dtype
    step = _step_dtype(work, (dt, a, b, c), xp)
    dev = _xp.device_of(a)
    sums = dict(sums)
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
    return sums


def _log_square(x: Array, xp: Namespace) -> Array:
    """``log(x^2)``, ``-inf`` where ``x = 0`` (no ``log(0)`` is evaluated)."""
    nonzero = x != 0
    return xp.where(nonzero, 2 * xp.log(xp.abs(xp.where(nonzero, x, 1))), -xp.inf)


def _decayed_sum(log_start: Array, shifted: Array, xp: Namespace) -> Array:
    """``log x_t - S_t`` of ``x_t = alpha_t x_{t-1} + beta_t`` over one chunk, in log space.

    With ``S_t = sum_{j <= t} log alpha_j`` (``0`` before the chunk) and
    ``shifted = log beta_t - S_t``,

    .. math::

        x_t = e^{S_t} \\Bigl(x_{-1} + \\sum_{j \\le t} e^{\\log \\beta_j - S_j}\\Bigr),
        \\qquad
        \\log x_t - S_t = \\operatorname{logaddexp}\\Bigl(\\log x_{-1},\\,
            \\log \\sum_{j \\le t} e^{\\log \\beta_j - S_j}\\Bigr),

    so nothing is exponentiated but the final ``log x_t``: no overflow however fast the poles
    decay (``-S_j`` may exceed any floating-point exponent), and zero terms (``-inf``) drop
    out. ``log_start`` is ``(batch, D, N)``, ``shifted`` ``(batch, T, D, N)``.
    """
    scanned = _xp.cumulative_logsumexp(shifted, 1, xp)
    return xp.logaddexp(log_start[:, None, :, :], scanned)


def accumulate_chunked(
    sums: dict[str, Array],
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
) -> dict[str, Array]:
    """Add the sums of whole sequences chunk by chunk, in log space (accelerators); a new dict.

    The recursions of :func:`accumulate_scan` have diagonal transitions
    ``alpha_t = a_t^2 = exp(2 dt_t A)``, whose cumulative log-products over a chunk are exactly
    ``S_t = 2 A cumsum(dt)_t`` (a cumulative sum over ``(batch, T, D)``, then one product).
    Each recursion ``x_t = alpha_t x_{t-1} + beta_t`` over a chunk of ``block`` steps is one
    cumulative log-sum-exp over time (:func:`_decayed_sum`): ``p`` with
    ``beta = dt^2 B^2``, ``m`` with ``beta = 1``, then ``r`` with ``beta = p``. Chunks are
    chained by the logarithms of the last ``p, m, r`` of the previous chunk (a Python loop
    over chunks, not steps): an update costs about 30 whole-array operations per chunk instead
    of about ten per time step. Everything runs in the accumulator's precision (float64 where
    the device has it): the logarithms reach ``|S_t|`` within a chunk, and the relative error
    of a term is about ``eps |S_t|``.
    """
    batch, steps = int(dt.shape[0]), int(dt.shape[1])
    sums = dict(sums)
    work = sums["count"].dtype
    dt, a, b, c = (xp.astype(x, work) for x in (dt, a, b, c))
    drive_sum, out_sum = _mean_sums(dt, b, c, channels, groups, xp)
    sums["b"] = sums["b"] + drive_sum
    sums["c"] = sums["c"] + out_sum
    sums["count"] = sums["count"] + batch * steps
    dt = dt[..., None]  # (batch, L, D, 1)
    if gramians:
        # log b~_t^2 = log dt_t^2 + log B_t^2, (batch, L, D, 1) and (batch, L, D or 1, N)
        log_dt2 = _log_square(dt, xp)
        log_b2 = _per_channel(_log_square(b, xp), channels, groups, xp)
        out = _per_channel(c, channels, groups, xp)
        gamma = out * out
        minus_twice_a = -2 * a
        start = xp.full(
            (batch, channels, int(a.shape[-1])), -xp.inf, dtype=work, device=_xp.device_of(a)
        )
        log_p = log_m = log_r = start
    for lo in range(0, steps, block):
        hi = min(lo + block, steps)
        step_dt = dt[:, lo:hi, ...]
        sums["poles"] = sums["poles"] + xp.sum(xp.exp(step_dt * a), axis=(0, 1))
        if not gramians:
            continue
        # -S_t = -log prod_{j <= t} a_j^2 >= 0, from the start of the chunk
        rise = xp.cumulative_sum(step_dt, axis=1) * minus_twice_a
        shifted = (log_dt2[:, lo:hi, ...] + rise) + log_b2[:, lo:hi, ...]
        # log x_t - S_t of p (beta = b~^2), m (beta = 1) and r (beta = p: log p_t - S_t)
        rel_p = _decayed_sum(log_p, shifted, xp)
        rel_m = _decayed_sum(log_m, rise, xp)
        rel_r = _decayed_sum(log_r, rel_p, xp)
        log_p, log_m, log_r = (rel - rise for rel in (rel_p, rel_m, rel_r))
        weight = gamma[:, lo:hi, ...]
        sums["controllability"] = sums["controllability"] + xp.sum(xp.exp(log_p), axis=(0, 1))
        sums["observability"] = sums["observability"] + xp.sum(weight * xp.exp(log_m), axis=(0, 1))
        sums["energy"] = sums["energy"] + xp.sum(weight * xp.exp(log_r), axis=(0, 1))
        log_p, log_m, log_r = log_p[:, -1, ...], log_m[:, -1, ...], log_r[:, -1, ...]
    return sums


KERNELS = {
    "chunked": accumulate_chunked,
    "doubling": accumulate_scan,
    "sequential": accumulate_stepwise,
}


def resolve_method(method: str, dt: Array, work: DType, xp: Namespace) -> str:
    """The kernel for ``method``; ``"auto"`` picks by backend, device and precision.

    JAX and traced arrays: the doubling scan (a loop over time would be unrolled). Eager
    arrays in host memory: the in-place loop over time (fewest operations per sample; on a CPU
    the cost is arithmetic, not the number of operations). Eager arrays on an accelerator with
    float64 sums: chunks in log space (a fixed number of operations per chunk; a loop over
    time is one kernel launch per operation and step); without float64 (PyTorch on MPS) the
    loop, since the logarithms would lose precision.
    """
    if method not in METHODS:
        msg = f"`method` must be one of {', '.join(map(repr, METHODS))}; received {method!r}."
        raise ValueError(msg)
    lazy = is_jax_namespace(xp) or _xp.is_traced(dt)
    if method == "sequential" and lazy:
        msg = (
            "`method='sequential'` updates buffers in place, which JAX arrays do not support; "
            "use 'chunked' or 'doubling' (or 'auto')."
        )
        raise BackendCapabilityError(msg)
    if method != "auto":
        return method
    if lazy:
        return "doubling"
    if _xp.is_cpu(dt) or work != xp.float64:
        return "sequential"
    return "chunked"
