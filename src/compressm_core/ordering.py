"""Orderings that are a property of the values, not of their last bits.

An eigenvalue routine returns a conjugate pair ``0.5j, -0.5j`` with moduli that differ in the
16th digit, and which one is larger depends on the BLAS / LAPACK build and the CPU. A plain sort
by modulus therefore orders such pairs by rounding noise. The functions here compare every key
with a tolerance: values closer than ``tol`` (chained, as in single-linkage clustering) are
*tied*, and ties fall through to the next key and finally to the original index.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import _xp
from ._typing import Array, Namespace

__all__ = ["pole_order", "tolerant_argsort"]

#: Default relative tolerance of the orderings: a few hundred units in the last place.
ULPS = 512


def _default_tol(values: Array, rtol: float | None, xp: Namespace) -> Array:
    """``rtol * max(1, max|values|)`` per batch member, shape ``(..., 1)``."""
    real = _xp.real_dtype_of(values.dtype, xp)
    if rtol is None:
        rtol = ULPS * float(xp.finfo(real).eps)
    scale = xp.max(xp.abs(values), axis=-1, keepdims=True) if values.shape[-1] else None
    one = xp.ones((*values.shape[:-1], 1), dtype=real, device=_xp.device_of(values))
    if scale is None:
        return rtol * one
    return rtol * xp.maximum(xp.astype(scale, real), one)


def _cluster_ids(key: Array, tol: Array, xp: Namespace) -> Array:
    """Id of each entry's cluster, ascending in ``key``; neighbours within ``tol`` merge."""
    order = xp.argsort(key, axis=-1, stable=True)
    ordered = xp.take_along_axis(key, order, axis=-1)
    step = xp.astype(ordered[..., 1:] - ordered[..., :-1] > tol, xp.int64)
    first = xp.zeros((*key.shape[:-1], 1), dtype=xp.int64, device=_xp.device_of(key))
    ids = xp.concat([first, xp.cumulative_sum(step, axis=-1)], axis=-1)
    inverse = xp.argsort(order, axis=-1, stable=True)
    return xp.take_along_axis(ids, inverse, axis=-1)


def tolerant_argsort(
    keys: Sequence[Array], *, tol: Array | float, xp: Namespace | None = None
) -> Array:
    """Indices that sort by ``keys[0]`` ascending, ties by ``keys[1]``, ..., then by index.

    Two entries *tie* on a key when their values are within ``tol`` of each other (or linked by
    a chain of such neighbours). The result is a stable lexicographic order of the tie classes,
    so a perturbation of the keys much smaller than ``tol`` leaves it unchanged, unlike
    :func:`numpy.lexsort` on the raw keys.

    Parameters
    ----------
    keys : sequence of (..., n) real arrays
        Sort keys, most significant first (the reverse of :func:`numpy.lexsort`). Negate a key to
        sort it in descending order.
    tol : float or (..., 1) real array
        Absolute tolerance of a tie, the same for every key.
    xp : namespace, optional
        Array namespace; inferred from ``keys``.

    Returns
    -------
    (..., n) integer array
        The permutation; traceable (no host synchronisation).
    """
    if not keys:
        msg = "`keys` must hold at least one array; received an empty sequence."
        raise ValueError(msg)
    xp = _xp.namespace(*keys, xp=xp)
    # least significant key first; each stable sort keeps the order of the previous ties
    order = xp.argsort(_cluster_ids(keys[-1], tol, xp), axis=-1, stable=True)
    for key in reversed(keys[:-1]):
        ids = xp.take_along_axis(_cluster_ids(key, tol, xp), order, axis=-1)
        order = xp.take_along_axis(order, xp.argsort(ids, axis=-1, stable=True), axis=-1)
    return order


def pole_order(poles: Array, *, rtol: float | None = None, xp: Namespace | None = None) -> Array:
    """The documented order of modes: modulus descending, then imaginary part, then real part.

    Moduli, imaginary and real parts are compared with the tolerance
    ``rtol * max(1, max_i |poles_i|)`` (default ``rtol`` = 512 units in the last place of the
    poles' real dtype), so conjugate poles whose moduli differ by rounding sort with the
    positive imaginary part first on every machine, and repeated poles keep their input order.

    Parameters
    ----------
    poles : (..., n) real or complex array
        Poles of a diagonal system.
    rtol : float, optional
        Relative tolerance of a tie.
    xp : namespace, optional
        Array namespace; inferred from ``poles``.

    Returns
    -------
    (..., n) integer array
        Indices that put the poles in order (``take_along_axis(poles, order, axis=-1)``).

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core import pole_order
    >>> poles = np.array([0.2, -0.5j * (1 + 1e-16), 0.9, 0.5j])
    >>> pole_order(poles).tolist()
    [2, 3, 1, 0]
    """
    xp = _xp.namespace(poles, xp=xp)
    tol = _default_tol(poles, rtol, xp)
    real = _xp.real_dtype_of(poles.dtype, xp)
    if _xp.is_complex(poles, xp):
        imag, re = xp.imag(poles), xp.real(poles)
    else:
        re = poles
        imag = xp.zeros_like(re)
    return tolerant_argsort(
        [-xp.astype(xp.abs(poles), real), -imag, -re],
        tol=tol,
        xp=xp,
    )
