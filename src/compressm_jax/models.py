"""Reference models built from SSM layers: the LRU block and a sequence model (Flax NNX)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from compressm_core.layers import check_block_norm, sequence_layer_sizes
from compressm_core.sequence_model import sequence_forward

from .lru import LRU
from .s4d import S4D
from .s5 import S5

__all__ = ["SSMBlock", "SequenceModel"]

_LAYERS: dict[str, Callable[..., nnx.Module]] = {"lru": LRU, "s5": S5, "s4d": S4D}


def _linear(d_in: int, d_out: int, param_dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
    """``nnx.Linear`` initialised like ``torch.nn.Linear``: kernel and bias uniform on
    ``[-1/sqrt(d_in), 1/sqrt(d_in)]``."""
    bound = 1 / math.sqrt(d_in)

    def bias_init(key: jax.Array, shape: Sequence[int], dtype: Any = param_dtype) -> jax.Array:
        return jax.random.uniform(key, tuple(shape), dtype, -bound, bound)

    return nnx.Linear(
        d_in,
        d_out,
        kernel_init=nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
        bias_init=bias_init,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class SSMBlock(nnx.Module):
    """Residual block ``x + Dropout(GLU(Dropout(GELU(SSM(Norm(x))))))`` (the LRU paper's block).

    The Flax NNX twin of :class:`compressm_torch.SSMBlock`: same layers under the same names
    (``norm``, ``ssm``, ``out``, ``dropout``), exact (erf) GELU, GLU over the last axis.

    Parameters
    ----------
    ssm : flax.nnx.Module
        Sequence layer mapping (batch, length, d_model) to the same shape.
    d_model : int
        Width.
    dropout : float, optional
        Dropout probability (active in training mode, :meth:`flax.nnx.Module.train`).
    norm : {"layer", "batch"}, optional
        Pre-norm: LayerNorm (``epsilon=1e-5`` as in torch), or BatchNorm over (batch, length)
        without scale and bias as in the LRU paper (``momentum=0.9``, i.e. torch's 0.1; the
        running variance is updated with the biased batch variance, torch uses the unbiased).
    param_dtype : dtype, optional
        Dtype of the norm and output parameters.
    rngs : flax.nnx.Rngs
        Random streams: ``params`` (else ``default``) for the initial values, ``dropout`` (else
        ``default``) for dropout masks.
    """

    def __init__(
        self,
        ssm: nnx.Module,
        d_model: int,
        *,
        dropout: float = 0.0,
        norm: Literal["layer", "batch"] = "layer",
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        check_block_norm(norm)
        self.norm: nnx.LayerNorm | nnx.BatchNorm = (
            nnx.LayerNorm(d_model, epsilon=1e-5, param_dtype=param_dtype, rngs=rngs)
            if norm == "layer"
            else nnx.BatchNorm(
                d_model,
                use_bias=False,
                use_scale=False,
                momentum=0.9,
                epsilon=1e-5,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        )
        if isinstance(self.norm, nnx.BatchNorm):  # flax keeps its statistics in float32
            for stat in (self.norm.mean, self.norm.var):
                stat.set_value(stat[...].astype(param_dtype))
        self.ssm = ssm
        self.out = _linear(d_model, 2 * d_model, param_dtype, rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(batch, length, d_model) -> same shape."""
        z = self.dropout(jax.nn.gelu(self.ssm(self.norm(x)), approximate=False))
        out: jax.Array = x + self.dropout(jax.nn.glu(self.out(z), axis=-1))
        return out


class SequenceModel(nnx.Module):
    """Linear encoder, ``n_layers`` :class:`SSMBlock` s, optional mean pooling, linear decoder.

    The Flax NNX twin of :class:`compressm_torch.SequenceModel`, with the same structure,
    defaults and layer names (``encoder``, ``blocks.<i>.norm``, ``blocks.<i>.ssm``,
    ``blocks.<i>.out``, ``decoder``); the linear layers are initialised like ``torch.nn.Linear``.
    Torch's ``weight`` (out, in) is the transpose of NNX's ``kernel`` (in, out), and a
    LayerNorm's ``weight`` is NNX's ``scale``.

    Parameters
    ----------
    d_input, d_output, d_model, d_state, n_layers, pool, dropout, norm
        As for :class:`compressm_torch.SequenceModel` (checked by
        :func:`compressm_core.layers.sequence_layer_sizes`).
    layer : {"lru", "s5", "s4d"}, optional
        SSM layer type (:class:`LRU`, :class:`S5` or :class:`S4D`).
    param_dtype : dtype, optional
        Dtype of every parameter.
    rngs : flax.nnx.Rngs
        Random streams (see :class:`SSMBlock`).
    **layer_kwargs
        Passed to the SSM layer (e.g. ``r_min``, ``r_max`` for the LRU).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from compressm_jax import SequenceModel
    >>> model = SequenceModel(1, 10, d_model=16, d_state=32, rngs=nnx.Rngs(0))
    >>> model(jnp.ones((4, 40, 1))).shape
    (4, 10)
    """

    def __init__(
        self,
        d_input: int,
        d_output: int,
        *,
        d_model: int = 64,
        d_state: int | Sequence[int] = 64,
        n_layers: int = 1,
        layer: Literal["lru", "s5", "s4d"] = "lru",
        pool: Literal["mean"] | None = "mean",
        dropout: float = 0.0,
        norm: Literal["layer", "batch"] = "layer",
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        **layer_kwargs: Any,
    ) -> None:
        sizes = sequence_layer_sizes(layer, _LAYERS, pool, d_state, n_layers)
        self.pool = pool
        self.encoder = _linear(d_input, d_model, param_dtype, rngs)
        self.blocks = nnx.List(
            [
                SSMBlock(
                    _LAYERS[layer](
                        d_model,
                        size,
                        param_dtype=param_dtype,
                        rngs=rngs,
                        **layer_kwargs,
                    ),
                    d_model,
                    dropout=dropout,
                    norm=norm,
                    param_dtype=param_dtype,
                    rngs=rngs,
                )
                for size in sizes
            ]
        )
        self.decoder = _linear(d_model, d_output, param_dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """The model's output, as :meth:`compressm_torch.SequenceModel.forward`."""
        out: jax.Array = sequence_forward(x, self.encoder, self.blocks, self.decoder, self.pool)
        return out
