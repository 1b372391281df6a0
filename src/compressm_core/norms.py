"""Frequency response and the H-infinity and H2 norms of discrete-time systems."""

from __future__ import annotations

import math

from . import _xp
from ._typing import Array, Namespace
from ._validation import check_int, check_system
from .errors import ShapeError
from .gramians import prepared_gramians
from .linalg import eig
from .systems import DiagonalStateSpace, StateSpace

__all__ = ["frequency_response", "h2_norm", "h_infinity_norm"]

_CHUNK_ELEMENTS = 2**23


def _response(sys: StateSpace | DiagonalStateSpace, omega: Array, xp: Namespace) -> Array:
    """``G(e^{i w})`` of a promoted system at ``omega (..., F)``, shape ``(..., F, p, m)``."""
    first, b, c, d = sys
    cplx = xp.complex128 if first.dtype in (xp.float64, xp.complex128) else xp.complex64
    z = xp.exp(1j * xp.astype(omega, _xp.real_dtype_of(cplx, xp)))
    b, c = xp.astype(b, cplx), xp.astype(c, cplx)
    if isinstance(sys, DiagonalStateSpace):
        r = 1 / (z[..., :, None] - xp.astype(first, cplx)[..., None, :])
        if b.shape[-1] <= c.shape[-2]:
            g = c[..., None, :, :] @ (r[..., :, :, None] * b[..., None, :, :])
        else:
            g = (c[..., None, :, :] * r[..., :, None, :]) @ b[..., None, :, :]
    else:
        n = first.shape[-1]
        eye = xp.eye(n, dtype=cplx, device=_xp.device_of(first))
        zi_a = z[..., :, None, None] * eye - xp.astype(first, cplx)[..., None, :, :]
        g = c[..., None, :, :] @ xp.linalg.solve(
            zi_a, xp.broadcast_to(b[..., None, :, :], (*zi_a.shape[:-1], b.shape[-1]))
        )
    if d is not None:
        g = g + xp.astype(d, cplx)[..., None, :, :]
    return g


def _evaluate(
    sys: StateSpace | DiagonalStateSpace, omega: Array, real_output: bool, xp: Namespace
) -> Array:
    """Response of the layer; for output ``Re(C x)``: ``(G(e^{iw}) + conj(G(e^{-iw}))) / 2``."""
    if real_output:
        return (_response(sys, omega, xp) + xp.conj(_response(sys, -omega, xp))) / 2
    return _response(sys, omega, xp)


def _prepare(
    sys: object, other: object | None, xp: Namespace | None
) -> tuple[StateSpace | DiagonalStateSpace, StateSpace | DiagonalStateSpace | None, Namespace]:
    checked, info, xp = check_system(sys, xp=xp)
    if other is None:
        fields, _, _ = _xp.promote(*checked, xp=xp)
        return type(checked)(*fields), None, xp
    checked_o, info_o, xp = check_system(other, name="other", xp=xp)
    _xp.namespace(checked[0], checked_o[0], xp=None)
    if (info_o.m, info_o.p) != (info.m, info.p):
        msg = (
            f"`other` must have the inputs and outputs of `sys`, (m, p) = ({info.m}, {info.p}); "
            f"received ({info_o.m}, {info_o.p})."
        )
        raise ShapeError(msg)
    fields, _, _ = _xp.promote(*checked, *checked_o, xp=xp)
    return type(checked)(*fields[:4]), type(checked_o)(*fields[4:]), xp


def frequency_response(
    sys: StateSpace | DiagonalStateSpace,
    omega: Array,
    *,
    real_output: bool = False,
    xp: Namespace | None = None,
) -> Array:
    """Frequency response :math:`G(e^{i\\omega}) = C (e^{i\\omega} I - A)^{-1} B + D`.

    Parameters
    ----------
    sys : StateSpace or DiagonalStateSpace
        The system (need not be stable), batched over leading dimensions.
    omega : (..., F) array
        Normalised angular frequencies in radians per sample; leading dimensions broadcast
        against the system's.
    real_output : bool, optional
        Response of a complex layer with output ``Re(C x)`` driven by real inputs:
        :math:`\\tfrac12 (G(e^{i\\omega}) + \\overline{G(e^{-i\\omega})})`.
    xp : array_namespace, optional
        Namespace override.

    Returns
    -------
    (..., F, p, m) complex array
        The response at each frequency.
    """
    system, _, xp = _prepare(sys, None, xp)
    _xp.namespace(system[0], omega, xp=None)
    return _evaluate(system, omega, real_output, xp)


def _elements_per_frequency(sys: StateSpace | DiagonalStateSpace) -> int:
    """Size of the largest temporary :func:`_response` forms for one frequency."""
    batch = math.prod(int(d) for d in sys.b.shape[:-2])
    n, m, p = int(sys.b.shape[-2]), int(sys.b.shape[-1]), int(sys.c.shape[-2])
    core = n * n if isinstance(sys, StateSpace) else n * min(m, p)
    return max(1, batch * max(core, p * m))


def _gain(
    sys: StateSpace | DiagonalStateSpace,
    other: StateSpace | DiagonalStateSpace | None,
    omega: Array,
    real_output: bool,
    xp: Namespace,
) -> Array:
    """Largest singular value of the (error) response at ``omega (..., F)``, chunked over F."""
    per_freq = max(_elements_per_frequency(s) for s in (sys, other) if s is not None)
    step = max(1, _CHUNK_ELEMENTS // per_freq)
    out = []
    total = int(omega.shape[-1])
    for start in range(0, total, step):
        w = omega[..., start : min(start + step, total)]
        g = _evaluate(sys, w, real_output, xp)
        if other is not None:
            g = g - _evaluate(other, w, real_output, xp)
        out.append(xp.linalg.svdvals(g)[..., 0])
    return xp.concat(out, axis=-1)


def _pole_angles(sys: StateSpace | DiagonalStateSpace, xp: Namespace) -> Array:
    poles = sys.poles if isinstance(sys, DiagonalStateSpace) else eig(sys.a, xp=xp)[0]
    return (
        xp.atan2(xp.imag(poles), xp.real(poles))
        if _xp.is_complex(poles, xp)
        else xp.where(poles < 0, xp.full_like(poles, math.pi), xp.zeros_like(poles))
    )


def h_infinity_norm(
    sys: StateSpace | DiagonalStateSpace,
    other: StateSpace | DiagonalStateSpace | None = None,
    *,
    real_output: bool = False,
    n_grid: int = 512,
    refinements: int = 6,
    xp: Namespace | None = None,
) -> Array:
    """H-infinity norm :math:`\\|G\\|_\\infty = \\max_{\\omega} \\sigma_{\\max}(G(e^{i\\omega}))`.

    With ``other`` it is the norm of the error system :math:`G - G_{\\text{other}}`, the
    a-posteriori check of the balanced-truncation bound
    :math:`\\|G - G_r\\|_\\infty \\le 2 \\sum_{i > r} \\sigma_i`.

    Parameters
    ----------
    sys : StateSpace or DiagonalStateSpace
        Stable system, batched over leading dimensions.
    other : StateSpace or DiagonalStateSpace, optional
        A system with the same inputs and outputs (any state size) to subtract.
    real_output : bool, optional
        Norm of the real-output layer ``Re(C x)`` (see :func:`frequency_response`).
    n_grid : int, optional
        Points of the initial uniform grid on ``[0, pi]`` (real systems) or ``[0, 2 pi)``.
    refinements : int, optional
        Rounds of local refinement around the 8 best points, each shrinking the spacing 8x.
    xp : array_namespace, optional
        Namespace override.

    Returns
    -------
    (...) real array
        The norm for each system in the batch.

    Notes
    -----
    A grid search, made reliable for lightly damped modes by adding the pole angles of both
    systems to the grid (the peaks of such modes sit there), then refined locally. The result
    is a lower bound of the true norm that converges to it as the grid is refined; with the
    defaults the relative error is far below the gaps between bounds and errors that matter
    here. The cost is ``O(F n (m + p))`` for diagonal and ``O(F n^3)`` for dense systems, with
    ``F ~ n_grid + 2 n + 48 refinements`` frequencies.
    """
    n_grid = check_int(n_grid, "n_grid", low=8, high=2**24)
    refinements = check_int(refinements, "refinements", low=0, high=64)
    system, other_sys, xp = _prepare(sys, other, xp)
    fields = [f for s in (system, other_sys) if s is not None for f in s if f is not None]
    symmetric = real_output or not any(_xp.is_complex(f, xp) for f in fields)
    span = math.pi if symmetric else 2 * math.pi
    real = _xp.real_dtype_of(system.b.dtype, xp)
    dev = _xp.device_of(system.b)
    if symmetric:
        base = xp.linspace(0.0, span, n_grid, dtype=real, device=dev)
    else:
        base = xp.linspace(0.0, span, n_grid, endpoint=False, dtype=real, device=dev)
    angles = [_pole_angles(s, xp) for s in (system, other_sys) if s is not None]
    if symmetric:
        angles = [xp.abs(a) for a in angles]
    angles = [xp.astype(a, real) for a in angles]
    batch = tuple(int(s) for s in system.b.shape[:-2])
    if other_sys is not None:
        batch = tuple(
            int(s)
            for s in xp.broadcast_arrays(system.b[..., :1, :1], other_sys.b[..., :1, :1])[0].shape[
                :-2
            ]
        )
    grid = xp.concat(
        [xp.broadcast_to(base, (*batch, n_grid))]
        + [xp.broadcast_to(a, (*batch, a.shape[-1])) for a in angles],
        axis=-1,
    )
    values = _gain(system, other_sys, grid, real_output, xp)
    best = xp.max(values, axis=-1)
    half_width = span / n_grid
    points, keep = 9, min(8, int(grid.shape[-1]))
    offsets = xp.linspace(-1.0, 1.0, points, dtype=real, device=dev)
    for _ in range(refinements):
        top = xp.argsort(-values, axis=-1)[..., :keep]
        centers = xp.take_along_axis(grid, top, axis=-1)
        grid = xp.reshape(centers[..., :, None] + half_width * offsets, (*batch, keep * points))
        values = _gain(system, other_sys, grid, real_output, xp)
        best = xp.maximum(best, xp.max(values, axis=-1))
        half_width = half_width * 2 / (points - 1)
    return best


def h2_norm(
    sys: StateSpace | DiagonalStateSpace,
    other: StateSpace | DiagonalStateSpace | None = None,
    *,
    real_output: bool = False,
    xp: Namespace | None = None,
) -> Array:
    """H2 norm of a discrete-time system, :math:`\\|G\\|_2^2 = \\operatorname{tr}(C P C^H) +
    \\|D\\|_F^2`.

    Equivalently :math:`\\|G\\|_2^2 = \\sum_{k \\ge 0} \\|g_k\\|_F^2` over the impulse response
    :math:`g_0 = D,\\ g_k = C A^{k-1} B`, with ``P`` the controllability Gramian.

    Parameters
    ----------
    sys : StateSpace or DiagonalStateSpace
        Stable system, batched over leading dimensions.
    other : StateSpace or DiagonalStateSpace, optional
        A system with the same inputs and outputs to subtract (norm of the error system).
    real_output : bool, optional
        Norm of the real-output layer ``Re(C x)``.
    xp : array_namespace, optional
        Namespace override.

    Returns
    -------
    (...) real array
        The norm for each system in the batch.
    """
    system, other_sys, xp = _prepare(sys, other, xp)
    if other_sys is not None:
        system = _difference(system, other_sys, xp)
    p, _, used, _, xp, result = prepared_gramians(
        system, horizon=None, real_output=real_output, xp=xp, want=(True, False)
    )
    c, d = used.c, used.d
    sq = xp.sum((c @ p) * _xp.conj(c, xp), axis=(-2, -1))
    if d is not None:
        sq = sq + xp.sum(xp.abs(d) ** 2, axis=(-2, -1))
    if _xp.is_complex(sq, xp):
        sq = xp.real(sq)
    return xp.astype(xp.sqrt(sq), _xp.real_dtype_of(result, xp))


def _difference(
    s1: StateSpace | DiagonalStateSpace, s2: StateSpace | DiagonalStateSpace, xp: Namespace
) -> StateSpace | DiagonalStateSpace:
    """Parallel connection ``G1 - G2`` (block-diagonal state)."""
    d = s1.d if s2.d is None else (-s2.d if s1.d is None else s1.d - s2.d)
    b1, _ = xp.broadcast_arrays(s1.b[..., :1, :1], s2.b[..., :1, :1])
    batch = tuple(int(s) for s in b1.shape[:-2])

    def bc(x: Array, core: int) -> Array:
        return xp.broadcast_to(x, (*batch, *x.shape[x.ndim - core :]))

    b = xp.concat([bc(s1.b, 2), bc(s2.b, 2)], axis=-2)
    c = xp.concat([bc(s1.c, 2), -bc(s2.c, 2)], axis=-1)
    if isinstance(s1, DiagonalStateSpace) and isinstance(s2, DiagonalStateSpace):
        return DiagonalStateSpace(xp.concat([bc(s1.poles, 1), bc(s2.poles, 1)], axis=-1), b, c, d)
    a1 = bc(s1.a if isinstance(s1, StateSpace) else _diag(s1.poles, xp), 2)
    a2 = bc(s2.a if isinstance(s2, StateSpace) else _diag(s2.poles, xp), 2)
    n1, n2 = a1.shape[-1], a2.shape[-1]
    z12 = xp.zeros((*batch, n1, n2), dtype=a1.dtype, device=_xp.device_of(a1))
    z21 = xp.zeros((*batch, n2, n1), dtype=a1.dtype, device=_xp.device_of(a1))
    a = xp.concat([xp.concat([a1, z12], axis=-1), xp.concat([z21, a2], axis=-1)], axis=-2)
    return StateSpace(a, b, c, d)


def _diag(poles: Array, xp: Namespace) -> Array:
    n = poles.shape[-1]
    return poles[..., None, :] * xp.eye(n, dtype=poles.dtype, device=_xp.device_of(poles))
