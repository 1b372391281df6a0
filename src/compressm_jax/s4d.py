"""The S4D layer (Gu et al., 2022) as a Flax NNX module: per-channel diagonal SSMs, ZOH."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from compressm_core.layer_init import log_uniform_steps
from compressm_core.layer_shapes import S4DShape, check_layer_input
from compressm_core.layers import check_s4d_args

from ._layer import ParamLayer
from ._precision import complex_of, working_dtype
from ._scan import diagonal_scan
from ._systems import S4D_NAMES, s4d_zoh

__all__ = ["S4D"]


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _init_values(
    key: jax.Array,
    h: int,
    m: int,
    dt_min: float,
    dt_max: float,
    real: Any,
    param_dtype: Any,
) -> dict[str, jax.Array]:
    """The S4D-Lin initialisation, one compiled function (eager construction compiles once)."""
    uniform_key, normal_key = jax.random.split(key)
    u = jax.random.uniform(uniform_key, (h,), real)
    # One draw for C (H, M, 2) and D (H,), split afterwards.
    z = jax.random.normal(normal_key, (2 * h * m + h,), real)
    values = {
        "log_dt": log_uniform_steps(u, dt_min, dt_max),
        "log_A_real": jnp.full((h, m), math.log(0.5), real),
        "A_imag": jnp.broadcast_to(math.pi * jnp.arange(m, dtype=real), (h, m)),
        "C": z[: 2 * h * m].reshape(h, m, 2) * math.sqrt(0.5),
        "D": z[2 * h * m :],
    }
    return {name: value.astype(param_dtype) for name, value in values.items()}


@functools.partial(jax.jit, static_argnums=(0,))
def _forward(real: Any, u: jax.Array, values: tuple[jax.Array, ...], d: jax.Array) -> jax.Array:
    """``2 Re(sum_n C x) + D u`` per channel, computed in ``real`` precision, returned in
    ``u``'s dtype."""
    cplx = complex_of(real)
    poles, b_bar, c_out = s4d_zoh(*(v.astype(real) for v in values), xp=jnp)
    poles, b_bar, c_out = poles.astype(cplx), b_bar.astype(cplx), c_out.astype(cplx)
    x_in = u.astype(real)
    v = x_in[..., None] * b_bar  # (..., L, H, M)
    x = diagonal_scan(poles.reshape(-1), v.reshape(*v.shape[:-2], -1)).reshape(v.shape)
    y = jnp.sum(x.real * c_out.real - x.imag * c_out.imag, axis=-1) + d.astype(real) * x_in
    return y.astype(u.dtype)


class S4D(S4DShape, ParamLayer):
    """S4D: ``H`` independent SISO state-space models, one per channel, with a real output.

    The Flax NNX twin of :class:`compressm_torch.S4D`, where the maths of state-spaces' minimal
    ``models/s4/s4d.py`` are written out: ``N/2`` stored complex modes per channel, zero-order
    hold with ``B = 1`` fixed, output ``2 Re(sum_n C x) + D u``. Parameter names, shapes
    (``log_dt`` (H,), ``log_A_real`` and ``A_imag`` (H, N/2), ``C`` (H, N/2, 2), ``D`` (H,),
    each an :class:`flax.nnx.Param`) and the S4D-Lin initialisation are the same.

    Parameters
    ----------
    d_model, d_state, dt_min, dt_max
        As for :class:`compressm_torch.S4D`
        (checked by :func:`compressm_core.layers.check_s4d_args`).
    param_dtype : dtype, optional
        Dtype of the parameters (real).
    rngs : flax.nnx.Rngs
        Random streams; the ``params`` stream (else ``default``) draws the initial values.

    Notes
    -----
    The recurrence is a parallel scan (:func:`jax.lax.associative_scan`) over the ``H * N/2``
    modes in float32 (float64 for float64 parameters or inputs); the output has the input's
    dtype. The library counts the state in stored modes (``n_modes = N/2``), as for :class:`S5`
    with ``conj_sym``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from compressm_jax import S4D
    >>> layer = S4D(d_model=4, d_state=16, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 10, 4))).shape, layer.n_modes
    ((2, 10, 4), 8)
    """

    system_names = tuple(S4D_NAMES)

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        *,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        check_s4d_args(d_model, d_state, dt_min, dt_max)
        self.d_model, self.dt_min, self.dt_max = d_model, dt_min, dt_max
        dtype = jnp.dtype(param_dtype)
        real = working_dtype(jnp.zeros((), dtype))
        values = _init_values(rngs.params(), d_model, d_state // 2, dt_min, dt_max, real, dtype)
        self._set_params(values)

    def discrete_system(self, dtype: Any = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The ``H`` ZOH systems, as :meth:`compressm_torch.S4D.discrete_system`."""
        system: tuple[jax.Array, jax.Array, jax.Array] = self._evaluate(s4d_zoh, (), dtype)
        return system

    def __call__(self, u: jax.Array) -> jax.Array:
        """Map ``u`` of shape (..., length, d_model) to ``y`` of the same shape."""
        check_layer_input(u, self.d_model)
        d = self.D[...]
        out: jax.Array = _forward(working_dtype(d, u), u, self._values(), d)
        return out
