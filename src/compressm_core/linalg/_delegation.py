"""Delegation layer for non-standard linear algebra.

Every call that the Array API standard does not guarantee goes through here, and tries in order:

1. the namespace's own routine (``xp.linalg.eig`` is in the 2025.12 standard, and torch, JAX,
   array-api-compat's NumPy and array-api-strict provide it);
2. host NumPy/SciPy, only for arrays already in host memory, or when the caller passes
   ``allow_host_fallback=True``. Data never moves between devices silently.

Each tier is a named private function so that tests can force it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _xp
from .._typing import Array, Namespace

__all__ = ["eig", "solve_discrete_lyapunov_host"]


def _eig_native(a: Array, xp: Namespace) -> tuple[Array, Array]:
    w, v = xp.linalg.eig(a)
    return w, v


def _eig_host(a: Array, xp: Namespace, *, allow_host_fallback: bool) -> tuple[Array, Array]:
    w, v = np.linalg.eig(_xp.to_host(a, allow_transfer=allow_host_fallback))
    dtype = xp.complex128 if a.dtype in (xp.float64, xp.complex128) else xp.complex64
    return (
        xp.astype(_xp.from_host(w, like=a, xp=xp), dtype),
        xp.astype(_xp.from_host(v, like=a, xp=xp), dtype),
    )


def eig(a: Array, *, xp: Namespace, allow_host_fallback: bool = False) -> tuple[Array, Array]:
    """Eigenvalues and right eigenvectors of a (batch of) general square matrices.

    Parameters
    ----------
    a : (..., n, n) array
        Real or complex matrices.
    xp : array_namespace
        The namespace of ``a``.
    allow_host_fallback : bool, optional
        Allow a copy to host memory when the namespace has no ``linalg.eig`` and ``a`` is not
        on the CPU.

    Returns
    -------
    w : (..., n) complex array
        Eigenvalues, in no particular order (callers sort by a real key).
    v : (..., n, n) complex array
        Eigenvectors as columns, ``a @ v = v * w``.
    """
    if getattr(xp.linalg, "eig", None) is not None:
        return _eig_native(a, xp)
    return _eig_host(a, xp, allow_host_fallback=allow_host_fallback)


def solve_discrete_lyapunov_host(
    a: Array, q: Array, *, xp: Namespace, allow_host_fallback: bool = False
) -> Array:
    """Solve ``A X A^H - X + Q = 0`` with SciPy on the host, looping over batch dimensions.

    SciPy uses a Kronecker solve for ``n < 10`` and otherwise the bilinear (Cayley) transform to
    a continuous Lyapunov equation solved by Bartels-Stewart. The transform needs ``A + I``
    invertible, which holds whenever the solution is unique.

    Raises
    ------
    BackendCapabilityError
        If the arrays are not in host memory and ``allow_host_fallback`` is false.
    """
    import scipy.linalg

    a_np = _xp.to_host(a, allow_transfer=allow_host_fallback)
    q_np = _xp.to_host(q, allow_transfer=allow_host_fallback)
    batch = np.broadcast_shapes(a_np.shape[:-2], q_np.shape[:-2])
    n = a_np.shape[-1]
    a_b = np.broadcast_to(a_np, (*batch, n, n)).reshape(-1, n, n)
    q_b = np.broadcast_to(q_np, (*batch, n, n)).reshape(-1, n, n)
    out: np.ndarray[Any, Any] = np.empty(a_b.shape, dtype=np.result_type(a_b.dtype, q_b.dtype))
    for i in range(a_b.shape[0]):
        out[i] = scipy.linalg.solve_discrete_lyapunov(a_b[i], q_b[i])
    return xp.astype(_xp.from_host(out.reshape((*batch, n, n)), like=a, xp=xp), a.dtype)
