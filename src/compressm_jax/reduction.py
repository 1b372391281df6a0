"""Reduce one NNX layer: read its system, plan (:mod:`compressm_core.reduction`), write."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from compressm_core import DiagonalStateSpace, StabilityError, h_infinity_norm
from compressm_core.layer_writes import LayerPlan, layer_plan, write_plan
from compressm_core.reduction import LayerReduction, ReduceArguments, ReduceKeywords
from compressm_core.training import Selection, signature_with

from ._systems import host_system
from .adapters import LayerAdapter, get_adapter

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["LayerReduction", "Selection", "reduce_layer"]


def _arguments(
    keywords: Mapping[str, Any], rank: int | None, key: object, *, owner: str
) -> ReduceArguments:
    """The checked arguments (before anything is computed); ``selection="random"`` needs
    ``key``."""
    arguments = ReduceArguments.from_keywords(keywords, rank, owner=owner)
    if arguments.selection == "random" and key is None:
        msg = "`selection='random'` needs a `key` (a jax.random key) to draw the kept states."
        raise TypeError(msg)
    return arguments


def _plan(
    sys: DiagonalStateSpace,
    rank: int | None,
    arguments: ReduceArguments,
    key: jax.Array | None,
    *,
    from_state_space: Callable[[DiagonalStateSpace], dict[str, np.ndarray]],
    sliced: Callable[[np.ndarray], dict[str, np.ndarray]],
) -> LayerPlan:
    """The reduced values of a host system: HSVs, rank, then
    :func:`~compressm_core.reduction.plan_reduction`."""
    hsv, rank = arguments.layer_hsv(sys, rank)

    def permute(n: int) -> np.ndarray:
        assert key is not None
        return np.asarray(jax.random.permutation(key, n))

    return layer_plan(
        arguments.plan(sys, rank, permute),
        hsv,
        from_state_space=from_state_space,
        sliced=sliced,
        host=np.asarray,
    )


def _cast_like(name: str, value: Any, old: Any) -> jax.Array:
    """``value`` with ``old``'s dtype and placement (sharding); refuse non-finite values.

    A partitioning that the new shape does not fit (a sharded state axis that no longer
    divides the mesh) becomes replication on the same mesh. An uncommitted ``old`` (placed on
    the default device by JAX, not by the user) gives an uncommitted result: ``jax.jit``
    compiles again for every change of commitment among its arguments, so a committed
    parameter among uncommitted ones would cost a second compilation after the event.

    Raises
    ------
    StabilityError
        If the value is not finite in ``old``'s dtype.
    """
    dtype = old.dtype if hasattr(old, "dtype") else np.asarray(old).dtype
    cast = np.asarray(value).astype(dtype)
    if not np.all(np.isfinite(cast.astype(np.complex128))):
        msg = f"The reduced value of `{name}` is not finite; the layer is left unchanged."
        raise StabilityError(msg)
    new = jnp.asarray(cast)
    sharding = getattr(old, "sharding", None)
    if sharding is None or not getattr(old, "committed", True):
        return new
    placed: jax.Array
    try:  # the old placement: same devices, same partitioning
        placed = jax.device_put(new, sharding)
    except ValueError:  # the new shape does not fit the partitioning: replicate on its mesh
        if not isinstance(sharding, NamedSharding):
            return new
        replicated = NamedSharding(sharding.mesh, PartitionSpec())  # type: ignore[no-untyped-call]
        placed = jax.device_put(new, replicated)
    return placed


@signature_with(ReduceArguments.parameters())
def reduce_layer(
    layer: nnx.Module,
    rank: int | None = None,
    *,
    key: jax.Array | None = None,
    **keywords: Unpack[ReduceKeywords],
) -> LayerReduction:
    """Reduce the state of an NNX ``layer`` in place to ``rank`` states.

    The same reduction, arguments and report as :func:`compressm_torch.reduce_layer` (the plan
    is :func:`compressm_core.reduction.plan_reduction`), with a JAX random ``key`` in place of
    the torch generator. The computation runs on the host in float64 (NumPy), whatever
    ``jax_enable_x64`` says, and matches the torch function on the same weights. The new values
    are cast to the parameters' dtypes and checked before anything is written; on failure the
    layer is left as it was. Each :class:`flax.nnx.Param` keeps its identity and gets a new
    array of the new shape; optimizer state built for the old shapes must be rebuilt
    (:func:`resize_optimizer_state`).

    Parameters
    ----------
    layer : flax.nnx.Module
        A layer with a registered adapter (:class:`LRU`, :class:`S5`, :class:`S4D`, or your
        own).
    rank : int, optional
        As for :func:`compressm_torch.reduce_layer`.
    key : jax.Array, optional
        Random key for ``selection="random"`` (required there).
    **keywords
        ``tau``, ``energy``, ``method``, ``selection``, ``real_output``, ``horizon``,
        ``compute_error``, ``max_condition``: as for :func:`compressm_torch.reduce_layer`.

    Returns
    -------
    LayerReduction
        Ranks, HSVs, bound, measured error and what changed.

    Raises
    ------
    TypeError
        No adapter for ``layer``; neither or both of ``rank`` and ``tau``; no ``key`` for
        ``selection="random"``.
    ValueError, StabilityError, ConditioningError
        As for :func:`compressm_torch.reduce_layer`; the layer is unchanged.

    Examples
    --------
    >>> from flax import nnx
    >>> from compressm_jax import LRU, reduce_layer
    >>> layer = LRU(d_model=4, d_state=32, rngs=nnx.Rngs(0))
    >>> report = reduce_layer(layer, 8)
    >>> layer.d_state, report.old_rank, report.error_bound > 0
    (8, 32, True)
    """
    arguments = _arguments(keywords, rank, key, owner="reduce_layer")
    adapter = get_adapter(layer)
    sys = host_system(adapter.to_state_space(layer))
    plan = _plan(
        sys,
        rank,
        arguments,
        key,
        from_state_space=lambda reduced: adapter.from_state_space(layer, reduced),
        sliced=lambda indices: _sliced(layer, adapter, indices),
    )
    report, _ = _apply(
        layer,
        adapter,
        sys,
        plan,
        selection=arguments.selection,
        compute_error=arguments.compute_error,
    )
    return report


def _apply(
    layer: nnx.Module,
    adapter: LayerAdapter,
    sys: DiagonalStateSpace,
    plan: LayerPlan,
    *,
    selection: str,
    compute_error: bool,
) -> tuple[LayerReduction, Callable[[], None]]:
    """Write ``plan`` into ``layer`` (:func:`~compressm_core.layer_writes.write_plan`): the
    report, and a function that restores the layer."""
    return write_plan(
        layer,
        adapter,
        sys,
        plan,
        _write,
        selection=selection,
        compute_error=compute_error,
        read=host_system,
        norm=h_infinity_norm,
    )


def _sliced(
    layer: nnx.Module, adapter: LayerAdapter, indices: np.ndarray
) -> dict[str, np.ndarray]:
    return {
        name: np.take(np.asarray(getattr(layer, name)[...]), indices, axis=axis)
        for name, axis in adapter.state_axes.items()
    }


def _write(layer: nnx.Module, values: Mapping[str, Any]) -> Callable[[], None]:
    """Cast and check every new value, then assign all of them (all or nothing); returns a
    function that writes the old values back."""
    staged = {
        name: _cast_like(name, value, getattr(layer, name)[...]) for name, value in values.items()
    }
    saved = {name: getattr(layer, name)[...] for name in staged}
    for name, new in staged.items():
        getattr(layer, name).set_value(new)

    def restore() -> None:
        for name, value in saved.items():
            getattr(layer, name).set_value(value)

    return restore
