"""Reduce one NNX layer: read its system, plan (:mod:`compressm_core.reduction`), write."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from compressm_core import DiagonalStateSpace, StabilityError, h_infinity_norm
from compressm_core.reduction import (
    LayerReduction,
    check_reduction,
    layer_hsv,
    plan_reduction,
    reduction_report,
)
from compressm_core.training import Selection

from ._systems import host_system
from .adapters import LayerAdapter, get_adapter

__all__ = ["LayerReduction", "Selection", "reduce_layer"]


def _check_arguments(
    rank: int | None, tau: float | None, selection: str, real_output: bool, key: object
) -> None:
    """Validate what does not depend on the layer (before anything is computed)."""
    check_reduction(rank, tau, selection, real_output)
    if selection == "random" and key is None:
        msg = "`selection='random'` needs a `key` (a jax.random key) to draw the kept states."
        raise TypeError(msg)


@dataclass(frozen=True)
class _Plan:
    """New parameter values of a reduction, computed on the host and not yet written."""

    values: dict[str, np.ndarray]
    hsv: np.ndarray
    bound: float
    indices: np.ndarray | None


def _plan_reduction(
    sys: DiagonalStateSpace,
    rank: int | None,
    *,
    tau: float | None,
    energy: Literal["sum", "squared"],
    method: Literal["sqrt", "bfsr"],
    selection: str,
    real_output: bool,
    horizon: int | None,
    key: jax.Array | None,
    max_condition: float,
    from_state_space: Callable[[DiagonalStateSpace], dict[str, np.ndarray]],
    sliced: Callable[[np.ndarray], dict[str, np.ndarray]],
) -> _Plan:
    """The reduced values of a host system: HSVs, rank, then
    :func:`~compressm_core.reduction.plan_reduction`."""
    hsv, rank = layer_hsv(
        sys, rank, tau=tau, energy=energy, horizon=horizon, real_output=real_output
    )
    permutation = None
    if selection == "random":
        assert key is not None
        permutation = np.asarray(jax.random.permutation(key, int(sys.poles.shape[-1])))
    plan = plan_reduction(
        sys,
        rank,
        selection=selection,
        method=method,
        horizon=horizon,
        real_output=real_output,
        max_condition=max_condition,
        permutation=permutation,
    )
    if plan.indices is not None:
        return _Plan(sliced(plan.indices), np.asarray(hsv), plan.bound, plan.indices)
    assert plan.system is not None
    return _Plan(from_state_space(plan.system), np.asarray(hsv), plan.bound, None)


def _cast_like(name: str, value: Any, old: Any) -> jax.Array:
    """``value`` with ``old``'s dtype and placement (sharding); refuse non-finite values.

    A partitioning that the new shape does not fit (a sharded state axis that no longer
    divides the mesh) becomes replication on the same mesh.

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
    if sharding is None:
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


def reduce_layer(
    layer: nnx.Module,
    rank: int | None = None,
    *,
    tau: float | None = None,
    energy: Literal["sum", "squared"] = "sum",
    method: Literal["sqrt", "bfsr"] = "sqrt",
    selection: Selection = "largest",
    real_output: bool = False,
    horizon: int | None = None,
    compute_error: bool = False,
    key: jax.Array | None = None,
    max_condition: float = 1e8,
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
    rank, tau, energy, method, selection, real_output, horizon, compute_error : optional
        As for :func:`compressm_torch.reduce_layer`.
    key : jax.Array, optional
        Random key for ``selection="random"`` (required there).
    max_condition : float, optional
        Refuse re-diagonalisation when the eigenvector basis is worse conditioned.

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
    _check_arguments(rank, tau, selection, real_output, key)
    adapter = get_adapter(layer)
    sys = host_system(adapter.to_state_space(layer))
    plan = _plan_reduction(
        sys,
        rank,
        tau=tau,
        energy=energy,
        method=method,
        selection=selection,
        real_output=real_output,
        horizon=horizon,
        key=key,
        max_condition=max_condition,
        from_state_space=lambda reduced: adapter.from_state_space(layer, reduced),
        sliced=lambda indices: _sliced(layer, adapter, indices),
    )
    return _apply(layer, adapter, sys, plan, selection=selection, compute_error=compute_error)


def _apply(
    layer: nnx.Module,
    adapter: LayerAdapter,
    sys: DiagonalStateSpace,
    plan: _Plan,
    *,
    selection: str,
    compute_error: bool,
) -> LayerReduction:
    """Write ``plan`` into ``layer``, then measure the error if asked; if anything after the
    checks raises (the error check included), ``layer`` is restored before it propagates."""
    saved = {name: getattr(layer, name)[...] for name in plan.values}
    _write(layer, plan.values)
    try:
        if adapter.on_resize is not None:
            adapter.on_resize(layer)
        hinf = None
        if compute_error:
            after = host_system(adapter.to_state_space(layer))
            hinf = float(np.max(h_infinity_norm(sys, after, real_output=adapter.real_output)))
    except BaseException:
        for name, value in saved.items():
            getattr(layer, name).set_value(value)
        if adapter.on_resize is not None:
            adapter.on_resize(layer)
        raise
    return reduction_report(
        old_rank=int(sys.poles.shape[-1]),
        new_rank=adapter.state_size(layer),
        hsv=plan.hsv,
        bound=plan.bound,
        hinf_error=hinf,
        selection=selection,
        indices=plan.indices,
        changed=plan.values,
        state_axes=adapter.state_axes,
    )


def _sliced(
    layer: nnx.Module, adapter: LayerAdapter, indices: np.ndarray
) -> dict[str, np.ndarray]:
    return {
        name: np.take(np.asarray(getattr(layer, name)[...]), indices, axis=axis)
        for name, axis in adapter.state_axes.items()
    }


def _write(layer: nnx.Module, values: Mapping[str, Any]) -> None:
    """Cast and check every new value, then assign all of them (all or nothing)."""
    staged = {
        name: _cast_like(name, value, getattr(layer, name)[...]) for name, value in values.items()
    }
    for name, new in staged.items():
        getattr(layer, name).set_value(new)
