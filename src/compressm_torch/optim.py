"""Optimizer state after a reduction: sliced after index selection, reset after a basis change."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

__all__ = ["OptimizerStatePolicy", "update_optimizer_state"]

OptimizerStatePolicy = Literal["reset", "zero"]
POLICIES = ("reset", "zero")


@torch.no_grad()
def update_optimizer_state(
    optimizer: torch.optim.Optimizer,
    param: torch.Tensor,
    old_shape: Sequence[int],
    *,
    axis: int,
    indices: torch.Tensor | None = None,
    policy: OptimizerStatePolicy = "reset",
) -> str:
    """Bring ``optimizer``'s per-parameter state of ``param`` to its new (reduced) shape.

    Every state tensor with the parameter's old shape (Adam's ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq``, SGD's ``momentum_buffer``, ...) is

    - sliced with ``indices`` along ``axis`` after an index selection: the kept states are the
      same coordinates, so this is exact bookkeeping;
    - replaced by zeros after a change of basis (``indices=None``): old moments are meaningless
      in the new coordinates, and second moments do not transform linearly. With
      ``policy="reset"`` (default) the parameter's ``step`` count restarts too, so Adam's bias
      correction :math:`1 / (1 - \\beta^t)` matches the age of its new moments; with
      ``"zero"`` the count is kept (the first updates are then up to
      :math:`(1 - \\beta_1) / \\sqrt{1 - \\beta_2}` times larger than Adam's usual step).

    State of every other parameter, the param_groups and their hyperparameters are untouched.
    An entry whose layout is not understood (state tensors of other shapes) is dropped, so the
    optimizer initialises it afresh at its next step.

    Returns
    -------
    str
        What was done: ``"sliced"``, ``"reset"``, ``"zeroed"``, ``"dropped"`` or ``"none"``.
    """
    state = optimizer.state.get(param)
    if not state:
        return "none"
    old = tuple(old_shape)
    new_state = {}
    for key, value in state.items():
        if not torch.is_tensor(value) or value.ndim == 0:
            new_state[key] = value
        elif tuple(value.shape) == old:
            if indices is not None:
                new_state[key] = value.index_select(axis, indices.to(value.device)).contiguous()
            else:
                new_state[key] = torch.zeros_like(param, dtype=value.dtype)
        else:
            del optimizer.state[param]
            return "dropped"
    if indices is None and policy == "reset" and "step" in new_state:
        step = new_state["step"]
        new_state["step"] = torch.zeros_like(step) if torch.is_tensor(step) else type(step)(0)
    optimizer.state[param] = new_state
    if indices is not None:
        return "sliced"
    return "reset" if policy == "reset" else "zeroed"
