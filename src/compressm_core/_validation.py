"""Boundary checks, called first in public functions and never inside traced inner loops.

Messages follow one template: which argument, what was expected, what was received. Value checks
(finiteness, stability) are skipped for abstract values under ``jax.jit``.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from . import _xp
from ._typing import Array, Namespace
from .checks import check_int
from .errors import ShapeError, StabilityError
from .systems import DiagonalStateSpace, StateSpace

__all__ = [
    "SystemInfo",
    "broadcast_shapes",
    "check_finite",
    "check_int",
    "check_square",
    "check_stable_poles",
    "check_system",
    "check_tau",
]


class SystemInfo(NamedTuple):
    """Sizes of a validated system."""

    n: int
    m: int
    p: int
    batch: tuple[int, ...]


def _shape(x: Array) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def broadcast_shapes(shapes: list[tuple[int, ...]], what: str) -> tuple[int, ...]:
    ndim = max((len(s) for s in shapes), default=0)
    out = []
    for axis in range(-ndim, 0):
        sizes = {s[axis] for s in shapes if len(s) >= -axis} - {1}
        if len(sizes) > 1:
            msg = f"Expected broadcastable leading dimensions for {what}; received {shapes}."
            raise ShapeError(msg)
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def check_square(x: Array, name: str) -> int:
    """Check that ``x`` is a (batch of) square matrices and return its size."""
    shape = _shape(x)
    if len(shape) < 2 or shape[-1] != shape[-2]:
        msg = f"`{name}` must be a (batch of) square matrices (..., n, n); received shape {shape}."
        raise ShapeError(msg)
    return shape[-1]


def check_finite(x: Array, name: str, xp: Namespace) -> None:
    """Check that every entry of ``x`` is finite (skipped while tracing)."""
    if _xp.is_traced(x):
        return
    if not bool(xp.all(xp.isfinite(x))):
        msg = f"`{name}` must contain only finite values; received NaN or infinite entries."
        raise StabilityError(msg)


def check_stable_poles(poles: Array, name: str, xp: Namespace) -> None:
    """Check ``|pole| < 1`` for every pole (skipped while tracing)."""
    if _xp.is_traced(poles) or poles.shape[-1] == 0:
        return
    radius = _xp.finite_max(poles, xp)
    if not radius < 1.0:
        msg = (
            f"`{name}` must be Schur stable (every |pole| < 1); received a pole of modulus "
            f"{radius:.17g}."
        )
        raise StabilityError(msg)


def check_tau(tau: object) -> float:
    """``tau`` as a Python float if it is a real number in ``[0, 1)`` (bools are refused).

    Raises
    ------
    ValueError
        If ``tau`` is not a real number in ``[0, 1)`` (NaN included).
    """
    real = isinstance(tau, numbers.Real) and not isinstance(tau, (bool, np.bool_))
    if not (real and 0 <= float(tau) < 1):  # type: ignore[arg-type]
        msg = f"`tau` must be a number in [0, 1); received {tau!r}."
        raise ValueError(msg)
    return float(tau)  # type: ignore[arg-type]


def check_system(
    sys: object,
    *,
    name: str = "sys",
    xp: Namespace | None = None,
    stable: bool = True,
) -> tuple[StateSpace | DiagonalStateSpace, SystemInfo, Namespace]:
    """Validate a system and broadcast its fields to one batch shape.

    Parameters
    ----------
    sys : object
        Must be a :class:`StateSpace` or :class:`DiagonalStateSpace`.
    name : str
        Argument name used in error messages.
    xp : array_namespace, optional
        Namespace override.
    stable : bool
        Also check ``|pole| < 1`` for diagonal systems (dense systems are checked by the
        Lyapunov solver, which detects divergence for free).

    Returns
    -------
    system, info, xp
        The system with broadcast fields, its sizes and its namespace.
    """
    if not isinstance(sys, (StateSpace, DiagonalStateSpace)):
        msg = (
            f"`{name}` must be a StateSpace or DiagonalStateSpace; received {type(sys).__name__}."
        )
        raise TypeError(msg)
    first, b, c, d = sys
    xp = _xp.namespace(first, b, c, d, xp=xp)
    diagonal = isinstance(sys, DiagonalStateSpace)
    field = "poles" if diagonal else "a"
    if diagonal:
        if first.ndim < 1:
            msg = f"`{name}.poles` must have shape (..., n); received shape {_shape(first)}."
            raise ShapeError(msg)
        n = _shape(first)[-1]
        batch_a = _shape(first)[:-1]
    else:
        n = check_square(first, f"{name}.a")
        batch_a = _shape(first)[:-2]
    for arr, fname in ((b, "b"), (c, "c")):
        if arr.ndim < 2:
            msg = f"`{name}.{fname}` must be at least 2-D; received shape {_shape(arr)}."
            raise ShapeError(msg)
    if b.shape[-2] != n:
        msg = (
            f"`{name}.b` must have shape (..., n, m) with n = {n} states; received shape "
            f"{_shape(b)}."
        )
        raise ShapeError(msg)
    if c.shape[-1] != n:
        msg = (
            f"`{name}.c` must have shape (..., p, n) with n = {n} states; received shape "
            f"{_shape(c)}."
        )
        raise ShapeError(msg)
    m, p = int(b.shape[-1]), int(c.shape[-2])
    shapes = [batch_a, _shape(b)[:-2], _shape(c)[:-2]]
    if d is not None:
        if d.ndim < 2 or (int(d.shape[-2]), int(d.shape[-1])) != (p, m):
            msg = (
                f"`{name}.d` must have shape (..., p, m) = (..., {p}, {m}); received {_shape(d)}."
            )
            raise ShapeError(msg)
        shapes.append(_shape(d)[:-2])
    batch = broadcast_shapes(shapes, f"the fields of `{name}`")
    for arr, fname in ((first, field), (b, "b"), (c, "c"), (d, "d")):
        if arr is not None:
            if not xp.isdtype(arr.dtype, ("real floating", "complex floating", "integral")):
                msg = f"`{name}.{fname}` must have a numeric dtype; received {arr.dtype}."
                raise TypeError(msg)
            check_finite(arr, f"{name}.{fname}", xp)
    if diagonal and stable:
        check_stable_poles(first, f"{name}.poles", xp)

    def bcast(x: Array | None, core: tuple[int, ...]) -> Array | None:
        if x is None or _shape(x)[: x.ndim - len(core)] == batch:
            return x
        return xp.broadcast_to(x, (*batch, *core))

    core_a = (n,) if diagonal else (n, n)
    fields = (bcast(first, core_a), bcast(b, (n, m)), bcast(c, (p, n)), bcast(d, (p, m)))
    out = DiagonalStateSpace(*fields) if diagonal else StateSpace(*fields)
    return out, SystemInfo(n, m, p, batch), xp
