"""Selective (Mamba-style) layers: statistics from forward passes and index-selection reduction.

The adapters of the Mamba-1 and Mamba-2 layers are in ``_mamba_adapters`` (registered on
import).
"""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from compressm_core import (
    SelectiveStatistics,
    finalize_selective_statistics,
    init_selective_statistics,
    select_rank,
    select_state_indices,
    state_importance,
    update_selective_statistics,
)
from compressm_core.checks import check_int

from . import _mamba_adapters  # noqa: F401  (registers the Mamba adapters)
from ._distributed import all_reduce_numbers, is_distributed
from ._params import assign
from ._precision import full_precision
from .adapters import SelectiveAdapter, find_layers, get_adapter
from .reduction import LayerReduction

__all__ = [
    "AGGREGATES",
    "IMPORTANCES",
    "Aggregate",
    "Importance",
    "SelectiveRecorder",
    "reduce_selective_layer",
    "selective_importance",
]

Importance = Literal["gramian", "mean_lti", "random"]
"""State-importance scores of a selective layer (see :func:`selective_importance`)."""

Aggregate = Literal["sum", "energy", "normalized"]
"""How the per-channel scores of a selective layer are combined."""

IMPORTANCES: tuple[Importance, ...] = ("gramian", "mean_lti", "random")
"""The values of :data:`Importance`."""

AGGREGATES: tuple[Aggregate, ...] = ("sum", "energy", "normalized")
"""The values of :data:`Aggregate`."""


def _selective_adapter(layer: nn.Module) -> SelectiveAdapter:
    adapter = get_adapter(layer)
    if not isinstance(adapter, SelectiveAdapter):
        msg = (
            f"`layer` of type {type(layer).__name__} is not selective; reduce it with "
            "compressm_torch.reduce_layer."
        )
        raise TypeError(msg)
    return adapter


# --- statistics from forward passes -----------------------------------------------------------


class SelectiveRecorder:
    """Collect the selective-Gramian statistics of a model's selective layers in forward passes.

    Registers a forward pre-hook on every selective layer (:class:`~compressm_torch.Mamba`,
    Mamba and Mamba-2 layers of ``mamba_ssm`` and ``transformers``, or any type registered with
    a :class:`SelectiveAdapter`). While :attr:`active`, each forward pass of a layer adds its
    batch to ``statistics[name]`` (:func:`compressm_core.update_selective_statistics`): the
    step sizes and projections are recomputed from the layer's input under ``torch.no_grad``
    (the projections and the convolution, not the scan), so training needs no extra forward
    pass. Every pass counts as whole sequences starting from a zero state; single-step passes
    (cached decoding) are ignored.

    Parameters
    ----------
    model : torch.nn.Module
        The model (or one selective layer).
    layers : iterable of str, optional
        Names of the layers to record (default: every selective layer).
    active : bool, optional
        Record from the start.
    training_only : bool, optional
        Record only passes in training mode (``module.training``).
    max_sequences : int, optional
        Record at most this many sequences of each batch (the first ones; the data loader's
        shuffling makes them a random sample). The cost of a recorded pass is proportional to
        the number of sequences recorded, and every statistic is a sum over sequences, so
        recording ``k`` of ``batch`` sequences estimates the same averages from fewer samples.
        Default: all.

    Examples
    --------
    >>> import torch
    >>> from compressm_torch import Mamba, SelectiveRecorder, reduce_selective_layer
    >>> layer = Mamba(d_model=8, d_state=16)
    >>> with SelectiveRecorder(layer) as recorder:
    ...     _ = layer(torch.randn(4, 32, 8))
    >>> report = reduce_selective_layer(layer, recorder.statistics[""], rank=6)
    >>> layer.d_state, layer.A_log.shape, layer.x_proj.weight.shape
    (6, torch.Size([16, 6]), torch.Size([13, 16]))
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: Iterable[str] | None = None,
        active: bool = True,
        training_only: bool = True,
        max_sequences: int | None = None,
    ) -> None:
        if max_sequences is not None:
            max_sequences = check_int(max_sequences, "max_sequences", low=1)
        found = {
            name: layer
            for name, layer in find_layers(model).items()
            if isinstance(get_adapter(layer), SelectiveAdapter)
        }
        if layers is not None:
            wanted = list(layers)
            missing = sorted(set(wanted) - set(found))
            if missing:
                msg = f"`layers` names no selective layer of `model`: {missing}."
                raise KeyError(msg)
            found = {name: found[name] for name in wanted}
        if not found:
            msg = "`model` has no selective layer (Mamba, Mamba-2 or a registered type)."
            raise ValueError(msg)
        self.layers: dict[str, nn.Module] = found
        self.active = active
        self.training_only = training_only
        self.max_sequences = max_sequences
        self.statistics: dict[str, SelectiveStatistics] = {}
        self._handles: list[RemovableHandle] = [
            layer.register_forward_pre_hook(self._hook(name), with_kwargs=True)
            for name, layer in found.items()
        ]

    def __enter__(self) -> SelectiveRecorder:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def samples(self, name: str) -> int:
        """Number of (sequence, step) samples recorded for layer ``name``."""
        stats = self.statistics.get(name)
        return 0 if stats is None else int(stats.count)

    def reset(self, names: Iterable[str] | None = None) -> None:
        """Forget the statistics of the named layers (default: all)."""
        for name in list(self.statistics) if names is None else names:
            self.statistics.pop(name, None)

    def remove(self) -> None:
        """Remove the hooks (the statistics are kept)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def all_reduce(self, group: Any = None) -> None:
        """Sum the statistics over the processes of ``torch.distributed`` (no-op without it).

        Every field of the statistics is a sum over samples, so the sum over ranks is exactly
        the statistics of all ranks' batches, and every rank then ranks the states identically.
        Every rank must call it (a collective). A layer recorded on some ranks only is summed
        with zeros from the others, so every rank issues the same collectives whatever it
        recorded and ends with statistics for the same layers.
        """
        if not is_distributed():
            return
        shapes = self._recorded_shapes(group)
        for name in sorted(self.layers):
            if name not in shapes:
                self.statistics.pop(name, None)  # recorded nowhere (or empty everywhere)
                continue
            stats = self.statistics.get(name)
            if stats is None:
                device = next(self.layers[name].parameters()).device
                stats = init_selective_statistics(torch.empty(shapes[name], device=device))
            fields = [t.clone() for t in stats]
            for tensor in fields:
                torch.distributed.all_reduce(tensor, group=group)
            self.statistics[name] = SelectiveStatistics(*fields)

    def _recorded_shapes(self, group: Any = None) -> dict[str, tuple[int, int]]:
        """The layers with recorded samples on some rank, with the ``(D, N)`` shape of their
        statistics (one collective under ``torch.distributed``, the same on every rank)."""
        names = sorted(self.layers)
        local: list[float] = []
        for name in names:
            stats = self.statistics.get(name)
            shape = (0, 0) if stats is None else tuple(stats.poles.shape)
            local += [int(self.samples(name) > 0), *shape]
        agreed = all_reduce_numbers(local, "max", dtype=torch.int64, group=group)
        return {
            name: (int(agreed[3 * i + 1]), int(agreed[3 * i + 2]))
            for i, name in enumerate(names)
            if agreed[3 * i]
        }

    def record(self, name: str, hidden_states: torch.Tensor) -> None:
        """Add one batch of whole sequences (batch, L, d_model) to layer ``name``'s statistics.

        Only the first :attr:`max_sequences` sequences are recorded when it is set.
        """
        layer = self.layers[name]
        hidden_states = hidden_states[: self.max_sequences]
        adapter = _selective_adapter(layer)
        with torch.no_grad(), full_precision(hidden_states.device):
            dt, a, b, c = (t.detach().float() for t in adapter.signals(layer, hidden_states))
            stats = self.statistics.get(name)
            if stats is None or tuple(stats.poles.shape) != tuple(a.shape):
                stats = init_selective_statistics(a)
            self.statistics[name] = update_selective_statistics(stats, dt, a, b, c)

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not self.active or (self.training_only and not module.training):
                return
            hidden = args[0] if args else kwargs.get("hidden_states")
            if torch.is_tensor(hidden) and hidden.ndim == 3 and hidden.shape[1] > 1:
                self.record(name, hidden.detach())

        # Never traced by ``torch.compile``: Dynamo would guard on ``active`` and the recorded
        # statistics and recompile every time they change (the compiled graph breaks here).
        return torch.compiler.disable(hook)  # type: ignore[no-untyped-call]


# --- reduction --------------------------------------------------------------------------------


def selective_importance(
    layer: nn.Module,
    statistics: SelectiveStatistics,
    *,
    importance: Importance = "gramian",
    aggregate: Literal["sum", "energy", "normalized"] = "sum",
    seed: int = 0,
) -> torch.Tensor:
    """One score per state index of ``layer`` ((N,), or (G, N) for Mamba-2 groups).

    :func:`compressm_core.state_importance` of the finalized ``statistics``, with the layer's
    groups. See there for the scores and what they do (not) guarantee.
    """
    if importance not in IMPORTANCES:
        msg = f"`importance` must be one of {IMPORTANCES}; received {importance!r}."
        raise ValueError(msg)
    if aggregate not in AGGREGATES:
        msg = f"`aggregate` must be one of {AGGREGATES}; received {aggregate!r}."
        raise ValueError(msg)
    adapter = _selective_adapter(layer)
    gramians = finalize_selective_statistics(statistics)
    scores: torch.Tensor = state_importance(
        gramians,
        method=importance,
        aggregate=aggregate,
        groups=adapter.groups(layer),
        seed=seed,
    )
    return scores


def _rank_for(scores: torch.Tensor, tau: float) -> int:
    rows = scores.reshape(-1, scores.shape[-1])
    return max(select_rank(row, tau=tau) for row in rows)


def _slice(
    layer: nn.Module, adapter: SelectiveAdapter, indices: torch.Tensor
) -> dict[str, tuple[int, torch.Tensor]]:
    """Keep ``indices`` in every parameter with a state dimension (checked, then all written)."""
    positions = adapter.positions(layer, indices)
    staged = {}
    for name, (axis, pos) in positions.items():
        param = layer.get_parameter(name)
        new = param.detach().index_select(axis, pos.to(param.device))
        if not bool(torch.all(torch.isfinite(new))):
            msg = f"`{name}` has non-finite entries; the layer is left unchanged."
            raise ValueError(msg)
        staged[name] = new.contiguous()
    for name, new in staged.items():
        assign(layer.get_parameter(name), new)
    adapter.on_resize(layer, int(indices.shape[-1]))
    return {name: (axis, pos.cpu()) for name, (axis, pos) in positions.items()}


def reduce_selective_layer(
    layer: nn.Module,
    statistics: SelectiveStatistics,
    rank: int | None = None,
    *,
    tau: float | None = None,
    importance: Importance = "gramian",
    aggregate: Literal["sum", "energy", "normalized"] = "sum",
    seed: int = 0,
) -> LayerReduction:
    """Keep the ``rank`` most important state indices of a selective layer, in place.

    The scores are :func:`selective_importance` of ``statistics`` (collected with
    :class:`SelectiveRecorder`); the kept indices are the same in every channel (in every
    channel of a group for Mamba-2), because ``B_t`` and ``C_t`` are shared projections. Every
    parameter with a state dimension is sliced (Mamba-1: ``A_log[:, S]`` and the ``B``/``C``
    rows of ``x_proj``; Mamba-2: the ``B``/``C`` rows of ``in_proj`` and channels of ``conv1d``)
    and the size attributes are updated, keeping the Parameter objects. With ``tau``, the rank
    is the smallest that keeps a fraction ``1 - tau`` of the summed scores in every group
    (:func:`compressm_core.select_rank`; for ``importance="random"`` the rank comes from the
    ``"gramian"`` scores, so random selection is compared at the same size). Mamba-2 ranks are
    rounded up to what its fused kernels accept (a multiple of 8 convolution channels).

    There is no error bound: the layer is time-varying and the kept states are original
    coordinates (modal truncation guided by Hankel-type scores). Check the effect on held-out
    data.

    Parameters
    ----------
    layer : torch.nn.Module
        A selective layer.
    statistics : SelectiveStatistics
        Its statistics (:attr:`SelectiveRecorder.statistics`).
    rank : int, optional
        States to keep per group; give exactly one of ``rank`` and ``tau``.
    tau : float, optional
        Fraction of the summed scores that may be discarded, in ``[0, 1)``.
    importance : {"gramian", "mean_lti", "random"}, optional
        Scores (see :func:`compressm_core.state_importance`).
    aggregate : {"sum", "energy", "normalized"}, optional
        How per-channel scores are combined.
    seed : int, optional
        Seed of ``importance="random"``.

    Returns
    -------
    LayerReduction
        ``hsv`` holds the scores summed over groups, descending; ``error_bound`` is ``None``;
        ``indices`` the kept indices ((r,) or (G, r)) and ``slices`` the kept positions of
        every sliced parameter (for the optimizer's moments).

    Raises
    ------
    TypeError
        If ``layer`` is not selective, or both or neither of ``rank`` and ``tau`` are given.
    ValueError
        If ``rank`` is out of range, the statistics are empty, or a parameter is not finite (the
        layer is then unchanged).
    """
    if (rank is None) == (tau is None):
        msg = f"Give exactly one of `rank` and `tau`; received rank={rank!r}, tau={tau!r}."
        raise TypeError(msg)
    plan = _plan_selective(
        layer, statistics, rank, tau=tau, importance=importance, aggregate=aggregate, seed=seed
    )
    return _apply_selective(layer, plan)


class _SelectivePlan(NamedTuple):
    """The kept state indices of a selective layer, not yet applied."""

    adapter: SelectiveAdapter
    indices: torch.Tensor
    scores: torch.Tensor  # summed over groups, float64 on the CPU
    selection: str


def _plan_selective(
    layer: nn.Module,
    statistics: SelectiveStatistics,
    rank: int | None,
    *,
    tau: float | None,
    importance: Importance,
    aggregate: Literal["sum", "energy", "normalized"],
    seed: int,
) -> _SelectivePlan:
    """Scores, rank and kept indices of :func:`reduce_selective_layer`; nothing is written."""
    adapter = _selective_adapter(layer)
    old = adapter.state_size(layer)
    scores = selective_importance(
        layer, statistics, importance=importance, aggregate=aggregate, seed=seed
    )
    if tau is not None:
        rate = scores
        if importance == "random":
            rate = selective_importance(layer, statistics, aggregate=aggregate)
        rank = _rank_for(rate, tau)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= old:
        msg = f"`rank` must be an int in [1, {old}]; received {rank!r}."
        raise ValueError(msg)
    if adapter.rank_multiple is not None:
        rank = adapter.rank_multiple(layer, rank)
    indices = select_state_indices(scores, rank)
    total = scores.reshape(-1, old).sum(0).detach().to("cpu", torch.float64)
    return _SelectivePlan(adapter, indices, total, importance)


def _apply_selective(layer: nn.Module, plan: _SelectivePlan) -> LayerReduction:
    """Slice ``layer`` to ``plan``'s indices (every value checked first, then all written)."""
    old = plan.adapter.state_size(layer)
    slices = _slice(layer, plan.adapter, plan.indices)
    return LayerReduction(
        old_rank=old,
        new_rank=plan.adapter.state_size(layer),
        hsv=torch.sort(plan.scores, descending=True).values,
        error_bound=None,
        hinf_error=None,
        selection=plan.selection,
        indices=plan.indices.cpu(),
        changed=tuple(slices),
        slices=slices,
    )
