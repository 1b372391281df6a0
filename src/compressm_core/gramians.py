"""Controllability and observability Gramians and their square-root factors."""

from __future__ import annotations

from typing import NamedTuple

from . import _xp
from ._typing import Array, Namespace
from ._validation import SystemInfo, check_int, check_system
from .errors import ConditioningError, StabilityError
from .linalg import eig
from .lyapunov import solve_discrete_lyapunov
from .systems import DiagonalStateSpace, StateSpace, real_output_realization

__all__ = [
    "GramianFactors",
    "controllability_gramian",
    "gramian_factors",
    "observability_gramian",
    "prepared_gramians",
    "psd_factor",
]


class GramianFactors(NamedTuple):
    """Square-root factors of the Gramians, ``P = Lc Lc^H`` and ``Q = Lo Lo^H``.

    Attributes
    ----------
    controllability : (..., n, n) array
        ``Lc``.
    observability : (..., n, n) array
        ``Lo``.
    """

    controllability: Array
    observability: Array


def _check_horizon(horizon: int | None) -> int | None:
    if horizon is None:
        return None
    return check_int(horizon, "horizon", low=1, high=2**62)


def _cauchy(left: Array, right: Array, g: Array, horizon: int | None) -> Array:
    """``G_ij / (1 - l_i r_j)``, times ``1 - (l_i r_j)^L`` for a finite horizon ``L``.

    The closed form of ``X = sum_k diag(l)^k G diag(r)^k`` (over ``k < L``).
    """
    x = g / (1 - left[..., :, None] * right[..., None, :])
    if horizon is not None:
        x = x * (1 - (left**horizon)[..., :, None] * (right**horizon)[..., None, :])
    return x


def _diagonal_gramian(
    poles: Array, g: Array, horizon: int | None, xp: Namespace, *, observability: bool
) -> Array:
    """``G_ij / (1 - l_i conj(l_j))`` (controllability) or ``/ (1 - conj(l_i) l_j)``."""
    lam_h = _xp.conj(poles, xp)
    if observability:
        return _cauchy(lam_h, poles, g, horizon)
    return _cauchy(poles, lam_h, g, horizon)


def _finite_sum(a: Array, q: Array, horizon: int, xp: Namespace) -> Array:
    """``sum_{k < L} A^k Q (A^H)^k`` by binary doubling (``O(log L)`` matmuls, any ``A``)."""
    n = a.shape[-1]
    total = xp.zeros_like(q)
    offset = xp.eye(n, dtype=a.dtype, device=_xp.device_of(a))
    block, power = q, a  # block: sum of the next 2^j terms; power: A^(2^j)
    remaining = horizon
    while remaining:
        if remaining & 1:
            total = total + offset @ block @ _xp.conj_transpose(offset, xp)
            offset = offset @ power
        remaining >>= 1
        if remaining:
            block = block + power @ block @ _xp.conj_transpose(power, xp)
            power = power @ power
    return total


def _stable_lyapunov(a: Array, q: Array, xp: Namespace) -> Array:
    """Infinite-horizon Gramian of a dense system; refuses an ``A`` that is not Schur stable.

    Squared Smith converges iff ``rho(A) < 1`` (to within ``max_iter`` doublings), so its
    failure is the stability test; the spectral radius is computed only for the message.
    """
    try:
        return solve_discrete_lyapunov(a, q, method="smith", xp=xp)
    except ConditioningError:
        radius = _xp.finite_max(eig(a, xp=xp, allow_host_fallback=True)[0], xp)
        msg = (
            "`sys.a` must be Schur stable (every |pole| < 1) for infinite-horizon Gramians; "
            f"received spectral radius {radius:.17g}."
        )
        raise StabilityError(msg) from None


def _real_output_diagonal(
    sys: DiagonalStateSpace, xp: Namespace, horizon: int | None, want: tuple[bool, bool]
) -> tuple[Array | None, Array | None]:
    """Gramians of the real realization ``[Re x; Im x]`` of a complex diagonal layer.

    The conjugate-augmented state ``[x; conj(x)]`` has poles ``(l, conj(l))``, input matrix
    ``[B; conj(B)]`` and output matrix ``[C, conj(C)] / 2``. Its Gramian blocks are
    ``X11 = Cauchy(l, conj(l); B B^H)``, ``X12 = Cauchy(l, l; B B^T)`` (and conjugates), and the
    change of coordinates ``x_r = M x_aug``, ``M = [[I, I], [-iI, iI]] / 2``, gives with
    ``s = X11 + conj(X12)``, ``u = X11 - conj(X12)``:
    ``P_r = [[Re s, -Im s], [Im u, Re u]] / 2`` and likewise ``Q_r = 2 [[Re s, ...]]`` (for
    ``Q`` the factor 1/4 of ``C / 2`` and the 4 of ``M^{-H} (.) M^{-1}`` give 2 overall).
    Only ``n x n`` complex blocks are formed.
    """
    poles, b, c, _ = sys
    lam_h = _xp.conj(poles, xp)

    def assemble(x11: Array, x12: Array, scale: float) -> Array:
        s, u = x11 + _xp.conj(x12, xp), x11 - _xp.conj(x12, xp)
        top = xp.concat([xp.real(s), -xp.imag(s)], axis=-1)
        bottom = xp.concat([xp.imag(u), xp.real(u)], axis=-1)
        return scale * xp.concat([top, bottom], axis=-2)

    p = q = None
    if want[0]:
        bt = xp.matrix_transpose(b)
        p11 = _cauchy(poles, lam_h, b @ _xp.conj(bt, xp), horizon)
        p12 = _cauchy(poles, poles, b @ bt, horizon)
        p = assemble(p11, p12, 0.5)
    if want[1]:
        ch = _xp.conj_transpose(c, xp)
        q11 = _cauchy(lam_h, poles, ch @ c, horizon)
        q12 = _cauchy(lam_h, lam_h, ch @ _xp.conj(c, xp), horizon)
        q = assemble(q11, q12, 0.5)
    return p, q


def _pair(
    sys: StateSpace | DiagonalStateSpace,
    xp: Namespace,
    horizon: int | None,
    *,
    want: tuple[bool, bool] = (True, True),
) -> tuple[Array | None, Array | None]:
    """Gramians of a validated, promoted system."""
    p = q = None
    if isinstance(sys, DiagonalStateSpace):
        poles, b, c, _ = sys
        if want[0]:
            p = _diagonal_gramian(
                poles, b @ _xp.conj_transpose(b, xp), horizon, xp, observability=False
            )
        if want[1]:
            q = _diagonal_gramian(
                poles, _xp.conj_transpose(c, xp) @ c, horizon, xp, observability=True
            )
        return p, q
    a, b, c, _ = sys
    a_h = _xp.conj_transpose(a, xp)
    bb = b @ _xp.conj_transpose(b, xp)
    cc = _xp.conj_transpose(c, xp) @ c
    if horizon is None:
        p = _stable_lyapunov(a, bb, xp) if want[0] else None
        q = _stable_lyapunov(a_h, cc, xp) if want[1] else None
    else:
        p = _finite_sum(a, bb, horizon, xp) if want[0] else None
        q = _finite_sum(a_h, cc, horizon, xp) if want[1] else None
    return (
        None if p is None else _xp.hermitian_part(p, xp),
        None if q is None else _xp.hermitian_part(q, xp),
    )


def prepared_gramians(
    sys: object,
    *,
    horizon: int | None,
    real_output: bool,
    xp: Namespace | None,
    want: tuple[bool, bool] = (True, True),
    name: str = "sys",
) -> tuple[
    Array | None, Array | None, StateSpace | DiagonalStateSpace, SystemInfo, Namespace, object
]:
    """Validate, promote and compute the Gramians.

    Returns ``(P, Q, system, info, xp, result_dtype)`` where ``system`` is the promoted system
    the Gramians belong to: the real ``2n``-state realization when ``real_output`` is set.
    """
    horizon = _check_horizon(horizon)
    checked, info, xp = check_system(sys, name=name, xp=xp)
    fields, _work, result = _xp.promote(*checked, xp=xp)
    system = type(checked)(*fields)
    if real_output and any(_xp.is_complex(f, xp) for f in fields if f is not None):
        real_system = real_output_realization(system, xp=xp)
        if isinstance(system, DiagonalStateSpace):
            p, q = _real_output_diagonal(system, xp, horizon, want)
        else:
            p, q = _pair(real_system, xp, horizon, want=want)
        result = _xp.real_dtype_of(result, xp)
        info = SystemInfo(2 * info.n, info.m, info.p, info.batch)
        return p, q, real_system, info, xp, result
    p, q = _pair(system, xp, horizon, want=want)
    return p, q, system, info, xp, result


def controllability_gramian(
    sys: StateSpace | DiagonalStateSpace,
    *,
    horizon: int | None = None,
    real_output: bool = False,
    xp: Namespace | None = None,
) -> Array:
    """Controllability Gramian :math:`P = \\sum_{k} A^k B B^H (A^H)^k`.

    With ``horizon=None`` it is the infinite sum, the solution of
    :math:`A P A^H - P + B B^H = 0`; for diagonal systems in closed form,

    .. math::

        P_{ij} = \\frac{(B B^H)_{ij}}{1 - \\lambda_i \\overline{\\lambda_j}}.

    With an integer ``horizon`` ``L`` it is the time-limited Gramian
    :math:`P_L = \\sum_{k < L} A^k B B^H (A^H)^k`, for diagonal systems the closed form times
    :math:`1 - (\\lambda_i \\overline{\\lambda_j})^L`.

    Parameters
    ----------
    sys : StateSpace or DiagonalStateSpace
        Stable system; fields batched over leading dimensions.
    horizon : int, optional
        Number of time steps ``L`` the model sees; ``None`` for the infinite horizon.
    real_output : bool, optional
        Treat ``sys`` as a complex layer with output ``Re(C x)`` and return the (real, ``2n x 2n``)
        Gramian of its real realization (:func:`real_output_realization`).
    xp : array_namespace, optional
        Namespace override.

    Returns
    -------
    (..., n, n) array
        Hermitian positive semi-definite ``P`` in the promoted dtype of the system.

    Raises
    ------
    ShapeError, StabilityError, ConditioningError
        On malformed, non-finite or unstable systems.

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core import DiagonalStateSpace, controllability_gramian
    >>> sys = DiagonalStateSpace(np.array([0.9, -0.5]), np.ones((2, 1)), np.ones((1, 2)))
    >>> p = controllability_gramian(sys)
    >>> a, b = np.diag(sys.poles), sys.b
    >>> bool(np.allclose(a @ p @ a.T - p + b @ b.T, 0))
    True
    """
    p, _, _, _, xp, result = prepared_gramians(
        sys, horizon=horizon, real_output=real_output, xp=xp, want=(True, False)
    )
    return xp.astype(p, result)


def observability_gramian(
    sys: StateSpace | DiagonalStateSpace,
    *,
    horizon: int | None = None,
    real_output: bool = False,
    xp: Namespace | None = None,
) -> Array:
    """Observability Gramian :math:`Q = \\sum_{k} (A^H)^k C^H C A^k`.

    With ``horizon=None`` it solves :math:`A^H Q A - Q + C^H C = 0`; for diagonal systems

    .. math::

        Q_{ij} = \\frac{(C^H C)_{ij}}{1 - \\overline{\\lambda_i} \\lambda_j}.

    With an integer ``horizon`` ``L``: :math:`Q_L = \\sum_{k < L} (A^H)^k C^H C A^k`.

    Parameters
    ----------
    sys : StateSpace or DiagonalStateSpace
        Stable system; fields batched over leading dimensions.
    horizon : int, optional
        Number of time steps ``L``; ``None`` for the infinite horizon.
    real_output : bool, optional
        Gramian of the real realization of a layer with output ``Re(C x)``.
    xp : array_namespace, optional
        Namespace override.

    Returns
    -------
    (..., n, n) array
        Hermitian positive semi-definite ``Q``.

    Raises
    ------
    ShapeError, StabilityError, ConditioningError
        On malformed, non-finite or unstable systems.
    """
    _, q, _, _, xp, result = prepared_gramians(
        sys, horizon=horizon, real_output=real_output, xp=xp, want=(False, True)
    )
    return xp.astype(q, result)


def psd_factor(x: Array, xp: Namespace) -> Array:
    """Square-root factor ``L`` with ``L L^H = X`` of a Hermitian positive semi-definite ``X``.

    Eagerly, a Cholesky factorisation is tried first (cheapest); when it fails, as it does for
    numerically semi-definite Gramians, or while tracing, the factor is
    ``L = V sqrt(max(w, 0))`` from ``X = V diag(w) V^H``, which never fails and is never NaN.
    Every quantity computed from the factors (HSVs, balancing projections) is invariant to
    which factor is used, ``L -> L W`` with ``W`` unitary.
    """
    if not _xp.is_traced(x):
        try:
            low = xp.linalg.cholesky(x)
        except (ArithmeticError, RuntimeError, ValueError):  # NumPy/SciPy LinAlgError, torch
            low = None
        if low is not None and bool(xp.all(xp.isfinite(low))):  # JAX returns NaN instead
            return low
    w, v = xp.linalg.eigh(x)
    w = xp.where(w > 0, w, xp.zeros_like(w))
    return v * xp.astype(xp.sqrt(w), v.dtype)[..., None, :]


def gramian_factors(
    sys: StateSpace | DiagonalStateSpace,
    *,
    horizon: int | None = None,
    real_output: bool = False,
    xp: Namespace | None = None,
) -> GramianFactors:
    """Square-root factors ``Lc``, ``Lo`` with :math:`P = L_c L_c^H`, :math:`Q = L_o L_o^H`.

    The factors come from a Cholesky factorisation where it succeeds, and otherwise from a
    Hermitian eigendecomposition with the eigenvalues clamped at zero,
    :math:`P = V \\operatorname{diag}(w) V^H \\Rightarrow
    L_c = V \\operatorname{diag}(\\sqrt{\\max(w, 0)})`. Unlike a bare Cholesky factorisation
    (plus jitter) this never fails and never produces NaN when a Gramian is only semi-definite,
    as it is numerically whenever B or C has far fewer columns or rows than there are states.
    Under ``jax.jit`` the eigendecomposition is always used.

    Parameters
    ----------
    sys : StateSpace or DiagonalStateSpace
        Stable system.
    horizon : int, optional
        Time-limited Gramians over ``L`` steps; ``None`` for the infinite horizon.
    real_output : bool, optional
        Factors of the real realization of a layer with output ``Re(C x)``.
    xp : array_namespace, optional
        Namespace override.

    Returns
    -------
    GramianFactors
        ``(controllability, observability)``, each ``(..., n, n)``.
    """
    p, q, _, _, xp, result = prepared_gramians(
        sys, horizon=horizon, real_output=real_output, xp=xp
    )
    return GramianFactors(
        xp.astype(psd_factor(p, xp), result), xp.astype(psd_factor(q, xp), result)
    )
