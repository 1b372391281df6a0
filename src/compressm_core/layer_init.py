"""The initial values of the LRU, S5 and S4D layers, from uniform draws, for torch and JAX.

Each framework draws its own random numbers; the maps from those draws to the initial
parameters are written once here and run in the namespace of the draws.
"""

from __future__ import annotations

import math

import numpy as np

from . import _xp
from ._typing import Array, Namespace
from .parameterizations import hippo_n_eigenpairs

__all__ = ["log_uniform_steps", "lru_ring_init", "s5_hippo_basis"]


def log_uniform_steps(u: Array, dt_min: float, dt_max: float) -> Array:
    """Logarithms of steps log-uniform on ``[dt_min, dt_max]``, from uniform draws ``u``.

    Parameters
    ----------
    u : array
        Draws uniform on ``[0, 1)``.
    dt_min, dt_max : float
        Range of the steps.

    Returns
    -------
    array
        ``log(dt_min) + u * log(dt_max / dt_min)``.

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core.layer_init import log_uniform_steps
    >>> np.exp(log_uniform_steps(np.array([0.0, 0.5]), 1e-3, 1e-1)).round(6)
    array([0.001, 0.01 ])
    """
    return math.log(dt_min) + u * math.log(dt_max / dt_min)


def lru_ring_init(
    u_radius: Array,
    u_phase: Array,
    r_min: float,
    r_max: float,
    max_phase: float,
    *,
    xp: Namespace | None = None,
) -> tuple[Array, Array, Array]:
    """``nu_log``, ``theta_log``, ``gamma_log`` of LRU poles drawn uniformly on a ring.

    As in the LRU paper: ``|lambda|^2`` uniform on ``[r_min^2, r_max^2]`` (poles uniform on
    the ring's area), phase uniform on ``[0, max_phase)`` and
    :math:`\\gamma = \\log\\sqrt{1 - |\\lambda|^2}`.

    Parameters
    ----------
    u_radius, u_phase : array
        Draws uniform on ``[0, 1)``, one per state.
    r_min, r_max : float
        The ring.
    max_phase : float
        Largest phase.
    xp : namespace, optional
        The array namespace (default: that of the draws).

    Returns
    -------
    nu_log, theta_log, gamma_log : array
        The LRU's pole and input-scale parameters.

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core.layer_init import lru_ring_init
    >>> nu_log, theta_log, gamma_log = lru_ring_init(np.array([0.5]), np.array([0.5]), 0, 0.5, 2)
    >>> np.exp(-np.exp(nu_log)).round(4), np.exp(theta_log)
    (array([0.3536]), array([1.]))
    """
    xp = _xp.namespace(u_radius, u_phase, xp=xp)
    radius_sq = u_radius * (r_max**2 - r_min**2) + r_min**2
    nu_log = xp.log(-0.5 * xp.log(radius_sq))
    return nu_log, xp.log(max_phase * u_phase), 0.5 * xp.log1p(-radius_sq)


def s5_hippo_basis(d_state: int, blocks: int, conj_sym: bool) -> tuple[np.ndarray, np.ndarray]:
    """The initial eigenvalues of an S5 layer and the eigenbasis of one HiPPO-N block.

    The state of ``d_state`` stored modes is split into ``blocks`` blocks; each holds the first
    ``d_state // blocks`` eigenpairs of HiPPO-N of order ``full`` (twice that with
    ``conj_sym``, which keeps one member of each conjugate pair).

    Parameters
    ----------
    d_state : int
        Stored complex states ``P``, a multiple of ``blocks``.
    blocks : int
        Number of blocks.
    conj_sym : bool
        Whether the layer keeps one state per conjugate pair.

    Returns
    -------
    lam : numpy.ndarray
        ``(P,)``, complex: the eigenvalues of every block, one block after the other.
    v : numpy.ndarray
        ``(full, P // blocks)``, complex: the kept eigenvectors of one block
        (:func:`~compressm_core.parameterizations.hippo_n_eigenpairs`).

    Examples
    --------
    >>> from compressm_core.layer_init import s5_hippo_basis
    >>> lam, v = s5_hippo_basis(8, 2, True)
    >>> lam.shape, v.shape
    ((8,), (8, 4))
    """
    block = d_state // blocks
    lam, v = hippo_n_eigenpairs(2 * block if conj_sym else block)
    return np.tile(lam[:block], blocks), v[:, :block]
