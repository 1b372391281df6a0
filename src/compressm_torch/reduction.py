"""Reduce layers in place: balanced truncation + re-diagonalisation, or index selection."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

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

from ._params import assign, resolve
from .adapters import LayerAdapter, find_layers, get_adapter

__all__ = ["LayerReduction", "Selection", "reduce_layer", "reduce_model"]


@dataclass(frozen=True)
class LayerReduction:
    """Report of :func:`reduce_layer`.

    Attributes
    ----------
    old_rank, new_rank : int
        State sizes before and after.
    hsv : (n,) tensor
        Hankel singular values before the reduction (float64, CPU), descending; for a layer
        made of a batch of systems (:class:`S4D`) their per-index maximum
        (:func:`compressm_core.rank.shared_rank_hsv`); for a selective layer
        (:func:`reduce_selective_layer`) its state-importance scores, descending.
    error_bound : float or None
        Bound on the H-infinity norm of the change of the layer's transfer function:
        :math:`2 \\sum_{\\text{discarded}} \\sigma_i` for balanced truncation, the modal bound
        :math:`\\sum_{\\text{discarded}} \\|c_i\\| \\|b_i\\| / (1 - |\\lambda_i|)` for
        ``selection="random"``; for a batch of systems (:class:`S4D`) the largest member's bound,
        which bounds the layer's block-diagonal transfer function. Only an indicator with
        ``horizon`` set. ``None`` for selective layers (no bound exists).
    hinf_error : float or None
        Measured H-infinity norm of the change of the layer's (real) output map, if asked.
    selection : str
        ``"largest"``, ``"smallest"`` or ``"random"`` (for selective layers, the importance
        method).
    indices : (new_rank,) or (G, new_rank) tensor or None
        Kept state indices for index selection (``"random"``, selective layers): the parameters,
        and the optimizer moments, were sliced with them. ``None`` after a change of basis.
    changed : tuple of str
        Names of the parameters whose values were replaced (their objects are kept).
    slices : mapping
        After an index selection, ``{parameter name: (axis, kept positions)}`` for every sliced
        parameter (what :func:`resize_optimizer_state` needs to slice its moments); empty after
        a change of basis.
    """

    old_rank: int
    new_rank: int
    hsv: torch.Tensor
    error_bound: float | None
    hinf_error: float | None
    selection: str
    indices: torch.Tensor | None
    changed: tuple[str, ...]
    slices: Mapping[str, tuple[int, torch.Tensor]] = field(default_factory=dict)


def _check_rank(rank: object, total: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= total:
        msg = f"`rank` must be an int in [1, {total}]; received {rank!r}."
        raise ValueError(msg)
    return rank


def _modal_bound(sys: DiagonalStateSpace, dropped: torch.Tensor) -> float:
    """The modal bound of the dropped states, the largest over a batch of systems."""
    gain = torch.linalg.vector_norm(sys.b[..., dropped, :], dim=-1) * torch.linalg.vector_norm(
        sys.c[..., :, dropped], dim=-2
    )
    return float(torch.max(torch.sum(gain / (1 - sys.poles[..., dropped].abs()), dim=-1)))


def _balanced(
    sys: DiagonalStateSpace,
    rank: int,
    hsv: torch.Tensor,
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
        reduced, bound = bt.system, float(torch.max(bt.error_bound))
    else:
        br = balanced_realization(sys, horizon=horizon, real_output=real_output)
        a, b, c, d = br.system
        keep = slice(a.shape[-1] - rank, None)
        reduced = StateSpace(a[..., keep, keep], b[..., keep, :], c[..., :, keep], d)
        bound = float(torch.max(2 * br.hsv[..., : a.shape[-1] - rank].sum(dim=-1)))
    diag = rediagonalize(reduced, real_output=real_output, max_condition=max_condition)
    return diag, bound


def reduce_layer(
    layer: nn.Module,
    rank: int | None = None,
    *,
    tau: float | None = None,
    energy: Literal["sum", "squared"] = "sum",
    method: Literal["sqrt", "bfsr"] = "sqrt",
    selection: Selection = "largest",
    real_output: bool = False,
    horizon: int | None = None,
    compute_error: bool = False,
    generator: torch.Generator | None = None,
    max_condition: float = 1e8,
) -> LayerReduction:
    """Reduce the state of ``layer`` in place to ``rank`` states.

    ``selection="largest"`` (the method): balanced truncation to the ``rank`` states with the
    largest Hankel singular values, then re-diagonalisation
    :math:`A_r = V \\operatorname{diag}(\\mu) V^{-1}`, written back through the layer's
    adapter; the change of the transfer function obeys

    .. math::

        \\|G - G_r\\|_{\\mathcal{H}_\\infty} \\le 2 \\sum_{i > r} \\sigma_i .

    ``"smallest"`` keeps the ``rank`` weakest balanced states instead and ``"random"`` keeps
    ``rank`` random modal states without balancing (the paper's ablations; ``"random"`` slices
    the parameters, so the optimizer moments can be sliced exactly too).

    The new values are computed and checked (finite, :math:`0 < |\\mu| < 1`) before anything
    is written: on failure the layer is left as it was and the error says why; if the error
    check (``compute_error``) fails, the old values are written back before the error
    propagates. Parameter objects keep their identity (their ``.data`` is replaced).

    Parameters
    ----------
    layer : torch.nn.Module
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
    generator : torch.Generator, optional
        Random source for ``selection="random"``.
    max_condition : float, optional
        Refuse re-diagonalisation when the eigenvector basis is worse conditioned.

    Returns
    -------
    LayerReduction
        Ranks, HSVs, bound, measured error and what changed.

    Raises
    ------
    TypeError
        No adapter for ``layer``; neither or both of ``rank`` and ``tau``.
    ValueError
        ``rank``, ``selection`` or ``tau`` out of range.
    StabilityError, ConditioningError
        The reduced system cannot be written back (unstable or non-finite parameters, an
        ill-conditioned modal basis). The layer is unchanged.

    Examples
    --------
    >>> import torch
    >>> from compressm_torch import LRU, reduce_layer
    >>> _ = torch.manual_seed(0)
    >>> layer = LRU(d_model=4, d_state=32)
    >>> report = reduce_layer(layer, 8)
    >>> layer.d_state, report.old_rank, report.error_bound > 0
    (8, 32, True)
    """
    if (rank is None) == (tau is None):
        msg = f"Give exactly one of `rank` and `tau`; received rank={rank!r}, tau={tau!r}."
        raise TypeError(msg)
    if selection not in SELECTIONS:
        msg = f"`selection` must be one of {SELECTIONS}; received {selection!r}."
        raise ValueError(msg)
    if selection == "random" and real_output:
        msg = "`selection='random'` keeps modal states; it cannot be combined with `real_output`."
        raise ValueError(msg)
    adapter, sys, hsv = _read(layer, "layer", horizon=horizon, real_output=real_output)
    if tau is not None:
        rank = select_rank(hsv, tau=tau, energy=energy)
    plan = _plan(
        layer,
        adapter,
        sys,
        hsv,
        _check_rank(rank, int(hsv.shape[-1])),
        method=method,
        selection=selection,
        real_output=real_output,
        horizon=horizon,
        generator=generator,
        max_condition=max_condition,
    )
    return _apply(layer, adapter, sys, hsv, plan, selection=selection, compute_error=compute_error)


def _read(
    layer: nn.Module, what: str, *, horizon: int | None, real_output: bool
) -> tuple[LayerAdapter, DiagonalStateSpace, torch.Tensor]:
    """The adapter, system and (shared-rank) HSVs of an LTI layer; ``what`` names it in the
    error raised for a selective layer."""
    adapter = get_adapter(layer)
    if not isinstance(adapter, LayerAdapter):
        msg = (
            f"`{what}` of type {type(layer).__name__} is selective; reduce it with "
            "compressm_torch.reduce_selective_layer."
        )
        raise TypeError(msg)
    sys = adapter.to_state_space(layer)
    hsv = shared_rank_hsv(hankel_singular_values(sys, horizon=horizon, real_output=real_output))
    return adapter, sys, hsv


def reduce_model(
    model: nn.Module,
    ranks: Mapping[str, int],
    *,
    method: Literal["sqrt", "bfsr"] = "sqrt",
    real_output: bool = False,
    horizon: int | None = None,
    compute_error: bool = False,
    max_condition: float = 1e8,
) -> dict[str, LayerReduction]:
    """Balanced-truncate the named layers of ``model`` once, in place, to the given ranks.

    Every layer ``name`` is reduced as :func:`reduce_layer` with ``rank=ranks[name]`` and
    ``selection="largest"`` does (balanced truncation, re-diagonalisation, the bound
    :math:`\\|G - G_r\\|_{\\mathcal{H}_\\infty} \\le 2 \\sum_{i > r} \\sigma_i`). A layer whose
    rank equals its state size is left as it is. All reductions are planned before any is
    written; if writing one fails, the layers already written are restored, so the model is
    reduced entirely or not at all.

    Parameters
    ----------
    model : torch.nn.Module
        The model; names are those of :func:`find_layers` (and :func:`state_sizes`).
    ranks : mapping
        ``{layer name: states to keep}``.
    method, real_output, horizon, compute_error, max_condition : optional
        As for :func:`reduce_layer`.

    Returns
    -------
    dict
        ``{layer name: LayerReduction}`` for every layer that was reduced.

    Raises
    ------
    KeyError
        ``ranks`` names a layer that ``model`` does not have.
    TypeError
        A named layer is selective (no balanced truncation exists for it).
    ValueError, StabilityError, ConditioningError
        As for :func:`reduce_layer`; the model is unchanged.

    Examples
    --------
    >>> import torch
    >>> from compressm_torch import SequenceModel, reduce_model, state_sizes
    >>> _ = torch.manual_seed(0)
    >>> model = SequenceModel(2, 3, d_model=4, d_state=16, n_layers=2)
    >>> reports = reduce_model(model, {"blocks.0.ssm": 6, "blocks.1.ssm": 16})
    >>> state_sizes(model), list(reports)
    ({'blocks.0.ssm': 6, 'blocks.1.ssm': 16}, ['blocks.0.ssm'])
    """
    layers = find_layers(model)
    unknown = sorted(set(ranks) - set(layers))
    if unknown:
        msg = f"`ranks` names layers that `model` does not have: {unknown}."
        raise KeyError(msg)
    planned = []
    for name, rank in ranks.items():
        layer = layers[name]
        adapter, sys, hsv = _read(
            layer, f"ranks[{name!r}]", horizon=horizon, real_output=real_output
        )
        if _check_rank(rank, int(hsv.shape[-1])) == int(hsv.shape[-1]):
            continue
        plan = _plan(
            layer,
            adapter,
            sys,
            hsv,
            rank,
            method=method,
            selection="largest",
            real_output=real_output,
            horizon=horizon,
            generator=None,
            max_condition=max_condition,
        )
        planned.append((name, layer, adapter, sys, hsv, plan))
    reports: dict[str, LayerReduction] = {}
    undo: list[tuple[nn.Module, LayerAdapter, dict[str, tuple[torch.Tensor, Any]]]] = []
    try:
        for name, layer, adapter, sys, hsv, plan in planned:
            saved = {p: (resolve(layer, p).detach(), resolve(layer, p).grad) for p in plan.values}
            reports[name] = _apply(
                layer, adapter, sys, hsv, plan, selection="largest", compute_error=compute_error
            )
            undo.append((layer, adapter, saved))
    except BaseException:
        for layer, adapter, saved in reversed(undo):
            with torch.no_grad():
                for p, (value, grad) in saved.items():
                    assign(resolve(layer, p), value)
                    resolve(layer, p).grad = grad
            if adapter.on_resize is not None:
                adapter.on_resize(layer)
        raise
    return reports


@dataclass(frozen=True)
class _Plan:
    """New parameter values of a reduction, computed and not yet written."""

    values: dict[str, torch.Tensor]
    bound: float
    indices: torch.Tensor | None


def _plan(
    layer: nn.Module,
    adapter: LayerAdapter,
    sys: DiagonalStateSpace,
    hsv: torch.Tensor,
    rank: int,
    *,
    method: Literal["sqrt", "bfsr"],
    selection: str,
    real_output: bool,
    horizon: int | None,
    generator: torch.Generator | None,
    max_condition: float,
) -> _Plan:
    """The reduced values of ``layer`` (selection or balancing); nothing is written."""
    old = int(sys.poles.shape[-1])
    if selection == "random":
        perm = torch.randperm(old, generator=generator)
        indices = torch.sort(perm[:rank]).values.to(sys.poles.device)
        dropped = torch.sort(perm[rank:]).values.to(sys.poles.device)
        return _Plan(_sliced(layer, adapter, indices), _modal_bound(sys, dropped), indices)
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
    return _Plan(adapter.from_state_space(layer, reduced), bound, None)


def _apply(
    layer: nn.Module,
    adapter: LayerAdapter,
    sys: DiagonalStateSpace,
    hsv: torch.Tensor,
    plan: _Plan,
    *,
    selection: str,
    compute_error: bool,
) -> LayerReduction:
    """Write ``plan`` into ``layer``, then measure the error if asked; if anything after the
    checks raises (the error check included), ``layer`` is restored before it propagates."""
    saved = {
        name: (resolve(layer, name).detach(), resolve(layer, name).grad) for name in plan.values
    }
    _write(layer, plan.values)
    try:
        if adapter.on_resize is not None:
            adapter.on_resize(layer)
        hinf = None
        if compute_error:
            after = adapter.to_state_space(layer)
            hinf = float(torch.max(h_infinity_norm(sys, after, real_output=adapter.real_output)))
    except BaseException:
        with torch.no_grad():
            for name, (value, grad) in saved.items():
                param = resolve(layer, name)
                assign(param, value)
                param.grad = grad
        if adapter.on_resize is not None:
            adapter.on_resize(layer)
        raise
    indices = plan.indices
    return LayerReduction(
        old_rank=int(sys.poles.shape[-1]),
        new_rank=adapter.state_size(layer),
        hsv=hsv.detach().cpu(),
        error_bound=plan.bound,
        hinf_error=hinf,
        selection=selection,
        indices=None if indices is None else indices.cpu(),
        changed=tuple(plan.values),
        slices={}
        if indices is None
        else {name: (axis, indices.cpu()) for name, axis in adapter.state_axes.items()},
    )


def _sliced(
    layer: nn.Module, adapter: LayerAdapter, indices: torch.Tensor
) -> dict[str, torch.Tensor]:
    return {
        name: resolve(layer, name).detach().index_select(axis, indices)
        for name, axis in adapter.state_axes.items()
    }


@torch.no_grad()
def _write(layer: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Check every new value, then assign all of them (all or nothing)."""
    staged = {}
    for name, value in values.items():
        param = resolve(layer, name)
        new = value.detach().to(device=param.device, dtype=param.dtype)
        if not bool(torch.all(torch.isfinite(new))):
            msg = f"The reduced value of `{name}` is not finite; the layer is left unchanged."
            raise StabilityError(msg)
        staged[name] = new.contiguous()
    for name, new in staged.items():
        assign(resolve(layer, name), new)
