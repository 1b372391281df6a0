"""compressm_torch: PyTorch SSM layers that shrink their state while they train.

Layers (:class:`LRU`, :class:`S5`, :class:`S4D`, the selective :class:`Mamba`), adapters that
read a layer as a diagonal system and write a reduced one back (:func:`to_state_space`,
:func:`reduce_layer`, :func:`register_adapter`), selective layers reduced by index selection
from statistics recorded in training (:class:`SelectiveRecorder`,
:func:`reduce_selective_layer`), the
training controller :class:`CompreSSM` that reduces every supported layer of a model at
scheduled steps and updates the live optimizer, and checkpoints that reload reduced models.
For the baselines the method is compared with: a one-shot reduction of a trained model
(:func:`reduce_model`), the Hankel nuclear-norm regulariser (:func:`hankel_nuclear_norm`) and
the knowledge-distillation loss (:func:`distillation_loss`).
"""

from .adapters import (
    LayerAdapter,
    SelectiveAdapter,
    find_layers,
    get_adapter,
    register_adapter,
    resize_layers,
    state_sizes,
    to_state_space,
)
from .checkpoint import load_checkpoint, save_checkpoint
from .controller import CompreSSM, ReductionEvent, ReductionWarning, reduction_schedule
from .distillation import distillation_loss
from .lru import LRU
from .mamba import Mamba
from .models import SequenceModel, SSMBlock
from .optim import resize_optimizer_state, update_optimizer_state
from .reduction import LayerReduction, reduce_layer, reduce_model
from .regularization import hankel_nuclear_norm, hankel_nuclear_norms
from .s4d import S4D
from .s5 import S5, hippo_n_eigenpairs
from .selective import SelectiveRecorder, reduce_selective_layer, selective_importance

__all__ = [
    "LRU",
    "S4D",
    "S5",
    "CompreSSM",
    "LayerAdapter",
    "LayerReduction",
    "Mamba",
    "ReductionEvent",
    "ReductionWarning",
    "SSMBlock",
    "SelectiveAdapter",
    "SelectiveRecorder",
    "SequenceModel",
    "distillation_loss",
    "find_layers",
    "get_adapter",
    "hankel_nuclear_norm",
    "hankel_nuclear_norms",
    "hippo_n_eigenpairs",
    "load_checkpoint",
    "reduce_layer",
    "reduce_model",
    "reduce_selective_layer",
    "reduction_schedule",
    "register_adapter",
    "resize_layers",
    "resize_optimizer_state",
    "save_checkpoint",
    "selective_importance",
    "state_sizes",
    "to_state_space",
    "update_optimizer_state",
]
