"""Rank selection from Hankel singular values and the balanced-truncation error bound."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from . import _xp
from ._typing import Array, Namespace
from ._validation import check_int, check_tau
from .errors import ShapeError

__all__ = ["hankel_error_bound", "select_rank", "select_ranks", "shared_rank_hsv"]


def select_rank(
    hsv: Array,
    *,
    tau: float,
    energy: Literal["sum", "squared"] = "sum",
) -> int:
    """Smallest rank that keeps a fraction ``1 - tau`` of the Hankel "energy" (paper Eq. 8).

    .. math::

        r = \\min \\Big\\{ k \\ge 1 : \\sum_{i \\le k} e_i \\ge (1 - \\tau) \\sum_{i \\le n} e_i
        \\Big\\}, \\qquad e_i = \\sigma_i \\ (\\text{"sum"}) \\text{ or } \\sigma_i^2
        \\ (\\text{"squared"}).

    ``tau`` is the fraction that may be *discarded*: larger ``tau`` means a smaller model. The
    paper (and its code) uses the plain sum, which matches the :math:`2 \\sum \\sigma` error
    bound.

    Parameters
    ----------
    hsv : (n,) array
        Hankel singular values (any order; they are sorted in descending order here).
    tau : float
        Discarded fraction, in ``[0, 1)``: any real number (Python, NumPy scalar).
    energy : {"sum", "squared"}, optional
        Energy of a state: its HSV (default, the paper's rule) or its square.

    Returns
    -------
    int
        The rank, in ``[1, n]``; ``1`` when every HSV is zero. A host-side decision: the HSVs
        are copied to host memory (``n`` numbers), never traced.

    Raises
    ------
    ValueError
        If ``tau`` is outside ``[0, 1)``, ``energy`` is unknown, or ``hsv`` has negative or
        non-finite entries.
    ShapeError
        If ``hsv`` is not a non-empty 1-D array.

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core import select_rank
    >>> select_rank(np.array([4.0, 3.0, 2.0, 1.0]), tau=0.3)   # keep 7/10 >= 0.7
    2
    """
    tau = check_tau(tau)
    if energy not in ("sum", "squared"):
        msg = f"`energy` must be 'sum' or 'squared'; received {energy!r}."
        raise ValueError(msg)
    values = np.asarray(_xp.to_host(hsv, allow_transfer=True), dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        msg = f"`hsv` must be a non-empty 1-D array; received shape {values.shape}."
        if values.ndim > 1:
            msg += (
                " For a batch of systems use select_ranks (one rank each) or "
                "shared_rank_hsv (one rank for all)."
            )
        raise ShapeError(msg)
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        msg = "`hsv` must be finite and non-negative; received negative or non-finite entries."
        raise ValueError(msg)
    e = -np.sort(-values)
    if energy == "squared":
        e = e * e
    cumulative = np.cumsum(e)
    total = cumulative[-1]
    if total == 0:
        return 1
    k = int(np.searchsorted(cumulative, (1.0 - tau) * total, side="left"))
    return min(max(k + 1, 1), values.size)


def select_ranks(
    hsv: Array,
    *,
    tau: float,
    energy: Literal["sum", "squared"] = "sum",
) -> np.ndarray[Any, np.dtype[np.int64]]:
    """:func:`select_rank` of every system of a batch: one rank per row of ``hsv``.

    Parameters
    ----------
    hsv : (..., n) array
        Hankel singular values of a batch of systems, one system per row (any order).
    tau, energy
        As for :func:`select_rank`.

    Returns
    -------
    numpy.ndarray of int64, shape (...)
        ``select_rank(hsv[i], tau=tau, energy=energy)`` for every batch index ``i`` (host
        memory).

    Raises
    ------
    ShapeError
        If ``hsv`` has no axis or its last axis is empty.
    ValueError
        As :func:`select_rank`.

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core import select_ranks
    >>> select_ranks(np.array([[4.0, 3.0, 2.0, 1.0], [9.0, 0.5, 0.3, 0.2]]), tau=0.3)
    array([2, 1])
    """
    values = np.asarray(_xp.to_host(hsv, allow_transfer=True), dtype=np.float64)
    if values.ndim == 0 or values.shape[-1] == 0:
        msg = f"`hsv` must have a non-empty last axis (..., n); received shape {values.shape}."
        raise ShapeError(msg)
    rows = values.reshape(-1, values.shape[-1])
    ranks = [select_rank(row, tau=tau, energy=energy) for row in rows]
    return np.asarray(ranks, dtype=np.int64).reshape(values.shape[:-1])


_ROUNDOFF = 10.0  # c of the round-off term c n eps sigma_1 of hankel_error_bound


def hankel_error_bound(hsv: Array, rank: int, *, xp: Namespace | None = None) -> Array:
    """A-priori bound on the balanced-truncation error: twice the discarded HSVs, plus the
    round-off level of the computation.

    .. math::

        \\| G - G_r \\|_{\\mathcal{H}_\\infty} \\le 2 \\sum_{i > r} \\sigma_i
        + c\\, n\\, \\varepsilon\\, \\sigma_1, \\qquad c = 10,

    with :math:`\\varepsilon` the machine epsilon of ``hsv`` 's dtype (the precision of the
    returned system: ``2.2e-16`` for float64, ``1.2e-7`` for float32). The first term is the
    exact-arithmetic bound (Glover). It holds for infinite-horizon Gramians of a stable system
    and both the square-root and the balancing-free methods; it does not hold for time-limited
    (finite ``horizon``) Gramians. The second term is the error that rounding alone leaves in
    the computed reduced system (also at full rank, where the first term is 0): without it the
    bound fails, by factors of 10 and more, at ranks whose discarded HSVs are below
    :math:`n \\varepsilon \\sigma_1`. Measured errors stay below
    :math:`5 n \\varepsilon \\sigma_1` for poles with :math:`|\\lambda| \\le 0.95`; rounding
    grows like :math:`\\varepsilon / (1 - |\\lambda|)` for poles closer to the unit circle,
    which the term does not cover.

    Parameters
    ----------
    hsv : (..., n) array
        Hankel singular values in descending order.
    rank : int
        Kept states, in ``[0, n]``.
    xp : array_namespace, optional
        Namespace override.

    Returns
    -------
    (...) array
        The bound, batched like ``hsv`` (``0`` for ``n = 0``).
    """
    xp = _xp.namespace(hsv, xp=xp)
    if hsv.ndim < 1:
        msg = f"`hsv` must have shape (..., n); received shape {tuple(hsv.shape)}."
        raise ShapeError(msg)
    rank = check_int(rank, "rank", low=0, high=int(hsv.shape[-1]))
    floating = xp.isdtype(hsv.dtype, ("real floating", "complex floating"))
    eps = float(xp.finfo(hsv.dtype if floating else xp.float64).eps)
    n = int(hsv.shape[-1])
    tail = 2 * xp.sum(hsv[..., rank:], axis=-1)
    if n == 0:
        return tail
    return tail + (_ROUNDOFF * n * eps) * xp.max(hsv, axis=-1)


def shared_rank_hsv(hsv: Array, *, xp: Namespace | None = None) -> Array:
    """The Hankel singular values of a batch of systems that is cut to one shared rank.

    A layer made of independent systems (S4D: one SISO system per channel) has rectangular
    parameters, so every member keeps the same number of states ``r``. Its profile is the
    per-index maximum over the batch of each member's descending HSVs,

    .. math::

        p_i = \\max_b \\sigma_{b, i}, \\qquad i = 1, \\dots, n,

    which is descending, equals ``hsv`` for a single system, and dominates every member's tail:
    :math:`\\max_b 2 \\sum_{i > r} \\sigma_{b, i} \\le 2 \\sum_{i > r} p_i`. The layer's
    transfer function is block diagonal, so its H-infinity error after truncating every member
    to ``r`` states is the largest member's error, bounded by ``2 sum_{i > r} p_i``. Weyl-type
    bounds carry over: if every :math:`\\sigma_{b, i}` moves by at most ``e``, so does
    :math:`p_i`. Rank rules (:func:`select_rank`) and the controllers apply to ``p``.

    Parameters
    ----------
    hsv : (..., n) array
        HSVs of each member, descending along the last axis (as
        :func:`~compressm_core.hankel_singular_values` returns them).
    xp : array_namespace, optional
        Namespace override.

    Returns
    -------
    (n,) array
        ``p``; ``hsv`` itself when it is 1-D.

    Raises
    ------
    ShapeError
        If ``hsv`` has no state axis.

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core.rank import shared_rank_hsv
    >>> shared_rank_hsv(np.array([[3.0, 1.0, 0.5], [2.0, 1.5, 0.1]]))
    array([3. , 1.5, 0.5])
    """
    xp = _xp.namespace(hsv, xp=xp)
    if hsv.ndim < 1:
        msg = f"`hsv` must have shape (..., n); received shape {tuple(hsv.shape)}."
        raise ShapeError(msg)
    if hsv.ndim == 1:
        return hsv
    return xp.max(xp.reshape(hsv, (-1, hsv.shape[-1])), axis=0)
