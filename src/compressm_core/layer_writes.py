"""Write planned layer reductions, all or nothing: the framework-free part of the adapters' writes.

``compressm_torch`` and ``compressm_jax`` turn a :class:`~compressm_core.reduction.ReductionPlan`
into parameter values (:func:`layer_plan`), write them with their framework's assignment
(:func:`write_plan`, which measures the error and reports) and restore every layer already
written when a later one fails (:func:`apply_all`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from . import _xp
from ._typing import Array
from .norms import h_infinity_norm
from .reduction import LayerReduction, ReductionPlan, reduction_report
from .systems import DiagonalStateSpace

__all__ = ["LayerPlan", "ReductionAdapter", "apply_all", "layer_plan", "write_plan"]

R = TypeVar("R")
P = TypeVar("P")


@dataclass(frozen=True)
class LayerPlan:
    """A layer's new parameter values, computed and checked, not yet written.

    Attributes
    ----------
    values : dict
        ``{parameter name: new value}``.
    hsv : array
        The HSVs the reduction was decided by (for the report).
    bound : float
        The plan's bound (``error_bound`` of :class:`~compressm_core.reduction.LayerReduction`).
    indices : array or None
        The kept state indices of an index selection (for the report), else ``None``.
    """

    values: dict[str, Any]
    hsv: Any
    bound: float
    indices: Any


def layer_plan(
    plan: ReductionPlan,
    hsv: Array,
    *,
    from_state_space: Callable[[DiagonalStateSpace], dict[str, Any]],
    sliced: Callable[[Array], dict[str, Any]],
    host: Callable[[Array], Any] = lambda x: x,
) -> LayerPlan:
    """The parameter values of ``plan``: ``sliced(indices)`` after an index selection, else
    ``from_state_space(system)``; ``hsv`` and the indices are reported as ``host`` gives them.

    Returns
    -------
    LayerPlan
        The values to write.
    """
    if plan.indices is not None:
        return LayerPlan(sliced(plan.indices), host(hsv), plan.bound, host(plan.indices))
    assert plan.system is not None
    return LayerPlan(from_state_space(plan.system), host(hsv), plan.bound, None)


class ReductionAdapter(Protocol):
    """What :func:`write_plan` needs of a layer adapter (``LayerAdapter`` of either framework)."""

    @property
    def to_state_space(self) -> Callable[[Any], DiagonalStateSpace]:
        """``layer -> DiagonalStateSpace``."""

    @property
    def state_axes(self) -> Mapping[str, int]:
        """``{parameter name: state axis}``."""

    @property
    def real_output(self) -> bool:
        """Whether the layer's output is the real part of the system's output."""

    @property
    def on_resize(self) -> Callable[[Any], None] | None:
        """Called with the layer after its state size changed."""

    def state_size(self, layer: Any) -> int:
        """Number of states of ``layer``."""


def write_plan(
    layer: Any,
    adapter: ReductionAdapter,
    sys: DiagonalStateSpace,
    plan: LayerPlan,
    write: Callable[[Any, Mapping[str, Any]], Callable[[], None]],
    *,
    selection: str,
    compute_error: bool,
    read: Callable[[DiagonalStateSpace], DiagonalStateSpace] | None = None,
    norm: Callable[..., Array] = h_infinity_norm,
) -> tuple[LayerReduction, Callable[[], None]]:
    """Write ``plan`` into ``layer``, then measure the error if asked.

    If anything after the write raises (the error check included), ``layer`` is restored before
    the error propagates.

    Parameters
    ----------
    layer : object
        The layer.
    adapter : ReductionAdapter
        Its adapter.
    sys : DiagonalStateSpace
        Its system before the reduction.
    plan : LayerPlan
        The new values.
    write : callable
        ``write(layer, values)`` checks every value and assigns all of them or none (raising
        then), and returns a function that writes the old values back.
    selection : str
        As in :class:`~compressm_core.reduction.LayerReduction`.
    compute_error : bool
        Measure the H-infinity norm of the change of the layer's output map.
    read : callable, optional
        Applied to the layer's new system before it is compared with ``sys``.
    norm : callable, optional
        The H-infinity norm of the change (:func:`~compressm_core.h_infinity_norm`; a caller
        may pass the name its own module resolves).

    Returns
    -------
    report : LayerReduction
        What changed.
    restore : callable
        Writes the old values back (and calls ``adapter.on_resize``).
    """
    write_back = write(layer, plan.values)

    def restore() -> None:
        write_back()
        if adapter.on_resize is not None:
            adapter.on_resize(layer)

    try:
        if adapter.on_resize is not None:
            adapter.on_resize(layer)
        hinf = None
        if compute_error:
            after = adapter.to_state_space(layer)
            change = norm(
                sys, after if read is None else read(after), real_output=adapter.real_output
            )
            hinf = float(_xp.namespace(change).max(change))
    except BaseException:
        restore()
        raise
    report = reduction_report(
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
    return report, restore


def apply_all(planned: Iterable[P], apply: Callable[[P], tuple[R, Callable[[], None]]]) -> list[R]:
    """Apply every plan in turn, all or nothing.

    ``apply(plan)`` writes one plan (leaving its layer unchanged if it raises) and returns its
    result and a function that restores what it wrote; if any raises, the plans already applied
    are restored, last first, before the error propagates.

    Returns
    -------
    list
        The results, in the order of ``planned``.

    Examples
    --------
    >>> from compressm_core.layer_writes import apply_all
    >>> state = []
    >>> def apply(x):
    ...     if x < 0:
    ...         raise ValueError(x)
    ...     state.append(x)
    ...     return x, state.pop
    >>> apply_all([1, 2], apply), state
    ([1, 2], [1, 2])
    >>> try:
    ...     apply_all([3, -1], apply)
    ... except ValueError:
    ...     state
    [1, 2]
    """
    results: list[R] = []
    undo: list[Callable[[], None]] = []
    try:
        for plan in planned:
            result, restore = apply(plan)
            results.append(result)
            undo.append(restore)
    except BaseException:
        for restore in reversed(undo):
            restore()
        raise
    return results
