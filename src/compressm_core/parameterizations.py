"""Parameterisations of diagonal layers: the LRU and the S5 / S4D zero-order hold, both ways.

The LRU and S5 layers of :mod:`compressm_torch` and :mod:`compressm_jax` are parameterised by
these maps: the forward maps give the discrete system a layer runs, the inverse maps the
parameters that realise a (reduced) diagonal system, which the adapters write back. Written once
against the Array API: every function runs on NumPy, PyTorch, JAX and array-api-strict arrays,
and takes a trailing keyword ``xp`` that overrides the array namespace.

Conventions (element-wise over the states, poles ``λ``, complex):

* LRU (Orvieto et al., 2023): :math:`\\lambda = \\exp(-e^{\\nu_{\\log}} + i e^{\\theta_{\\log}})`
  and the input scale :math:`\\gamma = e^{\\gamma_{\\log}}`, so the input matrix is
  :math:`\\operatorname{diag}(\\gamma) B`. The inverse draws the normalisation
  :math:`\\gamma = \\sqrt{1 - |\\lambda|^2}` from the poles, as the LRU initialisation does, and
  the phase :math:`e^{\\theta_{\\log}} = \\arg\\lambda` in :math:`(0, 2\\pi]`.
* Zero-order hold with step :math:`\\Delta > 0` of a continuous diagonal system ``(a, B)``:
  :math:`\\lambda = e^{\\Delta a}` and :math:`\\bar B = \\frac{\\lambda - 1}{a} B` (row ``j`` of
  ``B`` scaled by the ``j``-th factor). The inverse takes the principal logarithm,
  :math:`a = \\log(\\lambda) / \\Delta` and :math:`B = \\frac{a}{\\lambda - 1} \\bar B`.

* S4D (Gu et al., 2022, state-spaces' minimal ``s4d.py``): per channel ``h`` a continuous
  diagonal system with :math:`a = -e^{\\text{log\\_A\\_real}} + i\\,\\text{A\\_imag}`, input
  matrix ``B = 1`` (fixed), step :math:`\\Delta_h = e^{\\text{log\\_dt}_h}`, zero-order hold and
  output :math:`2 \\operatorname{Re}(C x)`: the ``N/2`` stored modes stand for ``N`` real states
  (their conjugates).

The inverse maps need ``0 < |λ| < 1`` (:func:`check_poles`) and run eagerly (they inspect the
values); the forward maps are traceable (``jax.jit``).
"""

from __future__ import annotations

import math

from . import _xp
from ._typing import Array, DType, Namespace
from .errors import StabilityError

__all__ = [
    "check_poles",
    "hippo_n_eigenpairs",
    "inverse_zoh",
    "lru_from_poles",
    "lru_to_poles",
    "pole_phase",
    "s4d_discrete",
    "s4d_from_discrete",
    "zoh",
]

# S5's ``clip_eigs`` clips ``Re(a)`` to at most this value in the forward pass.
_S5_CLIP_REAL = -1e-4


def _complex_dtype(dtype: DType, xp: Namespace) -> DType:
    """The complex dtype of the precision of ``dtype`` (complex dtypes are kept; half precision
    becomes complex64, integers the highest complex precision available)."""
    if dtype in (xp.float64, xp.complex128):
        return xp.complex128
    if xp.isdtype(dtype, ("real floating", "complex floating")):
        return xp.complex64
    return _xp.working_dtype(xp, None, complex_=True)


def _to_complex(x: Array, xp: Namespace) -> Array:
    return x if _xp.is_complex(x, xp) else xp.astype(x, _complex_dtype(x.dtype, xp))


def _complex(re: Array, im: Array, xp: Namespace) -> Array:
    """``re + i im`` for real ``re`` and ``im`` of one dtype, exactly (no rounding)."""
    cplx = _complex_dtype(re.dtype, xp)
    return xp.astype(re, cplx) + 1j * xp.astype(im, cplx)


def _numpy_namespace() -> Namespace:
    import array_api_compat.numpy as np_xp

    return np_xp


def lru_to_poles(
    nu_log: Array, theta_log: Array, gamma_log: Array, *, xp: Namespace | None = None
) -> tuple[Array, Array]:
    """The LRU's poles and input scale from its log-parameters.

    .. math::

        \\lambda = \\exp\\big(-e^{\\nu_{\\log}} + i\\, e^{\\theta_{\\log}}\\big), \\qquad
        \\gamma = e^{\\gamma_{\\log}},

    so ``|λ| = exp(-exp(nu_log))`` lies in ``(0, 1)`` for every finite ``nu_log`` and
    ``arg λ = exp(theta_log)``. The layer's input matrix is ``diag(γ) B``.

    Parameters
    ----------
    nu_log, theta_log, gamma_log : array
        Real floating arrays of one shape ``(..., N)``.
    xp : namespace, optional
        The array namespace (default: that of the arrays).

    Returns
    -------
    poles : array
        ``λ``, complex of the inputs' precision (complex64 for float32).
    gamma : array
        ``γ``, real, of the inputs' dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core.parameterizations import lru_to_poles
    >>> poles, gamma = lru_to_poles(
    ...     np.log([np.log(2.0)]), np.log([np.pi / 2]), np.log([0.5])
    ... )
    >>> np.round(poles, 12), gamma
    (array([0.+0.5j]), array([0.5]))
    """
    xp = _xp.namespace(nu_log, theta_log, gamma_log, xp=xp)
    radius, angle = xp.exp(-xp.exp(nu_log)), xp.exp(theta_log)
    poles = _complex(radius * xp.cos(angle), radius * xp.sin(angle), xp)
    return poles, xp.exp(gamma_log)


def lru_from_poles(
    poles: Array, *, what: str = "LRU", xp: Namespace | None = None
) -> tuple[Array, Array, Array]:
    """The LRU log-parameters of ``poles``: the inverse of :func:`lru_to_poles`.

    .. math::

        \\nu_{\\log} = \\log(-\\log|\\lambda|), \\qquad
        \\theta_{\\log} = \\log \\arg\\lambda, \\qquad
        \\gamma_{\\log} = \\log\\sqrt{1 - |\\lambda|^2},

    with ``arg λ`` in ``(0, 2π]`` (:func:`pole_phase`: a real positive pole gets ``2π``, so
    ``theta_log`` stays finite). ``γ`` is the LRU's normalisation drawn from the new poles, as at
    initialisation, so a system ``(λ, b, C)`` is realised by ``B = b / exp(gamma_log)``.
    ``1 - |λ|^2`` is evaluated as ``-expm1(2 log|λ|)``, accurate for ``|λ|`` near 1.

    Parameters
    ----------
    poles : array
        ``(..., N)``, complex (a real array is read as complex).
    what : str, optional
        The name of the system in error messages.
    xp : namespace, optional
        The array namespace (default: that of ``poles``).

    Returns
    -------
    nu_log : array
        ``log(-log|λ|)``, real, of ``poles``' shape and precision (as the two below).
    theta_log : array
        ``log arg λ``.
    gamma_log : array
        ``log sqrt(1 - |λ|^2)``.

    Raises
    ------
    StabilityError
        A pole outside ``0 < |λ| < 1`` or non-finite (:func:`check_poles`).

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core.parameterizations import lru_from_poles, lru_to_poles
    >>> poles = np.array([0.5j, -0.9, 0.3])
    >>> nu_log, theta_log, gamma_log = lru_from_poles(poles)
    >>> np.exp(theta_log) / np.pi  # arg in (0, 2 pi]
    array([0.5, 1. , 2. ])
    >>> np.allclose(lru_to_poles(nu_log, theta_log, gamma_log)[0], poles, rtol=0, atol=1e-15)
    True
    >>> np.exp(2 * gamma_log) + np.abs(poles) ** 2
    array([1., 1., 1.])
    """
    xp = _xp.namespace(poles, xp=xp)
    poles = _to_complex(poles, xp)
    log_radius = xp.log(check_poles(poles, what, xp=xp))
    gamma = xp.sqrt(-xp.expm1(2 * log_radius))
    return xp.log(-log_radius), xp.log(pole_phase(poles, xp=xp)), xp.log(gamma)


def zoh(
    a: Array, b: Array, step: Array | float, *, xp: Namespace | None = None
) -> tuple[Array, Array]:
    """Zero-order hold of the diagonal system ``x' = a ⊙ x + B u`` with step ``Δ``.

    .. math::

        \\lambda = e^{\\Delta a}, \\qquad \\bar B = \\frac{\\lambda - 1}{a} \\odot B,

    the ``j``-th row of ``B`` scaled by ``(λ_j - 1) / a_j`` (S5, S4D). The discrete system
    ``x_k = λ ⊙ x_{k-1} + B̄ u_k`` equals the continuous one sampled every ``Δ`` with the input
    held constant in between. Needs ``a != 0``.

    Parameters
    ----------
    a : array
        ``(..., N)``, the continuous poles (complex; a real array is read as complex).
    b : array
        ``(..., N, H)``, the continuous input matrix.
    step : array or float
        ``Δ``, positive: a scalar or one step per state ``(..., N)``.
    xp : namespace, optional
        The array namespace (default: that of ``a`` and ``b``).

    Returns
    -------
    poles : array
        ``λ`` ``(..., N)``.
    b_bar : array
        ``B̄`` ``(..., N, H)``.

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core.parameterizations import zoh
    >>> poles, b_bar = zoh(np.array([-np.log(2.0) + 0j]), np.array([[1.0, 2.0]]), 1.0)
    >>> np.round(poles, 12), np.round(b_bar, 12)  # (1/2 - 1) / (-log 2) = 0.7213...
    (array([0.5+0.j]), array([[0.72134752+0.j, 1.44269504+0.j]]))
    """
    xp = _xp.namespace(a, b, xp=xp)
    a = _to_complex(a, xp)
    poles = xp.exp(a * step)
    return poles, ((poles - 1) / a)[..., None] * b


def inverse_zoh(
    poles: Array,
    b_bar: Array,
    step: Array | float,
    *,
    clip_eigs: bool = False,
    what: str = "S5 layer",
    xp: Namespace | None = None,
) -> tuple[Array, Array]:
    """The continuous system whose zero-order hold with step ``Δ`` is ``(poles, b_bar)``.

    The inverse of :func:`zoh`, with the principal logarithm:

    .. math::

        a = \\frac{\\log \\lambda}{\\Delta}, \\qquad B = \\frac{a}{\\lambda - 1} \\odot \\bar B.

    Any ``Δ > 0`` reproduces the same discrete system (with another ``a``); the S5 adapters pass
    the geometric mean of the layer's old steps.

    Parameters
    ----------
    poles : array
        ``λ`` ``(..., N)``, complex (a real array is read as complex).
    b_bar : array
        ``B̄`` ``(..., N, H)``.
    step : array or float
        ``Δ``, positive: a scalar or one step per state ``(..., N)``.
    clip_eigs : bool, optional
        Raise when ``Re(a) > -1e-4`` (for S5 layers with ``clip_eigs``, whose forward pass
        would clip such poles and so change the system).
    what : str, optional
        The name of the system in error messages.
    xp : namespace, optional
        The array namespace (default: that of ``poles`` and ``b_bar``).

    Returns
    -------
    a : array
        ``(..., N)``, complex, with ``Im(a Δ)`` in ``(-π, π]``.
    b : array
        ``(..., N, H)``.

    Raises
    ------
    StabilityError
        A pole outside ``0 < |λ| < 1`` or non-finite (:func:`check_poles`), or ``Re(a) > -1e-4``
        with ``clip_eigs``.

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core.parameterizations import inverse_zoh, zoh
    >>> a, b = np.array([-0.5 + 2j, -3.0 + 0j]), np.array([[1.0], [2j]])
    >>> a2, b2 = inverse_zoh(*zoh(a, b, 0.1), 0.1)
    >>> np.allclose(a2, a), np.allclose(b2, b)
    (True, True)
    """
    xp = _xp.namespace(poles, b_bar, xp=xp)
    poles = _to_complex(poles, xp)
    check_poles(poles, what, xp=xp)
    a = xp.log(poles) / step
    if clip_eigs and bool(xp.any(xp.real(a) > _S5_CLIP_REAL)):
        msg = f"The reduced {what} has Re(Lambda) > -1e-4, which `clip_eigs` would change."
        raise StabilityError(msg)
    return a, b_bar * (a / (poles - 1))[..., None]


def s4d_discrete(
    log_dt: Array,
    log_a_real: Array,
    a_imag: Array,
    c: Array,
    *,
    xp: Namespace | None = None,
) -> tuple[Array, Array, Array]:
    """The discrete SISO systems of an S4D layer, one per channel.

    .. math::

        a_{hn} = -e^{\\text{log\\_A\\_real}_{hn}} + i\\, \\text{A\\_imag}_{hn}, \\quad
        \\Delta_h = e^{\\text{log\\_dt}_h}, \\quad
        \\lambda_{hn} = e^{\\Delta_h a_{hn}}, \\quad
        \\bar b_{hn} = \\frac{\\lambda_{hn} - 1}{a_{hn}} \\cdot 1, \\quad
        c^{out}_{hn} = 2 C_{hn},

    so channel ``h`` runs :math:`x_k = \\lambda_h \\odot x_{k-1} + \\bar b_h u_k` and
    :math:`y_k = \\operatorname{Re}(c^{out}_h \\cdot x_k) = 2 \\operatorname{Re}(C_h \\cdot x_k)`
    (plus the feedthrough). ``B = 1`` is not a parameter (state-spaces' minimal ``S4D``); its
    role is played by ``C``.

    Parameters
    ----------
    log_dt : array
        ``(..., H)``, real.
    log_a_real, a_imag : array
        ``(..., H, M)``, real (``M = N/2`` stored modes).
    c : array
        ``(..., H, M)``, complex.
    xp : namespace, optional
        The array namespace (default: that of the arrays).

    Returns
    -------
    poles : array
        ``λ`` ``(..., H, M)``, complex of the inputs' precision.
    b_bar : array
        ``(λ - 1) / a`` ``(..., H, M)``.
    c_out : array
        ``2 C`` ``(..., H, M)``: the output matrix of the real-part output ``Re(c_out x)``.

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core.parameterizations import s4d_discrete
    >>> poles, b_bar, c_out = s4d_discrete(
    ...     np.zeros(1), np.log([[np.log(2.0)]]), np.zeros((1, 1)), np.ones((1, 1)) + 0j
    ... )
    >>> np.round(poles, 12), np.round(b_bar, 6), c_out
    (array([[0.5+0.j]]), array([[0.721348+0.j]]), array([[2.+0.j]]))
    """
    xp = _xp.namespace(log_dt, log_a_real, a_imag, c, xp=xp)
    a = _complex(-xp.exp(log_a_real), a_imag, xp)
    step = xp.astype(xp.exp(log_dt), a.dtype)[..., None]
    poles, b_bar = zoh(a, xp.ones_like(a)[..., None], step, xp=xp)
    return poles, b_bar[..., 0], 2 * _to_complex(c, xp)


def s4d_from_discrete(
    poles: Array,
    b_bar: Array,
    c_out: Array,
    log_dt: Array,
    *,
    what: str = "S4D layer",
    xp: Namespace | None = None,
) -> tuple[Array, Array, Array]:
    """S4D parameters that realise discrete SISO systems, keeping each channel's step.

    The inverse of :func:`s4d_discrete` for given steps :math:`\\Delta_h = e^{\\text{log\\_dt}_h}`
    (any ``Δ > 0`` realises the same discrete system; the layer's own steps are kept):
    :func:`inverse_zoh` gives :math:`a = \\log(\\lambda) / \\Delta_h` (principal branch, so
    ``Im(a Δ)`` is in ``(-π, π]``) and the continuous input :math:`b = a \\bar b / (\\lambda - 1)`,
    which the fixed ``B = 1`` cannot hold, so it moves into ``C``:

    .. math::

        \\text{log\\_A\\_real} = \\log(-\\operatorname{Re} a), \\quad
        \\text{A\\_imag} = \\operatorname{Im} a, \\quad
        C = \\tfrac12\\, c^{out} \\odot b,

    the factor ``1/2`` undoing the layer's output ``2 Re(C x)``. ``Re a < 0`` follows from
    ``|λ| < 1``. A real pole (``Im a = 0``) is kept as a mode of its own; with a real residue its
    ``2 Re`` output is the real system's.

    Parameters
    ----------
    poles, b_bar, c_out : array
        ``(..., H, M)``, complex: poles, input entries and output entries of the real-part
        output ``Re(c_out x)`` of ``H`` SISO systems with ``M`` states each.
    log_dt : array
        ``(..., H)``, real: the steps to keep.
    what : str, optional
        The name of the system in error messages.
    xp : namespace, optional
        The array namespace (default: that of the arrays).

    Returns
    -------
    log_a_real, a_imag : array
        ``(..., H, M)``, real, of the poles' precision.
    c : array
        ``(..., H, M)``, complex.

    Raises
    ------
    StabilityError
        A pole outside ``0 < |λ| < 1`` or non-finite (:func:`check_poles`).

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core.parameterizations import s4d_discrete, s4d_from_discrete
    >>> log_dt, log_a_real = np.log([0.1]), np.log([[0.5, 2.0]])
    >>> a_imag, c = np.array([[3.0, -1.0]]), np.array([[1 + 2j, -0.5j]])
    >>> back = s4d_from_discrete(*s4d_discrete(log_dt, log_a_real, a_imag, c), log_dt)
    >>> [bool(np.allclose(x, y)) for x, y in zip(back, (log_a_real, a_imag, c))]
    [True, True, True]
    """
    xp = _xp.namespace(poles, b_bar, c_out, log_dt, xp=xp)
    poles = _to_complex(poles, xp)
    step = xp.astype(xp.exp(log_dt), poles.dtype)[..., None]
    a, b = inverse_zoh(poles, _to_complex(b_bar, xp)[..., None], step, what=what, xp=xp)
    c = _to_complex(c_out, xp) * b[..., 0] / 2
    return xp.log(-xp.real(a)), xp.imag(a), c


def check_poles(poles: Array, what: str = "system", *, xp: Namespace | None = None) -> Array:
    """``|λ|``, after checking that every pole is finite and ``0 < |λ| < 1``.

    The inverse maps need it: ``log|λ|`` must be negative for ``nu_log = log(-log|λ|)`` and for a
    stable continuous ``a = log(λ) / Δ``, and ``λ = 0`` has no logarithm. Eager only.

    Parameters
    ----------
    poles : array
        ``(..., N)``, real or complex.
    what : str, optional
        The name of the system in error messages ("The reduced {what} has ...").
    xp : namespace, optional
        The array namespace (default: that of ``poles``).

    Returns
    -------
    array
        ``|λ|``, real.

    Raises
    ------
    StabilityError
        A non-finite pole, or one with ``|λ| >= 1`` or ``λ = 0`` (the message gives the largest
        and smallest modulus).

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core.parameterizations import check_poles
    >>> check_poles(np.array([0.5j, -0.25]))
    array([0.5 , 0.25])
    >>> check_poles(np.array([0.5, 1.0]), "LRU")
    Traceback (most recent call last):
    ...
    compressm_core.errors.StabilityError: The reduced LRU has poles outside 0 < |lambda| < 1 \
(max |lambda| = 1, min 0.5); its parameters would be non-finite.
    """
    xp = _xp.namespace(poles, xp=xp)
    radius = xp.abs(poles)
    if not bool(xp.all(xp.isfinite(radius))):
        msg = f"The reduced {what} has non-finite poles."
        raise StabilityError(msg)
    if bool(xp.any((radius >= 1) | (radius <= 0))):
        msg = (
            f"The reduced {what} has poles outside 0 < |lambda| < 1 (max |lambda| = "
            f"{float(xp.max(radius)):.6g}, min {float(xp.min(radius)):.3g}); its parameters "
            "would be non-finite."
        )
        raise StabilityError(msg)
    return radius


def pole_phase(poles: Array, *, xp: Namespace | None = None) -> Array:
    """``arg λ`` in ``(0, 2π]``: a real positive pole gets ``2π``, so ``log(arg λ)`` is finite.

    ``arg λ = atan2(Im λ, Re λ) mod 2π``, mapped from ``[0, 2π)`` to ``(0, 2π]`` by sending
    ``0`` to ``2π`` (``λ`` and ``λ e^{2πi}`` are the same pole).

    Parameters
    ----------
    poles : array
        ``(..., N)``, complex (a real array is read as complex).
    xp : namespace, optional
        The array namespace (default: that of ``poles``).

    Returns
    -------
    array
        Real, of ``poles``' shape and precision.

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core.parameterizations import pole_phase
    >>> pole_phase(np.array([1j, -1j, -1.0, 0.5])) / np.pi
    array([0.5, 1.5, 1. , 2. ])
    """
    xp = _xp.namespace(poles, xp=xp)
    poles = _to_complex(poles, xp)
    phase = xp.remainder(xp.atan2(xp.imag(poles), xp.real(poles)), 2 * math.pi)
    return xp.where(phase > 0, phase, xp.full_like(phase, 2 * math.pi))


def hippo_n_eigenpairs(size: int, *, xp: Namespace | None = None) -> tuple[Array, Array]:
    """Eigenvalues and eigenvectors of the normal part of the HiPPO-LegS matrix.

    HiPPO-LegS is :math:`A_{nk} = -\\sqrt{(2n+1)(2k+1)}` for ``n > k``, ``-(n+1)`` on the
    diagonal; adding :math:`p p^T` with :math:`p_n = \\sqrt{n + 1/2}` leaves
    :math:`S = -\\tfrac12 I + \\text{skew}`, whose eigenvalues are :math:`-\\tfrac12 + i\\omega`.

    Parameters
    ----------
    size : int
        The order of the matrix.
    xp : namespace, optional
        The array namespace of the results (default: NumPy). Computed in float64 / complex128
        where the namespace has it.

    Returns
    -------
    lam : array
        ``Lambda`` ``(size,)``, complex, imaginary parts ascending.
    v : array
        Unitary ``V`` ``(size, size)``, complex, with ``S = V diag(Lambda) V^H``.

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core.parameterizations import hippo_n_eigenpairs
    >>> lam, v = hippo_n_eigenpairs(4)
    >>> lam.real
    array([-0.5, -0.5, -0.5, -0.5])
    >>> np.allclose(v.conj().T @ v, np.eye(4))
    True
    """
    if xp is None:
        xp = _numpy_namespace()
    real = _xp.working_dtype(xp, None, complex_=False)
    cplx = _complex_dtype(real, xp)
    n = xp.arange(size, dtype=real)
    q = xp.sqrt(1.0 + 2.0 * n)
    rows, cols = n[:, None], n[None, :]
    zero = xp.zeros((size, size), dtype=real)
    lower = xp.where(rows >= cols, q[:, None] * q[None, :], zero)
    hippo = -(lower - xp.where(rows == cols, rows, zero))
    p = xp.sqrt(n + 0.5)
    normal = hippo + p[:, None] * p[None, :]
    real_part = xp.mean(xp.linalg.diagonal(normal))
    imag, v = xp.linalg.eigh(xp.astype(normal, cplx) * -1j)
    return xp.astype(imag, cplx) * 1j + real_part, v
