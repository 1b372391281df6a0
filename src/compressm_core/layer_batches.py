"""Measure and truncate the layers of one reduction event together, in batched calls.

A reduction event reads every layer's system; :func:`measure_layers` stacks the systems of the
layers that share a shape and computes their Gramian factors, the SVD of their product and the
Hankel singular values in one batched call on their device (one host transfer of the HSVs for
the rank decisions), and :func:`plan_layers` truncates the members that share a rank in one
batched projection and re-diagonalisation, without computing a Gramian again. The results
agree with the one-layer path (:func:`~compressm_core.reduction.layer_hsv`,
:func:`~compressm_core.reduction.plan_reduction`) up to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from . import _xp
from ._typing import Array
from .balanced import _check_method, _check_numerical_rank, _Factors, _factors, _projected
from .checks import check_rank
from .diagonalize import rediagonalize
from .errors import ShapeError
from .rank import hankel_error_bound, shared_rank_hsv
from .reduction import ReductionPlan
from .systems import DiagonalStateSpace, StateSpace

__all__ = ["MeasuredLayers", "measure_layers", "plan_layers"]


class MeasuredLayers(NamedTuple):
    """What :func:`measure_layers` computed for a stack of ``k`` layer systems.

    Everything of their balanced truncations that does not depend on the rank, so that one
    event measures all its layers of one shape in one batched call and truncates them
    (:func:`plan_layers`) without computing a Gramian or an SVD again.

    Attributes
    ----------
    system : DiagonalStateSpace or StateSpace
        The stacked, promoted systems (leading axis ``k``); with ``real_output`` their real
        ``2n``-state realizations.
    controllability, observability : (k, ..., n, n) array
        Gramian factors ``Lc``, ``Lo`` with :math:`P = L_c L_c^H`, :math:`Q = L_o L_o^H`.
    svd : tuple of arrays or None
        ``(U, s, V^H)`` with :math:`L_o^H L_c = U \\operatorname{diag}(s) V^H`, on the
        systems' device; ``None`` if measured without ``vectors`` (:func:`plan_layers` then
        computes the SVD of its members).
    hsv : (k, ..., n) numpy.ndarray
        Every member's Hankel singular values :math:`s_i(L_o^H L_c)`, descending, on the host
        (one transfer for the whole stack), in the real dtype of the systems' precision.
    horizon : int or None
        The horizon of the Gramians.
    real_output : bool
        Whether the real realizations were measured.
    result : dtype
        The dtype of the reduced systems.
    """

    system: DiagonalStateSpace | StateSpace
    controllability: Array
    observability: Array
    svd: tuple[Array, Array, Array] | None
    hsv: np.ndarray[Any, Any]
    horizon: int | None
    real_output: bool
    result: Any

    def profile(self, member: int) -> np.ndarray[Any, Any]:
        """The HSVs layer ``member`` is decided by: :func:`~compressm_core.rank.shared_rank_hsv`
        of its own (one system's HSVs, or the per-index maximum over a batch such as S4D's
        channels), ``(n,)`` on the host."""
        return np.asarray(shared_rank_hsv(self.hsv[member], xp=np))


def measure_layers(
    systems: Sequence[DiagonalStateSpace],
    *,
    horizon: int | None = None,
    real_output: bool = False,
    vectors: bool = True,
) -> MeasuredLayers:
    """Measure ``k`` layer systems of one shape in one batched call.

    The systems are stacked along a new leading axis and their Gramians (closed form for
    diagonal systems, :math:`P_{ij} = (B B^H)_{ij} / (1 - \\lambda_i \\bar\\lambda_j)`), the
    square-root factors ``Lc``, ``Lo``, the SVD :math:`L_o^H L_c = U \\Sigma V^H` and the HSVs
    :math:`\\sigma = \\operatorname{diag}(\\Sigma)` are computed once for all of them, on the
    systems' device and in the highest precision it has. The HSVs come back to the host in one
    transfer; row ``i`` of ``hsv`` is what :func:`~compressm_core.hankel_singular_values` gives
    for ``systems[i]`` (up to rounding).

    Parameters
    ----------
    systems : sequence of DiagonalStateSpace
        One system per layer, all with the same field shapes, dtypes and device (a layer made
        of a batch of systems, S4D, keeps its own leading axes).
    horizon : int, optional
        Finite-horizon Gramians over ``horizon`` steps.
    real_output : bool, optional
        Measure the real realization of each layer's output ``Re(C x)``.
    vectors : bool, optional
        Keep the singular vectors too (default), so :func:`plan_layers` computes no SVD;
        ``False``: only the singular values (cheaper when few members will be truncated).

    Returns
    -------
    MeasuredLayers
        The stacked factors and the HSVs of every member.

    Raises
    ------
    ShapeError
        If ``systems`` is empty or its members differ in shape or in having ``d``.
    StabilityError
        If any member is unstable or not finite (the caller measures the layers one at a time
        to find which).

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core import DiagonalStateSpace, hankel_singular_values
    >>> from compressm_core.layer_batches import measure_layers
    >>> rng = np.random.default_rng(0)
    >>> systems = [DiagonalStateSpace(rng.uniform(0.1, 0.9, 4), rng.normal(size=(4, 2)),
    ...                               rng.normal(size=(2, 4))) for _ in range(3)]
    >>> measured = measure_layers(systems)
    >>> measured.hsv.shape
    (3, 4)
    >>> bool(np.allclose(measured.hsv[1], hankel_singular_values(systems[1])))
    True
    """
    if not systems:
        msg = "`systems` must hold at least one system; received an empty sequence."
        raise ShapeError(msg)
    shapes = {tuple(None if f is None else tuple(f.shape) for f in sys) for sys in systems}
    if len(shapes) != 1:
        msg = (
            f"`systems` must all have the same field shapes; received {sorted(map(str, shapes))}."
        )
        raise ShapeError(msg)
    xp = _xp.namespace(systems[0].poles)
    stacked = DiagonalStateSpace(
        *(
            None if systems[0][i] is None else xp.stack([sys[i] for sys in systems])
            for i in range(4)
        )
    )
    f = _factors(stacked, horizon, real_output, None)
    product = _xp.conj_transpose(f.lo, f.xp) @ f.lc
    svd = f.xp.linalg.svd(product, full_matrices=False) if vectors else None
    hsv = f.xp.linalg.svdvals(product) if svd is None else svd[1]
    hsv = f.xp.astype(hsv, _xp.real_dtype_of(f.result, f.xp))
    return MeasuredLayers(
        f.system,
        f.lc,
        f.lo,
        svd,
        _xp.to_host(hsv, allow_transfer=True),
        horizon,
        real_output,
        f.result,
    )


def plan_layers(
    measured: MeasuredLayers,
    members: Sequence[int],
    rank: int,
    *,
    method: Literal["sqrt", "bfsr"] = "sqrt",
    max_condition: float = 1e8,
) -> list[ReductionPlan]:
    """Balanced truncations of the ``members`` of ``measured`` to one ``rank``, in one batch.

    The batched counterpart of :func:`plan_reduction` with ``selection="largest"``: with the
    SVD :math:`L_o^H L_c = U \\Sigma V^H` of :func:`measure_layers` (computed here for the
    members if it was measured without ``vectors``), every member is projected with
    :math:`T = L_c V_r \\Sigma_r^{-1/2}`, :math:`T^{-1} = \\Sigma_r^{-1/2} U_r^H L_o^H` and
    re-diagonalised, and its bound is
    :math:`\\max_b 2 \\sum_{i > r} \\sigma_{b, i} + c\\, n\\, \\varepsilon\\, \\sigma_{b, 1}`
    (:func:`~compressm_core.hankel_error_bound`, the largest over a layer's own batch),
    computed on the host from ``measured.hsv``.

    Parameters
    ----------
    measured : MeasuredLayers
        From :func:`measure_layers`.
    members : sequence of int
        Positions in the stack of the layers to reduce.
    rank : int
        States to keep, in ``[1, n]``, the same for every member.
    method : {"sqrt", "bfsr"}, optional
        Balanced-truncation method.
    max_condition : float, optional
        Refuse re-diagonalisation when an eigenvector basis is worse conditioned.

    Returns
    -------
    list of ReductionPlan
        One plan per member, in the order of ``members``; ``system`` holds that member's
        reduced, re-diagonalised system.

    Raises
    ------
    ValueError
        ``rank`` out of range, an unknown ``method``, ``members`` empty or out of range.
    ConditioningError, StabilityError
        If any member cannot be truncated or re-diagonalised (the caller plans the layers one
        at a time to find which).

    Examples
    --------
    >>> import numpy as np
    >>> from compressm_core import DiagonalStateSpace
    >>> from compressm_core.layer_batches import measure_layers, plan_layers
    >>> from compressm_core.reduction import plan_reduction
    >>> rng = np.random.default_rng(0)
    >>> systems = [DiagonalStateSpace(rng.uniform(0.1, 0.9, 5), rng.normal(size=(5, 2)),
    ...                               rng.normal(size=(2, 5))) for _ in range(2)]
    >>> plans = plan_layers(measure_layers(systems), [0, 1], 2)
    >>> one = plan_reduction(systems[1], 2)
    >>> bool(np.allclose(plans[1].system.poles, one.system.poles))
    True
    """
    _check_method(method)
    count = int(measured.hsv.shape[0])
    chosen = [int(m) for m in members]
    if not chosen or not all(0 <= m < count for m in chosen):
        msg = f"`members` must be positions in [0, {count}); received {list(members)}."
        raise ValueError(msg)
    n = int(measured.hsv.shape[-1])
    rank = check_rank(rank, n)
    hsv = measured.hsv[chosen]
    _check_numerical_rank(hsv, rank, np)
    xp = _xp.namespace(measured.controllability)
    index = xp.asarray(chosen, device=_xp.device_of(measured.controllability))

    def pick(x: Array | None) -> Array | None:
        if x is None or chosen == list(range(count)):
            return x
        return xp.take(x, index, axis=0)

    lc, lo = pick(measured.controllability), pick(measured.observability)
    system = type(measured.system)(*(pick(x) for x in measured.system))
    if measured.svd is None:
        u, s, vh = xp.linalg.svd(_xp.conj_transpose(lo, xp) @ lc, full_matrices=False)
    else:
        u, s, vh = (pick(x) for x in measured.svd)
    factors = _Factors(system, lc, lo, n, xp, measured.result)
    reduced, _, _ = _projected(factors, (u, s, vh), rank, method)
    diag = rediagonalize(reduced, real_output=measured.real_output, max_condition=max_condition)
    bounds = hankel_error_bound(hsv, rank, xp=np).reshape(len(chosen), -1).max(axis=-1)
    return [
        ReductionPlan(
            DiagonalStateSpace(*(None if x is None else x[j] for x in diag)), None, float(bound)
        )
        for j, bound in enumerate(bounds)
    ]
