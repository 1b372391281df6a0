"""When to reduce, and the record of a reduction: shared by the framework controllers.

Plain Python (no arrays): the training controllers of ``compressm_torch`` and ``compressm_jax``
use the same schedule, the same event record and the same warning, so their histories compare
one to one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .checks import check_int

__all__ = ["ReductionEvent", "ReductionWarning", "reduction_schedule"]


class ReductionWarning(UserWarning):
    """A scheduled reduction was refused or skipped; the model was left as it was."""


@dataclass
class ReductionEvent:
    """One entry of a training controller's ``history``.

    Attributes
    ----------
    step : int
        Controller step (number of ``step()`` calls) at the event.
    layer : str
        Qualified name of the layer in the model.
    status : str
        ``"reduced"``, ``"skipped"`` (the 5 % gate or nothing to gain), ``"refused"`` (the
        reduction would have produced an invalid layer; see ``reason``) or ``"rolled_back"``
        (pragmatic mode undid it).
    old_rank, new_rank : int
        State sizes before and after.
    hsv : list of float
        Hankel singular values before the event (for selective layers, their state-importance
        scores).
    error_bound : float or None
        Bound on the H-infinity change of the layer (``None`` for selective layers).
    hinf_error : float or None
        Measured H-infinity change, when the controller was asked to measure it.
    seconds : float
        Wall time spent on this layer (HSVs, truncation, write-back, optimizer surgery).
    reason : str
        Why a reduction was skipped, refused or rolled back.
    trigger : str
        What made the controller cut: ``"scheduled"`` (a step of the fixed schedule),
        ``"certified"`` (learning had started and the cut was certified stable),
        ``"deadline"`` (the certified schedule's deadline forced it) or ``""`` (a direct
        :meth:`reduce` call, a rollback).
    margin : float or None
        Certified schedule: the certificate margin :math:`g_r - 2 A_r` of the cut when it was
        made (``None`` for selective layers and other triggers).
    loss : float or None
        Mean training loss of the last ``check_every`` steps before the event, when the loss is
        passed to ``step``.
    """

    step: int
    layer: str
    status: str
    old_rank: int
    new_rank: int
    hsv: list[float] = field(default_factory=list)
    error_bound: float | None = None
    hinf_error: float | None = None
    seconds: float = 0.0
    reason: str = ""
    trigger: str = ""
    margin: float | None = None
    loss: float | None = None


def reduction_schedule(
    total_steps: int, *, warmup_fraction: float = 0.1, num_reductions: int = 4
) -> list[int]:
    """Evenly spaced reduction steps inside the warm-up: ``round(k f T / R)``, ``k = 1..R``.

    Examples
    --------
    >>> reduction_schedule(1000)
    [25, 50, 75, 100]
    """
    check_int(total_steps, "total_steps", low=1)
    check_int(num_reductions, "num_reductions", low=1)
    if not 0 < warmup_fraction <= 1:
        msg = f"`warmup_fraction` must be in (0, 1]; received {warmup_fraction!r}."
        raise ValueError(msg)
    steps = {
        max(1, round(total_steps * warmup_fraction * k / num_reductions))
        for k in range(1, num_reductions + 1)
    }
    return sorted(steps)
