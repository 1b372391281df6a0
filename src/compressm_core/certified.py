"""When to cut: once learning has started and the cut is certified stable, with a deadline.

The paper reduces at fixed steps early in training (four events in the first 10 %). Whether a
step is early enough *and* late enough depends on the task: on some, the fixed steps fall while
the loss is still at its initial level and the HSVs still reflect the initialisation. The
certified schedule asks two questions at every check instead:

1. **Has learning started?** The mean training loss of the last ``check_every`` steps has
   fallen by at least ``learning_drop`` (relative) below a reference: the chance-level loss
   ``chance_loss`` when it is given, else the mean of the first ``check_every`` steps. The
   second reference is fooled by a quick early fall to the chance level, when a model first
   learns the class or symbol frequencies and then sits on a plateau (a language model
   learning to copy falls from ``ln V`` to the entropy of its symbols within a few dozen
   steps, and learns to copy hundreds of steps later).
2. **Is the cut stable?** Either the cut at the rank the rule asks for has been certified
   for ``window`` consecutive checks by the Weyl bound of :class:`~compressm_core.RankTracker`
   (HSVs of the current parameters, :func:`~compressm_core.hsv_perturbation_bound` between
   consecutive checks; trigger ``"certified"``), or the rank the rule asks for has stayed
   within ``rank_rtol`` (relative) of its latest value over the last ``window + 1`` checks
   (trigger ``"stable"``). Selective layers have no Weyl bound: their cut is stable when the
   kept state indices have not changed for ``window`` checks.

The Weyl certificate is rigorous but bounds the movement of *every* HSV by one number, which
the largest HSVs dominate: in the study of ``benchmarks/fidelity.py`` (MNIST-1D, LRU, 30 steps
between checks at a learning rate of 1e-2) the bound was 25-110 while the gaps at the cut were
0.04-0.4, so it never certified a cut. The rank criterion is the practical test; the Weyl
certificate is kept for small learning rates and widely separated spectra, where it does fire.

A layer is cut when both hold, at most ``num_reductions`` times. At the ``deadline`` step every
layer gets its remaining cuts, so a run always reduces. This module holds the bookkeeping; the
training controllers read the layers and make the cuts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ._validation import check_int
from .certificates import RankTracker

__all__ = ["CertifiedSchedule", "check_chance_loss"]


def check_chance_loss(value: object) -> float | None:
    """``value`` as the reference loss of the learning test: ``None`` or a finite number > 0.

    Raises
    ------
    TypeError
        If ``value`` is neither ``None`` nor a real number.
    ValueError
        If it is not finite, not positive, or a bool.
    """
    if value is None:
        return None
    if not isinstance(value, (int, float)):
        msg = f"`chance_loss` must be a positive number or None; received {value!r}."
        raise TypeError(msg)
    if isinstance(value, bool) or not (math.isfinite(value) and value > 0):
        msg = f"`chance_loss` must be a positive number or None; received {value!r}."
        raise ValueError(msg)
    return float(value)


class CertifiedSchedule:
    """Bookkeeping of the certified schedule: loss levels, per-layer trackers, cut counts.

    Parameters
    ----------
    layers : iterable of str
        Names of the layers it decides for.
    check_every : int
        Steps between checks (also the length of the loss-averaging interval).
    deadline : int
        Step at which every remaining cut is forced; checks run at the multiples of
        ``check_every`` before it.
    window : int
        Consecutive certified checks a cut needs.
    num_reductions : int
        Cuts per layer at most.
    learning_drop : float
        Relative fall of the interval-mean training loss below the first interval's mean
        that counts as "learning has started", in ``(0, 1)``.
    rank_rtol : float, optional
        Relative spread of the rule's rank over the last ``window + 1`` checks that counts as
        stable, in ``[0, 1)``.
    chance_loss : float or None, optional
        The reference of the learning test, the loss of a model that has learned nothing
        (> 0); ``None``: the first interval's mean.

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core.certified import CertifiedSchedule
    >>> cs = CertifiedSchedule(["ssm"], check_every=10, deadline=100, window=2,
    ...                        num_reductions=1, learning_drop=0.2)
    >>> for step in range(1, 31):
    ...     cs.observe_loss(2.3 if step <= 10 else 1.0)
    ...     if cs.is_check(step):
    ...         cs.close_interval()
    >>> cs.learning_started
    True
    >>> late = CertifiedSchedule(["ssm"], check_every=10, deadline=100, window=2,
    ...                          num_reductions=1, learning_drop=0.2, chance_loss=2.08)
    >>> for step in range(1, 31):  # 3.1 -> 2.08: the symbol frequencies, not learning
    ...     late.observe_loss(3.1 if step <= 10 else 2.08)
    ...     if late.is_check(step):
    ...         late.close_interval()
    >>> late.learning_started
    False
    >>> hsv = np.array([3.0, 1.0, 0.01])
    >>> [cs.update("ssm", hsv, rank=2, bound=None if k == 0 else 0.01)[0] for k in range(3)]
    [None, None, 'certified']
    """

    def __init__(
        self,
        layers: Iterable[str],
        *,
        check_every: int,
        deadline: int,
        window: int,
        num_reductions: int,
        learning_drop: float,
        rank_rtol: float = 0.1,
        chance_loss: float | None = None,
    ) -> None:
        layers_list = list(layers)
        self.check_every = check_int(check_every, "check_every", low=1, high=2**62)
        self.deadline = check_int(deadline, "deadline", low=1, high=2**62)
        self.window = check_int(window, "certify_window", low=1, high=2**62)
        self.num_reductions = check_int(num_reductions, "num_reductions", low=1, high=2**62)
        if not (isinstance(learning_drop, (int, float)) and 0 < learning_drop < 1):
            msg = f"`learning_drop` must be a number in (0, 1); received {learning_drop!r}."
            raise ValueError(msg)
        self.learning_drop = float(learning_drop)
        if not (isinstance(rank_rtol, (int, float)) and 0 <= rank_rtol < 1):
            msg = f"`rank_rtol` must be a number in [0, 1); received {rank_rtol!r}."
            raise ValueError(msg)
        self.rank_rtol = float(rank_rtol)
        self.chance_loss = check_chance_loss(chance_loss)
        self._ranks: dict[str, list[int]] = {name: [] for name in layers_list}
        self.names = layers_list
        self.initial_loss: float | None = None
        self.recent_loss: float | None = None
        self._sum: Any = 0.0
        self._count = 0
        self._started = False
        self.cuts = dict.fromkeys(self.names, 0)
        self.trackers = {name: RankTracker(max_history=1) for name in self.names}
        self._kept: dict[str, list[tuple[int, ...]]] = {name: [] for name in self.names}

    # -- loss -----------------------------------------------------------------------------------

    def observe_loss(self, loss: Any) -> None:
        """Add one training loss (a float or a 0-D array of any framework) to the interval.

        Arrays are summed as they are and read once, by :meth:`close_interval`.
        """
        self._sum = self._sum + loss
        self._count += 1

    def close_interval(
        self, combine: Callable[[Sequence[float]], Sequence[float]] | None = None
    ) -> None:
        """End the loss interval: its mean becomes :attr:`recent_loss` (the first one also
        :attr:`initial_loss`).

        Parameters
        ----------
        combine : callable, optional
            Maps ``[sum, count]`` of this process's losses in the interval to those of all
            processes of a distributed run (a sum over processes), so that every process
            decides by the same mean. It is called at every interval, also one without
            losses, so every process takes part.
        """
        total, count = (float(self._sum) if self._count else 0.0), self._count
        self._sum, self._count = 0.0, 0
        if combine is not None:
            total, combined = combine([total, float(count)])
            count = round(combined)
        if not count:
            return
        mean = total / count
        if not math.isfinite(mean):
            return
        self.recent_loss = mean
        first = self.initial_loss is None
        if first:
            self.initial_loss = mean
        if (self.chance_loss is not None or not first) and mean <= (
            1 - self.learning_drop
        ) * self.reference_loss:
            self._started = True

    @property
    def reference_loss(self) -> float:
        """The loss learning is measured against: :attr:`chance_loss`, else
        :attr:`initial_loss` (``nan`` before the first interval)."""
        if self.chance_loss is not None:
            return self.chance_loss
        return math.nan if self.initial_loss is None else self.initial_loss

    @property
    def learning_started(self) -> bool | None:
        """``True`` once the loss has fallen, ``False`` before, ``None`` if no loss was seen."""
        if self.initial_loss is None:
            return None
        return self._started

    def is_check(self, step: int) -> bool:
        """Whether ``step`` closes a loss interval and checks the cuts (before the deadline)."""
        return step % self.check_every == 0 and step < self.deadline

    # -- certification --------------------------------------------------------------------------

    def remaining(self, name: str) -> int:
        """Cuts left for layer ``name``."""
        return self.num_reductions - self.cuts[name]

    def update(
        self,
        name: str,
        hsv: np.ndarray[Any, Any],
        *,
        rank: int,
        bound: float | None,
        kept: tuple[int, ...] | None = None,
    ) -> tuple[str | None, float | None]:
        """Record one check of layer ``name``; whether its cut at ``rank`` may be made.

        Parameters
        ----------
        hsv : (n,) ndarray
            HSVs (or importance scores) of the current parameters.
        rank : int
            The rank the rule asks for now.
        bound : float or None
            Weyl bound on the HSV movement since the previous check of this layer; ``None`` on
            the first check after a cut, and always for selective layers (use ``kept``).
        kept : tuple of int, optional
            Selective layers: the state indices the rule would keep now.

        Returns
        -------
        trigger : {"certified", "stable"} or None
            ``"certified"``: the Weyl certificate of the cut has held for :attr:`window`
            consecutive checks; ``"stable"``: the rule's rank (selective layers: the kept
            indices) has been stable over the last ``window + 1`` checks; ``None``: not yet.
        margin : float or None
            :math:`g_r - 2 A_r` of the tracker (``None`` for selective layers).
        """
        if kept is not None:
            history = self._kept[name]
            history.append(tuple(kept))
            del history[: -(self.window + 1)]
            stable = len(history) > self.window and len(set(history)) == 1
            return ("stable" if stable else None), None
        ranks = self._ranks[name]
        ranks.append(int(rank))
        del ranks[: -(self.window + 1)]
        tracker = self.trackers[name]
        if bound is None:  # a new reference: first check, or the first after a cut
            tracker.reset()
            tracker.update(hsv)
        else:
            tracker.update(hsv, bound)
        n = int(np.asarray(hsv).size)
        if not 1 <= rank < n:
            return None, None
        margin = tracker.certificate(rank).margin
        if tracker.certified(rank, self.window):
            return "certified", margin
        spread = max(ranks) - min(ranks)
        if len(ranks) > self.window and spread <= self.rank_rtol * ranks[-1]:
            return "stable", margin
        return None, margin

    def cut(self, name: str) -> None:
        """Record a cut of layer ``name``: its certificates start over."""
        self.cuts[name] += 1
        self.trackers[name].reset()
        self._kept[name] = []
        self._ranks[name] = []

    def exhaust(self, name: str) -> None:
        """No more cuts for layer ``name`` (the rule no longer asks for one)."""
        self.cuts[name] = self.num_reductions

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state."""
        return {
            "initial_loss": self.initial_loss,
            "recent_loss": self.recent_loss,
            "sum": float(self._sum),
            "count": self._count,
            "started": self._started,
            "cuts": dict(self.cuts),
            "trackers": {n: t.state_dict() for n, t in self.trackers.items()},
            "kept": {n: [list(k) for k in v] for n, v in self._kept.items()},
            "ranks": {n: list(v) for n, v in self._ranks.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.initial_loss = state["initial_loss"]
        self.recent_loss = state["recent_loss"]
        self._sum, self._count = float(state["sum"]), int(state["count"])
        self._started = bool(state["started"])
        self.cuts = {n: int(c) for n, c in state["cuts"].items()}
        for name, tracker_state in state["trackers"].items():
            self.trackers[name].load_state_dict(tracker_state)
        self._kept = {n: [tuple(k) for k in v] for n, v in state["kept"].items()}
        self._ranks = {n: [int(r) for r in v] for n, v in state["ranks"].items()}
