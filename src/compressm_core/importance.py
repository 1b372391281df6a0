"""State importance for selective (Mamba-style) state-space layers.

A selective layer's ``B_t`` and ``C_t`` projections are shared by all its channels (or by the
channels of one group), so the only reduction a stock layer can represent is one set of state
indices kept by every channel, and what is needed is a score per state index.
:func:`state_importance` turns the statistics of :mod:`compressm_core.selective_statistics`
(a :class:`SelectiveGramians`) into one score per state index, and
:func:`select_state_indices` picks the indices to keep. None of these scores carries the
balanced-truncation error bound of the LTI case.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from . import _xp
from ._typing import Array, Namespace
from ._validation import check_int, check_stable_poles
from .errors import ShapeError
from .ordering import ULPS, tolerant_argsort
from .selective_statistics import SelectiveGramians

__all__ = ["select_state_indices", "state_importance"]


def _shape(x: Array) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def _aggregate(
    per_channel: Array,
    aggregate: str,
    groups: int | None,
    xp: Namespace,
) -> Array:
    channels, states = _shape(per_channel)
    g = 1 if groups is None else groups
    x = xp.reshape(per_channel, (g, channels // g, states))
    if aggregate == "sum":
        out = xp.sum(x, axis=-2)
    elif aggregate == "energy":
        out = xp.sqrt(xp.sum(x * x, axis=-2))
    else:
        total = xp.sum(x, axis=-1, keepdims=True)
        safe = xp.where(total > 0, total, xp.ones_like(total))
        out = xp.sum(xp.where(total > 0, x / safe, xp.zeros_like(x)), axis=-2)
    return out[0, :] if groups is None else out


def state_importance(
    gramians: SelectiveGramians,
    *,
    method: Literal["gramian", "mean_lti", "random"] = "gramian",
    aggregate: Literal["sum", "energy", "normalized"] = "sum",
    groups: int | None = None,
    seed: int = 0,
    xp: Namespace | None = None,
) -> Array:
    """One importance score per state index, shared by all channels (or by each group).

    A selective layer whose ``B`` and ``C`` projections are shared by its channels can only
    keep the same state indices in every channel. This function reduces per-channel,
    per-state scores :math:`s_{d, n}` to one score per index :math:`n`.

    Per-channel scores, by ``method``:

    - ``"gramian"``: :math:`s_{d,n} = \\sqrt{\\operatorname{mean}_{\\text{seq}, s} p_s q_s}`,
      the RMS Hankel singular value of mode ``(d, n)`` of the time-varying layer
      (``gramians.scores``);
    - ``"mean_lti"``: the mode-wise score of the mean-LTI surrogate,
      :math:`s_{d,n} = \\sqrt{P_{nn} Q_{nn}} = |\\bar b_{d,n} \\bar c_{d,n}| /
      (1 - |\\bar\\lambda_{d,n}|^2)` (diagonals of its infinite-horizon Gramians);
    - ``"random"``: independent uniform scores from a NumPy generator seeded with ``seed``
      (the ablation baseline); ``aggregate`` is ignored.

    Aggregation over the channels of a group, by ``aggregate``:

    - ``"sum"``: :math:`\\sum_d s_{d,n}` (scores add like the HSV sums of the paper's rank
      rule);
    - ``"energy"``: :math:`\\sqrt{\\sum_d s_{d,n}^2}` (the mode's share of the summed squared
      Hankel norms);
    - ``"normalized"``: :math:`\\sum_d s_{d,n} / \\sum_{n'} s_{d,n'}` (each channel votes with
      weight one; all-zero channels do not vote).

    Parameters
    ----------
    gramians : SelectiveGramians
        From :func:`selective_gramians` or :func:`finalize_selective_statistics`.
    method : {"gramian", "mean_lti", "random"}, optional
        Per-channel score.
    aggregate : {"sum", "energy", "normalized"}, optional
        Reduction over channels.
    groups : int, optional
        Number of groups ``G`` of consecutive channels with their own index set (Mamba2
        ``ngroups``); ``None`` for one index set for all channels.
    seed : int, optional
        Seed of the ``"random"`` method.
    xp : array_namespace, optional
        Namespace override.

    Returns
    -------
    (N,) or (G, N) array
        Non-negative scores; larger means more important.

    Raises
    ------
    ValueError
        If ``method`` or ``aggregate`` is unknown, or ``groups`` does not divide ``D``.
    StabilityError
        For ``"mean_lti"`` when a surrogate pole has modulus ``>= 1``.

    Notes
    -----
    None of these scores comes with a guarantee for a selective layer. The balanced-truncation
    bound :math:`\\|G - G_r\\|_\\infty \\le 2 \\sum_{i > r} \\sigma_i` holds for LTI systems
    and balanced coordinates; here the system varies with the input, the scores are mode-wise
    (the kept states are a subset of the original coordinates, not balanced ones), and they
    describe the calibration data only. Dropping indices is modal truncation guided by
    Hankel-type scores: check the effect on validation data.

    Examples
    --------
    Two channels, two states; the slower state (``a = -1``) remembers longer and scores higher:

    >>> import numpy as np
    >>> from compressm_core import selective_gramians, state_importance
    >>> dt = np.full((1, 400, 2), 0.1)
    >>> a = -np.array([[1.0, 5.0], [1.0, 5.0]])
    >>> b = c = np.ones((1, 400, 2))
    >>> g = selective_gramians(dt, a, b, c)
    >>> scores = state_importance(g)
    >>> scores.shape, bool(scores[0] > scores[1])
    ((2,), True)
    >>> bool(np.allclose(scores, g.scores.sum(axis=0)))
    True
    """
    if not isinstance(gramians, SelectiveGramians):
        msg = f"`gramians` must be a SelectiveGramians; received {type(gramians).__name__}."
        raise TypeError(msg)
    if method not in ("gramian", "mean_lti", "random"):
        msg = f"`method` must be 'gramian', 'mean_lti' or 'random'; received {method!r}."
        raise ValueError(msg)
    if aggregate not in ("sum", "energy", "normalized"):
        msg = f"`aggregate` must be 'sum', 'energy' or 'normalized'; received {aggregate!r}."
        raise ValueError(msg)
    scores = gramians.scores
    xp = _xp.namespace(scores, xp=xp)
    channels, states = _shape(scores)
    if groups is not None:
        groups = check_int(groups, "groups", low=1, high=channels)
        if channels % groups:
            msg = f"`groups` must divide the number of channels D = {channels}; received {groups}."
            raise ValueError(msg)
    if method == "random":
        check_int(seed, "seed", low=0, high=2**63 - 1)
        shape = (states,) if groups is None else (groups, states)
        draw = np.random.default_rng(seed).random(shape)
        return xp.astype(_xp.from_host(draw, like=scores, xp=xp), scores.dtype)
    if method == "mean_lti":
        poles, b, c, _ = gramians.surrogate
        check_stable_poles(poles, "gramians.surrogate.poles", xp)
        scores = xp.abs(b[..., 0] * c[..., 0, :]) / (1 - xp.abs(poles) ** 2)
    return _aggregate(scores, aggregate, groups, xp)


def select_state_indices(importance: Array, rank: int, *, xp: Namespace | None = None) -> Array:
    """Indices of the ``rank`` most important states, in increasing index order.

    Parameters
    ----------
    importance : (..., N) array
        Scores from :func:`state_importance` (real; larger is more important).
    rank : int
        Number of states to keep, in ``[1, N]`` (a host-side decision, e.g. from
        :func:`select_rank` on the sorted scores).
    xp : array_namespace, optional
        Namespace override.

    Returns
    -------
    (..., rank) integer array
        Sorted indices to keep, e.g. for slicing ``A_log[:, idx]`` and the ``B``/``C`` rows of
        the input projection. Scores within a few hundred ulps of each other (relative to the
        largest) tie, and ties are broken towards the lower index, so rounding noise in the
        scores never decides which state is kept. Traceable: the shape depends only on
        ``rank``.

    Raises
    ------
    ShapeError
        If ``importance`` is 0-D.
    ValueError
        If ``rank`` is outside ``[1, N]``.

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core import select_state_indices
    >>> select_state_indices(np.array([0.1, 3.0, 2.0, 0.5]), 2)
    array([1, 2])
    """
    xp = _xp.namespace(importance, xp=xp)
    if importance.ndim < 1:
        msg = f"`importance` must have shape (..., N); received shape {_shape(importance)}."
        raise ShapeError(msg)
    rank = check_int(rank, "rank", low=1, high=int(importance.shape[-1]))
    scale = xp.max(xp.abs(importance), axis=-1, keepdims=True)
    tol = ULPS * float(xp.finfo(importance.dtype).eps) * scale
    order = tolerant_argsort([-importance], tol=tol, xp=xp)
    return xp.sort(order[..., :rank], axis=-1)
