"""Perturbation bounds for Hankel singular values.

One gradient step moves the parameters ``(A, B, C)`` of a layer, so it moves the Gramians and
the Hankel singular values (HSVs). Weyl's theorem applied to the Hermitian operator
:math:`H = (P^{1/2} Q P^{1/2})^{1/2}`, whose eigenvalues are the HSVs, bounds how far every HSV
can move in one step (Lemma 3.1 of the CompreSSM paper). Summed over steps, the bound certifies
that no HSV crossed the cut between the ``r`` kept and the discarded states.

The numerics here (:func:`hankel_operator`, :func:`hsv_perturbation_bound`,
:func:`hsv_a_priori_bound`) are traceable Array API code, batched over leading dimensions. The
decisions built on them (:func:`ranking_certificate`, :class:`RankTracker`) run on the host, on
Python and NumPy numbers, and live in :mod:`compressm_core.certificates`; they are re-exported
here.
"""

from __future__ import annotations

from typing import cast

from . import _xp
from ._typing import Array, Namespace
from ._validation import broadcast_shapes, check_system
from .certificates import RankingCertificate, RankTracker, ranking_certificate
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
    return _xp.hermitian_part(h, xp)


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
    delta = _xp.hermitian_part(xp.astype(h1, work) - xp.astype(h0, work), xp)
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
