"""compressm_jax: JAX / Flax NNX layers that shrink their state while they train.

Layers (:class:`LRU`, :class:`S5`, :class:`S4D`) and reference models (:class:`SSMBlock`,
:class:`SequenceModel`), Flax NNX modules with the parameter names, shapes, initialisation and
maths of their :mod:`compressm_torch` twins (the layers evaluated by
:func:`jax.lax.associative_scan`); adapters that read a layer as a diagonal system and write a
reduced one back (:func:`to_state_space`, :func:`reduce_layer`, :func:`register_adapter`);
pure functions for LRUs held in Equinox modules or Flax linen param dicts
(:func:`lru_to_state_space`, :func:`reduce_lru_params`); the optax-state surgery
:func:`resize_optimizer_state`; the training controller :class:`CompreSSM`; and the
learning-rate re-warm-up after each cut as an optax transformation (:func:`scale_by_rewarmup`,
:func:`mark_cut`).

Balanced truncation to ``r`` states changes a layer's transfer function by at most

.. math::

    \\|G - G_r\\|_{\\mathcal{H}_\\infty} \\le 2 \\sum_{i > r} \\sigma_i ,

with :math:`\\sigma_i` the Hankel singular values of its standard realization
:math:`(\\lambda, B, C)`. Reductions run on the host in float64 whatever
``jax_enable_x64`` says.
"""

from compressm_core.schedule import ReductionEvent, reduction_schedule

from .adapters import (
    LayerAdapter,
    find_layers,
    get_adapter,
    register_adapter,
    state_sizes,
    to_state_space,
)
from .checkpoint import load_checkpoint, save_checkpoint
from .controller import CompreSSM, ReductionWarning, resize_layers
from .lru import LRU
from .models import SequenceModel, SSMBlock
from .optim import ParamChange, resize_optimizer_state
from .pytrees import lru_to_state_space, reduce_lru_params
from .reduction import LayerReduction, reduce_layer
from .rewarmup import RewarmupState, mark_cut, scale_by_rewarmup
from .s4d import S4D
from .s5 import S5, hippo_n_eigenpairs

__all__ = [
    "LRU",
    "S4D",
    "S5",
    "CompreSSM",
    "LayerAdapter",
    "LayerReduction",
    "ParamChange",
    "ReductionEvent",
    "ReductionWarning",
    "RewarmupState",
    "SSMBlock",
    "SequenceModel",
    "find_layers",
    "get_adapter",
    "hippo_n_eigenpairs",
    "load_checkpoint",
    "lru_to_state_space",
    "mark_cut",
    "reduce_layer",
    "reduce_lru_params",
    "reduction_schedule",
    "register_adapter",
    "resize_layers",
    "resize_optimizer_state",
    "save_checkpoint",
    "scale_by_rewarmup",
    "state_sizes",
    "to_state_space",
]
