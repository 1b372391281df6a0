"""The discrete-time Lyapunov (Stein) equation ``A X A^H - X + Q = 0``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from . import _xp
from ._typing import Array, Namespace
from ._validation import broadcast_shapes, check_finite, check_int, check_square
from .errors import BackendCapabilityError, ConditioningError, ShapeError
from .linalg import solve_discrete_lyapunov_host

__all__ = ["solve_discrete_lyapunov"]

_KRONECKER_MAX_N = 32
_DIVERGED = 1e30  # max|A^(2^k)| beyond this: the series diverges (A is not stable)
Method = Literal["smith", "kronecker", "scipy"]


def _eps(dtype: object, xp: Namespace) -> float:
    return float(xp.finfo(_xp.real_dtype_of(dtype, xp)).eps)


def _smith(a: Array, q: Array, xp: Namespace, max_iter: int, *, eager: bool) -> tuple[Array, bool]:
    """Squared Smith iteration ``X <- X + A_k X A_k^H``, ``A_{k+1} = A_k^2``.

    After ``k`` steps ``X = sum_{j < 2^k} A^j Q (A^j)^H``; matmul only. Eagerly it stops once the
    increment is below ``eps * max|X|``; while tracing it runs all ``max_iter`` steps.
    """
    eps = _eps(a.dtype, xp)
    x, ak = q, a
    for _ in range(max_iter):
        inc = ak @ x @ _xp.conj_transpose(ak, xp)
        x = x + inc
        if eager:
            x_max, inc_max = _xp.finite_max(x, xp), _xp.finite_max(inc, xp)
            if not (x_max < float("inf") and inc_max < float("inf")):
                return x, False
            if inc_max <= eps * x_max:
                return x, True
        ak = ak @ ak
        if eager and not _xp.finite_max(ak, xp) < _DIVERGED:
            return x, False
    return x, not eager


def _kronecker(a: Array, q: Array, xp: Namespace) -> Array:
    """Solve ``(I - A (x) conj(A)) vec(X) = vec(Q)`` (row-major ``vec``); O(n^6)."""
    n = a.shape[-1]
    batch = tuple(
        int(s) for s in xp.broadcast_arrays(a[..., :1, :1], q[..., :1, :1])[0].shape[:-2]
    )
    a = xp.broadcast_to(a, (*batch, n, n))
    q = xp.broadcast_to(q, (*batch, n, n))
    kron = a[..., :, None, :, None] * _xp.conj(a, xp)[..., None, :, None, :]
    kron = xp.reshape(kron, (*batch, n * n, n * n))
    eye = xp.eye(n * n, dtype=a.dtype, device=_xp.device_of(a))
    vec = xp.linalg.solve(eye - kron, xp.reshape(q, (*batch, n * n, 1)))
    return xp.reshape(vec, (*batch, n, n))


_NO_UNIQUE = (
    "The Lyapunov equation A X A^H - X + Q = 0 has no unique solution, or is too "
    "ill-conditioned to solve: some pair of eigenvalues of `a` has lambda_i * conj(lambda_j) ~ 1"
)


def _singular_guard(solve: Callable[[], Array]) -> Array:
    """Run a direct solver, turning the backends' singular-matrix errors into one error type."""
    try:
        return solve()
    except (ArithmeticError, RuntimeError, ValueError) as exc:  # LinAlgError, torch, SciPy
        msg = f"{_NO_UNIQUE} ({exc})."
        raise ConditioningError(msg) from exc


def _residual_ok(a: Array, x: Array, q: Array, xp: Namespace) -> tuple[bool, float]:
    res = a @ x @ _xp.conj_transpose(a, xp) - x + q
    n = a.shape[-1]
    scale = _xp.finite_max(a, xp) ** 2 * n * _xp.finite_max(x, xp) + _xp.finite_max(q, xp)
    r = _xp.finite_max(res, xp)
    eps = _eps(a.dtype, xp)
    # a small residual relative to |A|^2 |X| also accepts X ~ 1/eps for singular equations:
    # cap the amplification |X| / |Q| at 1 / (10 n eps) as well.
    ok = r <= 1e3 * n * eps * scale and _xp.finite_max(x, xp) * 10 * n * eps <= _xp.finite_max(
        q, xp
    )
    return bool(ok), r / scale if scale > 0 else r


def solve_discrete_lyapunov(
    a: Array,
    q: Array,
    *,
    method: Method | None = None,
    max_iter: int = 40,
    allow_host_fallback: bool = False,
    xp: Namespace | None = None,
) -> Array:
    """Solve the discrete Lyapunov (Stein) equation :math:`A X A^H - X + Q = 0`.

    The sign convention is SciPy's (:func:`scipy.linalg.solve_discrete_lyapunov`):

    .. math::

        A X A^H - X + Q = 0 \\iff X = \\sum_{k \\ge 0} A^k Q (A^H)^k \\quad (\\rho(A) < 1).

    The equation has a unique solution iff :math:`\\lambda_i \\overline{\\lambda_j} \\ne 1` for
    all eigenvalues of ``A``; ``A`` need not be stable.

    Parameters
    ----------
    a : (..., n, n) array
        Real or complex coefficient matrices.
    q : (..., n, n) array
        Right-hand sides; leading dimensions broadcast against ``a``.
    method : {None, "smith", "kronecker", "scipy"}, optional
        ``None`` (default) runs squared Smith and, if it does not converge (``A`` unstable or
        with a pole on the unit circle), falls back to ``"kronecker"`` for ``n <= 32`` and to
        ``"scipy"`` otherwise. ``"smith"``: matmul only, jit-safe and GPU-friendly, requires
        ``rho(A) < 1``. ``"kronecker"``: dense solve of the ``n^2 x n^2`` system, any backend.
        ``"scipy"``: :func:`scipy.linalg.solve_discrete_lyapunov` on the host.
    max_iter : int, optional
        Squared-Smith doublings; after ``k`` of them ``2^k`` terms of the series are summed, so
        40 covers spectral radii up to ``1 - 1e-10`` in float64. Eagerly the iteration stops
        as soon as it has converged; under ``jax.jit`` all steps run.
    allow_host_fallback : bool, optional
        Allow the ``"scipy"`` tier to copy arrays from an accelerator to the host.
    xp : array_namespace, optional
        Namespace override; by default that of ``a`` and ``q``.

    Returns
    -------
    x : (..., n, n) array
        The solution, in the promoted dtype of ``a`` and ``q``. Computed in float64/complex128
        where the device has it.

    Raises
    ------
    ShapeError
        If ``a`` or ``q`` is not square or their sizes differ.
    StabilityError
        If an input has non-finite entries.
    ConditioningError
        If the equation has no unique solution (the residual check fails), or ``method="smith"``
        was asked for an ``A`` that is not stable.
    BackendCapabilityError
        If only the host tier applies and the arrays are not in host memory.

    Notes
    -----
    Squared Smith needs ``O(log(log(eps) / log(rho(A))))`` doublings of cost ``O(n^3)`` each.
    Eagerly, every result is checked through its residual
    :math:`\\|A X A^H - X + Q\\|_{\\max} \\le 10^3 n \\epsilon
    (n \\|A\\|_{\\max}^2 \\|X\\|_{\\max} + \\|Q\\|_{\\max})`, and the amplification
    :math:`\\|X\\|_{\\max} \\le \\|Q\\|_{\\max} / (10 n \\epsilon)` (beyond it the equation is
    numerically singular). Under ``jax.jit`` only ``"smith"`` and ``"kronecker"`` apply and no
    check runs.

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core import solve_discrete_lyapunov
    >>> a = np.array([[0.5, 0.1], [0.0, -0.3]])
    >>> q = np.eye(2)
    >>> x = solve_discrete_lyapunov(a, q)
    >>> bool(np.allclose(a @ x @ a.T - x + q, 0))
    True
    """
    xp = _xp.namespace(a, q, xp=xp)
    n = check_square(a, "a")
    nq = check_square(q, "q")
    if nq != n:
        msg = f"`q` must have the size of `a`, ({n}, {n}); received shape {tuple(q.shape)}."
        raise ShapeError(msg)
    batch = broadcast_shapes(
        [tuple(int(s) for s in a.shape[:-2]), tuple(int(s) for s in q.shape[:-2])],
        "`a` and `q`",
    )
    if method not in (None, "smith", "kronecker", "scipy"):
        msg = f"`method` must be None, 'smith', 'kronecker' or 'scipy'; received {method!r}."
        raise ValueError(msg)
    max_iter = check_int(max_iter, "max_iter", low=1, high=1024)
    check_finite(a, "a", xp)
    check_finite(q, "q", xp)
    traced = _xp.is_traced(a) or _xp.is_traced(q)
    (a, q), _work, result = _xp.promote(a, q, xp=xp)
    if n == 0:
        return xp.zeros((*batch, 0, 0), dtype=result, device=_xp.device_of(a))
    if method == "kronecker":
        x = _singular_guard(lambda: _kronecker(a, q, xp))
    elif method == "scipy":
        x = _singular_guard(
            lambda: solve_discrete_lyapunov_host(
                a, q, xp=xp, allow_host_fallback=allow_host_fallback
            )
        )
    else:
        x, converged = _smith(a, q, xp, max_iter, eager=not traced)
        if not converged:
            if method == "smith":
                msg = (
                    f"Squared Smith did not converge in `max_iter`={max_iter} doublings: `a` is "
                    "not Schur stable (or too close to the unit circle); use method=None."
                )
                raise ConditioningError(msg)
            if n <= _KRONECKER_MAX_N:
                x = _singular_guard(lambda: _kronecker(a, q, xp))
            else:
                try:
                    x = _singular_guard(
                        lambda: solve_discrete_lyapunov_host(
                            a, q, xp=xp, allow_host_fallback=allow_host_fallback
                        )
                    )
                except BackendCapabilityError as exc:
                    msg = (
                        f"`a` is not Schur stable and n = {n} > {_KRONECKER_MAX_N}: only the "
                        "host SciPy solver applies. Pass `allow_host_fallback=True`, or "
                        "method='kronecker'."
                    )
                    raise BackendCapabilityError(msg) from exc
    if not traced:
        ok, rel = _residual_ok(a, x, q, xp)
        if not ok:
            msg = f"{_NO_UNIQUE} (relative residual {rel:.2e})."
            raise ConditioningError(msg)
    return xp.astype(x, result)
