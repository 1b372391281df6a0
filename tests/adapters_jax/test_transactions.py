"""Reduction events of the Flax NNX controller are transactions: all layers or none.

Faults are injected by replacing a function the event calls (``rediagonalize``, the H-infinity
norm of the error check, the optax-state surgery) with one that raises on a chosen call. The
layers of one shape and rank are re-diagonalised in one batched call
(:mod:`compressm_core.layer_batches`), a layer planned alone in its own.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
nnx = pytest.importorskip("flax.nnx")
jax.config.update("jax_enable_x64", True)
jnp = jax.numpy

import compressm_core.layer_batches as layer_batches  # noqa: E402
import compressm_core.reduction as core_reduction  # noqa: E402
import compressm_jax.controller as controller_module  # noqa: E402
import compressm_jax.reduction as reduction_module  # noqa: E402
from compressm_jax import LRU, S5  # noqa: E402
from compressm_jax.controller import CompreSSM, ReductionWarning  # noqa: E402


class Net(nnx.Module):
    def __init__(self, layer, d_state=16, second=None):
        rngs = nnx.Rngs(0)
        kw = {"r_min": 0.3, "r_max": 0.95} if layer is LRU else {}
        self.enc = nnx.Linear(2, 4, rngs=rngs)
        self.ssm0 = layer(4, d_state, rngs=rngs, **kw)
        self.ssm1 = layer(4, second or d_state, rngs=rngs, **kw)


def train(model, opt, n=1, seed=0):
    """``n`` optimizer updates with made-up gradients (eager: no compilation per test)."""
    for i in range(n):
        grads = jax.tree.map(
            lambda p, i=i: jnp.full_like(p, 0.01 * (seed + i + 1)), nnx.state(model, nnx.Param)
        )
        opt.update(model, grads)


def make(layer, tx=None, second=None):
    model = Net(layer, second=second)
    opt = nnx.Optimizer(model, tx or optax.adam(1e-2), wrt=nnx.Param)
    train(model, opt, 2)
    return model, opt


def leaves(tree):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def failing_on(calls, error):
    """A stand-in for ``function`` that raises ``error`` on the given (1-based) calls."""

    def wrap(function):
        count = [0]

        def fake(*args, **kwargs):
            count[0] += 1
            if count[0] in calls:
                raise error
            return function(*args, **kwargs)

        return fake

    return wrap


def state_of(model, opt, ctl):
    return {
        "model": leaves(nnx.state(model)),
        "optimizer": leaves(nnx.state(opt)),
        "sizes": ctl.state_sizes,
        "num_steps": ctl.num_steps,
        "history": list(ctl.history),
    }


def assert_unchanged(model, opt, ctl, before):
    assert ctl.state_sizes == before["sizes"]
    assert ctl.num_steps == before["num_steps"]
    assert ctl.history == before["history"]
    for key in ("model", "optimizer"):
        now = leaves(nnx.state(model if key == "model" else opt))
        assert now.keys() == before[key].keys()
        for path, value in now.items():
            assert value.shape == before[key][path].shape, path
            np.testing.assert_array_equal(value, before[key][path], err_msg=path)


def assert_consistent(model, opt, ctl):
    """The history agrees with the live layers; every moment has its parameter's shape."""
    for name, size in ctl.state_sizes.items():
        last = [e for e in ctl.history if e.layer == name]
        if last:
            assert last[-1].new_rank == size, (name, last[-1])
    moments = leaves(nnx.state(opt, nnx.OptState))
    for path, param in leaves(nnx.state(model, nnx.Param)).items():
        matching = [m for k, m in moments.items() if k.endswith(path)]
        assert matching, path
        assert all(m.shape == param.shape for m in matching), path


@pytest.mark.parametrize("layer", [LRU, S5], ids=["lru", "s5"])
def test_failed_error_check_refuses_that_layer_and_leaves_it_unchanged(monkeypatch, layer):
    model, opt = make(layer)
    ctl = CompreSSM(
        model, opt, total_steps=10, mode="fixed", fraction=0.5, reduction_steps=[1],
        compute_error=True,
    )  # fmt: skip
    first = leaves(nnx.state(model.ssm0))
    fake = failing_on({1}, ValueError("no convergence"))(reduction_module.h_infinity_norm)
    monkeypatch.setattr(reduction_module, "h_infinity_norm", fake)
    with pytest.warns(ReductionWarning, match="refused; the layer is unchanged"):
        events = ctl.step()
    assert [e.status for e in events] == ["refused", "reduced"]
    assert ctl.state_sizes == {"ssm0": 16, "ssm1": 8}
    for path, value in leaves(nnx.state(model.ssm0)).items():
        np.testing.assert_array_equal(value, first[path], err_msg=path)
    assert_consistent(model, opt, ctl)
    train(model, opt, 1)


@pytest.mark.parametrize("layer", [LRU, S5], ids=["lru", "s5"])
@pytest.mark.parametrize("second", [16, 12])
def test_interrupted_event_restores_everything_and_is_retried(monkeypatch, layer, second):
    # layers of one size are re-diagonalised in one batched call; of two sizes in two
    model, opt = make(layer, second=second)
    ctl = CompreSSM(model, opt, total_steps=10, mode="fixed", fraction=0.5, reduction_steps=[2])
    assert ctl.step() == []
    before = state_of(model, opt, ctl)
    calls = {1 if second == 16 else 2}  # the last call: the second layer's
    fake = failing_on(calls, KeyboardInterrupt())(core_reduction.rediagonalize)
    monkeypatch.setattr(core_reduction, "rediagonalize", fake)
    monkeypatch.setattr(layer_batches, "rediagonalize", fake)
    with pytest.raises(KeyboardInterrupt):
        ctl.step()
    assert_unchanged(model, opt, ctl, before)
    monkeypatch.undo()
    events = ctl.step()  # the same step again: its event is retried
    assert [(e.step, e.status) for e in events] == [(2, "reduced"), (2, "reduced")]
    assert ctl.state_sizes == {"ssm0": 8, "ssm1": second // 2}
    assert_consistent(model, opt, ctl)
    train(model, opt, 1)


def test_failure_in_the_optimizer_surgery_restores_everything(monkeypatch):
    model, opt = make(LRU)
    ctl = CompreSSM(model, opt, total_steps=10, mode="fixed", fraction=0.5, reduction_steps=[1])
    before = state_of(model, opt, ctl)
    fake = failing_on({1}, RuntimeError("out of memory"))(controller_module.resize_optimizer_state)
    monkeypatch.setattr(controller_module, "resize_optimizer_state", fake)
    with pytest.raises(RuntimeError, match="out of memory"):
        ctl.step()
    assert_unchanged(model, opt, ctl, before)
    monkeypatch.undo()
    assert [e.status for e in ctl.step()] == ["reduced", "reduced"]
    assert_consistent(model, opt, ctl)
    train(model, opt, 1)


def counts(opt):
    """The integer leaves (step counts) of the optimizer state."""
    return sorted(int(v) for v in leaves(nnx.state(opt)).values() if v.dtype.kind in "iu")


def pragmatic_run():
    """Reduced at step 2 (baseline 0.8 at step 1); 5 optimizer updates in all."""
    schedule = optax.exponential_decay(1e-2, transition_steps=1, decay_rate=0.9)
    model, opt = make(LRU, optax.adam(schedule))
    ctl = CompreSSM(
        model, opt, total_steps=20, mode="pragmatic", fraction=0.5, reduction_steps=[2]
    )
    ctl.step(val_metric=0.8)
    ctl.step()
    assert ctl.state_sizes == {"ssm0": 8, "ssm1": 8}
    train(model, opt, 3, seed=5)
    return model, opt, ctl


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_infinite_metric_is_rejected(value):
    model, opt, ctl = pragmatic_run()
    before = state_of(model, opt, ctl)
    with pytest.raises(ValueError, match=r"`value` must be a finite number .*received -?inf"):
        ctl.step(val_metric=value)
    assert_unchanged(model, opt, ctl, before)
    assert ctl._pending is not None


def test_nan_metric_rolls_the_pending_reduction_back_and_training_goes_on():
    model, opt, ctl = pragmatic_run()
    with pytest.warns(ReductionWarning, match="is NaN; the reduction was rolled back"):
        events = ctl.step(val_metric=float("nan"))
    assert [e.status for e in events] == ["rolled_back", "rolled_back"]
    assert ctl.stopped
    assert ctl.state_sizes == {"ssm0": 16, "ssm1": 16}
    assert_consistent(model, opt, ctl)
    train(model, opt, 1)


def test_pragmatic_rollback_keeps_the_step_counts_and_their_schedule():
    model, opt, ctl = pragmatic_run()
    assert set(counts(opt)) == {5}  # the optimizer's step and optax's counts
    (event, _) = ctl.step(val_metric=0.1)
    assert event.status == "rolled_back"
    assert ctl.state_sizes == {"ssm0": 16, "ssm1": 16}
    assert set(counts(opt)) == {5}  # not rolled back with the moments
    train(model, opt, 1)
    assert set(counts(opt)) == {6}


def test_reduce_layer_writes_the_old_values_back_when_the_error_check_fails(monkeypatch):
    from compressm_jax import reduce_layer

    layer = LRU(4, 12, rngs=nnx.Rngs(0))
    before = leaves(nnx.state(layer))
    fake = failing_on({1}, RuntimeError("out of memory"))(reduction_module.h_infinity_norm)
    monkeypatch.setattr(reduction_module, "h_infinity_norm", fake)
    with pytest.raises(RuntimeError, match="out of memory"):
        reduce_layer(layer, 4, compute_error=True)
    assert layer.d_state == 12
    for path, value in leaves(nnx.state(layer)).items():
        np.testing.assert_array_equal(value, before[path], err_msg=path)
