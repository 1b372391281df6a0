"""Streaming Gramian statistics of selective (Mamba-style) state-space layers.

A selective layer has, per channel :math:`d` and state index :math:`n`, the scalar recursion

.. math::

    h_t[d, n] = a_t[d, n]\\, h_{t-1}[d, n] + \\Delta_t[d]\\, B_t[n]\\, u_t[d], \\qquad
    y_t[d] = \\sum_n C_t[n]\\, h_t[d, n], \\qquad h_{-1} = 0,

with :math:`a_t[d, n] = \\exp(\\Delta_t[d] A[d, n])` and :math:`A = -\\exp(A_{\\log}) < 0`. Every
channel is a single-input single-output time-varying system with diagonal state matrix; ``B_t``
and ``C_t`` are shared by all channels (or by the channels of one group).

Two families of statistics are collected over calibration sequences, batch by batch, without a
second forward pass and without ever forming ``(batch, L, D, N, N)`` arrays: the time-averaged
diagonals of the time-varying Gramians of the state ``h_t`` with the resulting per-mode Hankel
scores (:func:`selective_gramians`), and the averages that define the paper's mean-LTI
surrogate (:func:`mean_lti_surrogate`). The accumulator :class:`SelectiveStatistics` is built by
:func:`init_selective_statistics`, :func:`update_selective_statistics` and
:func:`merge_selective_statistics` and read by :func:`finalize_selective_statistics`; the two
one-pass functions run that chain on one batch (the surrogate without the Gramian recursions).
:mod:`compressm_core.importance` turns the result into one score per state index. How the
recursions are evaluated (a loop over time, chunks in log space or a doubling scan; see
``method`` of :func:`update_selective_statistics`) is private to
``compressm_core._selective_kernels``.
"""

from __future__ import annotations

from typing import NamedTuple

from . import _xp
from ._selective_kernels import KERNELS, resolve_method
from ._typing import Array, Namespace
from ._validation import check_finite, check_int
from .errors import ShapeError
from .systems import DiagonalStateSpace

__all__ = [
    "SelectiveGramians",
    "SelectiveStatistics",
    "finalize_selective_statistics",
    "init_selective_statistics",
    "mean_lti_surrogate",
    "merge_selective_statistics",
    "selective_gramians",
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
    method: str = "auto",
) -> SelectiveStatistics:
    """Validated body of :func:`update_selective_statistics` (``gramians=False``: means only)."""
    if not isinstance(stats, SelectiveStatistics):
        msg = f"`stats` must be a SelectiveStatistics; received {type(stats).__name__}."
        raise TypeError(msg)
    xp = _xp.namespace(*stats, dt, a, b, c, xp=xp)
    _, steps, channels, states, groups = _check_inputs(dt, a, b, c, xp)
    _check_statistics(stats, channels, states)
    block = steps if time_block is None else check_int(time_block, "time_block", low=1, high=2**62)
    kernel = KERNELS[resolve_method(method, dt, stats.count.dtype, xp)]
    sums = kernel(
        stats._asdict(), dt, a, b, c, channels, groups, max(block, 1), xp, gramians=gramians
    )
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
    method: str = "auto",
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
        Steps processed together (``None``: the whole sequence): the span whose poles are
        computed at once, and the chunk of the ``"chunked"`` and ``"doubling"`` methods. Peak
        memory is a few arrays of ``(batch, T, D, N)`` elements (about ten for
        ``"chunked"``).
    method : {"auto", "sequential", "chunked", "doubling"}, optional
        How the recursions are evaluated; every method gives the same sums up to rounding.

        - ``"sequential"``: one step at a time, in place, about ten operations per step on
          ``(batch, D, N)`` buffers (``O(L)`` work). The sums of a block of steps are kept
          in the inputs' precision when that is single or half precision, then folded into
          the accumulator. Not for JAX arrays.
        - ``"chunked"``: each chunk of ``time_block`` steps by cumulative log-sum-exps over
          time in the accumulator's precision, chunks chained by a carry: about 30 whole-array
          operations per chunk, no loop over time steps (``O(L)`` work, several
          transcendental functions per sample).
        - ``"doubling"``: each chunk by a Hillis-Steele doubling scan, ``ceil(log2 T)``
          levels of products (``O(L log T)`` work), no loop over time steps.
        - ``"auto"`` (default): ``"doubling"`` for JAX and traced arrays, ``"sequential"``
          for arrays in host memory (on a CPU the cost is the arithmetic, which the loop
          minimises), ``"chunked"`` for arrays on an accelerator with float64 sums (there a
          loop over time costs one kernel launch per operation and step), ``"sequential"``
          on devices without float64.
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
    ValueError
        If ``method`` is not one of the names above.
    BackendCapabilityError
        If ``method="sequential"`` is asked for JAX arrays.

    Notes
    -----
    Precision: the sums are accumulated in ``stats``' dtype. With float32 (or half precision)
    inputs and a float64 accumulator, the per-step recursions of ``"sequential"`` run in
    float32 and are folded into the float64 sums once per block; every recursion is a
    contraction with non-negative terms, so the relative error stays near float32 rounding
    (about 1e-6) however long the sequence. Pass float64 inputs for float64 throughout. The
    other methods run in the accumulator's precision. ``"chunked"`` works with logarithms of
    magnitude up to :math:`|S| = 2 |A| \\sum_{t \\in \\text{chunk}} \\Delta_t`, which costs a
    relative error of about :math:`\\epsilon |S|` (``1e-13`` at :math:`|S| = 10^3` in
    float64); it never exponentiates a quantity that can overflow.

    Only shapes are checked: no value is read back from the device, so the update can run in
    forward hooks of a training loop without synchronisation. Non-finite inputs propagate into
    the sums and are reported by :func:`finalize_selective_statistics`. The Gramian sums use the
    forward-only identities

    .. math::

        \\sum_s q_s = \\sum_t C_t^2\\, m_t, \\quad m_t = a_t^2 m_{t-1} + 1, \\qquad
        \\sum_s p_s q_s = \\sum_t C_t^2\\, r_t, \\quad r_t = a_t^2 r_{t-1} + p_t,

    so no backward pass over time and no stored history beyond one block is needed. Cost
    ``O(batch L D N)`` elementwise operations for ``"sequential"`` (about ten per sample and
    mode) and ``"chunked"`` (about 30, including three cumulative log-sum-exps),
    ``O(batch L D N log T)`` for ``"doubling"``. The cost is proportional to the
    number of sequences: to make it cheaper, pass a subset of the batch (every field is a sum
    over sequences, so a subset estimates the same averages from fewer samples).
    """
    return _accumulate(stats, dt, a, b, c, time_block, xp, gramians=True, method=method)


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
    method: str = "auto",
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
        Steps evaluated together (see :func:`update_selective_statistics`); ``None`` for the
        whole sequence.
    method : {"auto", "sequential", "chunked", "doubling"}, optional
        How the recursions are evaluated (see :func:`update_selective_statistics`).
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
    ValueError
        If ``method`` is not a known method.

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
    stats = update_selective_statistics(
        stats, dt, a, b, c, time_block=time_block, method=method, xp=xp
    )
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
