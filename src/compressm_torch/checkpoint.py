"""Checkpoints that record per-layer state sizes, so reduced models reload into fresh ones."""

from __future__ import annotations

import os
from typing import IO, Any

import torch
from torch import nn

from .adapters import _COMPILED_PREFIX, resize_layers, state_sizes
from .controller import CompreSSM

__all__ = ["load_checkpoint", "save_checkpoint"]

FORMAT = "compressm.torch/1"

PathLike = str | os.PathLike[str] | IO[bytes]


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
        Destination (``torch.save``).
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
    torch.save(
        {
            "format": FORMAT,
            "state_sizes": state_sizes(model),
            "model": _plain_state_dict(model),
            "optimizer": None if optimizer is None else optimizer.state_dict(),
            "controller": None if controller is None else controller.state_dict(),
            "lr_scheduler": None if lr_scheduler is None else lr_scheduler.state_dict(),
            "extra": extra or {},
        },
        f,
    )


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

    Returns
    -------
    dict
        The ``extra`` dictionary given to :func:`save_checkpoint`.

    Raises
    ------
    ValueError
        If ``f`` is not a compressm checkpoint, or a state needed for an argument is missing.
    """
    ckpt = torch.load(f, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        msg = f"`f` is not a compressm checkpoint (expected format {FORMAT!r})."
        raise ValueError(msg)
    resize_layers(model, ckpt["state_sizes"])
    model.load_state_dict(_to_model_keys(model, ckpt["model"]))
    for name, obj in (
        ("optimizer", optimizer),
        ("controller", controller),
        ("lr_scheduler", lr_scheduler),
    ):
        if obj is None:
            continue
        if ckpt[name] is None:
            msg = f"The checkpoint holds no `{name}` state, but one was passed to restore."
            raise ValueError(msg)
        obj.load_state_dict(ckpt[name])
    return dict(ckpt["extra"])
