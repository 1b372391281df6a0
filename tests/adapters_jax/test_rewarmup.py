"""`scale_by_rewarmup`: the re-warm-up after each cut as an optax transformation."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
nnx = pytest.importorskip("flax.nnx")
jax.config.update("jax_enable_x64", True)
jnp = jax.numpy

from compressm_jax import (  # noqa: E402
    LRU,
    CompreSSM,
    ParamChange,
    RewarmupState,
    mark_cut,
    resize_optimizer_state,
    scale_by_rewarmup,
)


def expected_factors(updates: int, cuts: list[int], k: int) -> list[float]:
    """Factor of updates 1..``updates``: a cut after ``s`` updates gives updates s+1 .. s+k the
    factors 1/(k+1) .. k/(k+1); a later cut overrides an earlier one's tail."""
    factors = [1.0] * updates
    for s in sorted(cuts):
        for j in range(1, k + 1):
            if s + j <= updates:
                factors[s + j - 1] = j / (k + 1)
    return factors


SCHEDULES = {
    "warmup_cosine": optax.warmup_cosine_decay_schedule(0.0, 0.5, 5, 30, end_value=0.01),
    "exponential": optax.exponential_decay(0.3, transition_steps=2, decay_rate=0.8),
}


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_updates_are_the_schedule_times_the_rewarmup_factor(name: str, jit: bool) -> None:
    schedule, k, n, cuts = SCHEDULES[name], 3, 20, [4, 6, 13]  # the cut at 6 restarts the ramp
    tx = optax.chain(optax.sgd(schedule), scale_by_rewarmup(k))
    plain = optax.sgd(schedule)
    params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    state, plain_state = tx.init(params), plain.init(params)
    update, plain_update, mark = tx.update, plain.update, mark_cut
    if jit:
        update, plain_update, mark = jax.jit(update), jax.jit(plain_update), jax.jit(mark)
    factors = expected_factors(n, cuts, k)
    assert factors[4:8] == [0.25, 0.5, 0.25, 0.5]  # the expectation itself is not all ones
    for u in range(1, n + 1):
        if u - 1 in cuts:
            state = mark(state)
        grads = {
            "w": jax.random.normal(jax.random.PRNGKey(u), (3,)),
            "b": jnp.asarray(0.1 * u),
        }
        updates, state = update(grads, state)
        own, plain_state = plain_update(grads, plain_state)
        lr = float(schedule(jnp.asarray(u - 1, jnp.int32)))  # optax counts updates from 0
        for key in params:
            want = -np.asarray(grads[key]) * lr * factors[u - 1]
            np.testing.assert_allclose(updates[key], want, rtol=1e-12, atol=0)
            # the schedule is not shifted: the plain optimizer's update times the factor
            np.testing.assert_allclose(updates[key], own[key] * factors[u - 1], rtol=1e-12)
    assert int(state[1].count) == n
    assert int(state[1].last_cut) == cuts[-1]


def test_no_cut_and_zero_steps_leave_updates_unchanged() -> None:
    grads = {"w": jnp.arange(1.0, 4.0)}
    for tx, marked in [(scale_by_rewarmup(5), False), (scale_by_rewarmup(0), True)]:
        state = tx.init(grads)
        if marked:
            state = mark_cut(state)
        for _ in range(3):
            updates, state = tx.update(grads, state)
            np.testing.assert_array_equal(updates["w"], grads["w"])


def test_state_is_two_int32_scalars() -> None:
    state = scale_by_rewarmup(2).init({"w": jnp.zeros((4, 4))})
    assert isinstance(state, RewarmupState)
    for leaf in state:
        assert leaf.shape == ()
        assert leaf.dtype == jnp.int32
    assert (int(state.count), int(state.last_cut)) == (0, -1)


def rewarmup_states(tree: object) -> list[RewarmupState]:
    def is_state(node: object) -> bool:
        return isinstance(node, RewarmupState)

    leaves = jax.tree_util.tree_leaves(tree, is_leaf=is_state)
    return [node for node in leaves if is_state(node)]


def test_mark_cut_is_pure_and_marks_every_rewarmup_state() -> None:
    params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    tx = optax.multi_transform(
        {
            "x": optax.chain(optax.adam(0.1), scale_by_rewarmup(1)),
            "y": optax.chain(optax.sgd(0.1), scale_by_rewarmup(3)),
        },
        {"a": "x", "b": "y"},
    )
    state = tx.init(params)
    for _ in range(2):
        _, state = tx.update(params, state, params)
    marked = mark_cut(state)
    found = rewarmup_states(marked)
    assert len(found) == 2
    assert all((int(s.count), int(s.last_cut)) == (2, 2) for s in found)
    assert all(int(s.last_cut) == -1 for s in rewarmup_states(state))  # input not modified
    plain = optax.adam(0.1).init(params)
    same = jax.tree_util.tree_leaves(mark_cut(plain))
    assert all(x is y for x, y in zip(same, jax.tree_util.tree_leaves(plain), strict=True))


def test_state_survives_resize_optimizer_state() -> None:
    params = {"ssm": {"B": jnp.ones((4, 2))}, "w": jnp.ones(3)}
    tx = optax.chain(optax.adam(1.0), scale_by_rewarmup(2))
    state = tx.init(params)
    _, state = tx.update(params, state, params)
    state = mark_cut(state)
    keep = jnp.array([0, 2])
    plan = {
        (jax.tree_util.DictKey("ssm"), jax.tree_util.DictKey("B")): ParamChange(
            params["ssm"]["B"][keep], 0, keep
        )
    }
    new_params, new_state = resize_optimizer_state(params, state, plan)
    assert new_state[0][0].mu["ssm"]["B"].shape == (2, 2)
    assert new_state[1].count is state[1].count
    assert new_state[1].last_cut is state[1].last_cut
    plain = optax.adam(1.0)  # the optimizer part of the chain
    updates, _ = tx.update(new_params, new_state, new_params)
    own, _ = plain.update(new_params, new_state[0], new_params)
    np.testing.assert_allclose(updates["w"], own["w"] / 3, rtol=1e-12)  # first of K = 2


@pytest.mark.parametrize("value", [-1, 1.5, 2.0, True, "2", None])
def test_bad_rewarmup_steps(value: object) -> None:
    with pytest.raises(ValueError, match="`rewarmup_steps` must be an int >= 0; received"):
        scale_by_rewarmup(value)  # type: ignore[arg-type]


class Net(nnx.Module):
    def __init__(self) -> None:
        rngs = nnx.Rngs(0)
        self.ssm = LRU(4, 16, r_min=0.3, r_max=0.95, rngs=rngs)
        self.dec = nnx.Linear(4, 1, rngs=rngs)


@nnx.jit
def train_step(model: Net, opt: nnx.Optimizer, grad: jax.Array) -> jax.Array:
    """One update with every gradient entry ``grad``; the update of ``dec.bias``."""
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, grad), nnx.state(model, nnx.Param))
    return opt.update(model, grads)["dec"]["bias"][...]


def test_the_controller_marks_its_cuts_and_the_factors_match_lr_factor() -> None:
    lr, k, n = 0.01, 3, 11
    model = Net()
    opt = nnx.Optimizer(model, optax.chain(optax.sgd(lr), scale_by_rewarmup(k)), wrt=nnx.Param)
    ctl = CompreSSM(
        model,
        opt,
        total_steps=n,
        mode="fixed",
        fraction=0.5,
        reduction_steps=[3, 5],
        rewarmup_steps=k,
    )
    recorded, applied = [], []
    for i in range(n):
        grad = 1.0 + 0.1 * i
        recorded.append(ctl.lr_factor)
        applied.append(float(train_step(model, opt, grad)[0]) / (-lr * grad))
        ctl.step()
    assert [(e.step, e.new_rank) for e in ctl.history] == [(3, 8), (5, 4)]
    assert recorded == expected_factors(n, [3, 5], k)
    np.testing.assert_allclose(applied, recorded, rtol=1e-6)  # float32 parameters
