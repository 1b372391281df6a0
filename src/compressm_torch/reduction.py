"""Reduce layers in place: read each system, plan (:mod:`compressm_core.reduction`), write."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from compressm_core import DiagonalStateSpace, StabilityError, h_infinity_norm
from compressm_core.layer_writes import LayerPlan, apply_all, layer_plan, write_plan
from compressm_core.reduction import (
    LayerReduction,
    ReduceArguments,
    ReduceKeywords,
    ReductionPlan,
)
from compressm_core.training import Selection, signature_with

from ._params import assign, resolve
from .adapters import LayerAdapter, find_layers, get_adapter

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["LayerReduction", "Selection", "reduce_layer", "reduce_model"]


@signature_with(ReduceArguments.parameters())
def reduce_layer(
    layer: nn.Module,
    rank: int | None = None,
    *,
    generator: torch.Generator | None = None,
    **keywords: Unpack[ReduceKeywords],
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
    generator : torch.Generator, optional
        Random source for ``selection="random"``.
    **keywords
        The options below (:class:`compressm_core.reduction.ReduceKeywords`, with the defaults
        of :class:`compressm_core.reduction.ReduceArguments`).

    Other Parameters
    ----------------
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
    arguments = ReduceArguments.from_keywords(keywords, rank, owner="reduce_layer")
    adapter, sys = _read(layer, "layer")
    hsv, rank = arguments.layer_hsv(sys, rank)
    plan = _plan(layer, adapter, sys, hsv, rank, arguments, generator)
    (report,) = _apply_all([(layer, adapter, sys, plan)], arguments)
    return report


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
    arguments = ReduceArguments(
        method=method,
        real_output=real_output,
        horizon=horizon,
        compute_error=compute_error,
        max_condition=max_condition,
    )
    names, planned = [], []
    for name, rank in ranks.items():
        layer = layers[name]
        adapter, sys = _read(layer, f"ranks[{name!r}]")
        hsv, rank = arguments.layer_hsv(sys, rank)
        if rank == int(hsv.shape[-1]):
            continue
        names.append(name)
        planned.append((layer, adapter, sys, _plan(layer, adapter, sys, hsv, rank, arguments)))
    return dict(zip(names, _apply_all(planned, arguments), strict=True))


def _plan(
    layer: nn.Module,
    adapter: LayerAdapter,
    sys: DiagonalStateSpace,
    hsv: torch.Tensor,
    rank: int,
    arguments: ReduceArguments,
    generator: torch.Generator | None = None,
) -> LayerPlan:
    """The reduced values of ``layer`` (:func:`~compressm_core.reduction.plan_reduction`);
    nothing is written."""

    def permute(n: int) -> torch.Tensor:
        return torch.randperm(n, generator=generator).to(sys.poles.device)

    return _plan_values(layer, adapter, arguments.plan(sys, rank, permute), hsv)


def _plan_values(
    layer: nn.Module, adapter: LayerAdapter, plan: ReductionPlan, hsv: torch.Tensor
) -> LayerPlan:
    """The parameter values of ``layer`` that realise ``plan`` (sliced or re-parameterised);
    nothing is written."""
    return layer_plan(
        plan,
        hsv,
        from_state_space=lambda reduced: adapter.from_state_space(layer, reduced),
        sliced=lambda indices: _sliced(layer, adapter, indices),
        host=lambda x: x.detach().cpu(),
    )


_Step = tuple[nn.Module, LayerAdapter, DiagonalStateSpace, LayerPlan]


def _apply_all(planned: Sequence[_Step], arguments: ReduceArguments) -> list[LayerReduction]:
    """Write every plan with :func:`_apply`, all or nothing
    (:func:`~compressm_core.layer_writes.apply_all`)."""
    return apply_all(
        planned,
        lambda step: _apply(
            step, selection=arguments.selection, compute_error=arguments.compute_error
        ),
    )


def _apply(
    step: _Step, *, selection: str, compute_error: bool
) -> tuple[LayerReduction, Callable[[], None]]:
    """Write a planned ``(layer, adapter, system, plan)``
    (:func:`~compressm_core.layer_writes.write_plan`): the report, and a function that restores
    the layer."""
    return write_plan(
        *step, _write, selection=selection, compute_error=compute_error, norm=h_infinity_norm
    )


def _sliced(
    layer: nn.Module, adapter: LayerAdapter, indices: torch.Tensor
) -> dict[str, torch.Tensor]:
    return {
        name: resolve(layer, name).detach().index_select(axis, indices)
        for name, axis in adapter.state_axes.items()
    }


@torch.no_grad()
def _write(layer: nn.Module, values: Mapping[str, torch.Tensor]) -> Callable[[], None]:
    """Check every new value, then assign all of them (all or nothing); returns a function that
    writes the old values (and gradients) back."""
    staged = {}
    for name, value in values.items():
        param = resolve(layer, name)
        new = value.detach().to(device=param.device, dtype=param.dtype)
        if not bool(torch.all(torch.isfinite(new))):
            msg = f"The reduced value of `{name}` is not finite; the layer is left unchanged."
            raise StabilityError(msg)
        staged[name] = new.contiguous()
    saved = {name: (resolve(layer, name).detach(), resolve(layer, name).grad) for name in staged}
    for name, new in staged.items():
        assign(resolve(layer, name), new)

    @torch.no_grad()
    def restore() -> None:
        for name, (value, grad) in saved.items():
            param = resolve(layer, name)
            assign(param, value)
            param.grad = grad

    return restore
