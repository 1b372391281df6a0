"""Optimizer state after a reduction: sliced after index selection, reset after a basis change."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch

__all__ = ["OptimizerStatePolicy", "resize_optimizer_state", "update_optimizer_state"]

OptimizerStatePolicy = Literal["reset", "zero"]
POLICIES = ("reset", "zero")


@torch.no_grad()
def resize_optimizer_state(
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

    The optimizer is changed in place (PyTorch optimizers hold their state);
    :func:`compressm_jax.resize_optimizer_state` is the pure-function twin for optax states.

    Returns
    -------
    str
        What was done: ``"sliced"``, ``"reset"``, ``"zeroed"``, ``"dropped"`` or ``"none"``.

    Examples
    --------
    >>> import torch
    >>> from compressm_torch import resize_optimizer_state
    >>> p = torch.nn.Parameter(torch.ones(4, 2))
    >>> opt = torch.optim.Adam([p])
    >>> p.sum().backward(); opt.step()
    >>> with torch.no_grad():
    ...     p.data = p.data[[0, 2]]
    >>> resize_optimizer_state(opt, p, (4, 2), axis=0, indices=torch.tensor([0, 2]))
    'sliced'
    >>> tuple(opt.state[p]["exp_avg"].shape)
    (2, 2)
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


@functools.wraps(resize_optimizer_state, assigned=())
def update_optimizer_state(*args: Any, **kwargs: Any) -> str:
    """Deprecated name of :func:`resize_optimizer_state` (the name both frameworks share); same
    arguments."""
    warnings.warn(
        "`update_optimizer_state` is deprecated; use `resize_optimizer_state`.",
        DeprecationWarning,
        stacklevel=2,
    )
    return resize_optimizer_state(*args, **kwargs)
