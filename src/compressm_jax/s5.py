"""An S5-style MIMO layer as a Flax NNX module: continuous-time diagonal state, ZOH."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from compressm_core.parameterizations import hippo_n_eigenpairs

from ._precision import complex_of, working_dtype
from ._scan import real_output_layer
from ._systems import S5_STATE_AXES, evaluate, s5_continuous, s5_zoh
from .lru import _check_size

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
    block = p // blocks
    full = 2 * block if conj_sym else block
    lam, v = hippo_n_eigenpairs(full)
    lam, v = np.tile(lam[:block], blocks), v[:, :block]
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
        "log_step": math.log(dt_min) + u * math.log(dt_max / dt_min),
    }
    return {name: value.astype(param_dtype) for name, value in values.items()}


class S5(nnx.Module):
    """S5-style layer: one complex diagonal state shared by all channels (MIMO).

    Continuous-time :math:`\\Lambda = \\Lambda_{re} + i \\Lambda_{im}` and a step
    :math:`\\Delta_j = e^{\\text{log\\_step}_j}` per state, discretised by zero-order hold:

    .. math::

        \\bar\\lambda = e^{\\Lambda \\Delta}, \\quad
        \\bar B = \\frac{\\bar\\lambda - 1}{\\Lambda} \\odot \\tilde B, \\quad
        x_k = \\bar\\lambda \\odot x_{k-1} + \\bar B u_k, \\quad
        y_k = s \\operatorname{Re}(\\tilde C x_k) + D \\odot u_k,

    with :math:`s = 2` when ``conj_sym`` (the state stores one member of each conjugate pair,
    as in lindermanlab/S5) and :math:`s = 1` otherwise. ``B`` (P, H, 2) and ``C`` (H, P, 2) hold
    real and imaginary parts; ``Lambda_re``, ``Lambda_im`` and ``log_step`` are (P,) and ``D``
    is (H,), as in :class:`compressm_torch.S5`.

    Parameters
    ----------
    d_model : int
        Input and output width ``H``.
    d_state : int
        Number of stored complex states ``P`` (half the real order with ``conj_sym``).
    blocks : int, optional
        Number of HiPPO-N blocks on the diagonal of the initial :math:`\\Lambda`.
    conj_sym : bool, optional
        Output ``2 Re(C x)``: keep one state per conjugate pair.
    dt_min, dt_max : float, optional
        Range of the log-uniform initial steps.
    clip_eigs : bool, optional
        Clip :math:`\\operatorname{Re}\\Lambda` to at most ``-1e-4`` in the forward pass.
    param_dtype : dtype, optional
        Dtype of the parameters (real).
    rngs : flax.nnx.Rngs
        Random streams; the ``params`` stream (else ``default``) draws the initial values.

    Notes
    -----
    Initialisation as in S5: :math:`\\Lambda` from the eigenvalues of HiPPO-N
    (:func:`hippo_n_eigenpairs`), :math:`\\tilde B = V^{-1} B` and :math:`\\tilde C = C V` for
    random ``B`` (variance ``1/P``) and ``C`` (variance ``1/P``), ``D`` standard normal.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from compressm_jax import S5
    >>> layer = S5(d_model=4, d_state=8, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 10, 4))).shape
    (2, 10, 4)
    """

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
        _check_size("d_model", d_model)
        _check_size("d_state", d_state)
        _check_size("blocks", blocks)
        if d_state % blocks:
            msg = f"`d_state` ({d_state}) must be a multiple of `blocks` ({blocks})."
            raise ValueError(msg)
        if not 0 < dt_min <= dt_max:
            msg = f"Need 0 < `dt_min` <= `dt_max`; received {dt_min!r}, {dt_max!r}."
            raise ValueError(msg)
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
        self.Lambda_re = nnx.Param(values["Lambda_re"])
        self.Lambda_im = nnx.Param(values["Lambda_im"])
        self.B = nnx.Param(values["B"])
        self.C = nnx.Param(values["C"])
        self.D = nnx.Param(values["D"])
        self.log_step = nnx.Param(values["log_step"])

    @property
    def d_state(self) -> int:
        """Current number of stored complex states ``P``."""
        return int(self.Lambda_re.shape[0])

    @property
    def output_scale(self) -> float:
        """``2`` with ``conj_sym`` (output ``2 Re(C x)``), else ``1``."""
        return 2.0 if self.conj_sym else 1.0

    def continuous_system(
        self, dtype: Any = None
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """:math:`\\Lambda` (P,), :math:`\\tilde B` (P, H), :math:`\\tilde C` (H, P), complex,
        and the steps :math:`\\Delta` (P,), in the real precision ``dtype`` (default: float32,
        or float64 for float64 parameters)."""
        real = working_dtype(self.Lambda_re) if dtype is None else dtype
        options = (("clip_eigs", self.clip_eigs),)
        system: tuple[jax.Array, jax.Array, jax.Array, jax.Array] = evaluate(
            s5_continuous, options, real, self._values()
        )
        return system

    def discrete_system(self, dtype: Any = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """ZOH poles :math:`\\bar\\lambda` (P,), :math:`\\bar B` (P, H) and the output matrix
        :math:`s \\tilde C` (H, P) of the layer's output ``Re(C x)``."""
        real = working_dtype(self.Lambda_re) if dtype is None else dtype
        options = (("clip_eigs", self.clip_eigs), ("output_scale", self.output_scale))
        system: tuple[jax.Array, jax.Array, jax.Array] = evaluate(
            s5_zoh, options, real, self._values()
        )
        return system

    def _values(self) -> tuple[jax.Array, ...]:
        return tuple(getattr(self, name)[...] for name in S5_STATE_AXES)

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
