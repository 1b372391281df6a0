"""Options of the training controllers, shared by every framework.

:class:`ReductionOptions` holds the framework-free options of :class:`compressm_torch.CompreSSM`,
:class:`compressm_jax.CompreSSM` and :class:`compressm_torch.lightning.CompreSSMCallback`, with
their defaults and checks: those classes build one from their keyword arguments, so an invalid
option fails with the same message everywhere. Options that depend on a framework (the optimizer
policy, the Gramian horizon, the statistics of selective layers) and the length of training
(``total_steps``) stay with the controllers.

:class:`ControllerBase` is the framework-free part of the controllers: schedule, step counting,
rank rule and gate inputs, the pragmatic snapshot / rollback flow and event records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ._controller import ControllerBase
from ._validation import check_int
from .schedule import _check_fraction

__all__ = [
    "MODES",
    "SCHEDULES",
    "SELECTIONS",
    "ControllerBase",
    "Mode",
    "ReductionOptions",
    "Schedule",
    "Selection",
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

    Every field has the default of the keyword argument of the same name of
    :class:`compressm_torch.CompreSSM`, :class:`compressm_jax.CompreSSM` and
    :class:`compressm_torch.lightning.CompreSSMCallback`, which document them in full.

    Parameters
    ----------
    tau : float, optional
        Fraction of the HSV energy that may be discarded at each event (``"tolerance"``), in
        ``[0, 1)``.
    mode : {"tolerance", "fixed", "pragmatic"}, optional
        How the rank of a reduction is chosen (:data:`Mode`).
    warmup_fraction : float, optional
        The default schedule spreads ``num_reductions`` events over this fraction of training,
        in ``(0, 1]``; the deadline of the certified schedule. Checked only when
        ``reduction_steps`` is ``None`` (it is unused otherwise).
    num_reductions : int, optional
        Events of the default schedule; cuts per layer of the certified schedule.
    reduction_steps : sequence of int, optional
        Explicit schedule (steps >= 1), stored as a tuple; excludes ``schedule="certified"``.
    fraction : float, optional
        Fraction of states removed per event in ``"fixed"`` and ``"pragmatic"`` modes, in
        ``[0, 1)``.
    selection : {"largest", "smallest", "random"}, optional
        Which states are kept (:data:`Selection`); ``"random"`` excludes ``real_output=True``.
    gate : float, optional
        Reduce only if ``new_rank < gate * current_rank``; in ``[0, 1]``.
    min_rank : int, optional
        Never go below this many states (>= 1).
    method : {"sqrt", "bfsr"}, optional
        Balanced-truncation algorithm.
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
        Measure the H-infinity change of every reduced layer.
    seed : int, optional
        Seed of the random selection.
    schedule : {"steps", "certified"}, optional
        Fixed steps, or cuts certified stable (:data:`Schedule`); ``"certified"`` excludes
        ``mode="pragmatic"``.
    check_every : int, optional
        Steps between checks of the certified schedule and between readings of the training
        loss (``None``: 1 % of ``total_steps``, set by the controller).
    certify_window : int, optional
        Consecutive certified checks a cut needs.
    learning_drop : float, optional
        Relative fall of the training loss that counts as "learning has started", in ``(0, 1)``.
    rank_rtol : float, optional
        Relative spread of the rule's rank that counts as stable, in ``[0, 1)``.
    rewarmup_steps : int, optional
        Optimizer updates of the learning-rate re-warm-up after each cut (>= 0).
    max_cut : float or None, optional
        Largest fraction of a layer's current states one event may remove, in ``(0, 1]``
        (a floor ``ceil((1 - max_cut) n)`` on the rank); ``None``: no floor (the paper).

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
    rank_rtol: float = 0.1
    rewarmup_steps: int = 0
    max_cut: float | None = None

    def __post_init__(self) -> None:
        def store(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        store("tau", _check_fraction("tau", self.tau))
        store("fraction", _check_fraction("fraction", self.fraction))
        store("gate", _check_fraction("gate", self.gate, closed=True))
        store("rollback_rtol", _check_fraction("rollback_rtol", self.rollback_rtol, closed=True))
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
