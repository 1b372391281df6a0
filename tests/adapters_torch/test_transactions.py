"""Reduction events are transactions: all layers or none, history and model always agree.

Faults are injected by replacing a function the event calls (``rediagonalize``, the H-infinity
norm of the error check, the optimizer surgery, the index selection of selective layers) with
one that raises on a chosen call. The layers of one shape and rank are re-diagonalised in one
batched call (:mod:`compressm_core.layer_batches`), a layer planned alone in its own.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

import compressm_core.layer_batches as layer_batches  # noqa: E402
import compressm_core.reduction as core_reduction  # noqa: E402
import compressm_torch.controller as controller_module  # noqa: E402
import compressm_torch.reduction as reduction_module  # noqa: E402
import compressm_torch.selective as selective_module  # noqa: E402
from compressm_torch import (  # noqa: E402
    CompreSSM,
    ReductionWarning,
    SequenceModel,
    get_adapter,
    reduce_model,
)

LAYERS = ["blocks.0.ssm", "blocks.1.ssm"]


def make(layer="lru", d_state=16):
    torch.manual_seed(0)
    model = SequenceModel(2, 3, d_model=8, d_state=d_state, n_layers=2, layer=layer)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, opt


def train(model, opt, n=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.randn(4, 10, 2, generator=g), torch.randint(3, (4,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


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


def fail_rediagonalize(monkeypatch, calls, error):
    """Make ``rediagonalize`` raise ``error`` on the given calls, batched or one layer's."""
    fake = failing_on(calls, error)(core_reduction.rediagonalize)
    monkeypatch.setattr(core_reduction, "rediagonalize", fake)
    monkeypatch.setattr(layer_batches, "rediagonalize", fake)


def state_of(model, opt, ctl):
    """Everything an event may change, copied."""
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "grads": {
            k: None if v.grad is None else v.grad.clone() for k, v in model.named_parameters()
        },
        "optimizer": copy.deepcopy(opt.state_dict()),
        "sizes": ctl.state_sizes,
        "num_steps": ctl.num_steps,
        "history": list(ctl.history),
        "generator": ctl._generator.get_state(),
    }


def assert_unchanged(model, opt, ctl, before):
    assert ctl.state_sizes == before["sizes"]
    assert ctl.num_steps == before["num_steps"]
    assert ctl.history == before["history"]
    assert torch.equal(ctl._generator.get_state(), before["generator"])
    for name, param in model.named_parameters():
        assert param.shape == before["params"][name].shape, name
        assert torch.equal(param, before["params"][name]), name
        grad = before["grads"][name]
        assert (param.grad is None) == (grad is None), name
        assert grad is None or torch.equal(param.grad, grad), name
    after = opt.state_dict()
    assert after["param_groups"] == before["optimizer"]["param_groups"]
    assert after["state"].keys() == before["optimizer"]["state"].keys()
    for key, state in after["state"].items():
        for name, value in state.items():
            assert torch.equal(value, before["optimizer"]["state"][key][name]), (key, name)


def assert_consistent(model, opt, ctl):
    """The history agrees with the live layers; every moment has its parameter's shape."""
    for name in LAYERS:
        last = [e for e in ctl.history if e.layer == name]
        if last:
            assert last[-1].new_rank == ctl.state_sizes[name], (name, last[-1])
    for param in model.parameters():
        for value in opt.state[param].values():
            if torch.is_tensor(value) and value.ndim:
                assert value.shape == param.shape


@pytest.mark.parametrize("layer", ["lru", "s5"])
@pytest.mark.parametrize(
    "error", [RuntimeError("CUDA out of memory"), ValueError("bad"), ArithmeticError("bad")]
)
def test_failed_error_check_refuses_that_layer_and_leaves_it_unchanged(monkeypatch, layer, error):
    model, opt = make(layer)
    train(model, opt, 2)
    ctl = CompreSSM(
        model, opt, total_steps=10, mode="fixed", fraction=0.5, reduction_steps=[1],
        compute_error=True,
    )  # fmt: skip
    before = state_of(model, opt, ctl)
    norm = failing_on({1}, error)(reduction_module.h_infinity_norm)
    monkeypatch.setattr(reduction_module, "h_infinity_norm", norm)
    if isinstance(error, (RuntimeError, ValueError)):  # a layer error: refused, others go on
        with pytest.warns(ReductionWarning, match="refused; the layer is unchanged"):
            events = ctl.step()
        assert [e.status for e in events] == ["refused", "reduced"]
        assert ctl.state_sizes == {LAYERS[0]: 16, LAYERS[1]: 8}
        first = model.get_submodule(LAYERS[0])
        for name, param in first.named_parameters():
            assert torch.equal(param, before["params"][f"{LAYERS[0]}.{name}"]), name
        assert events[1].hinf_error is not None
    else:  # anything else: the whole step is undone and the error propagates
        with pytest.raises(ArithmeticError):
            ctl.step()
        assert_unchanged(model, opt, ctl, before)
        monkeypatch.undo()
        events = ctl.step()  # retried
        assert [(e.step, e.status) for e in events] == [(1, "reduced"), (1, "reduced")]
    assert_consistent(model, opt, ctl)
    train(model, opt, 1)


@pytest.mark.parametrize("layer", ["lru", "s5"])
@pytest.mark.parametrize("error", [KeyboardInterrupt(), ZeroDivisionError("bug")])
@pytest.mark.parametrize("first", [16, 12])
def test_interrupted_event_restores_everything_and_is_retried(monkeypatch, layer, error, first):
    model, opt = make(layer)
    # layers of one size are re-diagonalised in one batched call; of two sizes in two
    reduce_model(model, {LAYERS[0]: first})
    train(model, opt, 2)
    ctl = CompreSSM(model, opt, total_steps=10, mode="fixed", fraction=0.5, reduction_steps=[2])
    assert ctl.step() == []
    before = state_of(model, opt, ctl)
    fail_rediagonalize(monkeypatch, {1 if first == 16 else 2}, error)  # the last call
    with pytest.raises(type(error)):
        ctl.step()
    assert_unchanged(model, opt, ctl, before)
    monkeypatch.undo()
    events = ctl.step()  # the same step again: its event is retried
    assert [(e.step, e.status) for e in events] == [(2, "reduced"), (2, "reduced")]
    assert ctl.state_sizes == {LAYERS[0]: first // 2, LAYERS[1]: 8}
    assert_consistent(model, opt, ctl)
    train(model, opt, 2)
    assert ctl.step() == []


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("CUDA out of memory")])
def test_failure_in_the_optimizer_surgery_restores_everything(monkeypatch, error):
    model, opt = make("lru")
    train(model, opt, 2)
    ctl = CompreSSM(model, opt, total_steps=10, mode="fixed", fraction=0.5, reduction_steps=[1])
    before = state_of(model, opt, ctl)
    # fail in the second layer's surgery, after the first layer's and part of the second's
    per_layer = len(get_adapter(model.get_submodule(LAYERS[0])).state_axes)
    fake = failing_on({per_layer + 2}, error)(controller_module.resize_optimizer_state)
    monkeypatch.setattr(controller_module, "resize_optimizer_state", fake)
    with pytest.raises(type(error)):
        ctl.step()
    assert_unchanged(model, opt, ctl, before)
    monkeypatch.undo()
    assert [e.status for e in ctl.step()] == ["reduced", "reduced"]
    assert_consistent(model, opt, ctl)
    train(model, opt, 1)


def test_interrupted_selective_event_keeps_its_statistics_and_is_retried(monkeypatch):
    model, opt = make("mamba", d_state=8)
    ctl = CompreSSM(
        model, opt, total_steps=10, mode="fixed", fraction=0.5, reduction_steps=[3],
        calibration_steps=2,
    )  # fmt: skip
    for _ in range(2):
        train(model, opt, 1)
        ctl.step()
    train(model, opt, 1)
    before = state_of(model, opt, ctl)
    fake = failing_on({2}, KeyboardInterrupt())(selective_module.select_state_indices)
    monkeypatch.setattr(selective_module, "select_state_indices", fake)
    with pytest.raises(KeyboardInterrupt):
        ctl.step()
    assert_unchanged(model, opt, ctl, before)
    assert all(model.get_submodule(name).d_state == 8 for name in LAYERS)
    monkeypatch.undo()
    events = ctl.step()  # the recorded statistics are still there
    assert [(e.step, e.status) for e in events] == [(3, "reduced"), (3, "reduced")]
    assert all(model.get_submodule(name).d_state == 4 for name in LAYERS)
    assert_consistent(model, opt, ctl)
    train(model, opt, 1)


def test_interrupted_pragmatic_event_leaves_nothing_pending(monkeypatch):
    model, opt = make("lru")
    ctl = CompreSSM(
        model, opt, total_steps=10, mode="pragmatic", fraction=0.5, reduction_steps=[1]
    )
    ctl.report_metric(0.8)
    before = state_of(model, opt, ctl)
    fail_rediagonalize(monkeypatch, {1}, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        ctl.step()
    assert_unchanged(model, opt, ctl, before)
    assert ctl._pending is None
    monkeypatch.undo()
    assert [e.status for e in ctl.step()] == ["reduced", "reduced"]
    assert ctl._pending is not None


def pragmatic_run():
    model, opt = make("lru")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    ctl = CompreSSM(
        model, opt, total_steps=20, mode="pragmatic", fraction=0.5, reduction_steps=[2],
        lr_scheduler=sched,
    )  # fmt: skip
    for step in range(1, 5):
        train(model, opt, 1, seed=step)
        sched.step()
        ctl.step(val_metric=0.8 if step == 1 else None)
    assert ctl.state_sizes == dict.fromkeys(LAYERS, 8)
    return model, opt, sched, ctl


def test_nan_metric_rolls_the_pending_reduction_back_and_training_goes_on():
    model, opt, _, ctl = pragmatic_run()
    with pytest.warns(ReductionWarning, match="is NaN; the reduction was rolled back"):
        events = ctl.step(val_metric=float("nan"))
    assert [e.status for e in events] == ["rolled_back", "rolled_back"]
    assert ctl.stopped
    assert ctl.state_sizes == dict.fromkeys(LAYERS, 16)
    assert_consistent(model, opt, ctl)
    train(model, opt, 1)
    assert ctl.step() == []


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_infinite_metric_is_rejected(value):
    *_, ctl = pragmatic_run()
    with pytest.raises(ValueError, match=r"`value` must be a finite number .*received -?inf"):
        ctl.report_metric(value)
    with pytest.raises(ValueError, match="`value`"):
        ctl.step(val_metric=value)
    assert ctl.num_steps == 4
    assert ctl._pending is not None
    assert ctl.state_sizes == dict.fromkeys(LAYERS, 8)


def test_pragmatic_rollback_keeps_the_learning_rate_schedule_in_step():
    model, opt, sched, ctl = pragmatic_run()
    train(model, opt, 1, seed=5)
    sched.step()
    (event, _) = ctl.step(val_metric=0.1)
    assert event.status == "rolled_back"
    assert sched.last_epoch == ctl.num_steps == 5
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.9**5)
    assert sched.get_last_lr() == [opt.param_groups[0]["lr"]]
    train(model, opt, 1)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.9**6)


def test_reduce_layer_writes_the_old_values_back_when_the_error_check_fails(monkeypatch):
    from compressm_torch import LRU, reduce_layer

    torch.manual_seed(0)
    layer = LRU(4, 12)
    before = {k: v.detach().clone() for k, v in layer.named_parameters()}
    fake = failing_on({1}, RuntimeError("out of memory"))(reduction_module.h_infinity_norm)
    monkeypatch.setattr(reduction_module, "h_infinity_norm", fake)
    with pytest.raises(RuntimeError, match="out of memory"):
        reduce_layer(layer, 4, compute_error=True)
    assert layer.d_state == 12
    for name, param in layer.named_parameters():
        assert torch.equal(param, before[name]), name
