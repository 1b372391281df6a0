"""Hankel singular values by the square-root method."""

from __future__ import annotations

from . import _xp
from ._typing import Array, Namespace
from .gramians import prepared_gramians, psd_factor
from .systems import DiagonalStateSpace, StateSpace

__all__ = ["hankel_singular_values"]


def hankel_singular_values(
    sys: StateSpace | DiagonalStateSpace,
    *,
    horizon: int | None = None,
    real_output: bool = False,
    xp: Namespace | None = None,
) -> Array:
    """Hankel singular values :math:`\\sigma_1 \\ge \\dots \\ge \\sigma_n \\ge 0` of a system.

    .. math::

        \\sigma_i = \\sqrt{\\lambda_i(P Q)} = s_i(L_o^H L_c),
        \\qquad P = L_c L_c^H,\\ Q = L_o L_o^H,

    computed by the square-root method: the singular values of the product of the Gramian
    factors (:func:`gramian_factors`), never ``sqrt(eig(P Q))``, so they are real,
    non-negative, sorted and free of NaN, and invariant under any change of state coordinates.

    Parameters
    ----------
    sys : StateSpace or DiagonalStateSpace
        Stable system, batched over leading dimensions.
    horizon : int, optional
        Use the time-limited Gramians over ``L`` steps (what a sequence model of length ``L``
        sees); ``None`` (default) for the infinite horizon of the paper.
    real_output : bool, optional
        HSVs of the real ``2n``-state system of a complex layer with output ``Re(C x)`` (the
        LRU) instead of those of the complex system ``(A, B, C)``.
    xp : array_namespace, optional
        Namespace override.

    Returns
    -------
    (..., n) real array
        The HSVs in descending order (``2n`` of them with ``real_output``), in the real dtype of
        the system's precision.

    Raises
    ------
    ShapeError, StabilityError, ConditioningError
        On malformed, non-finite or unstable systems.

    Notes
    -----
    Cost for a diagonal system: ``O(n^2 (m + p))`` for the Gramians in closed form, two
    Hermitian eigendecompositions and one SVD of size ``n``. Elementwise and standard linear
    algebra only, so it runs batched on any backend and device and under ``jax.jit``.

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core import DiagonalStateSpace, hankel_singular_values
    >>> sys = DiagonalStateSpace(np.array([0.5]), np.array([[1.0]]), np.array([[1.0]]))
    >>> hsv = hankel_singular_values(sys)   # |c b| / (1 - |l|^2) for one state
    >>> bool(np.allclose(hsv, [1 / 0.75]))
    True
    """
    p, q, _, _, xp, result = prepared_gramians(
        sys, horizon=horizon, real_output=real_output, xp=xp
    )
    lc, lo = psd_factor(p, xp), psd_factor(q, xp)
    hsv = xp.linalg.svdvals(_xp.conj_transpose(lo, xp) @ lc)
    return xp.astype(hsv, _xp.real_dtype_of(result, xp))
