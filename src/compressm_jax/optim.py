"""Resize an optax state to reduced parameters: a pure function over pytrees."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["ParamChange", "resize_optimizer_state"]

KeyPath = tuple[Any, ...]


class ParamChange(NamedTuple):
    """The new value of one parameter, and how its optimizer state follows it.

    Attributes
    ----------
    value : array
        The new (reduced) value.
    axis : int
        The parameter's state axis (for ``indices``).
    indices : (r,) integer array or None
        Kept positions along ``axis`` after an index selection: the optimizer's per-parameter
        state is sliced with them (exact). ``None`` after a change of basis: it is reset to
        zeros of the new shape.
    """

    value: Any
    axis: int = 0
    indices: Any = None


def _path_key(path: KeyPath) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def resize_optimizer_state(
    params: Any, opt_state: Any, plan: Mapping[KeyPath, ParamChange]
) -> tuple[Any, Any]:
    """Apply a reduction ``plan`` to a parameter tree and to an optax state built on it.

    ``plan`` maps key paths of ``params`` (as given by ``jax.tree_util.tree_flatten_with_path``)
    to :class:`ParamChange` s. The new parameter tree has the new values at those paths. In the
    optax state, every leaf whose key path *ends with* a planned parameter's path (the longest
    such parameter path decides) and has that parameter's old shape (Adam's ``mu`` and ``nu``,
    momentum traces, ... also inside ``chain``, ``multi_transform`` and ``masked`` states) is

    - sliced with ``indices`` along ``axis`` after an index selection (exact bookkeeping), or
    - replaced by zeros of the new shape after a change of basis (old moments are meaningless in
      the new coordinates; second moments do not transform linearly).

    Every other leaf, including step counts (optax keeps one ``count`` for all parameters, so
    Adam's bias correction continues; this is ``optimizer_state="zero"`` of the PyTorch
    controller) and the states of parameters that did not change, is returned as is (the same
    array objects).

    Parameters
    ----------
    params : pytree
        The parameters before the reduction.
    opt_state : pytree
        ``optimizer.init(params)`` or a later state of the same optimizer.
    plan : mapping
        ``{key path: ParamChange}``.

    Returns
    -------
    (params, opt_state)
        New trees; the inputs are not modified.

    Raises
    ------
    KeyError
        If a planned path is not a leaf of ``params``.
    ValueError
        If a change's ``indices`` do not fit its value's shape along ``axis``.

    Examples
    --------
    >>> import jax.numpy as jnp, optax
    >>> from jax.tree_util import DictKey
    >>> params = {"ssm": {"B": jnp.ones((4, 2))}, "w": jnp.ones(3)}
    >>> opt = optax.adam(1e-3)
    >>> state = opt.init(params)
    >>> keep = jnp.array([0, 2])
    >>> plan = {(DictKey("ssm"), DictKey("B")): ParamChange(params["ssm"]["B"][keep], 0, keep)}
    >>> params, state = resize_optimizer_state(params, state, plan)
    >>> state[0].mu["ssm"]["B"].shape
    (2, 2)
    """
    leaves = {_path_key(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    changes: dict[tuple[str, ...], tuple[ParamChange, tuple[int, ...]]] = {}
    for path, change in plan.items():
        key = _path_key(tuple(path))
        if key not in leaves:
            msg = f"`plan` names {key}, which is not a leaf of `params`."
            raise KeyError(msg)
        if not isinstance(change, ParamChange):
            msg = f"`plan[{key}]` must be a ParamChange; received {type(change).__name__}."
            raise TypeError(msg)
        if change.indices is not None:
            size = int(jnp.shape(change.value)[change.axis])
            if int(jnp.size(change.indices)) != size:
                msg = (
                    f"`plan[{key}].indices` has {int(jnp.size(change.indices))} entries; the new "
                    f"value has {size} along axis {change.axis}."
                )
                raise ValueError(msg)
        changes[key] = (change, tuple(jnp.shape(leaves[key])))

    def new_param(path: KeyPath, leaf: Any) -> Any:
        found = changes.get(_path_key(path))
        return leaf if found is None else found[0].value

    by_length = sorted(leaves, key=len, reverse=True)

    def new_state(path: KeyPath, leaf: Any) -> Any:
        key = _path_key(path)
        # the parameter this leaf belongs to: the longest parameter path that ends its path
        owner = next((p for p in by_length if p and key[-len(p) :] == p), None)
        found = changes.get(owner) if owner is not None else None
        if found is None or tuple(jnp.shape(leaf)) != found[1]:
            return leaf
        change = found[0]
        if change.indices is not None:
            return jnp.take(leaf, jnp.asarray(change.indices), axis=change.axis)
        return jnp.zeros(jnp.shape(change.value), dtype=jnp.asarray(leaf).dtype)

    return (
        jax.tree_util.tree_map_with_path(new_param, params),
        jax.tree_util.tree_map_with_path(new_state, opt_state),
    )
