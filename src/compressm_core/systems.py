"""Discrete-time linear time-invariant systems as NamedTuples (pytrees in JAX for free).

Both types describe

.. math::

    x_{k+1} = A x_k + B u_k, \\qquad y_k = C x_k + D u_k,

batched over any leading dimensions (layers, heads, channels). Leading dimensions of the fields
broadcast against each other.
"""

from __future__ import annotations

from typing import NamedTuple

from . import _xp
from ._typing import Array, Namespace

__all__ = [
    "DiagonalStateSpace",
    "StateSpace",
    "real_output_realization",
    "to_dense",
]


class StateSpace(NamedTuple):
    """Dense discrete-time state-space system ``x' = A x + B u``, ``y = C x + D u``.

    Attributes
    ----------
    a : (..., n, n) array
        State matrix A.
    b : (..., n, m) array
        Input matrix B.
    c : (..., p, n) array
        Output matrix C.
    d : (..., p, m) array or None
        Feedthrough D; ``None`` means zero.
    """

    a: Array
    b: Array
    c: Array
    d: Array | None = None


class DiagonalStateSpace(NamedTuple):
    """Diagonal discrete-time system, ``A = diag(poles)`` (LRU, S4D, S5, Mamba channels).

    Attributes
    ----------
    poles : (..., n) array
        Eigenvalues of A, real or complex.
    b : (..., n, m) array
        Input matrix B.
    c : (..., p, n) array
        Output matrix C.
    d : (..., p, m) array or None
        Feedthrough D; ``None`` means zero.
    """

    poles: Array
    b: Array
    c: Array
    d: Array | None = None


System = StateSpace | DiagonalStateSpace


def to_dense(sys: StateSpace | DiagonalStateSpace, *, xp: Namespace | None = None) -> StateSpace:
    """Return ``sys`` as a dense :class:`StateSpace` (``A = diag(poles)`` for diagonal systems).

    Parameters
    ----------
    sys : StateSpace or DiagonalStateSpace
        The system.
    xp : array_namespace, optional
        Namespace override; by default that of the arrays.

    Returns
    -------
    StateSpace
        The same system with an explicit state matrix.
    """
    if isinstance(sys, StateSpace):
        return sys
    xp = _xp.namespace(sys.poles, sys.b, sys.c, sys.d, xp=xp)
    n = sys.poles.shape[-1]
    eye = xp.eye(n, dtype=sys.poles.dtype, device=_xp.device_of(sys.poles))
    return StateSpace(sys.poles[..., None, :] * eye, sys.b, sys.c, sys.d)


def real_output_realization(
    sys: StateSpace | DiagonalStateSpace, *, xp: Namespace | None = None
) -> StateSpace:
    """Real ``2n``-state realization of a complex system whose output is ``Re(C x)``.

    A complex layer driven by real inputs with real output (the LRU),

    .. math::

        x_{k+1} = A x_k + B u_k, \\qquad y_k = \\operatorname{Re}(C x_k) + D u_k,

    is exactly the real system with state ``[Re x; Im x]``:

    .. math::

        A_r = \\begin{bmatrix} \\operatorname{Re} A & -\\operatorname{Im} A \\\\
                               \\operatorname{Im} A & \\operatorname{Re} A \\end{bmatrix},\\quad
        B_r = \\begin{bmatrix} \\operatorname{Re} B \\\\ \\operatorname{Im} B \\end{bmatrix},\\quad
        C_r = \\begin{bmatrix} \\operatorname{Re} C & -\\operatorname{Im} C \\end{bmatrix},\\quad
        D_r = \\operatorname{Re} D.

    Parameters
    ----------
    sys : StateSpace or DiagonalStateSpace
        The complex (or real) system; a real system is returned as a dense copy of itself.
    xp : array_namespace, optional
        Namespace override.

    Returns
    -------
    StateSpace
        Real system with ``2n`` states and the same input-output map as the layer.
    """
    dense = to_dense(sys, xp=xp)
    xp = _xp.namespace(dense.a, dense.b, dense.c, dense.d, xp=xp)
    a, b, c, d = dense
    if not any(x is not None and _xp.is_complex(x, xp) for x in (a, b, c, d)):
        return dense
    re, im = xp.real, xp.imag

    def parts(x: Array) -> tuple[Array, Array]:
        if _xp.is_complex(x, xp):
            return re(x), im(x)
        return x, xp.zeros_like(x)

    ar, ai = parts(a)
    br, bi = parts(b)
    cr, ci = parts(c)
    a_real = xp.concat([xp.concat([ar, -ai], axis=-1), xp.concat([ai, ar], axis=-1)], axis=-2)
    b_real = xp.concat([br, bi], axis=-2)
    c_real = xp.concat([cr, -ci], axis=-1)
    d_real = None if d is None else parts(d)[0]
    return StateSpace(a_real, b_real, c_real, d_real)
