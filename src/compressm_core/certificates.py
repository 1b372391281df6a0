"""Certificates that the ranking of Hankel singular values survives a bounded perturbation.

Host-side decisions on Python and NumPy numbers: :func:`ranking_certificate` checks one cut
against one bound on how far the HSVs can move, and :class:`RankTracker` accumulates per-step
bounds through training and certifies each cut over a window of updates. The bounds themselves
come from the traceable :func:`hsv_perturbation_bound` and :func:`hsv_a_priori_bound` of
:mod:`compressm_core.perturbation`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from . import _xp
from ._typing import Array
from ._validation import check_int
from .errors import ShapeError

__all__ = ["RankTracker", "RankingCertificate", "ranking_certificate"]


class RankingCertificate(NamedTuple):
    """Whether the cut after the ``r`` largest HSVs survives HSVs moving by at most ``bound``.

    Attributes
    ----------
    stable : bool
        ``margin > 0``.
    margin : float
        :math:`\\sigma_r - \\sigma_{r+1} - 2\\, \\text{bound}`; the gap that is left at the cut
        in the worst case.
    """

    stable: bool
    margin: float


def _host(x: object) -> np.ndarray[Any, Any]:
    """``x`` as a NumPy array; arrays of any library are copied to the host (a few numbers)."""
    if isinstance(x, (bool, int, float, list, tuple, np.generic, np.ndarray)):
        return np.asarray(x)
    return _xp.to_host(x, allow_transfer=True)


def _host_hsv(hsv: object) -> np.ndarray[Any, Any]:
    """``hsv`` as a finite, non-negative 1-D float64 NumPy array."""
    raw = _host(hsv)
    if not np.issubdtype(raw.dtype, np.floating) and not np.issubdtype(raw.dtype, np.integer):
        msg = f"`hsv` must be a real array; received dtype {raw.dtype}."
        raise TypeError(msg)
    values = np.asarray(raw, dtype=np.float64)
    if values.ndim != 1 or values.size < 2:
        msg = f"`hsv` must be a 1-D array of at least 2 HSVs; received shape {values.shape}."
        raise ShapeError(msg)
    if not (np.all(np.isfinite(values)) and np.all(values >= 0)):
        msg = f"`hsv` must be finite and non-negative; received {values.tolist()}."
        raise ValueError(msg)
    return values


def _host_bound(bound: object) -> float:
    """``bound`` as a finite, non-negative Python float."""
    raw = _host(bound)
    if raw.ndim != 0 or raw.dtype == np.bool_ or not np.issubdtype(raw.dtype, np.number):
        msg = f"`bound` must be a real scalar; received {type(bound).__name__} {bound!r}."
        raise TypeError(msg)
    if np.iscomplexobj(raw):
        msg = f"`bound` must be real; received {bound!r}."
        raise TypeError(msg)
    value = float(raw)
    if not (np.isfinite(value) and value >= 0):
        msg = f"`bound` must be finite and non-negative; received {value!r}."
        raise ValueError(msg)
    return value


def _gaps(values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """``sigma_r - sigma_{r+1}`` for ``r = 1..n-1`` of the values sorted in descending order."""
    ordered = np.sort(values)[::-1]
    return np.asarray(ordered[:-1] - ordered[1:], dtype=np.float64)


def ranking_certificate(hsv: Array, bound: float | Array, rank: int) -> RankingCertificate:
    """Certify that the cut after the ``rank`` largest HSVs survives a perturbation ``bound``.

    If every HSV moves by at most ``bound`` (for instance :func:`hsv_perturbation_bound`, or the
    sum of such bounds over several steps), then with :math:`\\sigma` sorted in descending
    order

    .. math::

        m = \\sigma_r - \\sigma_{r+1} - 2\\, \\text{bound} > 0
        \\;\\Longrightarrow\\;
        \\sigma_r' - \\sigma_{r+1}' \\ge m > 0 ,

    so the perturbed system still has a gap of at least ``m`` at ``r``. When ``bound`` is
    :math:`\\|H' - H\\|_2` (or a sum of such bounds along a path), the Davis-Kahan
    :math:`\\sin\\Theta` theorem adds that the dominant ``r``-dimensional eigenspace of
    :math:`H` turns by an angle whose sine is at most :math:`\\text{bound} / (m +
    \\text{bound}) < 1`: no state direction is carried from below the cut to above it.
    ``m <= 0`` certifies nothing (it does not mean that the order changes).

    Parameters
    ----------
    hsv : (n,) array
        Hankel singular values of the reference state, any order (sorted here); from any array
        library (copied to the host).
    bound : float or 0-D array
        A bound on :math:`\\max_i |\\sigma_i' - \\sigma_i|`, non-negative.
    rank : int
        The cut ``r``: number of kept states, in ``[1, n - 1]``.

    Returns
    -------
    RankingCertificate
        ``(stable, margin)`` as Python ``bool`` and ``float``. A host-side decision: never
        traced.

    Raises
    ------
    ValueError
        If ``bound`` is negative or non-finite, ``rank`` is outside ``[1, n - 1]``, or ``hsv``
        has negative or non-finite entries.
    ShapeError
        If ``hsv`` is not 1-D with at least two entries.

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core.certificates import ranking_certificate
    >>> ranking_certificate(np.array([4.0, 3.0, 1.0]), 0.25, rank=2)   # 3 - 1 - 0.5
    RankingCertificate(stable=True, margin=1.5)
    """
    gaps = _gaps(_host_hsv(hsv))
    b = _host_bound(bound)
    r = check_int(rank, "rank", low=1, high=gaps.size)
    margin = float(gaps[r - 1] - 2 * b)
    return RankingCertificate(margin > 0, margin)


class RankTracker:
    """Follow HSVs through training and certify, per cut, that the ranking is stable.

    Call :meth:`update` at each checked training step with the HSVs of the current parameters
    and the bound on their movement since the previous call (:func:`hsv_perturbation_bound`
    between the two parameter states). The tracker is a small state machine with one state per
    cut ``r`` in ``[1, n - 1]``:

    - a **reference** snapshot ``a_r`` (an update index) with its gap
      :math:`g_r = \\sigma_r(a_r) - \\sigma_{r+1}(a_r)`;
    - the **accumulated bound** :math:`A_r = \\sum_{j = a_r + 1}^{k} \\beta_j`, the sum of the
      per-update bounds :math:`\\beta_j` since the reference;
    - a **streak**: the number of updates since the reference.

    By the triangle inequality :math:`|\\sigma_i(j) - \\sigma_i(a_r)| \\le A_r` for *every*
    update ``j`` between the reference and now, so the margin

    .. math::

        m_r = g_r - 2 A_r > 0
        \\;\\Longrightarrow\\;
        \\sigma_r(j) - \\sigma_{r+1}(j) \\ge m_r > 0 \\quad \\text{for all } a_r \\le j \\le k .

    The sum is accumulated, not the bound between the reference and the current state, because
    it covers every snapshot in between with one number, and because the tracker only sees
    per-step bounds. When an update makes :math:`m_r \\le 0` the cut is re-anchored: the current
    snapshot becomes its reference, :math:`A_r = 0` and the streak restarts at ``0``. A cut is
    :meth:`certified` for ``window`` when its streak is at least ``window``.

    HSVs of consecutive snapshots are also matched to each other by a linear sum assignment
    (:func:`scipy.optimize.linear_sum_assignment`), by default on the cost
    :math:`|\\sigma_i - \\sigma_j'|`, which gives :attr:`matchings` and :meth:`trajectories`.

    Parameters
    ----------
    max_history : int, optional
        Number of snapshots kept for :attr:`snapshots` and :meth:`trajectories`; ``None``
        (default) keeps all of them (``n`` floats per update). The certificates do not use the
        history.

    Notes
    -----
    The certificate covers the snapshots that were passed to :meth:`update`, not the optimizer
    steps between them: Weyl's bound compares two parameter states, however many steps apart,
    so checking every ``k`` steps is valid with the bound between states ``k`` steps apart.
    It says nothing about future steps. That the HSV ordering settles early in training is an
    empirical observation of the CompreSSM paper (Fig. 2); the tracker turns it into a check.

    With a cost that depends only on the values, an optimal assignment between two *sorted*
    lists is the identity: value matching follows HSVs passed in an arbitrary order, but it
    cannot see two states exchange their order. Pass ``cost`` to :meth:`update` (for example
    :math:`1 - |u_i^H u_j'|^2` from eigenvectors of :func:`hankel_operator`) to follow states
    through crossings.

    One tracker follows one system. Call :meth:`reset` after a reduction changes ``n``.

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core.certificates import RankTracker
    >>> tracker = RankTracker()
    >>> tracker.update(np.array([4.0, 2.0, 0.5]))            # reference snapshot
    >>> for _ in range(3):
    ...     tracker.update(np.array([4.0, 2.0, 0.5]), bound=0.125)
    >>> tracker.certified(rank=2, window=3), tracker.certificate(rank=2).margin
    (True, 0.75)
    """

    _VERSION = 1

    def __init__(self, *, max_history: int | None = None) -> None:
        if max_history is not None:
            max_history = check_int(max_history, "max_history", low=1, high=2**62)
        self._max_history = max_history
        self.reset()

    def reset(self) -> None:
        """Forget every snapshot; the next :meth:`update` sets a new reference."""
        self._n: int | None = None
        self._updates = 0
        self._gap: np.ndarray[Any, Any] = np.zeros(0)
        self._accumulated: np.ndarray[Any, Any] = np.zeros(0)
        self._streak: np.ndarray[Any, Any] = np.zeros(0, dtype=np.int64)
        self._anchor: np.ndarray[Any, Any] = np.zeros(0, dtype=np.int64)
        self._snapshots: list[np.ndarray[Any, Any]] = []
        self._matchings: list[np.ndarray[Any, Any]] = []

    # -- transitions -------------------------------------------------------------------------

    def update(
        self, hsv: Array, bound: float | Array | None = None, *, cost: Array | None = None
    ) -> None:
        """Record a snapshot and advance every cut's certificate.

        Parameters
        ----------
        hsv : (n,) array
            HSVs of the current parameters, any order (the certificates sort them; the
            matching and trajectories keep the given order).
        bound : float or 0-D array, optional
            Bound on :math:`\\max_i |\\sigma_i - \\sigma_i^{\\text{prev}}|` since the previous
            snapshot, non-negative. Required from the second snapshot on; ignored (but
            validated) for the first, which only sets the references.
        cost : (n, n) array, optional
            ``cost[i, j]`` of matching HSV ``i`` of the previous snapshot with HSV ``j`` of
            this one; default :math:`|\\sigma_i^{\\text{prev}} - \\sigma_j|`.

        Raises
        ------
        ShapeError
            If ``hsv`` does not have the ``n`` entries of the previous snapshots, or ``cost``
            is not ``(n, n)``.
        ValueError
            If ``bound`` is missing after the first snapshot, negative or non-finite, or
            ``hsv`` has negative or non-finite entries.
        """
        values = _host_hsv(hsv)
        step = None if bound is None else _host_bound(bound)
        gap = _gaps(values)
        if self._n is None:
            self._n = values.size
            self._gap = gap
            self._accumulated = np.zeros(values.size - 1)
            self._streak = np.zeros(values.size - 1, dtype=np.int64)
            self._anchor = np.zeros(values.size - 1, dtype=np.int64)
            self._record(values, None)
            return
        if values.size != self._n:
            msg = (
                f"`hsv` must have the n = {self._n} entries of the previous snapshots; "
                f"received {values.size} (call `reset()` after a reduction)."
            )
            raise ShapeError(msg)
        if step is None:
            msg = "`bound` is required for every snapshot after the first; received None."
            raise ValueError(msg)
        previous = self._snapshots[-1]
        matching = self._match(previous, values, cost)
        self._updates += 1
        accumulated = self._accumulated + step
        holds = self._gap - 2 * accumulated > 0
        self._streak = np.where(holds, self._streak + 1, 0)
        self._accumulated = np.where(holds, accumulated, 0.0)
        self._gap = np.where(holds, self._gap, gap)
        self._anchor = np.where(holds, self._anchor, self._updates)
        self._record(values, matching)

    def _match(
        self,
        previous: np.ndarray[Any, Any],
        values: np.ndarray[Any, Any],
        cost: Array | None,
    ) -> np.ndarray[Any, Any]:
        if cost is None:
            table = np.abs(previous[:, None] - values[None, :])
        else:
            table = np.asarray(_host(cost), dtype=np.float64)
            if table.shape != (values.size, values.size):
                msg = (
                    f"`cost` must have shape (n, n) = ({values.size}, {values.size}); "
                    f"received {table.shape}."
                )
                raise ShapeError(msg)
            if not np.all(np.isfinite(table)):
                msg = "`cost` must contain only finite values."
                raise ValueError(msg)
        from scipy.optimize import linear_sum_assignment  # host-side only, imported on use

        rows, cols = linear_sum_assignment(table)
        matching = np.empty(values.size, dtype=np.int64)
        matching[rows] = cols
        return matching

    def _record(self, values: np.ndarray[Any, Any], matching: np.ndarray[Any, Any] | None) -> None:
        self._snapshots.append(values)
        if matching is not None:
            self._matchings.append(matching)
        if self._max_history is not None and len(self._snapshots) > self._max_history:
            self._snapshots.pop(0)
            self._matchings.pop(0)

    # -- queries -----------------------------------------------------------------------------

    def _cut(self, rank: int) -> int:
        if self._n is None:
            msg = "The tracker has no snapshot yet; call `update(hsv)` first."
            raise ValueError(msg)
        return check_int(rank, "rank", low=1, high=self._n - 1) - 1

    def certificate(self, rank: int) -> RankingCertificate:
        """The certificate of the cut at ``rank`` against its accumulated bound.

        Parameters
        ----------
        rank : int
            The cut ``r`` in ``[1, n - 1]``.

        Returns
        -------
        RankingCertificate
            ``margin`` :math:`= g_r - 2 A_r`; ``stable`` when it is positive.
        """
        i = self._cut(rank)
        margin = float(self._gap[i] - 2 * self._accumulated[i])
        return RankingCertificate(margin > 0, margin)

    def certified(self, rank: int, window: int) -> bool:
        """Whether the cut at ``rank`` has held for at least ``window`` consecutive updates.

        Parameters
        ----------
        rank : int
            The cut ``r`` in ``[1, n - 1]``.
        window : int
            Number of consecutive updates, at least ``1``.

        Returns
        -------
        bool
            ``True`` when the margin of the cut has stayed positive against the bound
            accumulated over the last ``window`` (or more) updates.
        """
        i = self._cut(rank)
        w = check_int(window, "window", low=1, high=2**62)
        return bool(self._streak[i] >= w)

    @property
    def n(self) -> int | None:
        """Number of HSVs per snapshot; ``None`` before the first :meth:`update`."""
        return self._n

    @property
    def updates(self) -> int:
        """Number of updates after the first snapshot (the index of the latest snapshot)."""
        return self._updates

    @property
    def stable_updates(self) -> np.ndarray[Any, Any]:
        """``(n - 1,)`` streak per cut: updates since the cut's reference, all certified."""
        return np.array(self._streak)

    @property
    def anchors(self) -> np.ndarray[Any, Any]:
        """``(n - 1,)`` index of the reference snapshot of each cut."""
        return np.array(self._anchor)

    @property
    def accumulated_bound(self) -> np.ndarray[Any, Any]:
        """``(n - 1,)`` sum of the bounds since each cut's reference, :math:`A_r`."""
        return np.array(self._accumulated)

    @property
    def snapshots(self) -> np.ndarray[Any, Any]:
        """``(T, n)`` the retained snapshots, in the order their HSVs were given."""
        if not self._snapshots:
            return np.zeros((0, 0))
        return np.stack(self._snapshots)

    @property
    def matchings(self) -> np.ndarray[Any, Any]:
        """``(T - 1, n)``: HSV ``i`` of snapshot ``k`` is HSV ``[k, i]`` of snapshot ``k + 1``."""
        n = 0 if self._n is None else self._n
        if not self._matchings:
            return np.zeros((0, n), dtype=np.int64)
        return np.stack(self._matchings)

    def trajectories(self) -> np.ndarray[Any, Any]:
        """``(T, n)`` HSVs followed through the matchings.

        Column ``i`` starts at HSV ``i`` of the oldest retained snapshot and follows it through
        every matching.

        Returns
        -------
        ndarray
            One matched HSV trajectory per column.
        """
        if not self._snapshots:
            return np.zeros((0, 0))
        index = np.arange(self._snapshots[0].size)
        rows = [self._snapshots[0]]
        for values, matching in zip(self._snapshots[1:], self._matchings, strict=True):
            index = matching[index]
            rows.append(values[index])
        return np.stack(rows)

    # -- checkpointing -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The tracker's state as plain Python numbers and lists (JSON- and pickle-safe).

        Returns
        -------
        dict
            Everything :meth:`load_state_dict` needs to resume.
        """
        return {
            "version": self._VERSION,
            "max_history": self._max_history,
            "n": self._n,
            "updates": self._updates,
            "gap": self._gap.tolist(),
            "accumulated_bound": self._accumulated.tolist(),
            "stable_updates": self._streak.tolist(),
            "anchors": self._anchor.tolist(),
            "snapshots": [s.tolist() for s in self._snapshots],
            "matchings": [m.tolist() for m in self._matchings],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state written by :meth:`state_dict`.

        Parameters
        ----------
        state : mapping
            The output of :meth:`state_dict`.

        Raises
        ------
        ValueError
            If ``state`` lacks a key or comes from another version.
        """
        keys = set(self.state_dict())
        missing = sorted(keys - set(state))
        if missing:
            msg = f"`state` must be a RankTracker state_dict; missing keys {missing}."
            raise ValueError(msg)
        if state["version"] != self._VERSION:
            msg = f"`state` must have version {self._VERSION}; received {state['version']!r}."
            raise ValueError(msg)
        self._max_history = state["max_history"]
        self._n = state["n"]
        self._updates = int(state["updates"])
        self._gap = np.asarray(state["gap"], dtype=np.float64)
        self._accumulated = np.asarray(state["accumulated_bound"], dtype=np.float64)
        self._streak = np.asarray(state["stable_updates"], dtype=np.int64)
        self._anchor = np.asarray(state["anchors"], dtype=np.int64)
        self._snapshots = [np.asarray(s, dtype=np.float64) for s in state["snapshots"]]
        self._matchings = [np.asarray(m, dtype=np.int64) for m in state["matchings"]]
