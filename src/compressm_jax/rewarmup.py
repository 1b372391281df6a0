"""A learning-rate re-warm-up after each cut, as an optax transformation.

:func:`scale_by_rewarmup` is the optax form of the controllers' ``rewarmup_steps``: chained after
an optimizer, it scales the ``K`` updates after each cut by ``k / (K + 1)``, ``k = 1 .. K``. The
cut is marked in the optax state by :func:`mark_cut`, which :class:`compressm_jax.CompreSSM`
calls on its :class:`flax.nnx.Optimizer` at every event that reduced a layer. Learning-rate
schedules of the optimizer keep their own step counts, so their values are not shifted.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from compressm_core.checks import check_int

__all__ = ["RewarmupState", "mark_cut", "scale_by_rewarmup"]

_NO_CUT = -1  # `last_cut` before any cut


class RewarmupState(NamedTuple):
    """State of :func:`scale_by_rewarmup` (two int32 scalars).

    Attributes
    ----------
    count : int32 array, shape ()
        Updates made so far.
    last_cut : int32 array, shape ()
        ``count`` when the last cut was marked (:func:`mark_cut`); ``-1`` before any cut.
    """

    count: jax.Array  # type: ignore[assignment]  # optax's name; shadows tuple.count
    last_cut: jax.Array


def scale_by_rewarmup(rewarmup_steps: int) -> optax.GradientTransformation:
    """Scale the ``rewarmup_steps`` updates after each cut by ``k / (rewarmup_steps + 1)``.

    With ``K = rewarmup_steps``, the update with (incremented) count ``c`` is multiplied by
    ``min(1, (c - last_cut) / (K + 1))`` after a cut, and by 1 before any: the updates after a
    cut get ``1/(K+1), 2/(K+1), ..., K/(K+1)``, then 1; a cut during a re-warm-up starts it
    again. These are the factors :attr:`compressm_core.training.ControllerBase.lr_factor` gives
    for the same cuts. Put it last in an :func:`optax.chain`, after the optimizer: scaling the
    final updates is scaling the learning rate of SGD- and Adam-style optimizers (decoupled
    weight decay included), and the optimizer's schedule keeps its own count. Cuts are marked
    with :func:`mark_cut`; :class:`compressm_jax.CompreSSM` does it for its optimizer.

    Parameters
    ----------
    rewarmup_steps : int
        ``K >= 0``; 0 leaves every update as it is.

    Returns
    -------
    optax.GradientTransformation
        Its state is a :class:`RewarmupState` (scalars: :func:`resize_optimizer_state` keeps it,
        and it works under :func:`jax.jit`).

    Raises
    ------
    ValueError
        If ``rewarmup_steps`` is not an int >= 0 (bools and floats included).

    Examples
    --------
    >>> import jax.numpy as jnp, optax
    >>> from compressm_jax import mark_cut, scale_by_rewarmup
    >>> tx = optax.chain(optax.sgd(1.0), scale_by_rewarmup(3))
    >>> params = {"w": jnp.zeros(2)}
    >>> state = mark_cut(tx.init(params))  # a cut before the first update
    >>> for _ in range(5):
    ...     updates, state = tx.update({"w": jnp.ones(2)}, state)
    ...     print(float(-updates["w"][0]))
    0.25
    0.5
    0.75
    1.0
    1.0
    """
    steps = check_int(rewarmup_steps, "rewarmup_steps", low=0)

    def init_fn(params: Any) -> RewarmupState:
        del params
        return RewarmupState(
            count=jnp.zeros([], jnp.int32), last_cut=jnp.full([], _NO_CUT, jnp.int32)
        )

    def update_fn(
        updates: Any, state: RewarmupState, params: Any = None
    ) -> tuple[Any, RewarmupState]:
        del params
        count = optax.safe_int32_increment(state.count)
        since = (count - state.last_cut).astype(jnp.result_type(float))  # default float type
        factor = jnp.where(state.last_cut == _NO_CUT, 1.0, jnp.minimum(1.0, since / (steps + 1)))
        updates = jax.tree_util.tree_map(lambda u: u * factor.astype(u.dtype), updates)
        return updates, RewarmupState(count=count, last_cut=state.last_cut)

    return optax.GradientTransformation(init_fn, update_fn)


def _is_rewarmup(node: Any) -> bool:
    return isinstance(node, RewarmupState)


def mark_cut(opt_state: Any) -> Any:
    """Mark a cut now in every :class:`RewarmupState` of an optax state.

    Each one's ``last_cut`` becomes its ``count``: its next update is the first of a re-warm-up.
    A pure function (usable under :func:`jax.jit`); the input is not modified and every other
    leaf is returned as is. A state without a :class:`RewarmupState` is returned unchanged.

    Parameters
    ----------
    opt_state : pytree
        An optax state, e.g. ``tx.init(params)`` of an :func:`optax.chain` holding
        :func:`scale_by_rewarmup`, or ``nnx.as_pure(optimizer.opt_state)`` of a
        :class:`flax.nnx.Optimizer`.

    Returns
    -------
    pytree
        The new state.
    """

    def mark(node: Any) -> Any:
        if isinstance(node, RewarmupState):
            return node._replace(last_cut=node.count)
        return node

    return jax.tree_util.tree_map(mark, opt_state, is_leaf=_is_rewarmup)
