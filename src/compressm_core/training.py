"""Options of the training controllers, shared by every framework.

:class:`ReductionOptions` holds the framework-free options of :class:`compressm_torch.CompreSSM`,
:class:`compressm_jax.CompreSSM`, :class:`compressm_torch.lightning.CompreSSMCallback` and
:class:`compressm_torch.hf.CompreSSMTrainerCallback`, with their defaults, checks and
documentation. Those classes take one as ``options=`` or build one from their keyword arguments
(:func:`resolve_options`), so an invalid option fails with the same message everywhere. Options
that depend on a framework (the optimizer policy, the Gramian horizon, the statistics of
selective layers) and the length of training (``total_steps``) stay with the controllers.

:class:`ControllerBase` is the framework-free part of the controllers: schedule, step counting,
rank rule and gate inputs, the pragmatic snapshot / rollback flow and event records;
:func:`relative_bound` is a reduction's error bound over its largest Hankel singular value.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict, TypeVar

from ._controller import ControllerBase
from ._events import BatchedLayer
from ._summary import relative_bound
from .certified import check_chance_loss
from .checks import check_fraction, check_int

__all__ = [
    "MODES",
    "SCHEDULES",
    "SELECTIONS",
    "BatchedLayer",
    "ControllerBase",
    "Mode",
    "ReductionKeywords",
    "ReductionOptions",
    "Schedule",
    "Selection",
    "option_parameters",
    "relative_bound",
    "resolve_options",
    "signature_with",
]

Mode = Literal["tolerance", "fixed", "pragmatic"]
"""How the rank of a reduction is chosen: by the HSV energy ``tau`` (``"tolerance"``), by a fixed
``fraction`` (``"fixed"``), or by a fixed ``fraction`` judged by a validation metric
(``"pragmatic"``)."""

Selection = Literal["largest", "smallest", "random"]
"""Which states a reduction keeps: the strongest balanced states, the weakest, or random modal
states."""

Schedule = Literal["steps", "certified"]
"""When reductions happen: at fixed steps, or when a cut is certified stable."""

MODES: tuple[Mode, ...] = ("tolerance", "fixed", "pragmatic")
"""The values of :data:`Mode`."""

SELECTIONS: tuple[Selection, ...] = ("largest", "smallest", "random")
"""The values of :data:`Selection`."""

SCHEDULES: tuple[Schedule, ...] = ("steps", "certified")
"""The values of :data:`Schedule`."""

#: Upper bound of the counts checked as by :class:`~compressm_core.certified.CertifiedSchedule`.
_MAX_INT = 2**62


@dataclass(frozen=True, kw_only=True)
class ReductionOptions:
    """The framework-free options of a training controller, checked at construction.

    The controllers (:class:`compressm_torch.CompreSSM`, :class:`compressm_jax.CompreSSM`,
    :class:`compressm_torch.lightning.CompreSSMCallback`,
    :class:`compressm_torch.hf.CompreSSMTrainerCallback`) take these options by keyword, with
    these defaults, or all at once as ``options=``; this is where they are documented.

    Parameters
    ----------
    tau : float, optional
        Fraction of the HSV energy that may be discarded at each event (``"tolerance"``), in
        ``[0, 1)``.
    mode : {"tolerance", "fixed", "pragmatic"}, optional
        How the rank of a reduction is chosen (:data:`Mode`). ``"pragmatic"``: reduce by
        ``fraction``, compare the next reported validation metric with the one before the
        event, and if it fell by more than ``rollback_rtol`` (relative) or is NaN, restore the
        model and the optimizer's per-parameter state from the snapshot taken before the event
        and stop reducing (the learning-rate schedule is not rolled back).
    warmup_fraction : float, optional
        The default schedule spreads ``num_reductions`` events evenly over this fraction of
        training (:func:`~compressm_core.reduction_schedule`), in ``(0, 1]``; the deadline of
        the certified schedule. Checked only when ``reduction_steps`` is ``None`` (it is unused
        otherwise).
    num_reductions : int, optional
        Events of the default schedule; cuts per layer of the certified schedule.
    reduction_steps : sequence of int, optional
        Explicit schedule (steps >= 1, overriding the default), stored as a tuple; excludes
        ``schedule="certified"``.
    fraction : float, optional
        Fraction of states removed per event in ``"fixed"`` and ``"pragmatic"`` modes, in
        ``[0, 1)``.
    selection : {"largest", "smallest", "random"}, optional
        Keep the strongest balanced states (the method), the weakest, or random modal states
        (:data:`Selection`); ``"random"`` excludes ``real_output=True``.
    gate : float, optional
        Reduce only if ``new_rank < gate * current_rank`` (the paper's 5 % gate); in
        ``[0, 1]``.
    min_rank : int, optional
        Never go below this many states (>= 1).
    method : {"sqrt", "bfsr"}, optional
        Balanced-truncation algorithm (:func:`~compressm_core.balanced_truncation`).
    real_output : bool, optional
        Keep the reduced layer's output real (see the adapters' ``reduce_layer``).
    energy : {"sum", "squared"}, optional
        HSV energy of the ``"tolerance"`` rule (:func:`~compressm_core.select_rank`).
    rollback_rtol : float, optional
        Relative fall of the validation metric that triggers a rollback (``"pragmatic"``), in
        ``[0, 1]``.
    metric : {"max", "min"}, optional
        Whether a larger (accuracy) or smaller (loss) validation metric is better.
    compute_error : bool, optional
        Measure the H-infinity change of every reduced layer (recorded in the history).
    seed : int, optional
        Seed of the random selection.
    schedule : {"steps", "certified"}, optional
        ``"steps"``: reduce at the fixed steps (``reduction_steps``, or ``num_reductions``
        evenly spaced in the first ``warmup_fraction``; the paper). ``"certified"``: check the
        layers every ``check_every`` steps before the deadline ``warmup_fraction *
        total_steps``; cut a layer once learning has started (pass ``loss`` to the
        controller's ``step``) and the cut at the rank the rule asks for has been certified
        stable for ``certify_window`` checks (Weyl bound of :class:`~compressm_core.RankTracker`;
        for selective layers, an unchanged set of kept states) or the rule's rank has stayed
        within ``rank_rtol`` over ``certify_window + 1`` checks, at most ``num_reductions``
        times; the deadline forces the remaining cuts (:mod:`compressm_core.certified`).
        ``"certified"`` excludes ``mode="pragmatic"``.
    check_every : int, optional
        Steps between checks of the certified schedule and between readings of the training
        loss (``None``: 1 % of ``total_steps``, set by the controller).
    certify_window : int, optional
        Consecutive certified checks a cut needs (certified schedule).
    learning_drop : float, optional
        Relative fall of the mean training loss below its first ``check_every`` steps that
        counts as "learning has started", in ``(0, 1)``.
    chance_loss : float or None, optional
        Training loss of a model that has learned nothing beyond the data's marginal
        statistics (> 0; for example :math:`\\ln C` for ``C`` balanced classes, or the entropy
        of the symbol frequencies for a language model). Learning has started once the mean
        loss falls by ``learning_drop`` below it. ``None``: the mean of the first
        ``check_every`` steps is the reference, which a quick early fall to the chance level
        (learning the class or symbol frequencies) passes.
    rank_rtol : float, optional
        Relative spread of the rule's rank over the last checks that counts as stable
        (certified schedule), in ``[0, 1)``.
    rewarmup_steps : int, optional
        After each event that reduced a layer, scale the learning rate of the next
        ``rewarmup_steps`` optimizer updates by ``k / (rewarmup_steps + 1)``, ``k = 1, 2, ...``
        (a brief re-warm-up; >= 0). How it is applied depends on the framework (torch: step
        hooks of the optimizer; JAX: :func:`compressm_jax.scale_by_rewarmup`).
    max_cut : float or None, optional
        Largest fraction of a layer's current states one event may remove, in ``(0, 1]``
        (a floor ``ceil((1 - max_cut) n)`` on the rank); ``None``: no floor (the paper).
    max_bound : float or None, optional
        Largest error bound one event may cause, relative to the layer's largest Hankel
        singular value: the rank is raised to the smallest :math:`r` with
        :math:`2 \\sum_{i > r} \\sigma_i \\le` ``max_bound`` :math:`\\sigma_1` (> 0; LTI layers
        only). ``None``: no such floor (the paper).

    Raises
    ------
    ValueError
        If an option is out of range, not one of its allowed values, or excluded by another
        option; ``TypeError`` if ``check_every``, ``certify_window`` or ``num_reductions`` is
        not an integer. The message names the argument.

    Examples
    --------
    >>> from compressm_core.training import ReductionOptions
    >>> options = ReductionOptions(mode="fixed", fraction=0.25, reduction_steps=[10, 20])
    >>> options.reduction_steps
    (10, 20)
    >>> ReductionOptions(tau=1.5)
    Traceback (most recent call last):
    ...
    ValueError: `tau` must be a float in [0, 1); received 1.5.
    """

    tau: float = 0.1
    mode: Mode = "tolerance"
    warmup_fraction: float = 0.1
    num_reductions: int = 4
    reduction_steps: Sequence[int] | None = None
    fraction: float = 0.1
    selection: Selection = "largest"
    gate: float = 0.95
    min_rank: int = 1
    method: Literal["sqrt", "bfsr"] = "sqrt"
    real_output: bool = False
    energy: Literal["sum", "squared"] = "sum"
    rollback_rtol: float = 0.02
    metric: Literal["max", "min"] = "max"
    compute_error: bool = False
    seed: int = 0
    schedule: Schedule = "steps"
    check_every: int | None = None
    certify_window: int = 3
    learning_drop: float = 0.2
    chance_loss: float | None = None
    rank_rtol: float = 0.1
    rewarmup_steps: int = 0
    max_cut: float | None = None
    max_bound: float | None = None

    def __post_init__(self) -> None:
        def store(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        store("tau", check_fraction(self.tau, "tau"))
        store("fraction", check_fraction(self.fraction, "fraction"))
        store("gate", check_fraction(self.gate, "gate", closed=True))
        store("rollback_rtol", check_fraction(self.rollback_rtol, "rollback_rtol", closed=True))
        store("min_rank", check_int(self.min_rank, "min_rank", low=1))
        for name, value, allowed in (
            ("mode", self.mode, MODES),
            ("selection", self.selection, SELECTIONS),
            ("method", self.method, ("sqrt", "bfsr")),
            ("energy", self.energy, ("sum", "squared")),
            ("metric", self.metric, ("max", "min")),
            ("schedule", self.schedule, SCHEDULES),
        ):
            if value not in allowed:
                msg = f"`{name}` must be one of {allowed}; received {value!r}."
                raise ValueError(msg)
        if self.selection == "random" and self.real_output:
            msg = "`selection='random'` keeps modal states; it excludes `real_output=True`."
            raise ValueError(msg)
        if self.schedule == "certified" and self.mode == "pragmatic":
            msg = (
                "`schedule='certified'` works with mode 'tolerance' or 'fixed'; "
                "received mode 'pragmatic'."
            )
            raise ValueError(msg)
        if self.schedule == "certified" and self.reduction_steps is not None:
            msg = "`reduction_steps` is an explicit schedule; it excludes `schedule='certified'`."
            raise ValueError(msg)
        store("rewarmup_steps", check_int(self.rewarmup_steps, "rewarmup_steps", low=0))
        cut = self.max_cut
        if cut is not None:
            if isinstance(cut, bool) or not isinstance(cut, (int, float)) or not 0 < cut <= 1:
                msg = f"`max_cut` must be None or a number in (0, 1]; received {cut!r}."
                raise ValueError(msg)
            store("max_cut", float(cut))
        limit = self.max_bound
        if limit is not None:
            if (
                isinstance(limit, bool)
                or not isinstance(limit, (int, float))
                or not 0 < limit < math.inf
            ):
                msg = f"`max_bound` must be None or a finite number > 0; received {limit!r}."
                raise ValueError(msg)
            store("max_bound", float(limit))
        counts: list[tuple[str, object]] = [
            ("certify_window", self.certify_window),
            ("num_reductions", self.num_reductions),
        ]
        if self.check_every is not None:  # None: the controller derives it from total_steps
            counts.insert(0, ("check_every", self.check_every))
        for field, count in counts:
            store(field, check_int(count, field, low=1, high=_MAX_INT))
        drop = self.learning_drop
        if not (isinstance(drop, (int, float)) and 0 < drop < 1):
            msg = f"`learning_drop` must be a number in (0, 1); received {drop!r}."
            raise ValueError(msg)
        store("learning_drop", float(drop))
        store("chance_loss", check_chance_loss(self.chance_loss))
        rtol = self.rank_rtol
        if not (isinstance(rtol, (int, float)) and 0 <= rtol < 1):
            msg = f"`rank_rtol` must be a number in [0, 1); received {rtol!r}."
            raise ValueError(msg)
        store("rank_rtol", float(rtol))
        if self.reduction_steps is None:
            if not 0 < self.warmup_fraction <= 1:
                msg = f"`warmup_fraction` must be in (0, 1]; received {self.warmup_fraction!r}."
                raise ValueError(msg)
        else:
            steps = tuple(check_int(s, "reduction_steps[i]", low=1) for s in self.reduction_steps)
            store("reduction_steps", steps)


class ReductionKeywords(TypedDict, total=False):
    """The fields of :class:`ReductionOptions` as keyword arguments (for type checkers).

    The controllers take them as ``**keywords: Unpack[ReductionKeywords]``; their values, defaults
    and checks are those of :class:`ReductionOptions`.
    """

    tau: float
    mode: Mode
    warmup_fraction: float
    num_reductions: int
    reduction_steps: Sequence[int] | None
    fraction: float
    selection: Selection
    gate: float
    min_rank: int
    method: Literal["sqrt", "bfsr"]
    real_output: bool
    energy: Literal["sum", "squared"]
    rollback_rtol: float
    metric: Literal["max", "min"]
    compute_error: bool
    seed: int
    schedule: Schedule
    check_every: int | None
    certify_window: int
    learning_drop: float
    chance_loss: float | None
    rank_rtol: float
    rewarmup_steps: int
    max_cut: float | None
    max_bound: float | None


def resolve_options(
    options: ReductionOptions | None, keywords: Mapping[str, Any], *, owner: str
) -> ReductionOptions:
    """The options of a controller: ``options`` with the fields named in ``keywords`` replaced.

    Parameters
    ----------
    options : ReductionOptions or None
        The options given as one record (``None``: the defaults).
    keywords : mapping
        Options given by name; they take precedence over ``options``.
    owner : str
        The class whose arguments these are, for the messages.

    Returns
    -------
    ReductionOptions
        The checked options.

    Raises
    ------
    TypeError
        If ``options`` is not a :class:`ReductionOptions` or ``keywords`` names no option.
    ValueError
        If an option is invalid (see :class:`ReductionOptions`).

    Examples
    --------
    >>> from compressm_core.training import ReductionOptions, resolve_options
    >>> resolve_options(ReductionOptions(tau=0.2), {"mode": "fixed"}, owner="CompreSSM").tau
    0.2
    """
    if options is None:
        options = ReductionOptions()
    elif not isinstance(options, ReductionOptions):
        msg = (
            f"`options` must be a compressm_core.training.ReductionOptions or None; received "
            f"{type(options).__name__}."
        )
        raise TypeError(msg)
    unknown = sorted(set(keywords) - _FIELDS)
    if unknown:
        msg = f"{owner}() got an unexpected keyword argument {unknown[0]!r}"
        raise TypeError(msg)
    return dataclasses.replace(options, **keywords) if keywords else options


def option_parameters() -> list[inspect.Parameter]:
    """The fields of :class:`ReductionOptions` as keyword-only parameters with their defaults.

    Returns
    -------
    list of inspect.Parameter
        In the order of the fields.

    Examples
    --------
    >>> from compressm_core.training import option_parameters
    >>> option_parameters()[0]
    <Parameter "tau: 'float' = 0.1">
    """
    return [
        inspect.Parameter(f.name, _KEYWORD, default=f.default, annotation=f.type)
        for f in dataclasses.fields(ReductionOptions)
    ]


F = TypeVar("F", bound=Callable[..., Any])
_KEYWORD = inspect.Parameter.KEYWORD_ONLY


def signature_with(parameters: Iterable[inspect.Parameter] | None = None) -> Callable[[F], F]:
    """A decorator that shows ``parameters`` in place of the ``**keywords`` of a function.

    :func:`inspect.signature` (``help``, IDEs) then lists every option a controller accepts by
    name, with its default, although the function takes them as ``**keywords``. Parameters the
    function names itself are not repeated.

    Parameters
    ----------
    parameters : iterable of inspect.Parameter, optional
        Keyword-only parameters; default :func:`option_parameters`.

    Returns
    -------
    callable
        The decorator; it returns the function itself, with ``__signature__`` set.

    Examples
    --------
    >>> import inspect
    >>> from compressm_core.training import signature_with
    >>> @signature_with()
    ... def build(*, total_steps, **keywords):
    ...     pass
    >>> inspect.signature(build).parameters["gate"].default
    0.95
    """
    extra = option_parameters() if parameters is None else list(parameters)

    def decorate(function: F) -> F:
        signature = inspect.signature(function)
        own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        names = {p.name for p in own}
        shown = own + [p for p in extra if p.name not in names]
        function.__signature__ = signature.replace(parameters=shown)  # type: ignore[attr-defined]
        return function

    return decorate


_FIELDS = frozenset(f.name for f in dataclasses.fields(ReductionOptions))
