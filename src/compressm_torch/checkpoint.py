"""Checkpoints that record per-layer state sizes, so reduced models reload into fresh ones."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import IO, Any

import torch
from torch import nn

from compressm_core import CheckpointError
from compressm_core.files import READ_ERRORS, atomic_write, unreadable

from .adapters import (
    _COMPILED_PREFIX,
    LayerAdapter,
    _iter_layers,
    resize_layers,
    state_sizes,
)
from .controller import CompreSSM

__all__ = ["load_checkpoint", "save_checkpoint"]

FORMAT = "compressm.torch/1"

PathLike = str | os.PathLike[str] | IO[bytes]

_ENTRIES = ("format", "state_sizes", "model", "optimizer", "controller", "lr_scheduler", "extra")


def _plain_key(key: str) -> str:
    """A state-dict key without the ``_orig_mod.`` segments that ``torch.compile`` adds."""
    return key.replace(_COMPILED_PREFIX, "")


def _plain_state_dict(model: nn.Module) -> dict[str, Any]:
    return {_plain_key(k): v for k, v in model.state_dict().items()}


def _to_model_keys(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """Rename plain keys to ``model``'s own (compiled or not); unknown keys pass through, so
    ``load_state_dict`` reports them."""
    own = {_plain_key(k): k for k in model.state_dict()}
    return {own.get(_plain_key(k), k): v for k, v in state.items()}


def _describe(f: PathLike) -> str:
    """How error messages name ``f``: its path, or the name of an open file."""
    if isinstance(f, (str, os.PathLike)):
        return os.fspath(f)
    name = getattr(f, "name", None)
    return name if isinstance(name, str) else f"the file object {type(f).__name__}"


def save_checkpoint(
    f: PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    lr_scheduler: Any = None,
    controller: CompreSSM | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write model, optimizer, controller and scheduler state with the layers' state sizes.

    Parameters
    ----------
    f : path or binary file
        Destination (``torch.save``). A path is written atomically: the checkpoint goes to a
        temporary file in the same folder, which replaces ``f`` once it is complete, so a crash
        or kill during the save leaves the previous file at ``f`` intact.
    model : torch.nn.Module
        The (possibly reduced) model.
    optimizer, lr_scheduler, controller : optional
        Saved with ``state_dict()`` when given.
    extra : dict, optional
        Anything else to keep (epoch, data-loader state, ...), returned by
        :func:`load_checkpoint`.

    Notes
    -----
    Parameter names are stored without the ``_orig_mod.`` segments of ``torch.compile``, so a
    checkpoint of a compiled model loads into an uncompiled one and the other way round.
    """
    ckpt = {
        "format": FORMAT,
        "state_sizes": state_sizes(model),
        "model": _plain_state_dict(model),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "controller": None if controller is None else controller.state_dict(),
        "lr_scheduler": None if lr_scheduler is None else lr_scheduler.state_dict(),
        "extra": extra or {},
    }
    if isinstance(f, (str, os.PathLike)):
        with atomic_write(f) as out:
            torch.save(ckpt, out)
    else:
        torch.save(ckpt, f)


def load_checkpoint(
    f: PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    lr_scheduler: Any = None,
    controller: CompreSSM | None = None,
    map_location: Any = None,
) -> dict[str, Any]:
    """Restore :func:`save_checkpoint` into a freshly built (full-size) model.

    The layers are first resized to the recorded state sizes (:func:`resize_layers`, keeping
    the Parameter objects, so an optimizer built on the fresh model stays valid), then the model,
    optimizer, controller and scheduler states are loaded.

    The whole file is checked before anything is changed: its format, its entries, that the
    recorded state sizes are those of the stored tensors, and that every stored tensor has the
    shape of the model resized to them. If anything fails, even while loading the optimizer,
    controller or scheduler state, ``model``, ``optimizer``, ``controller`` and ``lr_scheduler``
    are left as they were.

    Returns
    -------
    dict
        The ``extra`` dictionary given to :func:`save_checkpoint`.

    Raises
    ------
    compressm_core.CheckpointError
        (a ``ValueError``) If ``f`` cannot be read (truncated, corrupt, not a file of
        ``torch.save``), is not a compressm checkpoint, does not fit ``model``, or a state needed
        for an argument is missing. The message names ``f``.
    """
    name = _describe(f)
    ckpt = _read(f, name, map_location)
    sizes = _checked_sizes(name, ckpt, model)
    _check_shapes(name, ckpt["model"], model, sizes)
    for entry, obj in (
        ("optimizer", optimizer),
        ("controller", controller),
        ("lr_scheduler", lr_scheduler),
    ):
        if obj is not None and not isinstance(ckpt[entry], Mapping):
            msg = (
                f"{name}: the checkpoint holds no `{entry}` state, but one was passed to restore."
            )
            raise CheckpointError(msg)
    if not isinstance(ckpt["extra"], Mapping):
        msg = f"{name}: the entry `extra` must be a dict; found {type(ckpt['extra']).__name__}."
        raise CheckpointError(msg)
    undo = _Undo(model, optimizer, lr_scheduler, controller)
    step = "model"
    try:
        resize_layers(model, sizes)
        model.load_state_dict(_to_model_keys(model, ckpt["model"]))
        for step, obj in (
            ("optimizer", optimizer),
            ("controller", controller),
            ("lr_scheduler", lr_scheduler),
        ):
            if obj is not None:
                obj.load_state_dict(ckpt[step])
    except BaseException as err:
        undo()
        if not isinstance(err, Exception):
            raise
        msg = f"{name}: the `{step}` state does not load ({type(err).__name__}: {err})."
        raise CheckpointError(msg) from err
    return dict(ckpt["extra"])


def _read(f: PathLike, name: str, map_location: Any) -> dict[str, Any]:
    """The dictionary in ``f``, with the entries of :func:`save_checkpoint`."""
    try:
        ckpt = torch.load(f, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except READ_ERRORS as err:
        raise unreadable(name, err, "checkpoint of torch.save") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        msg = f"{name}: `f` is not a compressm checkpoint (expected format {FORMAT!r})."
        raise CheckpointError(msg)
    missing = [entry for entry in _ENTRIES if entry not in ckpt]
    if missing:
        msg = f"{name}: the checkpoint lacks the entries {missing}."
        raise CheckpointError(msg)
    if not isinstance(ckpt["model"], Mapping) or not all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in ckpt["model"].items()
    ):
        msg = f"{name}: the entry `model` must map parameter names to tensors."
        raise CheckpointError(msg)
    ckpt["model"] = {_plain_key(k): v for k, v in ckpt["model"].items()}
    return ckpt


def _checked_sizes(name: str, ckpt: Mapping[str, Any], model: nn.Module) -> dict[str, int]:
    """The recorded ``state_sizes``, checked against ``model``'s layers and the stored tensors.

    A size must be that of the layer's tensors in the file, so no size read from the file can
    make :func:`resize_layers` allocate more than the file holds.
    """
    recorded = ckpt["state_sizes"]
    if not isinstance(recorded, Mapping):
        msg = f"{name}: the entry `state_sizes` must be a dict; found {type(recorded).__name__}."
        raise CheckpointError(msg)
    layers = {layer_name: (layer, adapter) for layer_name, layer, adapter in _iter_layers(model)}
    unknown = sorted(str(k) for k in set(recorded) - set(layers))
    if unknown:
        msg = (
            f"{name}: the checkpoint records layers that `model` does not have: {unknown}; "
            f"the model's are {sorted(layers)}."
        )
        raise CheckpointError(msg)
    sizes: dict[str, int] = {}
    for layer_name, size in recorded.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            msg = f"{name}: `state_sizes[{layer_name!r}]` must be a positive int; found {size!r}."
            raise CheckpointError(msg)
        layer, adapter = layers[layer_name]
        prefix = f"{layer_name}." if layer_name else ""
        stored = adapter.incoming_size(layer, ckpt["model"], prefix)
        if stored is None:
            msg = (
                f"{name}: the checkpoint does not fit `model`: it holds no state tensors of "
                f"{type(layer).__name__} {layer_name!r} (a checkpoint of another layer type?)."
            )
            raise CheckpointError(msg)
        if stored != size:
            msg = (
                f"{name}: `state_sizes[{layer_name!r}]` is {size}, but the stored tensors of "
                f"that layer have {stored} states; the file is corrupt or does not fit "
                f"`model` ({type(layer).__name__})."
            )
            raise CheckpointError(msg)
        sizes[layer_name] = size
    return sizes


def _check_shapes(
    name: str, stored: Mapping[str, torch.Tensor], model: nn.Module, sizes: Mapping[str, int]
) -> None:
    """Every stored tensor has the shape of ``model`` resized to ``sizes`` (computed, the model
    is not touched), and the keys match."""
    expected = {k: tuple(v.shape) for k, v in _plain_state_dict(model).items()}
    for layer_name, layer, adapter in _iter_layers(model):
        if layer_name not in sizes:
            continue
        size, prefix = sizes[layer_name], f"{layer_name}." if layer_name else ""
        if isinstance(adapter, LayerAdapter):
            changes = {p: (axis, size) for p, axis in adapter.state_axes.items()}
        else:
            first = torch.arange(size).expand(adapter.groups(layer) or 1, size)
            changes = {
                p: (axis, int(pos.numel()))
                for p, (axis, pos) in adapter.positions(layer, first).items()
            }
        for pname, (axis, length) in changes.items():
            shape = list(expected[prefix + pname])
            shape[axis] = length
            expected[prefix + pname] = tuple(shape)
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        msg = (
            f"{name}: the checkpoint does not fit `model` ({type(model).__name__}): "
            f"missing {missing[:8]}, unexpected {unexpected[:8]}"
            f"{' (and more)' if len(missing) > 8 or len(unexpected) > 8 else ''}."
        )
        raise CheckpointError(msg)
    wrong = [k for k, shape in expected.items() if tuple(stored[k].shape) != shape]
    if wrong:
        details = ", ".join(
            f"{k}: expected {list(expected[k])}, found {list(stored[k].shape)}" for k in wrong[:4]
        )
        msg = (
            f"{name}: the checkpoint does not fit `model` ({type(model).__name__}); "
            f"{len(wrong)} tensor(s) have other shapes ({details})."
        )
        raise CheckpointError(msg)


class _Undo:
    """A copy of the model's sizes, tensors and gradients and of the optimizer, scheduler and
    controller states; calling it puts them back (after a failed load)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        lr_scheduler: Any,
        controller: CompreSSM | None,
    ) -> None:
        self.model = model
        self.sizes = state_sizes(model)
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.grads = [(p, p.grad) for p in model.parameters()]
        self.others = [
            (obj, copy.deepcopy(obj.state_dict()))
            for obj in (optimizer, lr_scheduler, controller)
            if obj is not None
        ]
        self.previous = None if controller is None else (controller, controller._previous)

    def __call__(self) -> None:
        resize_layers(self.model, self.sizes)
        self.model.load_state_dict(self.state)
        for param, grad in self.grads:
            param.grad = grad
        for obj, state in self.others:
            obj.load_state_dict(state)
        if self.previous is not None:
            controller, previous = self.previous
            controller._previous = previous
