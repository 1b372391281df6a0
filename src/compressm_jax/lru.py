"""The Linear Recurrent Unit (Orvieto et al., 2023) as a Flax NNX module."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from compressm_core.layer_init import lru_ring_init
from compressm_core.layer_shapes import LRUShape
from compressm_core.layers import check_lru_args

from ._layer import ParamLayer
from ._precision import working_dtype
from ._scan import real_output_layer
from ._systems import LRU_STATE_AXES, lru_discrete

__all__ = ["LRU"]


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _init_values(
    key: jax.Array,
    n: int,
    h: int,
    r_min: float,
    r_max: float,
    max_phase: float,
    param_dtype: Any,
) -> dict[str, jax.Array]:
    """The LRU initialisation, one compiled function (eager construction compiles once)."""
    real = working_dtype(jnp.zeros((), param_dtype))
    uniform_key, normal_key = jax.random.split(key)
    u1, u2 = jax.random.uniform(uniform_key, (2, n), real)
    # One draw for B_re, B_im (N, H), C_re, C_im (H, N) and D (H,), split afterwards.
    z = jax.random.normal(normal_key, (4 * n * h + h,), real)
    b_re, b_im, c_re, c_im = jnp.split(z[: 4 * n * h], 4)
    nu_log, theta_log, gamma_log = lru_ring_init(u1, u2, r_min, r_max, max_phase, xp=jnp)
    values = {
        "nu_log": nu_log,
        "theta_log": theta_log,
        "gamma_log": gamma_log,
        "B_re": b_re.reshape(n, h) / math.sqrt(2 * h),
        "B_im": b_im.reshape(n, h) / math.sqrt(2 * h),
        "C_re": c_re.reshape(h, n) / math.sqrt(n),
        "C_im": c_im.reshape(h, n) / math.sqrt(n),
        "D": z[4 * n * h :],
    }
    return {name: value.astype(param_dtype) for name, value in values.items()}


class LRU(LRUShape, ParamLayer):
    """Linear Recurrent Unit: a complex diagonal recurrence with a real output.

    The Flax NNX twin of :class:`compressm_torch.LRU`, where the maths are written out: poles
    :math:`\\lambda = \\exp(-e^{\\nu} + i e^{\\theta})`, input matrix
    :math:`\\operatorname{diag}(e^\\gamma) B`, output ``Re(C x) + D u``. Parameter names, shapes
    (``nu_log``, ``theta_log``, ``gamma_log`` (N,), ``B_re``, ``B_im`` (N, H), ``C_re``,
    ``C_im`` (H, N), ``D`` (H,), each an :class:`flax.nnx.Param`) and the initialisation of the
    LRU paper are the same (and those of the official CompreSSM and minimal-LRU code).

    Parameters
    ----------
    d_model, d_state, r_min, r_max, max_phase
        As for :class:`compressm_torch.LRU`
        (checked by :func:`compressm_core.layers.check_lru_args`).
    param_dtype : dtype, optional
        Dtype of the parameters (real).
    rngs : flax.nnx.Rngs
        Random streams; the ``params`` stream (else ``default``) draws the initial values.

    Notes
    -----
    The recurrence is a parallel scan (:func:`jax.lax.associative_scan`) in float32 (float64
    for float64 parameters or inputs); the output has the input's dtype.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from compressm_jax import LRU
    >>> layer = LRU(d_model=4, d_state=16, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 10, 4))).shape
    (2, 10, 4)
    """

    system_names = tuple(LRU_STATE_AXES)

    def __init__(
        self,
        d_model: int,
        d_state: int,
        *,
        r_min: float = 0.9,
        r_max: float = 0.999,
        max_phase: float = 6.28,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        check_lru_args(d_model, d_state, r_min, r_max, max_phase)
        self.d_model = d_model
        self.r_min, self.r_max, self.max_phase = r_min, r_max, max_phase
        values = _init_values(
            rngs.params(), d_state, d_model, r_min, r_max, max_phase, jnp.dtype(param_dtype)
        )
        self._set_params(values)

    def discrete_system(self, dtype: Any = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The system, as :meth:`compressm_torch.LRU.discrete_system`."""
        system: tuple[jax.Array, jax.Array, jax.Array] = self._evaluate(lru_discrete, (), dtype)
        return system

    def __call__(self, u: jax.Array) -> jax.Array:
        """Map ``u`` of shape (..., length, d_model) to ``y`` of the same shape."""
        return real_output_layer(u, self.d_model, lru_discrete, self._values(), self.D[...])
