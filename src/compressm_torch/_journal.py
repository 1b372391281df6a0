"""What an event or a pragmatic rollback needs to put a training run back as it was.

:func:`snapshot_training` / :func:`restore_training` copy and bring back everything (model,
optimizer, learning-rate scheduler, shadow models): the pragmatic mode's rollback.
:func:`journal_layers` records only what one reduction event may change (the parameters of its
layers, their gradients, sizes and optimizer state) and returns the function that undoes it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ._params import assign
from .adapters import SelectiveAdapter, get_adapter, resize_layers, state_sizes

__all__ = ["journal_layers", "restore_training", "snapshot_training"]


def _copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def snapshot_training(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    lr_scheduler: Any,
    extra_models: Sequence[nn.Module],
) -> dict[str, Any]:
    """Copies of the state sizes and state dicts of everything a reduction changes."""
    return {
        "sizes": state_sizes(model),
        "model": _copy(model),
        "optimizer": None if optimizer is None else copy.deepcopy(optimizer.state_dict()),
        "lr_scheduler": None if lr_scheduler is None else copy.deepcopy(lr_scheduler.state_dict()),
        "extra_models": [(state_sizes(m), _copy(m)) for m in extra_models],
    }


def restore_training(
    snap: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    lr_scheduler: Any,
    extra_models: Sequence[nn.Module],
    *,
    exact: bool = False,
) -> None:
    """Bring back a :func:`snapshot_training`; without ``exact`` the optimizer's
    hyper-parameters (the learning rates a scheduler set since) stay where training is."""
    resize_layers(model, snap["sizes"])
    model.load_state_dict(snap["model"])
    for shadow, (sizes, state) in zip(extra_models, snap["extra_models"], strict=True):
        resize_layers(shadow, sizes)
        shadow.load_state_dict(state)
    if optimizer is not None:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_state_dict(snap["optimizer"])
        if not exact:
            for group, hyper in zip(optimizer.param_groups, groups, strict=True):
                group.update(hyper)
    if exact and lr_scheduler is not None and snap.get("lr_scheduler") is not None:
        lr_scheduler.load_state_dict(snap["lr_scheduler"])


def journal_layers(
    layers: Iterable[nn.Module],
    optimizer: torch.optim.Optimizer | None,
    state_size: Callable[[nn.Module], int],
) -> Callable[[], None]:
    """Record the parameters, gradients, state sizes and optimizer state of ``layers``; the
    returned function puts them back (an event's undo).

    Values are replaced by the reduction (``.data``), never changed in place, so aliases are
    enough: nothing is copied.
    """
    layers = list(layers)
    params = list({id(p): p for layer in layers for p in layer.parameters()}.values())
    values = [(p, p.detach(), p.grad) for p in params]
    states = {}
    if optimizer is not None:
        states = {p: dict(optimizer.state[p]) for p in params if p in optimizer.state}
    sizes = [(layer, state_size(layer)) for layer in layers]

    @torch.no_grad()
    def undo() -> None:
        for param, value, grad in values:
            assign(param, value)
            param.grad = grad
        for layer, size in sizes:
            adapter = get_adapter(layer)
            if isinstance(adapter, SelectiveAdapter):
                adapter.on_resize(layer, size)
            elif adapter.on_resize is not None:
                adapter.on_resize(layer)
        if optimizer is not None:
            for param in params:
                if param in states:
                    optimizer.state[param] = states[param]
                else:
                    optimizer.state.pop(param, None)

    return undo
