"""The one place that touches array-api-compat details.

Namespace and device resolution, working precision, complex helpers, tracing detection and the
explicit host (NumPy) round trip used by the fallback tiers of :mod:`compressm_core.linalg`.
Nothing here imports a framework: questions about torch or JAX are asked through
``array_api_compat.is_*`` predicates, and a framework module is only touched when one of its
arrays is already in hand (so it is already in ``sys.modules``).
"""

from __future__ import annotations

import sys
from typing import Any

import array_api_compat as compat
import numpy as np

from ._typing import Array, Device, DType, Namespace
from .errors import BackendCapabilityError, BackendMismatchError

__all__ = [
    "conj",
    "conj_transpose",
    "cumulative_logsumexp",
    "device_of",
    "finite_max",
    "from_host",
    "hermitian_part",
    "is_complex",
    "is_cpu",
    "is_traced",
    "namespace",
    "promote",
    "real_dtype_of",
    "to_host",
    "working_dtype",
]


def namespace(*arrays: Array | None, xp: Namespace | None = None) -> Namespace:
    """Return the common Array API namespace of ``arrays`` (``None`` entries are ignored).

    Raises
    ------
    BackendMismatchError
        If the arrays come from different libraries or live on different devices.
    """
    present = [a for a in arrays if a is not None]
    if xp is None:
        try:
            xp = compat.array_namespace(*present)
        except TypeError as exc:
            kinds = sorted({type(a).__module__ + "." + type(a).__name__ for a in present})
            msg = f"Expected arrays from one array library; received a mix of {kinds}."
            raise BackendMismatchError(msg) from exc
    devices: list[object] = []
    for a in present:
        d = compat.device(a)
        if all(d != other for other in devices):
            devices.append(d)
    if len(devices) > 1:
        msg = f"Expected all arrays on one device; received arrays on {devices}."
        raise BackendMismatchError(msg)
    return xp


def device_of(x: Array) -> Device:
    """The device of ``x``."""
    return compat.device(x)


def is_traced(x: Array) -> bool:
    """Whether ``x`` is an abstract value being traced (``jax.jit``), whose values are unknown."""
    if compat.is_jax_array(x):
        jax = sys.modules["jax"]
        return isinstance(x, jax.core.Tracer)
    return False


def is_complex(x: Array, xp: Namespace) -> bool:
    """Whether ``x`` has a complex floating dtype."""
    return bool(xp.isdtype(x.dtype, "complex floating"))


def conj(x: Array, xp: Namespace) -> Array:
    """Complex conjugate; the identity for real arrays (older namespaces reject real ``conj``)."""
    return xp.conj(x) if is_complex(x, xp) else x


def conj_transpose(x: Array, xp: Namespace) -> Array:
    """Conjugate transpose ``x^H`` of the last two axes (``matrix_transpose`` only transposes)."""
    return conj(xp.matrix_transpose(x), xp)


def hermitian_part(x: Array, xp: Namespace) -> Array:
    """``(x + x^H) / 2`` of the last two axes."""
    return (x + conj_transpose(x, xp)) / 2


def cumulative_logsumexp(x: Array, axis: int, xp: Namespace) -> Array:
    """Inclusive ``log(cumsum(exp(x)))`` along ``axis``, without forming ``exp(x)``.

    ``y_t = log sum_{j <= t} exp(x_j)``; entries of ``-inf`` stand for zero terms. Native
    routines where the namespace has one (``torch.logcumsumexp``, ``jax.lax.cumlogsumexp``,
    ``numpy.logaddexp.accumulate``), else ``ceil(log2 T)`` levels of Hillis-Steele doubling
    with the standard ``logaddexp``.
    """
    if compat.is_torch_namespace(xp):
        return x.logcumsumexp(axis)
    if compat.is_jax_namespace(xp):
        return sys.modules["jax"].lax.cumlogsumexp(x, axis=axis % x.ndim)
    if compat.is_numpy_namespace(xp):
        return np.logaddexp.accumulate(x, axis=axis)
    axis %= x.ndim
    steps = int(x.shape[axis])
    shift = 1
    while shift < steps:
        head = [slice(None)] * x.ndim
        tail = [slice(None)] * x.ndim
        head[axis], tail[axis] = slice(0, shift), slice(0, steps - shift)
        zero = xp.full_like(x[tuple(head)], -xp.inf)
        x = xp.logaddexp(x, xp.concat([zero, x[tuple(tail)]], axis=axis))
        shift *= 2
    return x


def _has_float64(xp: Namespace, device: Device) -> bool:
    if compat.is_jax_namespace(xp):
        jax = sys.modules["jax"]
        return bool(jax.config.read("jax_enable_x64"))
    if compat.is_torch_namespace(xp):
        return getattr(device, "type", "cpu") != "mps"
    return True


def working_dtype(xp: Namespace, device: Device, *, complex_: bool) -> DType:
    """Highest-precision float (or complex) dtype available on ``device``.

    float64/complex128 everywhere except JAX without ``jax_enable_x64`` and torch on MPS.
    """
    if _has_float64(xp, device):
        return xp.complex128 if complex_ else xp.float64
    return xp.complex64 if complex_ else xp.float32


def real_dtype_of(dtype: DType, xp: Namespace) -> DType:
    """The real dtype of the same precision as ``dtype``."""
    if dtype == xp.complex128:
        return xp.float64
    if dtype == xp.complex64:
        return xp.float32
    return dtype


def promote(*arrays: Array | None, xp: Namespace) -> tuple[list[Array | None], DType, DType]:
    """Cast arrays to one working dtype.

    Returns
    -------
    arrays : list
        The arrays cast to the working dtype (``None`` entries are kept).
    work : dtype
        float64 or complex128 (the highest precision the device has), complex when any input is.
    result : dtype
        The dtype outputs are cast back to: the promoted input dtype (integers become the
        working real dtype), at least float32 or complex64. Half precision (float16, bfloat16,
        complex32) is widened: Gramians and HSVs grow like ``1 / (1 - |pole|^2)`` and overflow
        float16 (largest value 65504) for poles of layers near the unit circle.
    """
    present = [a for a in arrays if a is not None]
    dev = compat.device(present[0])
    any_complex = any(xp.isdtype(a.dtype, "complex floating") for a in present)
    work = working_dtype(xp, dev, complex_=any_complex)
    floating = [
        a.dtype for a in present if xp.isdtype(a.dtype, ("real floating", "complex floating"))
    ]
    result = xp.result_type(*floating) if floating else work
    if any_complex and not xp.isdtype(result, "complex floating"):
        result = work
    if xp.finfo(result).bits < 32:  # float16, bfloat16, complex32 (finfo: the real part)
        result = xp.complex64 if xp.isdtype(result, "complex floating") else xp.float32
    out = [None if a is None else xp.astype(a, work) for a in arrays]
    return out, work, result


def finite_max(x: Array, xp: Namespace) -> float:
    """``max(|x|)`` as a Python float (eager only); ``0.0`` for empty arrays."""
    if compat.size(x) == 0:
        return 0.0
    if compat.is_torch_array(x):
        x = x.detach()
    return float(xp.max(xp.abs(x)))


def is_cpu(x: Array) -> bool:
    """Whether ``x`` lives in host memory, so a NumPy round trip copies nothing across devices."""
    if compat.is_numpy_array(x):
        return True
    dev = compat.device(x)
    if compat.is_torch_array(x):
        return bool(dev.type == "cpu")
    if compat.is_jax_array(x):
        return bool(getattr(dev, "platform", "cpu") == "cpu")
    if compat.is_array_api_strict_namespace(compat.array_namespace(x)):
        return str(dev) == str(type(dev)("CPU_DEVICE"))
    return False


def to_host(x: Array, *, allow_transfer: bool = False) -> np.ndarray[Any, Any]:
    """Copy ``x`` to a NumPy array.

    Parameters
    ----------
    x : array
        Any Array API array.
    allow_transfer : bool, optional
        Allow a copy from an accelerator. Without it, non-CPU arrays raise, so no device
        transfer ever happens silently.

    Raises
    ------
    BackendCapabilityError
        If ``x`` is not in host memory and ``allow_transfer`` is false.
    """
    if not (allow_transfer or is_cpu(x)):
        msg = (
            f"This operation needs a host (NumPy/SciPy) fallback, but the array is on "
            f"{compat.device(x)!r}; pass `allow_host_fallback=True` to allow the copy."
        )
        raise BackendCapabilityError(msg)
    if compat.is_numpy_array(x):
        return np.asarray(x)
    if compat.is_torch_array(x):
        return np.asarray(x.detach().resolve_conj().cpu().numpy())
    if compat.is_jax_array(x):
        return np.asarray(x)
    xp = compat.array_namespace(x)
    if compat.is_array_api_strict_namespace(xp) and not is_cpu(x):
        x = xp.asarray(x, device=type(compat.device(x))("CPU_DEVICE"), copy=True)
    return np.from_dlpack(x)


def from_host(x: np.ndarray[Any, Any], *, like: Array, xp: Namespace) -> Array:
    """Move a NumPy array back into ``like``'s namespace and device."""
    return xp.asarray(np.ascontiguousarray(x), device=compat.device(like))
