"""An S5-style MIMO layer as a Flax NNX module: continuous-time diagonal state, ZOH."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from compressm_core.layer_init import log_uniform_steps, s5_hippo_basis
from compressm_core.layer_shapes import S5Shape
from compressm_core.layers import check_s5_args
from compressm_core.parameterizations import hippo_n_eigenpairs

from ._layer import ParamLayer
from ._precision import complex_of, working_dtype
from ._scan import real_output_layer
from ._systems import S5_STATE_AXES, s5_continuous, s5_zoh

__all__ = ["S5", "hippo_n_eigenpairs"]


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6, 7))
def _init_values(
    key: jax.Array,
    p: int,
    h: int,
    blocks: int,
    conj_sym: bool,
    dt_min: float,
    dt_max: float,
    param_dtype: Any,
) -> dict[str, jax.Array]:
    """The S5 initialisation, one compiled function (eager construction compiles once)."""
    lam, v = s5_hippo_basis(p, blocks, conj_sym)
    full = v.shape[0]
    real = working_dtype(jnp.zeros((), param_dtype))
    cplx = complex_of(real)
    normal_key, uniform_key = jax.random.split(key)
    # One draw for every block's B (full, H), C (H, full, 2) and for D (H,).
    z = jax.random.normal(normal_key, (blocks * 3 * full * h + h,), real)
    zb = z[: blocks * 3 * full * h].reshape(blocks, 3, full * h)
    b = zb[:, 0].reshape(blocks, full, h) / math.sqrt(full)
    c = jax.lax.complex(zb[:, 1], zb[:, 2]).reshape(blocks, h, full) / math.sqrt(2 * full)
    hi = jax.lax.Precision.HIGHEST
    v_inv = jnp.asarray(v.conj().T, dtype=cplx)  # V is unitary
    b_tilde = jnp.matmul(v_inv, b.astype(cplx), precision=hi).reshape(p, h)
    c_tilde = jnp.matmul(c, jnp.asarray(v, dtype=cplx), precision=hi)
    c_tilde = c_tilde.transpose(1, 0, 2).reshape(h, p)
    u = jax.random.uniform(uniform_key, (p,), real)
    values = {
        "Lambda_re": jnp.asarray(lam.real, dtype=real),
        "Lambda_im": jnp.asarray(lam.imag, dtype=real),
        "B": jnp.stack([b_tilde.real, b_tilde.imag], axis=-1),
        "C": jnp.stack([c_tilde.real, c_tilde.imag], axis=-1),
        "D": z[blocks * 3 * full * h :],
        "log_step": log_uniform_steps(u, dt_min, dt_max),
    }
    return {name: value.astype(param_dtype) for name, value in values.items()}


class S5(S5Shape, ParamLayer):
    """S5-style layer: one complex diagonal state shared by all channels (MIMO).

    The Flax NNX twin of :class:`compressm_torch.S5`, where the maths are written out:
    continuous-time :math:`\\Lambda`, a step per state, zero-order hold and the output
    :math:`s \\operatorname{Re}(\\tilde C x) + D u`. Parameter names, shapes (``B`` (P, H, 2),
    ``C`` (H, P, 2), ``Lambda_re``, ``Lambda_im``, ``log_step`` (P,), ``D`` (H,), each an
    :class:`flax.nnx.Param`) and the HiPPO-N initialisation (:func:`hippo_n_eigenpairs`) are
    the same.

    Parameters
    ----------
    d_model, d_state, blocks, conj_sym, dt_min, dt_max, clip_eigs
        As for :class:`compressm_torch.S5`
        (checked by :func:`compressm_core.layers.check_s5_args`).
    param_dtype : dtype, optional
        Dtype of the parameters (real).
    rngs : flax.nnx.Rngs
        Random streams; the ``params`` stream (else ``default``) draws the initial values.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from compressm_jax import S5
    >>> layer = S5(d_model=4, d_state=8, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 10, 4))).shape
    (2, 10, 4)
    """

    system_names = tuple(S5_STATE_AXES)

    def __init__(
        self,
        d_model: int,
        d_state: int,
        *,
        blocks: int = 1,
        conj_sym: bool = True,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        clip_eigs: bool = False,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        check_s5_args(d_model, d_state, blocks, dt_min, dt_max)
        self.d_model, self.blocks, self.conj_sym = d_model, blocks, conj_sym
        self.dt_min, self.dt_max, self.clip_eigs = dt_min, dt_max, clip_eigs
        values = _init_values(
            rngs.params(),
            d_state,
            d_model,
            blocks,
            conj_sym,
            dt_min,
            dt_max,
            jnp.dtype(param_dtype),
        )
        self._set_params(values)

    def continuous_system(
        self, dtype: Any = None
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """The continuous system and steps, as :meth:`compressm_torch.S5.continuous_system`."""
        options = (("clip_eigs", self.clip_eigs),)
        system: tuple[jax.Array, jax.Array, jax.Array, jax.Array] = self._evaluate(
            s5_continuous, options, dtype
        )
        return system

    def discrete_system(self, dtype: Any = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The ZOH system, as :meth:`compressm_torch.S5.discrete_system`."""
        options = (("clip_eigs", self.clip_eigs), ("output_scale", self.output_scale))
        system: tuple[jax.Array, jax.Array, jax.Array] = self._evaluate(s5_zoh, options, dtype)
        return system

    def __call__(self, u: jax.Array) -> jax.Array:
        """Map ``u`` of shape (..., length, d_model) to ``y`` of the same shape."""
        return real_output_layer(
            u,
            self.d_model,
            s5_zoh,
            self._values(),
            self.D[...],
            clip_eigs=self.clip_eigs,
            output_scale=self.output_scale,
        )
