"""Balanced realization and balanced truncation (square-root and balancing-free methods)."""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np

from . import _xp
from ._typing import Array, Namespace
from ._validation import check_int, check_tau
from .errors import ConditioningError, ShapeError
from .gramians import prepared_gramians, psd_factor
from .rank import hankel_error_bound, select_rank
from .systems import DiagonalStateSpace, StateSpace

__all__ = [
    "BalancedRealization",
    "BalancedTruncation",
    "balanced_realization",
    "balanced_truncation",
]


class BalancedTruncation(NamedTuple):
    """Result of :func:`balanced_truncation`.

    Attributes
    ----------
    system : StateSpace
        Reduced system ``(T_inv A T, T_inv B, C T, D)`` with ``r`` states (dense ``A``).
    hsv : (..., n) array
        All Hankel singular values of the original system, descending.
    error_bound : (...) array
        :math:`2 \\sum_{i > r} \\sigma_i + c\\, n\\, \\varepsilon\\, \\sigma_1`
        (:func:`~compressm_core.hankel_error_bound`).
    T : (..., n, r) array
        Right projection (new state to old): ``x ~ T x_r``.
    T_inv : (..., r, n) array
        Left projection with ``T_inv @ T = I_r``: ``x_r = T_inv x``.
    """

    system: StateSpace
    hsv: Array
    error_bound: Array
    T: Array
    T_inv: Array


class BalancedRealization(NamedTuple):
    """Result of :func:`balanced_realization`.

    Attributes
    ----------
    system : StateSpace
        Balanced system: both of its Gramians equal ``diag(hsv)``.
    hsv : (..., n) array
        Hankel singular values, descending.
    T : (..., n, n) array
        Balancing transformation, ``x = T x_b``.
    T_inv : (..., n, n) array
        Its inverse.
    """

    system: StateSpace
    hsv: Array
    T: Array
    T_inv: Array


def _normalize_phases(u: Array, x: Array, xp: Namespace) -> tuple[Array, Array]:
    """Fix the phases of singular-vector pairs ``(u_k, v_k)``, given ``u`` and ``x = Lc v``.

    Each pair is multiplied by the unit scalar that makes the largest-modulus entry of
    ``x_k`` real positive; ``(u, x)`` are returned rephased. ``Lc v`` lives in the original
    state coordinates, so the result does not depend on which square-root factor ``Lc`` was
    used, nor on the backend's SVD.
    """
    idx = xp.argmax(xp.abs(x), axis=-2, keepdims=True)
    pivot = xp.take_along_axis(x, idx, axis=-2)
    mag = xp.abs(pivot)
    one = xp.ones_like(mag)
    safe = xp.where(mag > 0, mag, one)
    phase = xp.where(mag > 0, pivot / xp.astype(safe, pivot.dtype), xp.astype(one, pivot.dtype))
    phase = _xp.conj(phase, xp)
    return u * phase, x * phase


def _project(
    system: StateSpace | DiagonalStateSpace, t: Array, t_inv: Array, xp: Namespace
) -> StateSpace:
    first, b, c, d = system
    if isinstance(system, DiagonalStateSpace):
        a_r = t_inv @ (first[..., :, None] * t)
    else:
        a_r = t_inv @ first @ t
    return StateSpace(a_r, t_inv @ b, c @ t, d)


def _check_numerical_rank(s: Array, rank: int, xp: Namespace) -> None:
    """Refuse a rank whose last kept HSV is zero to working precision (no projection exists)."""
    n = s.shape[-1]
    eps = float(xp.finfo(s.dtype).eps)
    ratio = xp.min(s[..., rank - 1] / xp.where(s[..., 0] > 0, s[..., 0], xp.ones_like(s[..., 0])))
    if not float(ratio) > n * eps:
        msg = (
            f"The balancing projection for rank {rank} does not exist: the system is "
            f"(numerically) non-minimal, sigma_{rank} / sigma_1 = {float(ratio):.2e} <= n * eps. "
            "Choose a smaller `rank` (e.g. with select_rank)."
        )
        raise ConditioningError(msg)


def _rank_for_batch(s: Array, tau: float, energy: Literal["sum", "squared"]) -> int:
    """``select_rank`` per system; a batch keeps the largest of its members' ranks."""
    hsv = np.reshape(_xp.to_host(s, allow_transfer=True), (-1, s.shape[-1]))
    return max(select_rank(row, tau=tau, energy=energy) for row in hsv)


class _Factors(NamedTuple):
    """The promoted system (the real ``2n``-state one with ``real_output``), its Gramian
    factors ``Lc``, ``Lo`` and the dtype of results: everything of a balanced truncation that
    does not depend on the rank."""

    system: StateSpace | DiagonalStateSpace
    lc: Array
    lo: Array
    n: int
    xp: Namespace
    result: object


def _factors(
    sys: StateSpace | DiagonalStateSpace,
    horizon: int | None,
    real_output: bool,
    xp: Namespace | None,
) -> _Factors:
    p, q, system, info, xp, result = prepared_gramians(
        sys, horizon=horizon, real_output=real_output, xp=xp
    )
    if info.n == 0:
        msg = "`sys` must have at least one state to balance; received a system with n = 0."
        raise ShapeError(msg)
    return _Factors(system, psd_factor(p, xp), psd_factor(q, xp), info.n, xp, result)


def _projected(
    f: _Factors, svd: tuple[Array, Array, Array], r: int, method: str
) -> tuple[StateSpace, Array, Array]:
    """The system projected onto the leading ``r`` balanced states, ``T`` and ``T_inv``, in
    the result dtype; ``svd`` is ``svd(Lo^H Lc)``."""
    xp, lc, lo = f.xp, f.lc, f.lo
    u, s, vh = svd
    lc_v = lc @ _xp.conj_transpose(vh, xp)[..., :, :r]
    u_r, lc_v = _normalize_phases(u[..., :, :r], lc_v, xp)
    if method == "sqrt":
        scale = xp.astype(1 / xp.sqrt(s[..., :r]), lc.dtype)
        t = lc_v * scale[..., None, :]
        t_inv = scale[..., :, None] * _xp.conj_transpose(lo @ u_r, xp)
    else:
        x_basis, _ = xp.linalg.qr(lc_v)
        y_basis, _ = xp.linalg.qr(lo @ u_r)
        y_h = _xp.conj_transpose(y_basis, xp)
        t = x_basis
        t_inv = xp.linalg.solve(y_h @ x_basis, y_h)
    reduced = _project(f.system, t, t_inv, xp)
    return (
        StateSpace(*(None if x is None else xp.astype(x, f.result) for x in reduced)),
        xp.astype(t, f.result),
        xp.astype(t_inv, f.result),
    )


def _check_method(method: str) -> None:
    if method not in ("sqrt", "bfsr"):
        msg = f"`method` must be 'sqrt' or 'bfsr'; received {method!r}."
        raise ValueError(msg)


def _truncate(
    sys: StateSpace | DiagonalStateSpace,
    rank: int | None,
    tau: float | None,
    energy: Literal["sum", "squared"],
    method: str,
    horizon: int | None,
    real_output: bool,
    xp: Namespace | None,
) -> tuple[StateSpace, Array, Array, Array, Namespace, int]:
    _check_method(method)
    f = _factors(sys, horizon, real_output, xp)
    xp = f.xp
    if rank is not None:
        rank = check_int(rank, "rank", low=1, high=f.n)
    u, s, vh = xp.linalg.svd(_xp.conj_transpose(f.lo, xp) @ f.lc, full_matrices=False)
    r = rank if rank is not None else f.n if tau is None else _rank_for_batch(s, tau, energy)
    if not _xp.is_traced(s):
        _check_numerical_rank(s, r, xp)
    reduced, t, t_inv = _projected(f, (u, s, vh), r, method)
    real = _xp.real_dtype_of(f.result, xp)
    return reduced, xp.astype(s, real), t, t_inv, xp, r


def balanced_truncation(
    sys: StateSpace | DiagonalStateSpace,
    rank: int | None = None,
    *,
    tau: float | None = None,
    energy: Literal["sum", "squared"] = "sum",
    method: Literal["sqrt", "bfsr"] = "sqrt",
    horizon: int | None = None,
    real_output: bool = False,
    xp: Namespace | None = None,
) -> BalancedTruncation:
    """Reduce a stable system to ``rank`` states by balanced truncation.

    With Gramian factors :math:`P = L_c L_c^H`, :math:`Q = L_o L_o^H` and the SVD
    :math:`L_o^H L_c = U \\Sigma V^H`, the square-root method (``"sqrt"``) projects with

    .. math::

        T = L_c V_r \\Sigma_r^{-1/2}, \\quad T^{-1} = \\Sigma_r^{-1/2} U_r^H L_o^H, \\qquad
        (A_r, B_r, C_r, D_r) = (T^{-1} A T,\\ T^{-1} B,\\ C T,\\ D),

    the leading ``r`` states of the balanced realization. The balancing-free square-root method
    (``"bfsr"``, Varga) projects onto orthonormal bases of the same subspaces; its reduced
    system has the same transfer function but better-conditioned, unbalanced coordinates. For
    infinite-horizon Gramians

    .. math::

        \\| G - G_r \\|_{\\mathcal{H}_\\infty} \\le 2 \\sum_{i > r} \\sigma_i
        + c\\, n\\, \\varepsilon\\, \\sigma_1 \\quad (\\texttt{error\\_bound}),

    the exact-arithmetic bound plus the round-off level of the returned system's precision
    :math:`\\varepsilon` (:func:`hankel_error_bound`, :math:`c = 10`).

    Parameters
    ----------
    sys : StateSpace or DiagonalStateSpace
        Stable system, batched over leading dimensions.
    rank : int, optional
        States to keep, in ``[1, n]`` (``[1, 2n]`` with ``real_output``). A Python int (static
        under ``jax.jit``), e.g. from :func:`select_rank`. Give either ``rank`` or ``tau``.
    tau : float, optional
        A real number in ``[0, 1)`` (Python or NumPy scalar). Choose the rank from the HSVs
        computed here, ``select_rank(hsv, tau=tau, energy=energy)`` (for a batch, the largest
        of the members' ranks), saving the separate :func:`hankel_singular_values` call. Eager
        only (the rank is a host-side decision).
    energy : str, optional
        ``"sum"`` (default) or ``"squared"``; see :func:`select_rank`.
    method : {"sqrt", "bfsr"}, optional
        Square-root (default) or balancing-free square-root method.
    horizon : int, optional
        Use time-limited Gramians over ``L`` steps (time-limited balanced truncation, Gawronski
        and Juang). The reduced model is then tuned to the first ``L`` steps; neither stability
        nor the H-infinity bound is guaranteed, and ``error_bound`` is only the analogous
        tail sum, an indicator.
    real_output : bool, optional
        ``False`` (default, the paper's reduction): balance the complex system ``(A, B, C)``.
        For a layer with output ``Re(C x)`` its bound still bounds the error of the real output,
        conservatively. ``True``: reduce the exact real ``2n``-state realization
        (:func:`real_output_realization`); ``rank`` counts real states, the reduced system is
        real, and ``error_bound`` is the exact balanced-truncation bound of the real system.
    xp : array_namespace, optional
        Namespace override.

    Returns
    -------
    BalancedTruncation
        ``(system, hsv, error_bound, T, T_inv)``.

    Raises
    ------
    ValueError, TypeError
        If ``rank`` is not an integer in range, ``tau`` not a number in ``[0, 1)`` or
        ``method`` is unknown.
    ShapeError, StabilityError
        On malformed, non-finite or unstable systems, or a system with no state.
    ConditioningError
        If a kept HSV is zero, so the projection does not exist.

    Notes
    -----
    The reduced ``A`` is dense; :func:`rediagonalize` maps it back to a diagonal layer. The
    singular-vector phases are normalised (largest entry of each right singular vector real
    positive), so results are deterministic across backends.

    References
    ----------
    .. [1] A. C. Antoulas, *Approximation of Large-Scale Dynamical Systems*, SIAM, 2005.
    .. [2] A. Varga, "Efficient minimal realization procedure based on balancing", 1991.
    .. [3] W. Gawronski and J.-N. Juang, "Model reduction in limited time and frequency
       intervals", Int. J. Systems Science, 1990.

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core import DiagonalStateSpace, balanced_truncation
    >>> rng = np.random.default_rng(0)
    >>> sys = DiagonalStateSpace(np.linspace(0.1, 0.9, 8), rng.normal(size=(8, 2)),
    ...                          rng.normal(size=(1, 8)))
    >>> res = balanced_truncation(sys, 3)
    >>> res.system.a.shape, bool(res.error_bound >= 0)
    ((3, 3), True)
    """
    if (rank is None) == (tau is None):
        msg = f"Give exactly one of `rank` and `tau`; received rank={rank!r}, tau={tau!r}."
        raise TypeError(msg)
    if tau is not None:
        tau = check_tau(tau)
    reduced, hsv, t, t_inv, xp, r = _truncate(
        sys, rank, tau, energy, method, horizon, real_output, xp
    )
    return BalancedTruncation(reduced, hsv, hankel_error_bound(hsv, r, xp=xp), t, t_inv)


def balanced_realization(
    sys: StateSpace | DiagonalStateSpace,
    *,
    horizon: int | None = None,
    real_output: bool = False,
    xp: Namespace | None = None,
) -> BalancedRealization:
    """Balanced realization: a state basis in which both Gramians equal ``diag(hsv)``.

    .. math::

        T^{-1} P T^{-H} = T^H Q T = \\Sigma = \\operatorname{diag}(\\sigma_1, \\dots,
        \\sigma_n),

    computed by the square-root method (see :func:`balanced_truncation` with ``rank = n``).

    Parameters
    ----------
    sys : StateSpace or DiagonalStateSpace
        Stable, minimal system (every HSV positive).
    horizon : int, optional
        Balance the time-limited Gramians over ``L`` steps.
    real_output : bool, optional
        Balance the real ``2n``-state realization of a layer with output ``Re(C x)``.
    xp : array_namespace, optional
        Namespace override.

    Returns
    -------
    BalancedRealization
        ``(system, hsv, T, T_inv)``.

    Raises
    ------
    ConditioningError
        If the system is not minimal (a zero HSV).
    """
    reduced, hsv, t, t_inv, _, _ = _truncate(
        sys, None, None, "sum", "sqrt", horizon, real_output, xp
    )
    return BalancedRealization(reduced, hsv, t, t_inv)
