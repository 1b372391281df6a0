"""Diagonal linear recurrences evaluated by a parallel (associative) scan."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from compressm_core.layer_shapes import check_layer_input

from ._precision import complex_of, working_dtype

__all__ = ["diagonal_scan", "real_output_layer"]

_HIGHEST = jax.lax.Precision.HIGHEST


def _combine(
    earlier: tuple[jax.Array, jax.Array], later: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    """Compose two steps ``x -> a x + v``: first ``earlier``, then ``later``."""
    a_i, v_i = earlier
    a_j, v_j = later
    return a_j * a_i, a_j * v_i + v_j


def diagonal_scan(
    poles: jax.Array, inputs: jax.Array, *, initial_state: jax.Array | None = None
) -> jax.Array:
    """All states of the diagonal recurrence :math:`x_k = \\lambda \\odot x_{k-1} + v_k`.

    A parallel scan (:func:`jax.lax.associative_scan`) over the pairs :math:`(\\lambda_k, v_k)`
    with the composition :math:`(a_i, v_i) \\circ (a_j, v_j) = (a_j a_i,\\ a_j v_i + v_j)`:
    ``O(log L)`` depth instead of ``L`` sequential steps, linear in the state size ``N``.
    Differentiable by JAX's own rules.

    Parameters
    ----------
    poles : (N,) or (..., L, N) array
        Time-invariant poles, or one set per step (selective layers).
    inputs : (..., L, N) array
        Driving terms :math:`v_k` (already multiplied by ``B``).
    initial_state : (..., N) array, optional
        :math:`x_{-1}`; zero by default.

    Returns
    -------
    (..., L, N) array
        :math:`x_0, \\dots, x_{L-1}`.
    """
    dtype = jnp.result_type(poles, inputs)
    poles = jnp.broadcast_to(poles.astype(dtype), inputs.shape)
    inputs = inputs.astype(dtype)
    if initial_state is not None:
        first = inputs[..., :1, :] + poles[..., :1, :] * initial_state[..., None, :]
        inputs = jnp.concatenate([first, inputs[..., 1:, :]], axis=-2)
    scanned = jax.lax.associative_scan(_combine, (poles, inputs), axis=inputs.ndim - 2)
    states: jax.Array = scanned[1]
    return states


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _forward(
    system: Callable[..., tuple[jax.Array, jax.Array, jax.Array]],
    options: tuple[tuple[str, Any], ...],
    real: Any,
    u: jax.Array,
    values: tuple[jax.Array, ...],
    d: jax.Array,
) -> jax.Array:
    """``Re(C x) + d u`` computed in ``real`` precision, returned in ``u``'s dtype."""
    cplx = complex_of(real)
    poles, b, c = system(*(v.astype(real) for v in values), **dict(options), xp=jnp)
    poles, b, c = poles.astype(cplx), b.astype(cplx), c.astype(cplx)
    x_in, d = u.astype(real), d.astype(real)
    v = jax.lax.complex(
        jnp.matmul(x_in, b.real.T, precision=_HIGHEST),
        jnp.matmul(x_in, b.imag.T, precision=_HIGHEST),
    )
    x = diagonal_scan(poles, v)
    y = (
        jnp.matmul(x.real, c.real.T, precision=_HIGHEST)
        - jnp.matmul(x.imag, c.imag.T, precision=_HIGHEST)
        + d * x_in
    )
    return y.astype(u.dtype)


def real_output_layer(
    u: jax.Array,
    d_model: int,
    system: Callable[..., tuple[jax.Array, jax.Array, jax.Array]],
    values: Sequence[jax.Array],
    feedthrough: jax.Array,
    **options: Any,
) -> jax.Array:
    """``y_k = Re(C x_k) + D u_k``, ``x_k = lambda x_{k-1} + B u_k``, for (..., L, d_model) ``u``.

    ``system(*values, **options, xp=jax.numpy)`` maps the parameters ``values`` (cast to the
    real working precision: float32, or float64 if ``feedthrough`` or ``u`` is float64) to the
    complex poles (N,), ``B`` (N, H) and ``C`` (H, N); it must be a module-level function and
    ``options`` hashable. System, scan and products are one compiled function, so an eager call
    compiles once per shape. Products run at ``Precision.HIGHEST`` (no TF32 on GPUs). The output
    has ``u``'s dtype.
    """
    check_layer_input(u, d_model)
    real = working_dtype(feedthrough, u)
    static = tuple(sorted(options.items()))
    out: jax.Array = _forward(system, static, real, u, tuple(values), feedthrough)
    return out
