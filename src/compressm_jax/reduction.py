"""Reduce one NNX layer: balanced truncation + re-diagonalisation, or index selection."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from compressm_core import (
    DiagonalStateSpace,
    StabilityError,
    StateSpace,
    balanced_realization,
    balanced_truncation,
    h_infinity_norm,
    hankel_singular_values,
    rediagonalize,
    select_rank,
)
from compressm_core.rank import shared_rank_hsv
from compressm_core.training import SELECTIONS, Selection

from ._systems import host_system
from .adapters import LayerAdapter, get_adapter

__all__ = ["LayerReduction", "Selection", "reduce_layer"]


@dataclass(frozen=True)
class LayerReduction:
    """Report of :func:`reduce_layer` and :func:`reduce_lru_params`.

    Attributes
    ----------
    old_rank, new_rank : int
        State sizes before and after.
    hsv : (n,) ndarray
        Hankel singular values before the reduction (float64, host), descending; for a layer
        made of a batch of systems (:class:`S4D`) their per-index maximum
        (:func:`compressm_core.rank.shared_rank_hsv`).
    error_bound : float
        Bound on the H-infinity norm of the change of the layer's transfer function:
        :math:`2 \\sum_{\\text{discarded}} \\sigma_i` for balanced truncation, the modal bound
        :math:`\\sum_{\\text{discarded}} \\|c_i\\| \\|b_i\\| / (1 - |\\lambda_i|)` for
        ``selection="random"``; for a batch of systems (:class:`S4D`) the largest member's bound,
        which bounds the layer's block-diagonal transfer function. Only an indicator with
        ``horizon`` set.
    hinf_error : float or None
        Measured H-infinity norm of the change of the layer's (real) output map, if asked.
    selection : str
        ``"largest"``, ``"smallest"`` or ``"random"``.
    indices : (new_rank,) ndarray or None
        Kept state indices for ``selection="random"``: the parameters were sliced with them.
        ``None`` after a change of basis.
    changed : tuple of str
        Names of the parameters whose values were replaced.
    slices : mapping
        After an index selection, ``{parameter name: (axis, kept positions)}`` for every sliced
        parameter (what slicing optimizer moments needs); empty after a change of basis.
    """

    old_rank: int
    new_rank: int
    hsv: np.ndarray
    error_bound: float
    hinf_error: float | None
    selection: str
    indices: np.ndarray | None
    changed: tuple[str, ...]
    slices: Mapping[str, tuple[int, np.ndarray]] = field(default_factory=dict)


def _check_arguments(
    rank: int | None, tau: float | None, selection: str, real_output: bool, key: object
) -> None:
    """Validate what does not depend on the layer (before anything is computed)."""
    if (rank is None) == (tau is None):
        msg = f"Give exactly one of `rank` and `tau`; received rank={rank!r}, tau={tau!r}."
        raise TypeError(msg)
    if selection not in SELECTIONS:
        msg = f"`selection` must be one of {SELECTIONS}; received {selection!r}."
        raise ValueError(msg)
    if selection == "random" and real_output:
        msg = "`selection='random'` keeps modal states; it cannot be combined with `real_output`."
        raise ValueError(msg)
    if selection == "random" and key is None:
        msg = "`selection='random'` needs a `key` (a jax.random key) to draw the kept states."
        raise TypeError(msg)


def _check_rank(rank: object, total: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= total:
        msg = f"`rank` must be an int in [1, {total}]; received {rank!r}."
        raise ValueError(msg)
    return rank


def _modal_bound(sys: DiagonalStateSpace, dropped: np.ndarray) -> float:
    """The modal bound of the dropped states, the largest over a batch of systems."""
    gain = np.linalg.norm(sys.b[..., dropped, :], axis=-1) * np.linalg.norm(
        sys.c[..., :, dropped], axis=-2
    )
    return float(np.max(np.sum(gain / (1 - np.abs(sys.poles[..., dropped])), axis=-1)))


def _balanced(
    sys: DiagonalStateSpace,
    rank: int,
    hsv: np.ndarray,
    *,
    selection: str,
    method: Literal["sqrt", "bfsr"],
    horizon: int | None,
    real_output: bool,
    max_condition: float,
) -> tuple[DiagonalStateSpace, float]:
    if selection == "largest":
        bt = balanced_truncation(
            sys, rank, method=method, horizon=horizon, real_output=real_output
        )
        reduced, bound = bt.system, float(np.max(bt.error_bound))
    else:
        br = balanced_realization(sys, horizon=horizon, real_output=real_output)
        a, b, c, d = br.system
        keep = slice(a.shape[-1] - rank, None)
        reduced = StateSpace(a[..., keep, keep], b[..., keep, :], c[..., :, keep], d)
        bound = float(np.max(2 * np.sum(br.hsv[..., : a.shape[-1] - rank], axis=-1)))
    diag = rediagonalize(reduced, real_output=real_output, max_condition=max_condition)
    return diag, bound


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
    """The reduced values of a host system: HSVs, rank, then selection or balancing."""
    hsv = np.asarray(
        shared_rank_hsv(hankel_singular_values(sys, horizon=horizon, real_output=real_output))
    )
    if tau is not None:
        rank = select_rank(hsv, tau=tau, energy=energy)
    rank = _check_rank(rank, int(hsv.shape[-1]))
    if selection == "random":
        assert key is not None
        perm = np.asarray(jax.random.permutation(key, int(sys.poles.shape[-1])))
        indices, dropped = np.sort(perm[:rank]), np.sort(perm[rank:])
        return _Plan(sliced(indices), hsv, _modal_bound(sys, dropped), indices)
    reduced, bound = _balanced(
        sys,
        rank,
        hsv,
        selection=selection,
        method=method,
        horizon=horizon,
        real_output=real_output,
        max_condition=max_condition,
    )
    return _Plan(from_state_space(reduced), hsv, bound, None)


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

    ``selection="largest"`` (the method): balanced truncation to the ``rank`` states with the
    largest Hankel singular values, then re-diagonalisation
    :math:`A_r = V \\operatorname{diag}(\\mu) V^{-1}`, written back through the layer's
    adapter; the change of the transfer function obeys

    .. math::

        \\|G - G_r\\|_{\\mathcal{H}_\\infty} \\le 2 \\sum_{i > r} \\sigma_i .

    ``"smallest"`` keeps the ``rank`` weakest balanced states instead and ``"random"`` keeps
    ``rank`` random modal states without balancing (the paper's ablations).

    The computation runs on the host in float64 (NumPy, through :mod:`compressm_core`),
    whatever ``jax_enable_x64`` says, and matches :func:`compressm_torch.reduce_layer` on the
    same weights. The new values are computed, cast to the parameters' dtypes and checked
    (finite, :math:`0 < |\\mu| < 1`) before anything is written: on failure the layer is left
    as it was and the error says why; if the error check (``compute_error``) fails, the old
    values are written back before the error propagates. Each :class:`flax.nnx.Param` keeps
    its identity and gets a new array of the new shape; optimizer state built for the old shapes
    must be rebuilt.

    Parameters
    ----------
    layer : flax.nnx.Module
        A layer with a registered adapter (:class:`LRU`, :class:`S5`, :class:`S4D`, or your
        own). A layer made of a batch of systems (:class:`S4D`: one per channel) is reduced
        to one ``rank`` shared by all of them, chosen with ``tau`` from the per-index maximum
        of their HSVs (:func:`compressm_core.rank.shared_rank_hsv`).
    rank : int, optional
        States to keep, in ``[1, n]`` (real states in ``[1, 2n]`` with ``real_output``). Give
        either ``rank`` or ``tau``.
    tau : float, optional
        Choose the rank with :func:`compressm_core.select_rank` (fraction of the HSV energy
        that may be discarded).
    energy : {"sum", "squared"}, optional
        Energy used with ``tau``.
    method : {"sqrt", "bfsr"}, optional
        Balanced-truncation method (see :func:`compressm_core.balanced_truncation`).
    selection : {"largest", "smallest", "random"}, optional
        Which states to keep.
    real_output : bool, optional
        ``False`` (default, the paper's reduction): balance the complex system; its bound is a
        conservative bound for the layer's real output. ``True``: reduce the exact real
        ``2n``-state realization of ``Re(C x)``; ``rank`` counts real states and each kept
        conjugate pair takes one complex slot.
    horizon : int, optional
        Finite-horizon Gramians over ``horizon`` steps (the sequence length seen in training).
    compute_error : bool, optional
        Measure the H-infinity norm of the change of the layer's output map afterwards
        (a posteriori check of ``error_bound``).
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
    ValueError
        ``rank``, ``selection`` or ``tau`` out of range.
    StabilityError, ConditioningError
        The reduced system cannot be written back (unstable or non-finite parameters, an
        ill-conditioned modal basis). The layer is unchanged.

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
    return LayerReduction(
        old_rank=int(sys.poles.shape[-1]),
        new_rank=adapter.state_size(layer),
        hsv=plan.hsv,
        error_bound=plan.bound,
        hinf_error=hinf,
        selection=selection,
        indices=plan.indices,
        changed=tuple(plan.values),
        slices={}
        if plan.indices is None
        else {name: (axis, plan.indices) for name, axis in adapter.state_axes.items()},
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
