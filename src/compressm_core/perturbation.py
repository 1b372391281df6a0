"""Perturbation bounds for Hankel singular values and certificates for the ranking they induce.

One gradient step moves the parameters ``(A, B, C)`` of a layer, so it moves the Gramians and
the Hankel singular values (HSVs). Weyl's theorem applied to the Hermitian operator
:math:`H = (P^{1/2} Q P^{1/2})^{1/2}`, whose eigenvalues are the HSVs, bounds how far every HSV
can move in one step (Lemma 3.1 of the CompreSSM paper). Summed over steps, the bound certifies
that no HSV crossed the cut between the ``r`` kept and the discarded states.

The numerics (:func:`hankel_operator`, :func:`hsv_perturbation_bound`,
:func:`hsv_a_priori_bound`) are traceable Array API code, batched over leading dimensions. The
decisions (:func:`ranking_certificate`, :class:`RankTracker`) run on the host, on Python and
NumPy numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, cast

import numpy as np

from . import _xp
from ._typing import Array, Namespace
from ._validation import broadcast_shapes, check_int, check_system
from .errors import ShapeError
from .gramians import prepared_gramians, psd_factor
from .systems import DiagonalStateSpace, StateSpace

__all__ = [
    "RankTracker",
    "RankingCertificate",
    "hankel_operator",
    "hsv_a_priori_bound",
    "hsv_perturbation_bound",
    "ranking_certificate",
]


# --------------------------------------------------------------------------------------------
# Traceable numerics
# --------------------------------------------------------------------------------------------


def _hermitian_part(x: Array, xp: Namespace) -> Array:
    return (x + _xp.conj_transpose(x, xp)) / 2


def _psd_sqrt(x: Array, xp: Namespace) -> Array:
    """Hermitian square root ``V sqrt(max(w, 0)) V^H`` of ``X = V diag(w) V^H``."""
    w, v = xp.linalg.eigh(x)
    w = xp.where(w > 0, w, xp.zeros_like(w))
    return (v * xp.astype(xp.sqrt(w), v.dtype)[..., None, :]) @ _xp.conj_transpose(v, xp)


def _operator(p: Array, q: Array, xp: Namespace) -> Array:
    """``H = (P^1/2 Q P^1/2)^1/2`` as ``U diag(s) U^H`` from the SVD ``P^1/2 L_o = U S W^H``."""
    k = _psd_sqrt(p, xp) @ psd_factor(q, xp)
    u, s, _ = xp.linalg.svd(k, full_matrices=False)
    h = (u * xp.astype(s, u.dtype)[..., None, :]) @ _xp.conj_transpose(u, xp)
    return _hermitian_part(h, xp)


def _joint_namespace(first: object, second: object, xp: Namespace | None) -> Namespace | None:
    """The namespace shared by two systems; ``xp`` unchanged if either is not a system."""
    kinds = (StateSpace, DiagonalStateSpace)
    if isinstance(first, kinds) and isinstance(second, kinds):
        return _xp.namespace(*first, *second, xp=xp)
    return xp


def _states(sys: StateSpace | DiagonalStateSpace) -> int:
    return int(sys[0].shape[-1])


def _check_same_states(
    before: StateSpace | DiagonalStateSpace, after: StateSpace | DiagonalStateSpace
) -> None:
    n0, n1 = _states(before), _states(after)
    if n0 != n1:
        msg = (
            f"`sys_after` must have the same number of states as `sys_before` (n = {n0}); "
            f"received n = {n1}."
        )
        raise ShapeError(msg)


def hankel_operator(
    sys: StateSpace | DiagonalStateSpace,
    *,
    horizon: int | None = None,
    real_output: bool = False,
    xp: Namespace | None = None,
) -> Array:
    """Hermitian operator :math:`H = (P^{1/2} Q P^{1/2})^{1/2}` whose eigenvalues are the HSVs.

    :math:`P Q` is not Hermitian, but it has the eigenvalues of the Hermitian positive
    semi-definite :math:`P^{1/2} Q P^{1/2}` (similar to it when :math:`P` is invertible; here
    :math:`P^{1/2}` is the Hermitian square root, not a factor :math:`L_c`), so

    .. math::

        H = \\big(P^{1/2} Q P^{1/2}\\big)^{1/2} = H^H \\succeq 0, \\qquad
        \\lambda_i(H) = \\sqrt{\\lambda_i(P Q)} = \\sigma_i .

    Its spectrum is invariant under a change of state coordinates; ``H`` itself is not
    (:math:`x \\mapsto T x` sends :math:`P \\mapsto T P T^H`, :math:`Q \\mapsto T^{-H} Q T^{-1}`).
    Compare ``H`` of two parameter states only in the same coordinates, such as the state
    basis of a layer's own parameterisation.

    Parameters
    ----------
    sys : StateSpace or DiagonalStateSpace
        Stable system, batched over leading dimensions.
    horizon : int, optional
        Use the time-limited Gramians over ``L`` steps; ``None`` (default) for the infinite
        horizon.
    real_output : bool, optional
        Operator of the real ``2n``-state realization of a complex layer with output
        ``Re(C x)`` (coordinates ``[Re x; Im x]``), instead of that of ``(A, B, C)``.
    xp : array_namespace, optional
        Namespace override.

    Returns
    -------
    (..., n, n) array
        ``H`` in the promoted dtype of the system (``2n x 2n`` and real with ``real_output``).

    Raises
    ------
    ShapeError, StabilityError, ConditioningError
        On malformed, non-finite or unstable systems.

    Notes
    -----
    :math:`P^{1/2} = V \\operatorname{diag}(\\sqrt{\\max(w, 0)}) V^H` from a Hermitian
    eigendecomposition of :math:`P` with the eigenvalues clamped at zero. With
    :math:`Q = L_o L_o^H` (:func:`gramian_factors`) and the SVD
    :math:`P^{1/2} L_o = U \\Sigma W^H`, :math:`P^{1/2} Q P^{1/2} = U \\Sigma^2 U^H`, so
    :math:`H = U \\Sigma U^H`: the outer square root is taken from singular values, never by
    squaring them and taking roots again. Cost ``O(n^3)``; standard linear algebra only, so it
    is batched, runs on every backend and under ``jax.jit``.

    The matrix square root is only Hölder-1/2 continuous at singular matrices: when :math:`P`
    is numerically singular, rounding errors of order :math:`\\varepsilon \\|P\\|` become
    errors of order :math:`\\sqrt{\\varepsilon \\|P\\|}` in :math:`P^{1/2}`. ``H`` (and so
    :func:`hsv_perturbation_bound`) is accurate to about
    :math:`\\sqrt{\\varepsilon}\\, \\|P\\|^{1/2} \\|Q\\|^{1/2}` in that case, although its
    eigenvalues are not.

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core import DiagonalStateSpace, hankel_singular_values
    >>> from compressm_core.perturbation import hankel_operator
    >>> sys = DiagonalStateSpace(np.array([0.9, -0.5]), np.ones((2, 1)), np.ones((1, 2)))
    >>> h = hankel_operator(sys)
    >>> bool(np.allclose(np.linalg.eigvalsh(h)[::-1], hankel_singular_values(sys)))
    True
    """
    p, q, _, _, xp, result = prepared_gramians(
        sys, horizon=horizon, real_output=real_output, xp=xp
    )
    return xp.astype(_operator(p, q, xp), result)


def hsv_perturbation_bound(
    sys_before: StateSpace | DiagonalStateSpace,
    sys_after: StateSpace | DiagonalStateSpace,
    *,
    horizon: int | None = None,
    real_output: bool = False,
    xp: Namespace | None = None,
) -> Array:
    """Weyl bound :math:`\\|H' - H\\|_2` on how far any HSV moves between two parameter states.

    With :math:`H` and :math:`H'` the operators of :func:`hankel_operator` of ``sys_before``
    and ``sys_after``, Weyl's theorem for Hermitian matrices (HSVs sorted in descending order
    in both systems) gives

    .. math::

        \\max_i |\\sigma_i' - \\sigma_i| \\le \\|H' - H\\|_2
        = \\max_j |\\lambda_j(H' - H)| .

    This is Lemma 3.1 of the CompreSSM paper when the two states are consecutive training
    steps. The bound holds for any two systems with the same number of states; it is small when
    they are close *in the same state coordinates*, which is why both must be given in the
    coordinates of the layer's parameterisation (for diagonal layers, the state index).

    Parameters
    ----------
    sys_before, sys_after : StateSpace or DiagonalStateSpace
        Stable systems with the same number of states ``n``, batched over leading dimensions
        that broadcast against each other. A diagonal and a dense system may be mixed; both
        are read in the state coordinates they are given in.
    horizon : int, optional
        Use the time-limited Gramians over ``L`` steps (bounds the time-limited HSVs);
        ``None`` (default) for the infinite horizon.
    real_output : bool, optional
        Bound the HSVs of the real realizations of layers with output ``Re(C x)``.
    xp : array_namespace, optional
        Namespace override.

    Returns
    -------
    (...) real array
        :math:`\\|H' - H\\|_2 \\ge 0`, batched like the broadcast systems.

    Raises
    ------
    ShapeError
        If the systems have different numbers of states or batch shapes that do not
        broadcast.
    StabilityError, ConditioningError
        On non-finite or unstable systems.

    See Also
    --------
    hsv_a_priori_bound : A bound from the sizes of the parameter changes alone.
    ranking_certificate : Whether a cut survives HSVs moving by at most the bound.

    Notes
    -----
    Weyl's theorem is exact for the exact operators. The computed ``H`` carries rounding
    errors (see :func:`hankel_operator`, Notes), so compare the bound with HSV changes above
    that floor. The bound measures the change of a coordinate-dependent operator and may be
    larger than the actual movement of the HSVs, for example when a step is close to a change
    of coordinates (which moves ``H`` but no HSV).

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core import DiagonalStateSpace, hankel_singular_values
    >>> from compressm_core.perturbation import hsv_perturbation_bound
    >>> before = DiagonalStateSpace(np.array([0.9, -0.5]), np.ones((2, 1)), np.ones((1, 2)))
    >>> after = before._replace(poles=np.array([0.91, -0.5]))
    >>> bound = hsv_perturbation_bound(before, after)
    >>> move = np.abs(hankel_singular_values(after) - hankel_singular_values(before)).max()
    >>> bool(move <= bound)
    True
    """
    xp = _joint_namespace(sys_before, sys_after, xp)
    p0, q0, _, info0, xp, result0 = prepared_gramians(
        sys_before, horizon=horizon, real_output=real_output, xp=xp, name="sys_before"
    )
    p1, q1, _, info1, _, result1 = prepared_gramians(
        sys_after, horizon=horizon, real_output=real_output, xp=xp, name="sys_after"
    )
    _check_same_states(sys_before, sys_after)
    if info0.n != info1.n:
        msg = (
            f"`sys_after` must be complex exactly when `sys_before` is, with `real_output=True`; "
            f"received realizations of {info0.n} and {info1.n} states."
        )
        raise ShapeError(msg)
    broadcast_shapes([info0.batch, info1.batch], "`sys_before` and `sys_after`")
    h0, h1 = _operator(p0, q0, xp), _operator(p1, q1, xp)
    work = xp.result_type(h0.dtype, h1.dtype)
    delta = _hermitian_part(xp.astype(h1, work) - xp.astype(h0, work), xp)
    bound = xp.max(xp.abs(xp.linalg.eigvalsh(delta)), axis=-1)
    return xp.astype(bound, _xp.real_dtype_of(xp.result_type(result0, result1), xp))


def _spectral_norm(x: Array, xp: Namespace) -> Array:
    return xp.linalg.svdvals(x)[..., 0]


def _as_real_output(poles: Array, b: Array, c: Array, xp: Namespace) -> tuple[Array, Array, Array]:
    """Conjugate-augmented realization ``[x; conj(x)]`` of a layer with output ``Re(C x)``."""
    return (
        xp.concat([poles, _xp.conj(poles, xp)], axis=-1),
        xp.concat([b, _xp.conj(b, xp)], axis=-2),
        xp.concat([c, _xp.conj(c, xp)], axis=-1) / 2,
    )


def hsv_a_priori_bound(
    sys_before: DiagonalStateSpace,
    sys_after: DiagonalStateSpace,
    *,
    real_output: bool = False,
    xp: Namespace | None = None,
) -> Array:
    """Rigorous bound on the HSV movement from the sizes of ``δλ``, ``δB`` and ``δC``.

    For diagonal systems :math:`(\\Lambda, B, C)` and
    :math:`(\\Lambda + \\delta\\Lambda, B + \\delta B, C + \\delta C)` with spectral radii
    :math:`\\rho, \\rho' < 1` and :math:`\\bar\\rho = \\max(\\rho, \\rho')`,

    .. math::

        \\max_i |\\sigma_i' - \\sigma_i| \\le
        \\varepsilon_O \\frac{\\|B'\\|_2}{\\sqrt{1 - \\rho'^2}}
        + \\frac{\\|C\\|_2}{\\sqrt{1 - \\rho^2}} \\varepsilon_R,

        \\varepsilon_R = \\frac{\\|\\delta B\\|_2}{\\sqrt{1 - \\rho'^2}}
        + \\kappa \\|B\\|_2 \\|\\delta\\lambda\\|_\\infty, \\quad
        \\varepsilon_O = \\frac{\\|\\delta C\\|_2}{\\sqrt{1 - \\rho'^2}}
        + \\kappa \\|C\\|_2 \\|\\delta\\lambda\\|_\\infty, \\quad
        \\kappa = \\frac{\\sqrt{1 + \\bar\\rho^2}}{(1 - \\bar\\rho^2)^{3/2}} .

    This is an upper bound for steps of any size, not a first-order estimate. Divided by
    :math:`\\|B\\| \\|C\\| / (1 - \\rho^2) \\ge \\sigma_1` it reads, to first order,
    :math:`\\|\\delta B\\| / \\|B\\| + \\|\\delta C\\| / \\|C\\|
    + 2 \\|\\delta\\lambda\\|_\\infty \\sqrt{1 + \\rho^2} / (1 - \\rho^2)`: the distance of
    the poles to the unit circle sets the sensitivity to pole moves.

    Parameters
    ----------
    sys_before, sys_after : DiagonalStateSpace
        Stable diagonal systems with the same number of states, batched over leading
        dimensions that broadcast. Poles are compared index by index, so both must list
        their states in the same order (the layer's parameter order).
    real_output : bool, optional
        Bound the HSVs of the real realizations of layers with output ``Re(C x)``; the norms
        are then those of the conjugate-augmented realization
        :math:`([\\Lambda, \\bar\\Lambda], [B; \\bar B], [C, \\bar C] / 2)`.
    xp : array_namespace, optional
        Namespace override.

    Returns
    -------
    (...) real array
        The bound, batched like the broadcast systems.

    Raises
    ------
    TypeError
        If either system is not a :class:`DiagonalStateSpace`.
    ShapeError
        If the systems have different numbers of states.
    StabilityError
        If a pole of either system has modulus ``>= 1``, or a value is non-finite.

    See Also
    --------
    hsv_perturbation_bound : The (usually much tighter) Weyl bound of Lemma 3.1.

    Notes
    -----
    The HSVs are the singular values of the Hankel operator :math:`\\Gamma = \\mathcal{O}
    \\mathcal{R}` with :math:`\\mathcal{R} = [B, \\Lambda B, \\Lambda^2 B, \\dots]` and
    :math:`\\mathcal{O} = [C; C \\Lambda; C \\Lambda^2; \\dots]`. Weyl's inequality for
    singular values gives :math:`|\\sigma_i' - \\sigma_i| \\le \\|\\Gamma' - \\Gamma\\|_2`, and
    :math:`\\Gamma' - \\Gamma = (\\mathcal{O}' - \\mathcal{O}) \\mathcal{R}'
    + \\mathcal{O} (\\mathcal{R}' - \\mathcal{R})` with
    :math:`\\Lambda'^k B' - \\Lambda^k B = \\Lambda'^k \\delta B
    + (\\Lambda'^k - \\Lambda^k) B`, :math:`|\\lambda'^k - \\lambda^k| \\le k \\bar\\rho^{k-1}
    |\\delta\\lambda|` and :math:`\\sum_{k \\ge 1} k^2 \\bar\\rho^{2(k-1)} = \\kappa^2`. The
    Hankel operator does not depend on the state coordinates (unlike ``H`` of
    :func:`hsv_perturbation_bound`); only the sizes of the changes are measured in the diagonal
    coordinates. The time-limited Hankel operator over ``L`` steps keeps the first ``L`` block
    rows and columns, so every sum only shrinks and the bound also holds for time-limited HSVs.
    It is a worst case over all directions of change: expect it to be orders of magnitude
    larger than the Weyl bound, the more so the closer the poles are to the unit circle. Cost
    ``O(n (m^2 + p^2))``, traceable.

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core import DiagonalStateSpace, hankel_singular_values
    >>> from compressm_core.perturbation import hsv_a_priori_bound
    >>> before = DiagonalStateSpace(np.array([0.9, -0.5]), np.ones((2, 1)), np.ones((1, 2)))
    >>> after = before._replace(b=np.array([[1.01], [1.0]]))
    >>> move = np.abs(hankel_singular_values(after) - hankel_singular_values(before)).max()
    >>> bool(move <= hsv_a_priori_bound(before, after))
    True
    """
    for sys, name in ((sys_before, "sys_before"), (sys_after, "sys_after")):
        if not isinstance(sys, DiagonalStateSpace):
            msg = f"`{name}` must be a DiagonalStateSpace; received {type(sys).__name__}."
            raise TypeError(msg)
    xp = _joint_namespace(sys_before, sys_after, xp)
    before, info0, xp = check_system(sys_before, name="sys_before", xp=xp)
    after, info1, _ = check_system(sys_after, name="sys_after", xp=xp)
    _check_same_states(before, after)
    broadcast_shapes([info0.batch, info1.batch], "`sys_before` and `sys_after`")
    fields, _work, result = _xp.promote(*before[:3], *after[:3], xp=xp)
    lam0, b0, c0, lam1, b1, c1 = cast("list[Array]", fields)
    if real_output and _xp.is_complex(lam0, xp):
        lam0, b0, c0 = _as_real_output(lam0, b0, c0, xp)
        lam1, b1, c1 = _as_real_output(lam1, b1, c1, xp)
    rho0 = xp.max(xp.abs(lam0), axis=-1)
    rho1 = xp.max(xp.abs(lam1), axis=-1)
    rho = xp.maximum(rho0, rho1)
    d_lam = xp.max(xp.abs(lam1 - lam0), axis=-1)
    s0, s1 = 1 / xp.sqrt(1 - rho0**2), 1 / xp.sqrt(1 - rho1**2)
    kappa = xp.sqrt(1 + rho**2) / (1 - rho**2) ** 1.5
    norm_b0, norm_b1 = _spectral_norm(b0, xp), _spectral_norm(b1, xp)
    norm_c0 = _spectral_norm(c0, xp)
    eps_r = _spectral_norm(b1 - b0, xp) * s1 + kappa * norm_b0 * d_lam
    eps_o = _spectral_norm(c1 - c0, xp) * s1 + kappa * norm_c0 * d_lam
    bound = eps_o * norm_b1 * s1 + norm_c0 * s0 * eps_r
    return xp.astype(bound, _xp.real_dtype_of(result, xp))


# --------------------------------------------------------------------------------------------
# Host-side decisions
# --------------------------------------------------------------------------------------------


class RankingCertificate(NamedTuple):
    """Whether the cut after the ``r`` largest HSVs survives HSVs moving by at most ``bound``.

    Attributes
    ----------
    stable : bool
        ``margin > 0``.
    margin : float
        :math:`\\sigma_r - \\sigma_{r+1} - 2\\, \\text{bound}`; the gap that is left at the cut
        in the worst case.
    """

    stable: bool
    margin: float


def _host(x: object) -> np.ndarray[Any, Any]:
    """``x`` as a NumPy array; arrays of any library are copied to the host (a few numbers)."""
    if isinstance(x, (bool, int, float, list, tuple, np.generic, np.ndarray)):
        return np.asarray(x)
    return _xp.to_host(x, allow_transfer=True)


def _host_hsv(hsv: object) -> np.ndarray[Any, Any]:
    """``hsv`` as a finite, non-negative 1-D float64 NumPy array."""
    raw = _host(hsv)
    if not np.issubdtype(raw.dtype, np.floating) and not np.issubdtype(raw.dtype, np.integer):
        msg = f"`hsv` must be a real array; received dtype {raw.dtype}."
        raise TypeError(msg)
    values = np.asarray(raw, dtype=np.float64)
    if values.ndim != 1 or values.size < 2:
        msg = f"`hsv` must be a 1-D array of at least 2 HSVs; received shape {values.shape}."
        raise ShapeError(msg)
    if not (np.all(np.isfinite(values)) and np.all(values >= 0)):
        msg = f"`hsv` must be finite and non-negative; received {values.tolist()}."
        raise ValueError(msg)
    return values


def _host_bound(bound: object) -> float:
    """``bound`` as a finite, non-negative Python float."""
    raw = _host(bound)
    if raw.ndim != 0 or raw.dtype == np.bool_ or not np.issubdtype(raw.dtype, np.number):
        msg = f"`bound` must be a real scalar; received {type(bound).__name__} {bound!r}."
        raise TypeError(msg)
    if np.iscomplexobj(raw):
        msg = f"`bound` must be real; received {bound!r}."
        raise TypeError(msg)
    value = float(raw)
    if not (np.isfinite(value) and value >= 0):
        msg = f"`bound` must be finite and non-negative; received {value!r}."
        raise ValueError(msg)
    return value


def _gaps(values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """``sigma_r - sigma_{r+1}`` for ``r = 1..n-1`` of the values sorted in descending order."""
    ordered = np.sort(values)[::-1]
    return np.asarray(ordered[:-1] - ordered[1:], dtype=np.float64)


def ranking_certificate(hsv: Array, bound: float | Array, rank: int) -> RankingCertificate:
    """Certify that the cut after the ``rank`` largest HSVs survives a perturbation ``bound``.

    If every HSV moves by at most ``bound`` (for instance :func:`hsv_perturbation_bound`, or the
    sum of such bounds over several steps), then with :math:`\\sigma` sorted in descending
    order

    .. math::

        m = \\sigma_r - \\sigma_{r+1} - 2\\, \\text{bound} > 0
        \\;\\Longrightarrow\\;
        \\sigma_r' - \\sigma_{r+1}' \\ge m > 0 ,

    so the perturbed system still has a gap of at least ``m`` at ``r``. When ``bound`` is
    :math:`\\|H' - H\\|_2` (or a sum of such bounds along a path), the Davis-Kahan
    :math:`\\sin\\Theta` theorem adds that the dominant ``r``-dimensional eigenspace of
    :math:`H` turns by an angle whose sine is at most :math:`\\text{bound} / (m +
    \\text{bound}) < 1`: no state direction is carried from below the cut to above it.
    ``m <= 0`` certifies nothing (it does not mean that the order changes).

    Parameters
    ----------
    hsv : (n,) array
        Hankel singular values of the reference state, any order (sorted here); from any array
        library (copied to the host).
    bound : float or 0-D array
        A bound on :math:`\\max_i |\\sigma_i' - \\sigma_i|`, non-negative.
    rank : int
        The cut ``r``: number of kept states, in ``[1, n - 1]``.

    Returns
    -------
    RankingCertificate
        ``(stable, margin)`` as Python ``bool`` and ``float``. A host-side decision: never
        traced.

    Raises
    ------
    ValueError
        If ``bound`` is negative or non-finite, ``rank`` is outside ``[1, n - 1]``, or ``hsv``
        has negative or non-finite entries.
    ShapeError
        If ``hsv`` is not 1-D with at least two entries.

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core.perturbation import ranking_certificate
    >>> ranking_certificate(np.array([4.0, 3.0, 1.0]), 0.25, rank=2)   # 3 - 1 - 0.5
    RankingCertificate(stable=True, margin=1.5)
    """
    gaps = _gaps(_host_hsv(hsv))
    b = _host_bound(bound)
    r = check_int(rank, "rank", low=1, high=gaps.size)
    margin = float(gaps[r - 1] - 2 * b)
    return RankingCertificate(margin > 0, margin)


class RankTracker:
    """Follow HSVs through training and certify, per cut, that the ranking is stable.

    Call :meth:`update` at each checked training step with the HSVs of the current parameters
    and the bound on their movement since the previous call (:func:`hsv_perturbation_bound`
    between the two parameter states). The tracker is a small state machine with one state per
    cut ``r`` in ``[1, n - 1]``:

    - a **reference** snapshot ``a_r`` (an update index) with its gap
      :math:`g_r = \\sigma_r(a_r) - \\sigma_{r+1}(a_r)`;
    - the **accumulated bound** :math:`A_r = \\sum_{j = a_r + 1}^{k} \\beta_j`, the sum of the
      per-update bounds :math:`\\beta_j` since the reference;
    - a **streak**: the number of updates since the reference.

    By the triangle inequality :math:`|\\sigma_i(j) - \\sigma_i(a_r)| \\le A_r` for *every*
    update ``j`` between the reference and now, so the margin

    .. math::

        m_r = g_r - 2 A_r > 0
        \\;\\Longrightarrow\\;
        \\sigma_r(j) - \\sigma_{r+1}(j) \\ge m_r > 0 \\quad \\text{for all } a_r \\le j \\le k .

    The sum is accumulated, not the bound between the reference and the current state, because
    it covers every snapshot in between with one number, and because the tracker only sees
    per-step bounds. When an update makes :math:`m_r \\le 0` the cut is re-anchored: the current
    snapshot becomes its reference, :math:`A_r = 0` and the streak restarts at ``0``. A cut is
    :meth:`certified` for ``window`` when its streak is at least ``window``.

    HSVs of consecutive snapshots are also matched to each other by a linear sum assignment
    (:func:`scipy.optimize.linear_sum_assignment`), by default on the cost
    :math:`|\\sigma_i - \\sigma_j'|`, which gives :attr:`matchings` and :meth:`trajectories`.

    Parameters
    ----------
    max_history : int, optional
        Number of snapshots kept for :attr:`snapshots` and :meth:`trajectories`; ``None``
        (default) keeps all of them (``n`` floats per update). The certificates do not use the
        history.

    Notes
    -----
    The certificate covers the snapshots that were passed to :meth:`update`, not the optimizer
    steps between them: Weyl's bound compares two parameter states, however many steps apart,
    so checking every ``k`` steps is valid with the bound between states ``k`` steps apart.
    It says nothing about future steps. That the HSV ordering settles early in training is an
    empirical observation of the CompreSSM paper (Fig. 2); the tracker turns it into a check.

    With a cost that depends only on the values, an optimal assignment between two *sorted*
    lists is the identity: value matching follows HSVs passed in an arbitrary order, but it
    cannot see two states exchange their order. Pass ``cost`` to :meth:`update` (for example
    :math:`1 - |u_i^H u_j'|^2` from eigenvectors of :func:`hankel_operator`) to follow states
    through crossings.

    One tracker follows one system. Call :meth:`reset` after a reduction changes ``n``.

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core.perturbation import RankTracker
    >>> tracker = RankTracker()
    >>> tracker.update(np.array([4.0, 2.0, 0.5]))            # reference snapshot
    >>> for _ in range(3):
    ...     tracker.update(np.array([4.0, 2.0, 0.5]), bound=0.125)
    >>> tracker.certified(rank=2, window=3), tracker.certificate(rank=2).margin
    (True, 0.75)
    """

    _VERSION = 1

    def __init__(self, *, max_history: int | None = None) -> None:
        if max_history is not None:
            max_history = check_int(max_history, "max_history", low=1, high=2**62)
        self._max_history = max_history
        self.reset()

    def reset(self) -> None:
        """Forget every snapshot; the next :meth:`update` sets a new reference."""
        self._n: int | None = None
        self._updates = 0
        self._gap: np.ndarray[Any, Any] = np.zeros(0)
        self._accumulated: np.ndarray[Any, Any] = np.zeros(0)
        self._streak: np.ndarray[Any, Any] = np.zeros(0, dtype=np.int64)
        self._anchor: np.ndarray[Any, Any] = np.zeros(0, dtype=np.int64)
        self._snapshots: list[np.ndarray[Any, Any]] = []
        self._matchings: list[np.ndarray[Any, Any]] = []

    # -- transitions -------------------------------------------------------------------------

    def update(
        self, hsv: Array, bound: float | Array | None = None, *, cost: Array | None = None
    ) -> None:
        """Record a snapshot and advance every cut's certificate.

        Parameters
        ----------
        hsv : (n,) array
            HSVs of the current parameters, any order (the certificates sort them; the
            matching and trajectories keep the given order).
        bound : float or 0-D array, optional
            Bound on :math:`\\max_i |\\sigma_i - \\sigma_i^{\\text{prev}}|` since the previous
            snapshot, non-negative. Required from the second snapshot on; ignored (but
            validated) for the first, which only sets the references.
        cost : (n, n) array, optional
            ``cost[i, j]`` of matching HSV ``i`` of the previous snapshot with HSV ``j`` of
            this one; default :math:`|\\sigma_i^{\\text{prev}} - \\sigma_j|`.

        Raises
        ------
        ShapeError
            If ``hsv`` does not have the ``n`` entries of the previous snapshots, or ``cost``
            is not ``(n, n)``.
        ValueError
            If ``bound`` is missing after the first snapshot, negative or non-finite, or
            ``hsv`` has negative or non-finite entries.
        """
        values = _host_hsv(hsv)
        step = None if bound is None else _host_bound(bound)
        gap = _gaps(values)
        if self._n is None:
            self._n = values.size
            self._gap = gap
            self._accumulated = np.zeros(values.size - 1)
            self._streak = np.zeros(values.size - 1, dtype=np.int64)
            self._anchor = np.zeros(values.size - 1, dtype=np.int64)
            self._record(values, None)
            return
        if values.size != self._n:
            msg = (
                f"`hsv` must have the n = {self._n} entries of the previous snapshots; "
                f"received {values.size} (call `reset()` after a reduction)."
            )
            raise ShapeError(msg)
        if step is None:
            msg = "`bound` is required for every snapshot after the first; received None."
            raise ValueError(msg)
        previous = self._snapshots[-1]
        matching = self._match(previous, values, cost)
        self._updates += 1
        accumulated = self._accumulated + step
        holds = self._gap - 2 * accumulated > 0
        self._streak = np.where(holds, self._streak + 1, 0)
        self._accumulated = np.where(holds, accumulated, 0.0)
        self._gap = np.where(holds, self._gap, gap)
        self._anchor = np.where(holds, self._anchor, self._updates)
        self._record(values, matching)

    def _match(
        self,
        previous: np.ndarray[Any, Any],
        values: np.ndarray[Any, Any],
        cost: Array | None,
    ) -> np.ndarray[Any, Any]:
        if cost is None:
            table = np.abs(previous[:, None] - values[None, :])
        else:
            table = np.asarray(_host(cost), dtype=np.float64)
            if table.shape != (values.size, values.size):
                msg = (
                    f"`cost` must have shape (n, n) = ({values.size}, {values.size}); "
                    f"received {table.shape}."
                )
                raise ShapeError(msg)
            if not np.all(np.isfinite(table)):
                msg = "`cost` must contain only finite values."
                raise ValueError(msg)
        from scipy.optimize import linear_sum_assignment  # host-side only, imported on use

        rows, cols = linear_sum_assignment(table)
        matching = np.empty(values.size, dtype=np.int64)
        matching[rows] = cols
        return matching

    def _record(self, values: np.ndarray[Any, Any], matching: np.ndarray[Any, Any] | None) -> None:
        self._snapshots.append(values)
        if matching is not None:
            self._matchings.append(matching)
        if self._max_history is not None and len(self._snapshots) > self._max_history:
            self._snapshots.pop(0)
            self._matchings.pop(0)

    # -- queries -----------------------------------------------------------------------------

    def _cut(self, rank: int) -> int:
        if self._n is None:
            msg = "The tracker has no snapshot yet; call `update(hsv)` first."
            raise ValueError(msg)
        return check_int(rank, "rank", low=1, high=self._n - 1) - 1

    def certificate(self, rank: int) -> RankingCertificate:
        """The certificate of the cut at ``rank`` against its accumulated bound.

        Parameters
        ----------
        rank : int
            The cut ``r`` in ``[1, n - 1]``.

        Returns
        -------
        RankingCertificate
            ``margin`` :math:`= g_r - 2 A_r`; ``stable`` when it is positive.
        """
        i = self._cut(rank)
        margin = float(self._gap[i] - 2 * self._accumulated[i])
        return RankingCertificate(margin > 0, margin)

    def certified(self, rank: int, window: int) -> bool:
        """Whether the cut at ``rank`` has held for at least ``window`` consecutive updates.

        Parameters
        ----------
        rank : int
            The cut ``r`` in ``[1, n - 1]``.
        window : int
            Number of consecutive updates, at least ``1``.

        Returns
        -------
        bool
            ``True`` when the margin of the cut has stayed positive against the bound
            accumulated over the last ``window`` (or more) updates.
        """
        i = self._cut(rank)
        w = check_int(window, "window", low=1, high=2**62)
        return bool(self._streak[i] >= w)

    @property
    def n(self) -> int | None:
        """Number of HSVs per snapshot; ``None`` before the first :meth:`update`."""
        return self._n

    @property
    def updates(self) -> int:
        """Number of updates after the first snapshot (the index of the latest snapshot)."""
        return self._updates

    @property
    def stable_updates(self) -> np.ndarray[Any, Any]:
        """``(n - 1,)`` streak per cut: updates since the cut's reference, all certified."""
        return np.array(self._streak)

    @property
    def anchors(self) -> np.ndarray[Any, Any]:
        """``(n - 1,)`` index of the reference snapshot of each cut."""
        return np.array(self._anchor)

    @property
    def accumulated_bound(self) -> np.ndarray[Any, Any]:
        """``(n - 1,)`` sum of the bounds since each cut's reference, :math:`A_r`."""
        return np.array(self._accumulated)

    @property
    def snapshots(self) -> np.ndarray[Any, Any]:
        """``(T, n)`` the retained snapshots, in the order their HSVs were given."""
        if not self._snapshots:
            return np.zeros((0, 0))
        return np.stack(self._snapshots)

    @property
    def matchings(self) -> np.ndarray[Any, Any]:
        """``(T - 1, n)``: HSV ``i`` of snapshot ``k`` is HSV ``[k, i]`` of snapshot ``k + 1``."""
        n = 0 if self._n is None else self._n
        if not self._matchings:
            return np.zeros((0, n), dtype=np.int64)
        return np.stack(self._matchings)

    def trajectories(self) -> np.ndarray[Any, Any]:
        """``(T, n)`` HSVs followed through the matchings.

        Column ``i`` starts at HSV ``i`` of the oldest retained snapshot and follows it through
        every matching.

        Returns
        -------
        ndarray
            One matched HSV trajectory per column.
        """
        if not self._snapshots:
            return np.zeros((0, 0))
        index = np.arange(self._snapshots[0].size)
        rows = [self._snapshots[0]]
        for values, matching in zip(self._snapshots[1:], self._matchings, strict=True):
            index = matching[index]
            rows.append(values[index])
        return np.stack(rows)

    # -- checkpointing -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The tracker's state as plain Python numbers and lists (JSON- and pickle-safe).

        Returns
        -------
        dict
            Everything :meth:`load_state_dict` needs to resume.
        """
        return {
            "version": self._VERSION,
            "max_history": self._max_history,
            "n": self._n,
            "updates": self._updates,
            "gap": self._gap.tolist(),
            "accumulated_bound": self._accumulated.tolist(),
            "stable_updates": self._streak.tolist(),
            "anchors": self._anchor.tolist(),
            "snapshots": [s.tolist() for s in self._snapshots],
            "matchings": [m.tolist() for m in self._matchings],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state written by :meth:`state_dict`.

        Parameters
        ----------
        state : mapping
            The output of :meth:`state_dict`.

        Raises
        ------
        ValueError
            If ``state`` lacks a key or comes from another version.
        """
        keys = set(self.state_dict())
        missing = sorted(keys - set(state))
        if missing:
            msg = f"`state` must be a RankTracker state_dict; missing keys {missing}."
            raise ValueError(msg)
        if state["version"] != self._VERSION:
            msg = f"`state` must have version {self._VERSION}; received {state['version']!r}."
            raise ValueError(msg)
        self._max_history = state["max_history"]
        self._n = state["n"]
        self._updates = int(state["updates"])
        self._gap = np.asarray(state["gap"], dtype=np.float64)
        self._accumulated = np.asarray(state["accumulated_bound"], dtype=np.float64)
        self._streak = np.asarray(state["stable_updates"], dtype=np.int64)
        self._anchor = np.asarray(state["anchors"], dtype=np.int64)
        self._snapshots = [np.asarray(s, dtype=np.float64) for s in state["snapshots"]]
        self._matchings = [np.asarray(m, dtype=np.int64) for m in state["matchings"]]
