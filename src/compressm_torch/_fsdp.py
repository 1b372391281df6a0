"""Reductions of layers whose parameters FSDP2 (``torch.distributed.fsdp.fully_shard``) shards.

Under FSDP2 a module's parameters are ``DTensor`` s sharded on dim 0 (each rank holds a slice)
and ``fully_shard`` keeps one ``FSDPParam`` per parameter (padded local shard, sizes, all-gather
buffers) in the ``FSDPParamGroup`` of the enclosing ``fully_shard`` call. A reduction event then
runs in three parts:

1. :func:`gather` replaces every sharded parameter of the reduced layers by a plain parameter
   holding the full tensor (``DTensor.full_tensor``, an all-gather issued in the same order on
   every rank), and gives it the full optimizer state. Every rank now holds the same full
   layers, so the unchanged event code (HSVs, rank, plan, write-back, optimizer slicing)
   computes the same decision and values on every rank, as under DDP.
2. :func:`reshard` turns each changed full parameter back into a sharded one on the same mesh
   and placement: a new ``FSDPParam`` is built from it (the constructor ``fully_shard`` itself
   uses), replaces the old one in its group, and its sharded ``DTensor`` is swapped into the
   original Parameter object (``torch.utils.swap_tensors``), so the optimizer's param_groups
   and every other reference stay valid. The optimizer state is re-sharded like the parameter
   (``distribute_tensor`` without communication: each rank keeps its slice of the full state
   it already holds). Unchanged parameters get their original sharded parameter back.
3. :func:`release` (an event that raised, or a read-only look) puts the original sharded
   parameters and their optimizer state back untouched.

``FSDPParam`` and ``FSDPParamGroup`` are internals of PyTorch (checked with 2.13); this module
is the only place that touches them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "GatheredParameter",
    "check_supported",
    "fsdp_modules",
    "gather",
    "is_fully_sharded",
    "release",
    "reshard",
]


def _fsdp_module_type() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 or no torch.distributed
        return None
    return FSDPModule


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` was applied to (empty without FSDP2)."""
    kind = _fsdp_module_type()
    if kind is None:
        return []
    return [m for m in model.modules() if isinstance(m, kind)]


def is_fully_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) was applied to ``model`` or one of its submodules."""
    return bool(fsdp_modules(model))


def check_supported(model: nn.Module, *, pragmatic: bool, shadows: Iterable[nn.Module]) -> bool:
    """Whether ``model`` is sharded by FSDP2, after refusing what the controller does not
    support there.

    Raises
    ------
    NotImplementedError
        ``pragmatic`` mode (its rollback reloads a full ``state_dict``) or shadow models
        (``extra_models``) with a model sharded by ``fully_shard``.
    """
    if not is_fully_sharded(model):
        return False
    unsupported = {
        "mode='pragmatic' (its rollback reloads a full state_dict)": pragmatic,
        "extra_models": bool(list(shadows)),
    }
    for what, used in unsupported.items():
        if used:
            msg = (
                f"{what} is not supported for a model sharded by fully_shard (FSDP2); "
                "received a model with fully_shard modules."
            )
            raise NotImplementedError(msg)
    return True


@dataclass(eq=False)
class GatheredParameter:
    """One FSDP2 parameter of a reduced layer, gathered for a reduction event.

    Attributes
    ----------
    sharded : torch.nn.Parameter
        The original sharded parameter (a ``DTensor``; the optimizer's key).
    full : torch.nn.Parameter
        The plain parameter with the full tensor, in the module during the event.
    before : torch.Tensor
        A copy of the full tensor at the start of the event (to tell whether it changed).
    group : Any
        The ``FSDPParamGroup`` that holds the parameter.
    index : int
        Position of its ``FSDPParam`` in ``group.fsdp_params``.
    """

    sharded: nn.Parameter
    full: nn.Parameter
    before: torch.Tensor
    group: Any
    index: int


def _param_groups(model: nn.Module) -> dict[int, tuple[Any, int]]:
    """``id(sharded parameter) -> (FSDPParamGroup, index)`` for every FSDP2 parameter.

    Groups left unsharded (the root with ``reshard_after_forward=False`` after an evaluation
    forward pass, say) are resharded first (``FSDPModule.reshard``, no communication), so that
    every module holds its sharded parameters.
    """
    found: dict[int, tuple[Any, int]] = {}
    for module in fsdp_modules(model):
        group = module._get_fsdp_state()._fsdp_param_group  # type: ignore[operator]
        if group is None:
            continue
        if not group.is_sharded:
            module.reshard()  # type: ignore[operator]
        for index, fsdp_param in enumerate(group.fsdp_params):
            found[id(fsdp_param.sharded_param)] = (group, index)
    return found


def _set_on_modules(fsdp_param: Any, param: nn.Parameter) -> None:
    """Register ``param`` where ``fsdp_param``'s parameter lives (tied modules included)."""
    info = fsdp_param._module_info
    modules = (info.module, *info.shared_modules)
    names = (info.param_name, *info.shared_param_names)
    for module, name in zip(modules, names, strict=True):
        module._parameters[name] = param


def _full(value: Any) -> Any:
    """An optimizer-state entry in full: a ``DTensor`` gathered, a tensor copied (Adam steps
    its ``step`` count in place), anything else as it is."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor()
    return value.clone() if torch.is_tensor(value) else value


@torch.no_grad()
def gather(
    model: nn.Module, layers: Iterable[nn.Module], optimizer: torch.optim.Optimizer | None
) -> list[GatheredParameter]:
    """Put the full tensor of every FSDP2 parameter of ``layers`` in place of its shard.

    A collective: every rank must call it with the same layers. The optimizer state of each
    parameter is gathered too (under the full parameter's key; the sharded state stays).

    Returns
    -------
    list of GatheredParameter
        What :func:`reshard` or :func:`release` needs (empty if no parameter is sharded).

    Raises
    ------
    NotImplementedError
        A layer parameter that is a ``DTensor`` outside FSDP2's bookkeeping, that was a
        ``DTensor`` before ``fully_shard`` (tensor parallelism), or that is offloaded to the
        CPU (``CPUOffloadPolicy``).
    """
    from torch.distributed.tensor import DTensor

    groups = _param_groups(model)
    gathered: list[GatheredParameter] = []
    seen: set[int] = set()
    try:
        for layer in layers:
            for name, param in layer.named_parameters():
                if not isinstance(param, DTensor) or id(param) in seen:
                    continue
                seen.add(id(param))
                if id(param) not in groups:
                    msg = (
                        f"Parameter {name!r} of {type(layer).__name__} is a DTensor that "
                        "fully_shard does not manage; only FSDP2 sharding (fully_shard on a "
                        "1-D or HSDP mesh) is supported."
                    )
                    raise NotImplementedError(msg)
                group, index = groups[id(param)]
                fsdp_param = group.fsdp_params[index]
                if fsdp_param.is_dtensor or fsdp_param.offload_to_cpu:
                    msg = (
                        f"Parameter {name!r} of {type(layer).__name__} must be sharded by "
                        "fully_shard alone; received one that was a DTensor before fully_shard "
                        "(tensor parallelism) or is offloaded to the CPU (CPUOffloadPolicy), "
                        "whose reduction is not supported."
                    )
                    raise NotImplementedError(msg)
                full = nn.Parameter(param.full_tensor(), requires_grad=param.requires_grad)
                entry = GatheredParameter(param, full, full.detach().clone(), group, index)
                gathered.append(entry)
                _set_on_modules(fsdp_param, full)
                if optimizer is not None and param in optimizer.state:
                    state = optimizer.state[param]
                    optimizer.state[full] = {k: _full(state[k]) for k in sorted(state)}
    except BaseException:
        release(gathered, optimizer)
        raise
    return gathered


@torch.no_grad()
def release(
    gathered: Iterable[GatheredParameter], optimizer: torch.optim.Optimizer | None
) -> None:
    """Put the original sharded parameters back in place of the gathered full ones."""
    for entry in gathered:
        _set_on_modules(entry.group.fsdp_params[entry.index], entry.sharded)
        if optimizer is not None:
            optimizer.state.pop(entry.full, None)


def _shard_like(value: Any, param: Any) -> Any:
    """The full optimizer-state tensor ``value`` sharded like the DTensor ``param`` (each rank
    keeps its own slice; no communication)."""
    from torch.distributed.tensor import distribute_tensor

    if not torch.is_tensor(value) or value.ndim == 0:
        return value
    if tuple(value.shape) != tuple(param.shape):
        msg = (
            f"An optimizer state tensor must have its parameter's shape {tuple(param.shape)} "
            f"after a reduction; received {tuple(value.shape)}."
        )
        raise ValueError(msg)
    return distribute_tensor(
        value.contiguous(), param.device_mesh, param.placements, src_data_rank=None
    )


def _swap_values(param: nn.Parameter, other: nn.Parameter) -> None:
    """Exchange the tensors of ``param`` and ``other`` but not their Python attributes (what a
    user set on ``param`` stays there); its own inverse."""
    torch.utils.swap_tensors(param, other)  # type: ignore[no-untyped-call]
    param.__dict__, other.__dict__ = other.__dict__, param.__dict__


def _rebuild(entry: GatheredParameter) -> Any:
    """A new ``FSDPParam`` that shards ``entry.full`` like the old one sharded its tensor."""
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    group = entry.group
    old = group.fsdp_params[entry.index]
    value = nn.Parameter(entry.full.detach().contiguous(), requires_grad=entry.full.requires_grad)
    value._fsdp_orig_uid = old._orig_param_uid  # type: ignore[attr-defined]
    placement = old.fsdp_placement
    new = FSDPParam(
        value,
        old._module_info,
        old.mesh_info,
        old.post_forward_mesh_info,
        old.device,
        lambda _: placement,
        old.mp_policy,
        group.offload_policy,
    )
    new.init_dtype_attrs(group.mp_policy)
    new._param_fqn = old._param_fqn
    return new


@torch.no_grad()
def reshard(
    gathered: list[GatheredParameter], optimizer: torch.optim.Optimizer | None
) -> Callable[[], None]:
    """Shard the new full values of the gathered parameters back into FSDP2.

    Each changed parameter (new shape or new values) gets a new ``FSDPParam`` in its group; its
    sharded ``DTensor`` is swapped into the original Parameter object, and its optimizer state
    (already resized by the event) is sharded the same way. Unchanged parameters get their
    original sharded parameter back. No communication.

    Returns
    -------
    callable
        Undoes the re-sharding (for the event's transaction); :func:`release` then puts the
        original sharded parameters back.
    """
    changed = [
        e
        for e in gathered
        if e.full.shape != e.before.shape or not torch.equal(e.full.detach(), e.before)
    ]
    # build everything first: nothing changes for the model or the optimizer until then
    rebuilt: list[tuple[GatheredParameter, Any, Any]] = []
    done: list[tuple[GatheredParameter, Any, Any, nn.Parameter, Any]] = []

    @torch.no_grad()
    def undo() -> None:
        for _, new, _ in rebuilt:  # the constructor registered a load_state_dict hook
            new._post_load_hook_handle.remove()
        while done:
            entry, old, new, other, old_state = done.pop()
            _swap_values(entry.sharded, other)  # the old shard back
            old._post_load_hook_handle.remove()  # re-registered once (removal is idempotent)
            old._post_load_hook_handle = (
                old._module_info.module.register_load_state_dict_post_hook(
                    lambda *args, _old=old, **kwargs: _old.reset_sharded_param()
                )
            )
            entry.group.fsdp_params[entry.index] = old
            _set_on_modules(old, entry.sharded)
            if optimizer is not None:
                optimizer.state.pop(entry.sharded, None)
                if old_state is not None:
                    optimizer.state[entry.sharded] = old_state

    try:
        for entry in changed:
            new = _rebuild(entry)
            rebuilt.append((entry, new, None))
            if optimizer is not None and entry.full in optimizer.state:
                full_state = optimizer.state[entry.full]
                state = {k: _shard_like(v, new.sharded_param) for k, v in full_state.items()}
                rebuilt[-1] = (entry, new, state)
        for entry, new, state in rebuilt:
            old = entry.group.fsdp_params[entry.index]
            old_state = None if optimizer is None else optimizer.state.get(entry.sharded)
            # the original Parameter object takes the new shard; the object FSDPParam made
            # (``other``) takes the old one, for the undo
            other = new.sharded_param
            _swap_values(entry.sharded, other)
            done.append((entry, old, new, other, old_state))
            new.sharded_param = entry.sharded
            old._post_load_hook_handle.remove()
            entry.group.fsdp_params[entry.index] = new
            _set_on_modules(new, entry.sharded)
            if optimizer is not None:
                optimizer.state.pop(entry.sharded, None)
                if state is not None:
                    optimizer.state[entry.sharded] = state
    except BaseException:
        undo()
        raise
    ids = {id(e) for e in changed}
    release([e for e in gathered if id(e) not in ids], optimizer)
    if optimizer is not None:
        for entry in changed:
            optimizer.state.pop(entry.full, None)
    return undo
