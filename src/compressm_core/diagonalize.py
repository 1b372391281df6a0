"""Back from a dense reduced system to a diagonal (modal) one, with checks."""

from __future__ import annotations

import math
import warnings
from typing import Literal

from . import _xp
from ._typing import Array, Namespace
from ._validation import check_system
from .errors import ConditioningError, StabilityError
from .linalg import eig
from .ordering import ULPS, pole_order
from .systems import DiagonalStateSpace, StateSpace

__all__ = ["rediagonalize"]


def _sort_modes(w: Array, v: Array, xp: Namespace) -> tuple[Array, Array]:
    """Deterministic order of :func:`~compressm_core.pole_order` (modulus descending, ties by
    imaginary then real part descending, compared with a tolerance of a few hundred ulps)."""
    order = pole_order(w, xp=xp)
    return xp.take_along_axis(w, order, axis=-1), xp.take_along_axis(
        v, order[..., None, :], axis=-1
    )


def _balance_modes(b: Array, c: Array, xp: Namespace) -> tuple[Array, Array]:
    """Rescale each mode so ``||b_i|| = ||c_i||`` and the largest entry of ``b_i`` is positive.

    ``b_i -> b_i / s_i``, ``c_i -> c_i s_i`` leaves ``c_i b_i`` (the mode's residue) unchanged.
    """
    nb = xp.linalg.vector_norm(b, axis=-1)
    nc = xp.linalg.vector_norm(c, axis=-2)
    ok = (nb > 0) & (nc > 0)
    one = xp.ones_like(nb)
    mag = xp.where(ok, xp.sqrt(xp.where(ok, nb, one) / xp.where(ok, nc, one)), one)
    # the first entry within a few hundred ulps of the largest, not the last bits' winner
    mags = xp.abs(b)
    top = xp.max(mags, axis=-1, keepdims=True) if b.shape[-1] else mags
    rtol = ULPS * float(xp.finfo(mags.dtype).eps)
    idx = xp.argmax(xp.astype(mags >= top * (1 - rtol), xp.int8), axis=-1, keepdims=True)
    pivot = xp.take_along_axis(b, idx, axis=-1)[..., 0]
    pmag = xp.abs(pivot)
    phase = xp.where(
        pmag > 0,
        pivot / xp.astype(xp.where(pmag > 0, pmag, one), b.dtype),
        xp.astype(one, b.dtype),
    )
    s = xp.astype(mag, b.dtype) * phase
    return b / s[..., :, None], c * s[..., None, :]


def rediagonalize(
    sys: StateSpace,
    *,
    real_output: bool = False,
    on_unstable: Literal["raise", "clip"] = "raise",
    max_radius: float = 1.0 - 1e-6,
    min_phase: float = 0.0,
    max_condition: float = 1e8,
    allow_host_fallback: bool = False,
    xp: Namespace | None = None,
) -> DiagonalStateSpace:
    """Diagonalise a dense system: ``A = V diag(l) V^{-1}`` gives ``(l, V^{-1} B, C V, D)``.

    Used after :func:`balanced_truncation` to write a reduced system back into a diagonal layer
    (LRU, S4D, S5). The ``r x r`` eigenproblem goes through the delegation ladder (native
    ``linalg.eig``, else host NumPy for CPU arrays). Host-side; not traceable.

    With ``real_output=True`` the input is a *real* system (e.g. from
    ``balanced_truncation(..., real_output=True)``) to be written into a complex layer with
    output ``Re(C x)``: each conjugate pole pair becomes one complex state with
    ``c = 2 (C V)_i``, each real pole one state with a real pole, so that

    .. math::

        \\operatorname{Re}\\Big(\\sum_i c_i \\lambda_i^k b_i\\Big) = C A^k B \\quad
        \\text{for every } k \\ge 0.

    Parameters
    ----------
    sys : StateSpace
        Dense system, batched over leading dimensions.
    real_output : bool, optional
        Collapse conjugate pairs of a real system for a layer with output ``Re(C x)``.
    on_unstable : {"raise", "clip"}, optional
        Poles with ``|l| >= 1``: refuse (``StabilityError``, default) or repair by scaling every
        pole with ``|l| > max_radius`` onto the circle of radius ``max_radius`` (a
        ``RuntimeWarning`` reports it; the system changes).
    max_radius : float, optional
        Radius used by ``on_unstable="clip"``.
    min_phase : float, optional
        Repair for parameterisations that take ``log(arg l)`` (the LRU): poles with
        ``|arg l| < min_phase``, the real positive poles among them, are rotated to
        ``arg l = min_phase`` keeping their modulus (a ``RuntimeWarning`` reports it; the system
        changes by at most ``|l| min_phase`` per pole). ``0`` (default) keeps them.
    max_condition : float, optional
        Refuse (``ConditioningError``) when the 2-norm condition number of the column-normalised
        eigenvector matrix exceeds this: the modal form would amplify rounding errors by as
        much, and a defective ``A`` has no modal form at all.
    allow_host_fallback : bool, optional
        Allow a host copy of the ``r x r`` matrix if the namespace has no ``linalg.eig``.
    xp : array_namespace, optional
        Namespace override.

    Returns
    -------
    DiagonalStateSpace
        Poles in the order of :func:`~compressm_core.pole_order`: descending modulus, ties by
        descending imaginary part, then descending real part, where values within a few hundred
        ulps tie (so the order does not depend on the rounding of the eigenvalue routine). Each
        mode is scaled so that ``||b_i|| = ||c_i||`` with the largest-modulus entry of ``b_i``
        (the first one, among entries equal up to rounding) real positive.

    Raises
    ------
    StabilityError
        A pole with ``|l| >= 1`` and ``on_unstable="raise"``.
    ConditioningError
        Ill-conditioned or defective eigenvectors, or (``real_output``) a spectrum that is not
        closed under conjugation.
    """
    if not isinstance(sys, StateSpace):
        msg = f"`sys` must be a dense StateSpace; received {type(sys).__name__}."
        raise TypeError(msg)
    if on_unstable not in ("raise", "clip"):
        msg = f"`on_unstable` must be 'raise' or 'clip'; received {on_unstable!r}."
        raise ValueError(msg)
    if not 0 < max_radius < 1:
        msg = f"`max_radius` must be in (0, 1); received {max_radius!r}."
        raise ValueError(msg)
    if not 0 <= min_phase < math.pi:
        msg = f"`min_phase` must be in [0, pi); received {min_phase!r}."
        raise ValueError(msg)
    checked, info, xp = check_system(sys, xp=xp)
    a, b, c, d = checked
    if real_output and any(_xp.is_complex(x, xp) for x in (a, b, c) if x is not None):
        msg = "`real_output=True` needs a real system (`sys.a`, `sys.b`, `sys.c` real)."
        raise TypeError(msg)
    (a, b, c), _work, result = _xp.promote(a, b, c, xp=xp)
    w, v = eig(a, xp=xp, allow_host_fallback=allow_host_fallback)
    w, v = _sort_modes(w, v, xp)
    v = v / xp.astype(xp.linalg.vector_norm(v, axis=-2, keepdims=True), v.dtype)
    sv = xp.linalg.svdvals(v) if info.n else None
    cond = float(xp.max(sv[..., 0] / sv[..., -1])) if sv is not None else 1.0
    if not cond <= max_condition:
        msg = (
            f"The eigenvectors of `sys.a` have condition number {cond:.3g} > `max_condition`="
            f"{max_condition:.3g}: the reduced state matrix is (nearly) defective and has no "
            "reliable modal form."
        )
        raise ConditioningError(msg)
    cplx = w.dtype
    b_m = xp.linalg.solve(v, xp.astype(b, cplx))
    c_m = xp.astype(c, cplx) @ v
    if real_output:
        w, b_m, c_m = _collapse_pairs(w, b_m, c_m, xp)
    w = _repair(w, xp, on_unstable=on_unstable, max_radius=max_radius, min_phase=min_phase)
    b_m, c_m = _balance_modes(b_m, c_m, xp)
    d_out = None if d is None else xp.astype(d, result)
    return DiagonalStateSpace(w, b_m, c_m, d_out)


def _collapse_pairs(w: Array, b: Array, c: Array, xp: Namespace) -> tuple[Array, Array, Array]:
    """Keep one pole of each conjugate pair (``Im > 0``) with doubled residue, and real poles."""
    n = w.shape[-1]
    tol = (
        1e3 * float(xp.finfo(_xp.real_dtype_of(w.dtype, xp)).eps) * max(1.0, _xp.finite_max(w, xp))
    )
    imag = xp.imag(w)
    pos = imag > tol
    neg = imag < -tol
    npos = xp.sum(xp.astype(pos, xp.int64), axis=-1)
    nneg = xp.sum(xp.astype(neg, xp.int64), axis=-1)
    flat = xp.reshape(npos, (-1,))
    if not bool(xp.all(npos == nneg)) or (flat.shape[0] and not bool(xp.all(flat == flat[0]))):
        msg = (
            "The poles of the real system are not closed under conjugation (up to rounding), "
            "or the batch members differ in their numbers of complex pairs."
        )
        raise ConditioningError(msg)
    k = n - int(flat[0]) if n else 0
    keep = ~neg
    # stable sort moves the kept modes (key 0) to the front, preserving their order
    order = xp.argsort(xp.astype(~keep, xp.int8), axis=-1, stable=True)[..., :k]
    factor = xp.where(pos, xp.asarray(2.0, dtype=imag.dtype), xp.asarray(1.0, dtype=imag.dtype))
    c = c * xp.astype(factor, c.dtype)[..., None, :]
    real_mask = ~(pos | neg)
    w = xp.where(real_mask, xp.astype(xp.real(w), w.dtype), w)
    return (
        xp.take_along_axis(w, order, axis=-1),
        xp.take_along_axis(b, order[..., :, None], axis=-2),
        xp.take_along_axis(c, order[..., None, :], axis=-1),
    )


def _repair(
    w: Array, xp: Namespace, *, on_unstable: str, max_radius: float, min_phase: float
) -> Array:
    radius = xp.abs(w)
    rmax = _xp.finite_max(w, xp)
    if rmax >= 1.0 and on_unstable == "raise":
        msg = (
            f"The reduced system has a pole of modulus {rmax:.17g} >= 1; refusing to write an "
            "unstable layer (pass on_unstable='clip' to project it inside the unit circle)."
        )
        raise StabilityError(msg)
    if rmax > max_radius and on_unstable == "clip":
        nclip = int(xp.sum(xp.astype(radius > max_radius, xp.int64)))
        warnings.warn(
            f"rediagonalize: clipped {nclip} pole(s) with modulus up to {rmax:.6g} to "
            f"`max_radius`={max_radius}.",
            RuntimeWarning,
            stacklevel=3,
        )
        scale = xp.where(radius > max_radius, max_radius / radius, xp.ones_like(radius))
        w = w * xp.astype(scale, w.dtype)
        radius = xp.abs(w)
    if min_phase > 0:
        angle = xp.atan2(xp.imag(w), xp.real(w))
        small = xp.abs(angle) < min_phase
        nsmall = int(xp.sum(xp.astype(small, xp.int64)))
        if nsmall:
            warnings.warn(
                f"rediagonalize: rotated {nsmall} pole(s) with |arg| < `min_phase`={min_phase} "
                "to arg = min_phase.",
                RuntimeWarning,
                stacklevel=3,
            )
            sign = xp.where(angle < 0, -xp.ones_like(angle), xp.ones_like(angle))
            new_angle = xp.where(small, sign * min_phase, angle)
            w = xp.astype(radius * xp.cos(new_angle), w.dtype) + 1j * xp.astype(
                radius * xp.sin(new_angle), w.dtype
            )
    return w
