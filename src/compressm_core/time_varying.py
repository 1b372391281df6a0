"""Finite-horizon Gramians of linear time-varying (LTV) discrete-time systems.

The system

.. math::

    x_{t+1} = A_t x_t + B_t u_t, \\qquad y_t = C_t x_t, \\qquad t = 0, \\dots, L - 1,

is given as sequences of matrices stacked along a time axis. The Gramians are computed by a
binary tree reduction over time (``ceil(log2 L)`` levels of batched products), which is the
sequential recursion regrouped: no Python loop over ``L``, no data-dependent shapes, so it runs
under ``jax.jit`` and ``torch.compile``. The selective (Mamba) fast path, which needs the
Gramian diagonals at every time step, lives in :mod:`compressm_core.selective_statistics`.
"""

from __future__ import annotations

from typing import NamedTuple

from . import _xp
from ._typing import Array, Namespace
from ._validation import broadcast_shapes, check_finite
from .errors import ShapeError

__all__ = ["TimeVaryingGramians", "time_varying_gramians"]


class TimeVaryingGramians(NamedTuple):
    """Result of :func:`time_varying_gramians`.

    Attributes
    ----------
    controllability : (..., n, n) array
        :math:`P_L`, the reachability Gramian of the final state :math:`x_L` (from
        :math:`x_0 = 0`).
    observability : (..., n, n) array
        :math:`Q_0`, the observability Gramian of the initial state :math:`x_0` (with no input).
    """

    controllability: Array
    observability: Array


def _shape(x: Array) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def _broadcastable(shapes: list[tuple[int, ...]]) -> bool:
    try:
        broadcast_shapes(shapes, "")
    except ShapeError:
        return False
    return True


def _check_sequences(
    a_seq: Array, b_seq: Array, c_seq: Array, diagonal: bool | None
) -> tuple[bool, tuple[int, ...]]:
    """Check the shapes of the three sequences; return ``(diagonal, batch)``."""
    for x, name, core in ((b_seq, "b_seq", "(..., L, n, m)"), (c_seq, "c_seq", "(..., L, p, n)")):
        if x.ndim < 3:
            msg = f"`{name}` must have shape {core}; received shape {_shape(x)}."
            raise ShapeError(msg)
    steps, n = int(b_seq.shape[-3]), int(b_seq.shape[-2])
    if steps == 0:
        msg = "`b_seq` must hold at least one time step (L >= 1); received L = 0."
        raise ShapeError(msg)
    if (int(c_seq.shape[-3]), int(c_seq.shape[-1])) != (steps, n):
        msg = (
            f"`c_seq` must have shape (..., L, p, n) = (..., {steps}, p, {n}) to match `b_seq`; "
            f"received shape {_shape(c_seq)}."
        )
        raise ShapeError(msg)
    a_shape = _shape(a_seq)
    others = [_shape(b_seq)[:-3], _shape(c_seq)[:-3]]
    fits_dense = (
        len(a_shape) >= 3
        and a_shape[-3:] == (steps, n, n)
        and _broadcastable([a_shape[:-3], *others])
    )
    fits_diagonal = (
        len(a_shape) >= 2
        and a_shape[-2:] == (steps, n)
        and _broadcastable([a_shape[:-2], *others])
    )
    dense_form = f"(..., {steps}, {n}, {n})"
    diagonal_form = f"(..., {steps}, {n})"
    if diagonal is None:
        if fits_dense and fits_diagonal:
            msg = (
                f"`a_seq` of shape {a_shape} fits both the dense {dense_form} and the diagonal "
                f"{diagonal_form} form (L = n = {n}); pass `diagonal=True` or `diagonal=False`."
            )
            raise ShapeError(msg)
        if not (fits_dense or fits_diagonal):
            msg = (
                f"`a_seq` must have shape {dense_form} (dense) or {diagonal_form} (diagonal) to "
                f"match `b_seq` (L = {steps}, n = {n}); received shape {a_shape}."
            )
            raise ShapeError(msg)
        diagonal = fits_diagonal
    if not (fits_diagonal if diagonal else fits_dense):
        form = diagonal_form if diagonal else dense_form
        msg = (
            f"`a_seq` must have shape {form} to match `b_seq` (L = {steps}, n = {n}); "
            f"received shape {a_shape}."
        )
        raise ShapeError(msg)
    core_a = 2 if diagonal else 3
    batch = broadcast_shapes(
        [a_shape[:-core_a], _shape(b_seq)[:-3], _shape(c_seq)[:-3]],
        "`a_seq`, `b_seq` and `c_seq`",
    )
    return diagonal, batch


def _congruence(a: Array, x: Array, xp: Namespace, *, diagonal: bool, adjoint: bool) -> Array:
    """``A X A^H`` (or ``A^H X A`` with ``adjoint``) for dense ``A`` or ``A = diag(a)``."""
    if diagonal:
        left = _xp.conj(a, xp) if adjoint else a
        return left[..., :, None] * x * _xp.conj(left, xp)[..., None, :]
    if adjoint:
        return _xp.conj_transpose(a, xp) @ x @ a
    return a @ x @ _xp.conj_transpose(a, xp)


def _tree_reduce(a: Array, g: Array, xp: Namespace, *, diagonal: bool, adjoint: bool) -> Array:
    """Fold the time axis of ``(A_t, G_t)`` pairwise, ``ceil(log2 L)`` levels.

    Controllability (``adjoint=False``) composes an earlier ``(A1, P1)`` with a later
    ``(A2, P2)`` into ``(A2 A1, A2 P1 A2^H + P2)``; observability (``adjoint=True``) into
    ``(A2 A1, Q1 + A1^H Q2 A1)``. An odd level is padded at the end with the identity element
    ``(I, 0)``. ``a`` is ``(..., L, n)`` (diagonal) or ``(..., L, n, n)``; ``g`` is
    ``(..., L, n, n)``.
    """
    a_core = 1 if diagonal else 2
    n = int(g.shape[-1])
    while int(g.shape[-3]) > 1:
        if int(g.shape[-3]) % 2:
            one = xp.ones(n, dtype=a.dtype, device=_xp.device_of(a))
            if not diagonal:
                one = xp.eye(n, dtype=a.dtype, device=_xp.device_of(a))
            pad_a = xp.broadcast_to(one, (*a.shape[: -a_core - 1], 1, *a.shape[-a_core:]))
            a = xp.concat([a, pad_a], axis=-a_core - 1)
            g = xp.concat([g, xp.zeros_like(g[..., :1, :, :])], axis=-3)
        if diagonal:
            a1, a2 = a[..., 0::2, :], a[..., 1::2, :]
        else:
            a1, a2 = a[..., 0::2, :, :], a[..., 1::2, :, :]
        g1, g2 = g[..., 0::2, :, :], g[..., 1::2, :, :]
        if adjoint:
            g = g1 + _congruence(a1, g2, xp, diagonal=diagonal, adjoint=True)
        else:
            g = _congruence(a2, g1, xp, diagonal=diagonal, adjoint=False) + g2
        a = a2 * a1 if diagonal else a2 @ a1
    return g[..., 0, :, :]


def time_varying_gramians(
    a_seq: Array,
    b_seq: Array,
    c_seq: Array,
    *,
    diagonal: bool | None = None,
    xp: Namespace | None = None,
) -> TimeVaryingGramians:
    """Finite-horizon Gramians :math:`(P_L, Q_0)` of a linear time-varying system.

    For :math:`x_{t+1} = A_t x_t + B_t u_t`, :math:`y_t = C_t x_t`, :math:`t = 0, \\dots, L-1`,
    the controllability Gramian runs forward from :math:`P_0 = 0` and the observability Gramian
    backward from :math:`Q_L = 0`:

    .. math::

        P_{t+1} = A_t P_t A_t^H + B_t B_t^H, \\qquad
        Q_t = A_t^H Q_{t+1} A_t + C_t^H C_t .

    Returned are :math:`P_L` and :math:`Q_0`. With the transition matrix
    :math:`\\Phi(t, s) = A_{t-1} \\cdots A_s` (:math:`\\Phi(s, s) = I`),

    .. math::

        P_L = \\sum_{t=0}^{L-1} \\Phi(L, t+1) B_t B_t^H \\Phi(L, t+1)^H, \\qquad
        Q_0 = \\sum_{t=0}^{L-1} \\Phi(t, 0)^H C_t^H C_t \\Phi(t, 0),

    so :math:`x_L^H P_L^{+} x_L` is the least input energy that reaches the final state
    :math:`x_L` from rest, and :math:`x_0^H Q_0 x_0` is the output energy
    :math:`\\sum_t \\|y_t\\|^2` released by the initial state :math:`x_0` with no input. For
    constant matrices they are exactly the time-limited Gramians
    ``controllability_gramian(sys, horizon=L)`` and ``observability_gramian(sys, horizon=L)``,
    and they converge to the infinite-horizon Gramians as ``L`` grows when ``A`` is stable.

    Parameters
    ----------
    a_seq : (..., L, n, n) or (..., L, n) array
        State matrices :math:`A_t`, dense or (``diagonal``) their diagonals.
    b_seq : (..., L, n, m) array
        Input matrices :math:`B_t`.
    c_seq : (..., L, p, n) array
        Output matrices :math:`C_t`.
    diagonal : bool, optional
        Whether ``a_seq`` holds diagonals. By default inferred from the shapes; required when
        ``L == n`` makes both readings possible.
    xp : array_namespace, optional
        Namespace override.

    Returns
    -------
    TimeVaryingGramians
        ``(controllability, observability) = (P_L, Q_0)``, each ``(..., n, n)``, Hermitian
        positive semi-definite, in the promoted dtype of the inputs. Leading dimensions of the
        three sequences broadcast.

    Raises
    ------
    ShapeError
        If the sequences disagree in ``L`` or ``n``, or the form of ``a_seq`` is ambiguous.
    StabilityError
        If an entry is not finite (checked eagerly only).

    Notes
    -----
    The recursion is evaluated as a balanced binary tree over time: adjacent steps are
    composed pairwise, ``(A_2 A_1, A_2 P_1 A_2^H + P_2)`` forward and
    ``(A_2 A_1, Q_1 + A_1^H Q_2 A_1)`` backward, in ``ceil(log2 L)`` levels. The cost is
    ``O(L n^3)`` for dense and ``O(L n^2)`` for diagonal ``A_t`` (the Gramians themselves are
    full ``n x n`` matrices either way), the same as the sequential recursion, with depth
    ``log2 L``. No stability is required: the horizon is finite. Computed in float64 or
    complex128 where the device has it.

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core import time_varying_gramians
    >>> a = np.array([[0.5], [0.9]])            # L = 2 steps, n = 1, diagonal form
    >>> b = np.ones((2, 1, 1))
    >>> c = np.ones((2, 1, 1))
    >>> p, q = time_varying_gramians(a, b, c)
    >>> bool(np.allclose(p, 0.9**2 * 1.0 + 1.0)), bool(np.allclose(q, 1.0 + 0.5**2 * 1.0))
    (True, True)
    """
    xp = _xp.namespace(a_seq, b_seq, c_seq, xp=xp)
    diagonal, batch = _check_sequences(a_seq, b_seq, c_seq, diagonal)
    for x, name in ((a_seq, "a_seq"), (b_seq, "b_seq"), (c_seq, "c_seq")):
        check_finite(x, name, xp)
    (a, b, c), _work, result = _xp.promote(a_seq, b_seq, c_seq, xp=xp)
    steps, n = int(b_seq.shape[-3]), int(b_seq.shape[-2])
    core_a = (steps, n) if diagonal else (steps, n, n)
    a = xp.broadcast_to(a, (*batch, *core_a))
    bb = xp.broadcast_to(b @ _xp.conj_transpose(b, xp), (*batch, steps, n, n))
    cc = xp.broadcast_to(_xp.conj_transpose(c, xp) @ c, (*batch, steps, n, n))
    p = _tree_reduce(a, bb, xp, diagonal=diagonal, adjoint=False)
    q = _tree_reduce(a, cc, xp, diagonal=diagonal, adjoint=True)
    p = (p + _xp.conj_transpose(p, xp)) / 2
    q = (q + _xp.conj_transpose(q, xp)) / 2
    return TimeVaryingGramians(xp.astype(p, result), xp.astype(q, result))
