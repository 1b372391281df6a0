"""Reduce layers in place: read each system, plan (:mod:`compressm_core.reduction`), write."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from compressm_core import DiagonalStateSpace, StabilityError, h_infinity_norm
from compressm_core.reduction import (
    LayerReduction,
    check_reduction,
    layer_hsv,
    plan_reduction,
    reduction_report,
)
from compressm_core.training import Selection

from ._params import assign, resolve
from .adapters import LayerAdapter, find_layers, get_adapter

__all__ = ["LayerReduction", "Selection", "reduce_layer", "reduce_model"]


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
    check_reduction(rank, tau, selection, real_output)
    adapter, sys = _read(layer, "layer")
    hsv, rank = layer_hsv(
        sys, rank, tau=tau, energy=energy, horizon=horizon, real_output=real_output
    )
    plan = _plan(
        layer,
        adapter,
        sys,
        rank,
        method=method,
        selection=selection,
        real_output=real_output,
        horizon=horizon,
        generator=generator,
        max_condition=max_condition,
    )
    return _apply(layer, adapter, sys, hsv, plan, selection=selection, compute_error=compute_error)


def _read(layer: nn.Module, what: str) -> tuple[LayerAdapter, DiagonalStateSpace]:
    """The adapter and system of an LTI layer; ``what`` names it in the error raised for a
    selective layer."""
    adapter = get_adapter(layer)
    if not isinstance(adapter, LayerAdapter):
        msg = (
            f"`{what}` of type {type(layer).__name__} is selective; reduce it with "
            "compressm_torch.reduce_selective_layer."
        )
        raise TypeError(msg)
    return adapter, adapter.to_state_space(layer)


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
        adapter, sys = _read(layer, f"ranks[{name!r}]")
        hsv, rank = layer_hsv(sys, rank, horizon=horizon, real_output=real_output)
        if rank == int(hsv.shape[-1]):
            continue
        plan = _plan(
            layer,
            adapter,
            sys,
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
    rank: int,
    *,
    method: Literal["sqrt", "bfsr"],
    selection: str,
    real_output: bool,
    horizon: int | None,
    generator: torch.Generator | None,
    max_condition: float,
) -> _Plan:
    """The reduced values of ``layer`` (:func:`~compressm_core.reduction.plan_reduction`);
    nothing is written."""
    permutation = None
    if selection == "random":
        old = int(sys.poles.shape[-1])
        permutation = torch.randperm(old, generator=generator).to(sys.poles.device)
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
        return _Plan(_sliced(layer, adapter, plan.indices), plan.bound, plan.indices)
    assert plan.system is not None
    return _Plan(adapter.from_state_space(layer, plan.system), plan.bound, None)


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
    return reduction_report(
        old_rank=int(sys.poles.shape[-1]),
        new_rank=adapter.state_size(layer),
        hsv=hsv.detach().cpu(),
        bound=plan.bound,
        hinf_error=hinf,
        selection=selection,
        indices=None if indices is None else indices.cpu(),
        changed=plan.values,
        state_axes=adapter.state_axes,
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
