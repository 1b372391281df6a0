"""Reduced Hugging Face models that round-trip through ``save_pretrained``.

The functions of :mod:`compressm_torch.hf` that record, restore and align the state sizes of a
model (its config records them, so ``save_pretrained`` writes them to ``config.json``), and the
controller file the Trainer callback writes into its checkpoints. Import them from
:mod:`compressm_torch.hf`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any, TypeVar, cast

import torch
from torch import nn
from transformers import PreTrainedModel

from ._params import assign
from .adapters import SelectiveAdapter, find_layers, get_adapter, resize_layers, state_sizes

__all__ = [
    "CONTROLLER_FILE",
    "STATE_SIZES_KEY",
    "align_state_sizes",
    "load_reduced_pretrained",
    "prepare_resume",
    "read_controller_file",
    "record",
    "record_state_sizes",
    "write_controller_file",
]

logger = logging.getLogger("compressm")

#: Config attribute holding ``{layer name: state size}`` (written to ``config.json``).
STATE_SIZES_KEY = "compressm_state_sizes"
#: File the Trainer callback writes into every checkpoint folder (the controller's state).
CONTROLLER_FILE = "compressm.pt"
_FORMAT = "compressm.hf/1"

ModelT = TypeVar("ModelT", bound=PreTrainedModel)


def _config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        msg = (
            "`model` must have a transformers config (a `config` attribute, as a "
            f"PreTrainedModel has); received {type(model).__name__} without one."
        )
        raise TypeError(msg)
    return config


def record_state_sizes(model: nn.Module) -> dict[str, int]:
    """Write the state size of every supported layer of ``model`` into ``model.config``.

    Sets ``config.compressm_state_sizes = {layer name: size}`` (JSON, so ``save_pretrained``
    writes it to ``config.json``) and, when every layer has the same size, ``config.state_size``
    too, so that even a plain ``from_pretrained`` rebuilds the reduced model. Sizes are per
    group for Mamba-2 layers, as ``state_size`` is. Call it after every reduction event
    (:class:`CompreSSMTrainerCallback` does), or at least before ``save_pretrained``.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model with a ``config`` (for example ``MambaForCausalLM``).

    Returns
    -------
    dict
        ``{layer name: state size}``, as recorded.

    Raises
    ------
    TypeError
        If ``model`` has no transformers config.

    Examples
    --------
    >>> import torch
    >>> from transformers import MambaConfig, MambaForCausalLM
    >>> from compressm_torch import resize_layers
    >>> from compressm_torch.hf import record_state_sizes
    >>> model = MambaForCausalLM(MambaConfig(vocab_size=32, hidden_size=16, state_size=8,
    ...                                      num_hidden_layers=2))
    >>> resize_layers(model, {"backbone.layers.0.mixer": 4, "backbone.layers.1.mixer": 4})
    >>> record_state_sizes(model)
    {'backbone.layers.0.mixer': 4, 'backbone.layers.1.mixer': 4}
    >>> model.config.state_size
    4
    """
    config = _config(model)
    sizes = state_sizes(model)
    setattr(config, STATE_SIZES_KEY, dict(sizes))
    distinct = set(sizes.values())
    if len(distinct) == 1 and hasattr(config, "state_size"):
        config.state_size = distinct.pop()
    return sizes


def record(model: nn.Module) -> None:
    """:func:`record_state_sizes` if ``model`` has a transformers config (the Trainer also
    trains plain modules)."""
    if hasattr(getattr(model, "config", None), "to_dict"):
        record_state_sizes(model)


def _match_names(model: nn.Module, sizes: Mapping[str, int]) -> dict[str, int]:
    """``sizes`` renamed to ``model``'s layer names: recorded on a model with a head (say
    ``backbone.layers.0.mixer``) and loaded into its base model (``layers.0.mixer``), or the
    other way round."""
    own = set(find_layers(model))
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    matched = {}
    for name, size in sizes.items():
        if name not in own and prefix:
            if name.startswith(prefix + ".") and name[len(prefix) + 1 :] in own:
                name = name[len(prefix) + 1 :]
            elif f"{prefix}.{name}" in own:
                name = f"{prefix}.{name}"
        matched[name] = int(size)
    return matched


def _recorded_sizes(config: Any) -> dict[str, int] | None:
    sizes = getattr(config, STATE_SIZES_KEY, None)
    return None if sizes is None else {str(k): int(v) for k, v in dict(sizes).items()}


def load_reduced_pretrained(
    cls: type[ModelT],
    path: str | os.PathLike[str],
    *,
    state_sizes: Mapping[str, int] | None = None,
    **kwargs: Any,
) -> ModelT:
    """``cls.from_pretrained(path, **kwargs)`` for a model whose layers were reduced.

    The model is built from its config as usual, then its layers are resized to the state sizes
    recorded in the config (:func:`record_state_sizes`) or given as ``state_sizes``, and only
    then are the weights loaded, by transformers' own loader (safetensors or ``.bin``, sharded
    or not, local or from the Hub, with ``dtype``, ``device_map`` and the other options of
    ``from_pretrained``). So ``save_pretrained`` followed by this function gives back the same
    model: the same sizes and the same outputs.

    Parameters
    ----------
    cls : type
        The model class, a subclass of ``transformers.PreTrainedModel`` (``MambaForCausalLM``,
        ``Mamba2ForCausalLM``, ...).
    path : str or os.PathLike
        What ``from_pretrained`` accepts: a folder written by ``save_pretrained`` or a model id.
    state_sizes : mapping, optional
        ``{layer name: state size}``; overrides what the config records (for weights saved
        without :func:`record_state_sizes`).
    **kwargs
        Passed to ``cls.from_pretrained``.

    Returns
    -------
    PreTrainedModel
        An instance of ``cls`` with the recorded state sizes (also recorded in its config).

    Raises
    ------
    ValueError
        If the config records no state sizes (and ``state_sizes`` is not given) but the
        weights at ``path`` have other sizes than the config describes.
    KeyError
        If the recorded sizes name layers that the model does not have.

    Examples
    --------
    >>> import tempfile, torch
    >>> from transformers import MambaConfig, MambaForCausalLM
    >>> from compressm_torch import resize_layers
    >>> from compressm_torch.hf import load_reduced_pretrained, record_state_sizes
    >>> model = MambaForCausalLM(MambaConfig(vocab_size=32, hidden_size=16, state_size=8,
    ...                                      num_hidden_layers=2))
    >>> resize_layers(model, {"backbone.layers.0.mixer": 3})  # layers of different sizes
    >>> _ = record_state_sizes(model)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     model.save_pretrained(folder)
    ...     again = load_reduced_pretrained(MambaForCausalLM, folder)
    >>> again.config.compressm_state_sizes
    {'backbone.layers.0.mixer': 3, 'backbone.layers.1.mixer': 8}
    """
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        msg = f"`cls` must be a transformers PreTrainedModel subclass; received {cls!r}."
        raise TypeError(msg)
    given = None if state_sizes is None else {str(k): int(v) for k, v in state_sizes.items()}
    seen: dict[str, Any] = {}

    def __init__(self: ModelT, config: Any, *args: Any, **kw: Any) -> None:
        cls.__init__(self, config, *args, **kw)
        sizes = given if given is not None else _recorded_sizes(config)
        seen["sizes"], seen["config"] = sizes, config
        if sizes:
            resize_layers(self, _match_names(self, sizes))

    # A subclass whose constructor resizes the layers: from_pretrained builds it (on the meta
    # device), then loads the weights into tensors of the right shapes.
    resized = cast(
        "type[ModelT]",
        type(
            cls.__name__,
            (cls,),
            {"__init__": __init__, "__module__": cls.__module__, "__qualname__": cls.__qualname__},
        ),
    )
    try:
        model = resized.from_pretrained(path, **kwargs)
    except RuntimeError as err:
        if seen.get("sizes") or "mismatch" not in str(err):
            raise
        config = seen.get("config")
        size = getattr(config, "state_size", None)
        msg = (
            f"The weights at `path`={os.fspath(path)!r} do not have the sizes of its config "
            f"(state_size={size!r}), and the config records no per-layer state sizes "
            f"(`{STATE_SIZES_KEY}`): the model was probably reduced and saved without "
            "compressm_torch.hf.record_state_sizes. Pass `state_sizes={layer name: size}` "
            "(compressm_torch.state_sizes of the reduced model), or record them before "
            "save_pretrained."
        )
        raise ValueError(msg) from err
    model.__class__ = cls
    record_state_sizes(model)
    return model


@torch.no_grad()
def align_state_sizes(model: nn.Module) -> dict[str, int]:
    """Pad the selective layers of ``model`` to one state size (their largest), exactly.

    A transformers config holds one ``state_size``; after a reduction that left the layers at
    different sizes, a plain ``from_pretrained`` (without :func:`load_reduced_pretrained`) can
    only rebuild the model once they agree. The added states have zero input and output
    weights (zero ``B`` and ``C`` rows, zero convolution channels for Mamba-2), so they stay
    zero and the model computes exactly what it computed before; the cost is that of the
    larger size. The config is updated (:func:`record_state_sizes`) when ``model`` has one.

    Use it after training, to export: the moments an optimizer holds for the padded tensors are
    not padded. (To train with one shared size instead, reduce with ``mode="fixed"``: every
    layer then loses the same fraction at each event.)

    Parameters
    ----------
    model : torch.nn.Module
        A model with selective (Mamba, Mamba-2) layers.

    Returns
    -------
    dict
        ``{layer name: state size}`` after padding.

    Raises
    ------
    TypeError
        If ``model`` has a supported layer that is not selective (LRU, S5: pad those by
        hand, or keep :func:`load_reduced_pretrained`).
    """
    layers = find_layers(model)
    adapters = {}
    for name, layer in layers.items():
        adapter = get_adapter(layer)
        if not isinstance(adapter, SelectiveAdapter):
            msg = (
                f"`model` layer {name!r} of type {type(layer).__name__} is not selective; "
                "align_state_sizes pads selective (Mamba, Mamba-2) layers only."
            )
            raise TypeError(msg)
        adapters[name] = adapter
    sizes = {name: adapters[name].state_size(layer) for name, layer in layers.items()}
    target = max(sizes.values(), default=0)
    for name, layer in layers.items():
        adapter, old = adapters[name], sizes[name]
        if old == target:
            continue
        groups = adapter.groups(layer) or 1
        kept = adapter.positions(layer, torch.arange(old).expand(groups, old))
        values = {p: layer.get_parameter(p).detach().clone() for p in kept}
        adapter.resize(layer, target)  # zeros everywhere
        # Where states 0 .. old-1 live in the padded layout: the old values go there.
        new = adapter.positions(layer, torch.arange(old).expand(groups, old))
        for pname, (axis, pos) in new.items():
            param = layer.get_parameter(pname)
            assign(param, param.detach().index_copy(axis, pos.to(param.device), values[pname]))
    record(model)
    return state_sizes(model)


def _sizes_in(checkpoint_dir: str | os.PathLike[str]) -> dict[str, int]:
    """The state sizes recorded in a checkpoint folder: its ``config.json``, else the
    controller file of :class:`CompreSSMTrainerCallback`."""
    folder = os.fspath(checkpoint_dir)
    config_file = os.path.join(folder, "config.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            sizes = json.load(f).get(STATE_SIZES_KEY)
        if sizes is not None:
            return {str(k): int(v) for k, v in sizes.items()}
    controller_file = os.path.join(folder, CONTROLLER_FILE)
    if os.path.isfile(controller_file):
        return dict(read_controller_file(controller_file)["state_sizes"])
    msg = (
        f"`checkpoint_dir`={folder!r} records no state sizes: expected `{STATE_SIZES_KEY}` in "
        f"its config.json or a {CONTROLLER_FILE} file (written by CompreSSMTrainerCallback)."
    )
    raise FileNotFoundError(msg)


def prepare_resume(model: nn.Module, checkpoint_dir: str | os.PathLike[str]) -> dict[str, int]:
    """Resize a freshly built model to the state sizes of a checkpoint before loading it.

    Call it before ``trainer.train(resume_from_checkpoint=checkpoint_dir)`` when the Trainer
    does not resize the model itself (a :class:`CompreSSMTrainerCallback` passed to the
    ``Trainer`` constructor does), or before loading a checkpoint's weights by hand. The
    Parameter objects are kept, so an optimizer already built on ``model`` stays valid.

    Parameters
    ----------
    model : torch.nn.Module
        The freshly built (full-size) model.
    checkpoint_dir : str or os.PathLike
        A checkpoint folder of the Trainer (or any folder written by ``save_pretrained`` after
        :func:`record_state_sizes`).

    Returns
    -------
    dict
        ``{layer name: state size}`` of the checkpoint, now the model's.

    Raises
    ------
    FileNotFoundError
        If the folder records no state sizes.
    """
    sizes = _match_names(model, _sizes_in(checkpoint_dir))
    resize_layers(model, sizes)
    record(model)
    return sizes


def read_controller_file(path: str) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        msg = f"{path!r} is not a compressm controller file (expected format {_FORMAT!r})."
        raise ValueError(msg)
    return state


def write_controller_file(path: str, state: Mapping[str, Any]) -> None:
    """Write a controller file (``state``: the callback's ``controller``, ``state_sizes`` and
    ``metric``) that :func:`read_controller_file` reads back."""
    torch.save({"format": _FORMAT, **state}, path)
