"""The framework-free part of reducing one layer: checks, the plan and the report.

``compressm_torch.reduce_layer`` and ``compressm_jax.reduce_layer`` read a layer's system,
call :func:`plan_reduction` (balanced truncation and re-diagonalisation, or a random index
selection) and write the result back through the layer's adapter; both report it as a
:class:`LayerReduction`. Written with the Array API: the plan is computed on the arrays it is
given (torch tensors, NumPy arrays).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, TypedDict

from . import _xp
from ._typing import Array
from .balanced import balanced_realization, balanced_truncation
from .checks import check_rank
from .diagonalize import rediagonalize
from .hankel import hankel_singular_values
from .rank import select_rank, shared_rank_hsv
from .systems import DiagonalStateSpace, StateSpace
from .training import SELECTIONS, Selection

__all__ = [
    "LayerReduction",
    "ReduceArguments",
    "ReduceKeywords",
    "ReductionPlan",
    "check_reduction",
    "layer_hsv",
    "plan_reduction",
    "reduction_report",
]


@dataclass(frozen=True)
class LayerReduction:
    """Report of the adapters' ``reduce_layer`` (torch and JAX) and of a controller's events.

    Attributes
    ----------
    old_rank, new_rank : int
        State sizes before and after.
    hsv : (n,) array
        Hankel singular values before the reduction (float64, on the host), descending; for a
        layer made of a batch of systems (S4D) their per-index maximum
        (:func:`~compressm_core.rank.shared_rank_hsv`); for a selective layer
        (``compressm_torch.reduce_selective_layer``) its state-importance scores, descending.
    error_bound : float or None
        Bound on the H-infinity norm of the change of the layer's transfer function:
        :math:`2 \\sum_{\\text{discarded}} \\sigma_i` for balanced truncation, the modal bound
        :math:`\\sum_{\\text{discarded}} \\|c_i\\| \\|b_i\\| / (1 - |\\lambda_i|)` for
        ``selection="random"``; for a batch of systems (S4D) the largest member's bound, which
        bounds the layer's block-diagonal transfer function. Only an indicator with ``horizon``
        set. ``None`` for selective layers (no bound exists).
    hinf_error : float or None
        Measured H-infinity norm of the change of the layer's (real) output map, if asked.
    selection : str
        ``"largest"``, ``"smallest"`` or ``"random"`` (for selective layers, the importance
        method).
    indices : (new_rank,) or (G, new_rank) array or None
        Kept state indices of an index selection (``"random"``, selective layers): the
        parameters, and the optimizer moments, were sliced with them. ``None`` after a change
        of basis.
    changed : tuple of str
        Names of the parameters whose values were replaced (their objects are kept).
    slices : mapping
        After an index selection, ``{parameter name: (axis, kept positions)}`` for every sliced
        parameter (what resizing the optimizer's moments needs); empty after a change of basis.
    """

    old_rank: int
    new_rank: int
    hsv: Any
    error_bound: float | None
    hinf_error: float | None
    selection: str
    indices: Any
    changed: tuple[str, ...]
    slices: Mapping[str, tuple[int, Any]] = field(default_factory=dict)


class ReductionPlan(NamedTuple):
    """What :func:`plan_reduction` decided; nothing is written yet.

    Attributes
    ----------
    system : DiagonalStateSpace or None
        The reduced, re-diagonalised system (balancing); ``None`` for an index selection.
    indices : array or None
        The kept state indices, ascending (``selection="random"``); ``None`` after balancing.
    bound : float
        The bound on the H-infinity change (see :class:`LayerReduction`).
    """

    system: DiagonalStateSpace | None
    indices: Array | None
    bound: float


def check_reduction(
    rank: int | None, tau: float | None, selection: str, real_output: bool
) -> None:
    """Check the arguments of a layer's reduction that do not depend on the layer.

    Parameters
    ----------
    rank, tau : optional
        Exactly one of them must be given.
    selection : str
        One of :data:`~compressm_core.training.SELECTIONS`.
    real_output : bool
        Excluded by ``selection="random"``.

    Raises
    ------
    TypeError
        Neither or both of ``rank`` and ``tau``.
    ValueError
        An unknown ``selection``, or ``"random"`` with ``real_output``.
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


def layer_hsv(
    sys: DiagonalStateSpace,
    rank: int | None,
    *,
    tau: float | None = None,
    energy: Literal["sum", "squared"] = "sum",
    horizon: int | None = None,
    real_output: bool = False,
) -> tuple[Array, int]:
    """The HSVs a layer's reduction is decided by, and its checked rank.

    Parameters
    ----------
    sys : DiagonalStateSpace
        The layer's system (a batch of systems shares one rank).
    rank : int or None
        The rank asked for, or ``None`` to choose it with ``tau``.
    tau, energy : optional
        :func:`~compressm_core.select_rank`'s arguments.
    horizon, real_output : optional
        :func:`~compressm_core.hankel_singular_values`'s arguments.

    Returns
    -------
    hsv : (n,) array
        :func:`~compressm_core.rank.shared_rank_hsv` of the system's HSVs.
    rank : int
        In ``[1, n]``.

    Raises
    ------
    ValueError
        If the rank is out of range.
    """
    hsv = shared_rank_hsv(hankel_singular_values(sys, horizon=horizon, real_output=real_output))
    if tau is not None:
        rank = select_rank(hsv, tau=tau, energy=energy)
    return hsv, check_rank(rank, int(hsv.shape[-1]))


def plan_reduction(
    sys: DiagonalStateSpace,
    rank: int,
    *,
    selection: str = "largest",
    method: Literal["sqrt", "bfsr"] = "sqrt",
    horizon: int | None = None,
    real_output: bool = False,
    max_condition: float = 1e8,
    permutation: Array | None = None,
) -> ReductionPlan:
    """Plan the reduction of a diagonal layer system to ``rank`` states.

    ``selection="largest"`` (the method): balanced truncation to the ``rank`` states with the
    largest Hankel singular values, then re-diagonalisation
    :math:`A_r = V \\operatorname{diag}(\\mu) V^{-1}`; the change of the transfer function
    obeys

    .. math::

        \\|G - G_r\\|_{\\mathcal{H}_\\infty} \\le 2 \\sum_{i > r} \\sigma_i .

    ``"smallest"`` keeps the ``rank`` weakest balanced states instead and ``"random"`` keeps
    ``rank`` random modal states without balancing (the paper's ablations), with the modal
    bound :math:`\\sum_{\\text{discarded}} \\|c_i\\| \\|b_i\\| / (1 - |\\lambda_i|)`.

    Parameters
    ----------
    sys : DiagonalStateSpace
        The layer's system, possibly a batch (reduced to one shared rank).
    rank : int
        States to keep.
    selection : {"largest", "smallest", "random"}, optional
        Which states to keep.
    method : {"sqrt", "bfsr"}, optional
        Balanced-truncation method.
    horizon : int, optional
        Finite-horizon Gramians.
    real_output : bool, optional
        Reduce the exact real realization of ``Re(C x)``.
    max_condition : float, optional
        Refuse re-diagonalisation when the eigenvector basis is worse conditioned.
    permutation : (n,) integer array, optional
        A random permutation of the states (``selection="random"``: the first ``rank`` are
        kept), drawn by the caller with its framework's random source.

    Returns
    -------
    ReductionPlan
        The reduced system or the kept indices, and the bound.

    Raises
    ------
    StabilityError, ConditioningError
        The reduced system cannot be re-diagonalised into a stable layer.

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core import DiagonalStateSpace
    >>> from compressm_core.reduction import plan_reduction
    >>> sys = DiagonalStateSpace(np.array([0.9, 0.5, 0.1]), np.ones((3, 1)), np.ones((1, 3)))
    >>> plan = plan_reduction(sys, 2)
    >>> plan.system.poles.shape, plan.bound > 0
    ((2,), True)
    """
    xp = _xp.namespace(sys.poles)
    if selection == "random":
        if permutation is None:
            msg = "`selection='random'` needs a `permutation` of the states."
            raise TypeError(msg)
        kept, dropped = xp.sort(permutation[:rank]), xp.sort(permutation[rank:])
        return ReductionPlan(None, kept, _modal_bound(sys, dropped))
    if selection == "largest":
        bt = balanced_truncation(
            sys, rank, method=method, horizon=horizon, real_output=real_output
        )
        reduced, bound = bt.system, float(xp.max(bt.error_bound))
    else:
        br = balanced_realization(sys, horizon=horizon, real_output=real_output)
        a, b, c, d = br.system
        cut = int(a.shape[-1]) - rank
        reduced = StateSpace(a[..., cut:, cut:], b[..., cut:, :], c[..., :, cut:], d)
        bound = float(xp.max(2 * xp.sum(br.hsv[..., :cut], axis=-1)))
    diag = rediagonalize(reduced, real_output=real_output, max_condition=max_condition)
    return ReductionPlan(diag, None, bound)


def _modal_bound(sys: DiagonalStateSpace, dropped: Array) -> float:
    """The modal bound of the dropped states, the largest over a batch of systems."""
    xp = _xp.namespace(sys.poles)
    b, c = xp.take(sys.b, dropped, axis=-2), xp.take(sys.c, dropped, axis=-1)
    gain = xp.linalg.vector_norm(b, axis=-1) * xp.linalg.vector_norm(c, axis=-2)
    poles = xp.abs(xp.take(sys.poles, dropped, axis=-1))
    return float(xp.max(xp.sum(gain / (1 - poles), axis=-1)))


def reduction_report(
    *,
    old_rank: int,
    new_rank: int,
    hsv: Any,
    bound: float,
    hinf_error: float | None,
    selection: str,
    indices: Any,
    changed: Iterable[str],
    state_axes: Mapping[str, int],
) -> LayerReduction:
    """The :class:`LayerReduction` of a written plan (``indices`` slice every state axis).

    Parameters
    ----------
    old_rank, new_rank, hsv, hinf_error, selection, indices : optional
        As in :class:`LayerReduction`.
    bound : float
        The plan's bound (``error_bound``).
    changed : iterable of str
        The parameters written.
    state_axes : mapping
        ``{parameter name: state axis}`` of the layer's adapter.

    Returns
    -------
    LayerReduction
        The report.
    """
    slices = (
        {} if indices is None else {name: (axis, indices) for name, axis in state_axes.items()}
    )
    return LayerReduction(
        old_rank=old_rank,
        new_rank=new_rank,
        hsv=hsv,
        error_bound=bound,
        hinf_error=hinf_error,
        selection=selection,
        indices=indices,
        changed=tuple(changed),
        slices=slices,
    )


class ReduceKeywords(TypedDict, total=False):
    """The keyword arguments every ``reduce_layer`` takes (for type checkers).

    ``compressm_torch.reduce_layer``, ``compressm_jax.reduce_layer`` and
    ``compressm_jax.reduce_lru_params`` take them as ``**keywords: Unpack[ReduceKeywords]``; their
    meaning, defaults and checks are those of :class:`ReduceArguments`.
    """

    tau: float | None
    energy: Literal["sum", "squared"]
    method: Literal["sqrt", "bfsr"]
    selection: Selection
    real_output: bool
    horizon: int | None
    compute_error: bool
    max_condition: float


@dataclass(frozen=True)
class ReduceArguments:
    """The keyword arguments of a layer's reduction, with their defaults.

    Attributes
    ----------
    tau : float, optional
        Choose the rank with :func:`~compressm_core.select_rank` (``None``: a rank is given).
    energy : {"sum", "squared"}
        Energy used with ``tau``.
    method : {"sqrt", "bfsr"}
        Balanced-truncation method.
    selection : {"largest", "smallest", "random"}
        Which states to keep.
    real_output : bool
        Reduce the exact real realization of ``Re(C x)``.
    horizon : int, optional
        Finite-horizon Gramians over ``horizon`` steps.
    compute_error : bool
        Measure the H-infinity norm of the change after writing.
    max_condition : float
        Refuse re-diagonalisation when the eigenvector basis is worse conditioned.

    Examples
    --------
    >>> from compressm_core.reduction import ReduceArguments
    >>> ReduceArguments.from_keywords({"tau": 0.1}, None, owner="reduce_layer").energy
    'sum'
    """

    tau: float | None = None
    energy: Literal["sum", "squared"] = "sum"
    method: Literal["sqrt", "bfsr"] = "sqrt"
    selection: Selection = "largest"
    real_output: bool = False
    horizon: int | None = None
    compute_error: bool = False
    max_condition: float = 1e8

    @classmethod
    def from_keywords(
        cls, keywords: Mapping[str, Any], rank: int | None, *, owner: str
    ) -> ReduceArguments:
        """The arguments named in ``keywords``, checked with ``rank`` (:func:`check_reduction`).

        Raises
        ------
        TypeError
            ``keywords`` names no argument (the message names ``owner``); neither or both of
            ``rank`` and ``tau``.
        ValueError
            An unknown ``selection``, or ``"random"`` with ``real_output``.
        """
        unknown = sorted(set(keywords) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            msg = f"{owner}() got an unexpected keyword argument {unknown[0]!r}"
            raise TypeError(msg)
        arguments = cls(**keywords)
        check_reduction(rank, arguments.tau, arguments.selection, arguments.real_output)
        return arguments

    @classmethod
    def parameters(cls) -> list[inspect.Parameter]:
        """The arguments as keyword-only parameters with their defaults (for
        :func:`~compressm_core.training.signature_with`)."""
        return [
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type
            )
            for f in dataclasses.fields(cls)
        ]

    def layer_hsv(self, sys: DiagonalStateSpace, rank: int | None) -> tuple[Array, int]:
        """:func:`layer_hsv` with these arguments."""
        return layer_hsv(sys, rank, **self._named("tau", "energy", "horizon", "real_output"))

    def plan(
        self,
        sys: DiagonalStateSpace,
        rank: int,
        permute: Callable[[int], Array] | None = None,
    ) -> ReductionPlan:
        """:func:`plan_reduction` with these arguments; ``permute(n)`` draws the permutation of
        the ``n`` states that ``selection="random"`` keeps the first ``rank`` of."""
        permutation = None
        if self.selection == "random" and permute is not None:
            permutation = permute(int(sys.poles.shape[-1]))
        named = self._named("selection", "method", "horizon", "real_output", "max_condition")
        return plan_reduction(sys, rank, permutation=permutation, **named)

    def _named(self, *names: str) -> dict[str, Any]:
        return {name: getattr(self, name) for name in names}
