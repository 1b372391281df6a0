"""The parameter layout of the LRU, S5 and S4D layers, shared by the torch and JAX adapters.

Which parameters of a layer hold a state axis (used to slice or resize states), and the
parameter values that realise a (reduced) diagonal system, in the layout of
:class:`compressm_torch.LRU`, :class:`compressm_torch.S5` and :class:`compressm_torch.S4D`
(and of their Flax NNX twins): complex matrices are stored as real and imaginary parts. The
maps are those of :mod:`compressm_core.parameterizations`; these functions run in the array
namespace of their arguments.
"""

from __future__ import annotations

from . import _xp
from ._typing import Array, Namespace
from .parameterizations import inverse_zoh, lru_from_poles, s4d_from_discrete

__all__ = [
    "LRU_STATE_AXES",
    "S4D_STATE_AXES",
    "S5_STATE_AXES",
    "lru_parameters",
    "s4d_parameters",
    "s5_parameters",
]

#: The LRU parameters with a state axis, and that axis, in the order of the layer's system.
LRU_STATE_AXES = {
    "nu_log": 0,
    "theta_log": 0,
    "gamma_log": 0,
    "B_re": 0,
    "B_im": 0,
    "C_re": 1,
    "C_im": 1,
}
#: The S5 parameters with a state axis, and that axis.
S5_STATE_AXES = {"Lambda_re": 0, "Lambda_im": 0, "B": 0, "C": 1, "log_step": 0}
#: The S4D parameters with a state (mode) axis, and that axis.
S4D_STATE_AXES = {"log_A_real": 1, "A_imag": 1, "C": 1}


def _parts(x: Array, xp: Namespace) -> Array:
    """``x`` complex as its real and imaginary parts along a new last axis."""
    return xp.stack([xp.real(x), xp.imag(x)], axis=-1)


def lru_parameters(
    poles: Array, b: Array, c: Array, *, xp: Namespace | None = None
) -> dict[str, Array]:
    """LRU parameters that realise the system ``(poles, b, c)``; ``D`` is not among them.

    ``gamma = sqrt(1 - |lambda|^2)`` is re-drawn from the poles as at initialisation
    (:func:`~compressm_core.parameterizations.lru_from_poles`), and ``B`` is ``b`` divided by
    ``e^gamma``, so ``diag(e^gamma) B`` is the system's input matrix.

    Parameters
    ----------
    poles : array
        ``(N,)``, complex.
    b, c : array
        Input ``(N, H)`` and output ``(H, N)`` matrices, complex.
    xp : namespace, optional
        The array namespace (default: that of the arrays).

    Returns
    -------
    dict
        ``nu_log``, ``theta_log``, ``gamma_log``, ``B_re``, ``B_im``, ``C_re``, ``C_im``.

    Raises
    ------
    StabilityError
        A pole outside ``0 < |lambda| < 1`` (its ``nu_log`` would be non-finite).

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core.layer_parameters import lru_parameters
    >>> params = lru_parameters(np.array([0.5j]), np.ones((1, 2)), np.ones((2, 1)) + 0j)
    >>> sorted(params)
    ['B_im', 'B_re', 'C_im', 'C_re', 'gamma_log', 'nu_log', 'theta_log']
    """
    xp = _xp.namespace(poles, b, c, xp=xp)
    nu_log, theta_log, gamma_log = lru_from_poles(poles, what="LRU", xp=xp)
    b = b / xp.exp(gamma_log)[:, None]
    return {
        "nu_log": nu_log,
        "theta_log": theta_log,
        "gamma_log": gamma_log,
        "B_re": xp.real(b),
        "B_im": xp.imag(b),
        "C_re": xp.real(c),
        "C_im": xp.imag(c),
    }


def s5_parameters(
    poles: Array,
    b_bar: Array,
    c: Array,
    log_step: Array,
    *,
    clip_eigs: bool,
    output_scale: float,
    xp: Namespace | None = None,
) -> dict[str, Array]:
    """S5 parameters that realise the discrete system ``(poles, b_bar, c)``, inverting ZOH.

    Every new mode gets the mean of the old ``log_step`` (any step reproduces the same discrete
    system; the geometric mean of the steps keeps the scale of their learning dynamics), then
    :math:`\\Lambda = \\log(\\lambda) / \\Delta` and
    :math:`\\tilde B = \\Lambda / (\\lambda - 1) \\bar B`
    (:func:`~compressm_core.parameterizations.inverse_zoh`); ``C`` is ``c / output_scale``.

    Parameters
    ----------
    poles : array
        ``(P,)``, complex.
    b_bar, c : array
        Input ``(P, H)`` and output ``(H, P)`` matrices of the output ``Re(c x)``, complex.
    log_step : array
        The layer's current steps (any length), real.
    clip_eigs : bool
        Whether the layer clips ``Re(Lambda)`` to at most ``-1e-4``.
    output_scale : float
        The layer's output factor (``2`` with ``conj_sym``).
    xp : namespace, optional
        The array namespace (default: that of the arrays).

    Returns
    -------
    dict
        ``Lambda_re``, ``Lambda_im``, ``B`` (P, H, 2), ``C`` (H, P, 2), ``log_step`` (P,).

    Raises
    ------
    StabilityError
        A pole outside ``0 < |lambda| < 1``, or ``Re(Lambda) > -1e-4`` with ``clip_eigs``.

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core.layer_parameters import s5_parameters
    >>> params = s5_parameters(
    ...     np.array([0.5 + 0j]), np.ones((1, 2)) + 0j, np.ones((2, 1)) + 0j, np.log([0.1, 0.4]),
    ...     clip_eigs=False, output_scale=2.0,
    ... )
    >>> params["B"].shape, params["C"].shape, np.exp(params["log_step"])
    ((1, 2, 2), (2, 1, 2), array([0.2]))
    """
    xp = _xp.namespace(poles, b_bar, c, log_step, xp=xp)
    mean_log_step = xp.mean(log_step)
    lam, b = inverse_zoh(
        poles, b_bar, xp.exp(mean_log_step), clip_eigs=clip_eigs, what="S5 layer", xp=xp
    )
    c = c / output_scale
    return {
        "Lambda_re": xp.real(lam),
        "Lambda_im": xp.imag(lam),
        "B": _parts(b, xp),
        "C": _parts(c, xp),
        "log_step": xp.zeros(poles.shape[:1], dtype=mean_log_step.dtype) + mean_log_step,
    }


def s4d_parameters(
    poles: Array, b_bar: Array, c_out: Array, log_dt: Array, *, xp: Namespace | None = None
) -> dict[str, Array]:
    """S4D parameters that realise ``H`` SISO systems, keeping each channel's ``log_dt``.

    The systems are a batch as the adapters read an S4D layer: ``poles`` (H, r), ``b_bar``
    (H, r, 1), ``c_out`` (H, 1, r) of the output ``Re(c_out x)``
    (:func:`~compressm_core.parameterizations.s4d_from_discrete`: the fixed ``B = 1`` is
    absorbed into ``C``).

    Parameters
    ----------
    poles, b_bar, c_out : array
        The batch of systems, complex.
    log_dt : array
        ``(H,)``: the steps to keep.
    xp : namespace, optional
        The array namespace (default: that of the arrays).

    Returns
    -------
    dict
        ``log_A_real``, ``A_imag`` (H, r) and ``C`` (H, r, 2).

    Raises
    ------
    StabilityError
        A pole outside ``0 < |lambda| < 1``.

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core.layer_parameters import s4d_parameters
    >>> params = s4d_parameters(
    ...     np.array([[0.5 + 0j]]), np.ones((1, 1, 1)) + 0j, np.ones((1, 1, 1)) + 0j, np.log([0.1])
    ... )
    >>> params["C"].shape
    (1, 1, 2)
    """
    xp = _xp.namespace(poles, b_bar, c_out, log_dt, xp=xp)
    log_a_real, a_imag, c = s4d_from_discrete(
        poles, b_bar[..., 0], c_out[..., 0, :], log_dt, what="S4D layer", xp=xp
    )
    return {"log_A_real": log_a_real, "A_imag": a_imag, "C": _parts(c, xp)}
