"""Parameters <-> discrete systems of the LRU, S5 and S4D layers, for JAX and host NumPy.

The maps themselves are :mod:`compressm_core.parameterizations`; here they are applied to the
layers' parameter layout. The forward maps run in both namespaces: the layers evaluate them in
JAX, the reduction evaluates them in NumPy float64 on the host (whatever ``jax_enable_x64``
says). The inverse maps run on the host only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressm_core import DiagonalStateSpace
from compressm_core.layer_parameters import (
    LRU_STATE_AXES,
    S4D_STATE_AXES,
    S5_STATE_AXES,
    lru_parameters,
    s4d_parameters,
    s5_parameters,
)
from compressm_core.parameterizations import (
    lru_to_poles,
    s4d_discrete,
    zoh,
)

from ._precision import complex_of, highest_dtype

__all__ = [
    "LRU_NAMES",
    "LRU_STATE_AXES",
    "S4D_NAMES",
    "S4D_STATE_AXES",
    "S5_STATE_AXES",
    "device_system",
    "evaluate",
    "host_system",
    "lru_discrete",
    "lru_from_state_space",
    "s4d_from_state_space",
    "s4d_zoh",
    "s5_continuous",
    "s5_discrete",
    "s5_from_state_space",
    "s5_zoh",
]

# LRU_STATE_AXES and S5_STATE_AXES list their parameters in the argument order of lru_discrete
# and s5_zoh.
LRU_NAMES = ("nu_log", "theta_log", "gamma_log", "B_re", "B_im", "C_re", "C_im", "D")
# The S4D parameters in the argument order of s4d_zoh.
S4D_NAMES = ("log_dt", "log_A_real", "A_imag", "C")


def _complex(re: Any, im: Any, xp: ModuleType) -> Any:
    return jax.lax.complex(re, im) if xp is jnp else re + 1j * im


def lru_discrete(
    nu_log: Any,
    theta_log: Any,
    gamma_log: Any,
    b_re: Any,
    b_im: Any,
    c_re: Any,
    c_im: Any,
    *,
    xp: ModuleType,
) -> tuple[Any, Any, Any]:
    """Poles ``exp(-e^nu + i e^theta)`` (N,), ``diag(e^gamma) B`` (N, H) and ``C`` (H, N)
    (:func:`~compressm_core.parameterizations.lru_to_poles`)."""
    poles, gamma = lru_to_poles(nu_log, theta_log, gamma_log)
    scale = gamma[:, None]
    return poles, _complex(b_re * scale, b_im * scale, xp), _complex(c_re, c_im, xp)


def s5_continuous(
    lambda_re: Any,
    lambda_im: Any,
    b: Any,
    c: Any,
    log_step: Any,
    *,
    clip_eigs: bool,
    xp: ModuleType,
) -> tuple[Any, Any, Any, Any]:
    """``Lambda`` (P,), ``B~`` (P, H), ``C~`` (H, P), complex, and the steps (P,)."""
    if clip_eigs:
        lambda_re = xp.minimum(lambda_re, -1e-4)
    return (
        _complex(lambda_re, lambda_im, xp),
        _complex(b[..., 0], b[..., 1], xp),
        _complex(c[..., 0], c[..., 1], xp),
        xp.exp(log_step),
    )


def s5_discrete(
    lam: Any, b: Any, c: Any, step: Any, *, output_scale: float, xp: ModuleType
) -> tuple[Any, Any, Any]:
    """Zero-order hold: ``exp(Lambda dt)``, ``((exp(Lambda dt) - 1) / Lambda) B~``, ``s C~``
    (:func:`~compressm_core.parameterizations.zoh`)."""
    poles, b_bar = zoh(lam, b, step)
    return poles, b_bar, output_scale * c


def s5_zoh(
    lambda_re: Any,
    lambda_im: Any,
    b: Any,
    c: Any,
    log_step: Any,
    *,
    clip_eigs: bool,
    output_scale: float,
    xp: ModuleType,
) -> tuple[Any, Any, Any]:
    """The S5 layer's discrete system from its parameters (:func:`s5_continuous`, then ZOH)."""
    lam, b_t, c_t, step = s5_continuous(
        lambda_re, lambda_im, b, c, log_step, clip_eigs=clip_eigs, xp=xp
    )
    return s5_discrete(lam, b_t, c_t, step, output_scale=output_scale, xp=xp)


def s4d_zoh(
    log_dt: Any, log_a_real: Any, a_imag: Any, c: Any, *, xp: ModuleType
) -> tuple[Any, Any, Any]:
    """Poles, inputs ``(mu - 1) / a`` and outputs ``2 C`` of the S4D layer's ``H`` SISO systems,
    each (H, N/2) complex (:func:`~compressm_core.parameterizations.s4d_discrete`)."""
    return s4d_discrete(log_dt, log_a_real, a_imag, _complex(c[..., 0], c[..., 1], xp))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def evaluate(
    fn: Callable[..., Any], options: tuple[tuple[str, Any], ...], real: Any, values: Any
) -> Any:
    """``fn(*values cast to real, **options, xp=jnp)``, compiled once per shape and options."""
    return fn(*(v.astype(real) for v in values), **dict(options), xp=jnp)


def host_system(sys: DiagonalStateSpace) -> DiagonalStateSpace:
    """``sys`` as host NumPy arrays: complex128 ``poles``, ``b``, ``c``; ``d`` float64 if real."""
    poles, b, c = (np.asarray(x, dtype=np.complex128) for x in sys[:3])
    d = None
    if sys.d is not None:
        d = np.asarray(sys.d)
        d = d.astype(np.complex128 if np.iscomplexobj(d) else np.float64)
    return DiagonalStateSpace(poles, b, c, d)


def device_system(sys: DiagonalStateSpace, like: jax.Array | None = None) -> DiagonalStateSpace:
    """A host system as JAX arrays in the highest precision (complex128 with x64), on ``like``'s
    device."""
    real = highest_dtype()

    def move(x: np.ndarray) -> jax.Array:
        out = jnp.asarray(x, dtype=complex_of(real) if np.iscomplexobj(x) else real)
        if like is not None and like.sharding.is_fully_replicated:
            out = jax.device_put(out, like.sharding)
        return out

    return DiagonalStateSpace(*(None if x is None else move(x) for x in sys))


def _host(sys: DiagonalStateSpace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(np.asarray(x, dtype=np.complex128) for x in sys[:3])  # type: ignore[return-value]


def lru_from_state_space(sys: DiagonalStateSpace) -> dict[str, np.ndarray]:
    """LRU parameters (float64, host) that realise ``sys``
    (:func:`compressm_core.layer_parameters.lru_parameters`)."""
    return lru_parameters(*_host(sys))


def s5_from_state_space(
    sys: DiagonalStateSpace, *, log_step: np.ndarray, clip_eigs: bool, output_scale: float
) -> dict[str, np.ndarray]:
    """S5 parameters (float64, host) that realise ``sys`` by inverting zero-order hold
    (:func:`compressm_core.layer_parameters.s5_parameters`)."""
    return s5_parameters(
        *_host(sys),
        np.asarray(log_step, dtype=np.float64),
        clip_eigs=clip_eigs,
        output_scale=output_scale,
    )


def s4d_from_state_space(sys: DiagonalStateSpace, *, log_dt: np.ndarray) -> dict[str, np.ndarray]:
    """S4D parameters (float64, host) that realise the batch of ``H`` SISO systems ``sys``,
    keeping each channel's ``log_dt`` (:func:`compressm_core.layer_parameters.s4d_parameters`).
    """
    return s4d_parameters(*_host(sys), np.asarray(log_dt, dtype=np.float64))
