"""The training controller: schedule, modes, gate, refusals, live-optimizer surgery."""

from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")

from compressm_core import hankel_singular_values  # noqa: E402
from compressm_torch import (  # noqa: E402
    CompreSSM,
    ReductionWarning,
    SequenceModel,
    reduction_schedule,
    state_sizes,
    to_state_space,
)

LAYERS = ["blocks.0.ssm", "blocks.1.ssm"]


def make(seed=0, d_state=32, layer="lru", **kw):
    torch.manual_seed(seed)
    model = SequenceModel(2, 3, d_model=8, d_state=d_state, n_layers=2, layer=layer, **kw)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    return model, opt


def batches(n, seed=123):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 16, 2, generator=g), torch.randint(3, (8,), generator=g)) for _ in range(n)
    ]


def train_step(model, opt, batch):
    x, y = batch
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def test_default_schedule():
    assert reduction_schedule(1000) == [25, 50, 75, 100]
    assert reduction_schedule(3000, warmup_fraction=0.2, num_reductions=4) == [150, 300, 450, 600]
    assert reduction_schedule(3, num_reductions=4) == [1]
    model, opt = make()
    assert CompreSSM(model, opt, total_steps=200).schedule == [5, 10, 15, 20]
    ctl = CompreSSM(model, opt, total_steps=200, reduction_steps=[7, 3, 7])
    assert ctl.schedule == [3, 7]


def test_reduces_on_schedule_and_training_continues():
    model, opt = make()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + 0.01 * s))
    ctl = CompreSSM(model, opt, total_steps=80, tau=0.2, lr_scheduler=sched)
    groups_before = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    data = batches(80)
    for t, batch in enumerate(data, start=1):
        train_step(model, opt, batch)
        sched.step()
        events = ctl.step()
        assert bool(events) == (t in ctl.schedule)
    sizes = ctl.state_sizes
    assert all(size < 32 for size in sizes.values()), sizes
    assert next(e.step for e in ctl.history if e.status == "reduced") == 2
    assert {e.status for e in ctl.history} <= {"reduced", "skipped"}
    # param_groups keep their parameters and hyperparameters (lr moved only by the scheduler)
    assert [p for g in opt.param_groups for p in g["params"]] == list(model.parameters())
    for g, before in zip(opt.param_groups, groups_before, strict=True):
        assert g["weight_decay"] == before["weight_decay"]
        assert g["lr"] == pytest.approx(1e-2 / (1 + 0.01 * 80))
    assert sched.last_epoch == 80
    event = next(e for e in ctl.history if e.status == "reduced")
    assert event.layer in LAYERS
    assert event.old_rank == 32
    assert event.new_rank < 32
    assert len(event.hsv) == 32
    assert event.error_bound >= 0
    assert event.seconds > 0


@pytest.mark.parametrize("policy", ["reset", "zero"])
def test_optimizer_surgery(policy):
    model, opt = make()
    data = batches(6)
    ctl = CompreSSM(
        model, opt, total_steps=100, tau=0.3, reduction_steps=[5], optimizer_state=policy
    )
    for batch in data[:5]:
        train_step(model, opt, batch)
    before = {p: copy.deepcopy(opt.state[p]) for p in model.parameters()}
    events = ctl.step() + ctl.step()  # steps 1..2: nothing, then jump to 5
    assert events == []
    ctl.num_steps = 4
    events = ctl.step()
    assert [e.status for e in events] == ["reduced", "reduced"]
    reduced = {p for name in LAYERS for p in _state_params(model, name)}
    for p in model.parameters():
        state = opt.state[p]
        if p in reduced:
            assert state["exp_avg"].shape == p.shape
            assert not state["exp_avg"].any()
            assert not state["exp_avg_sq"].any()
            assert float(state["step"]) == (0.0 if policy == "reset" else 5.0)
        else:  # every other tensor: bit-identical state
            for key, value in before[p].items():
                assert torch.equal(state[key], value), key
    # every parameter keeps moving after the reduction
    snapshot = [p.detach().clone() for p in model.parameters()]
    train_step(model, opt, data[5])
    for p, old in zip(model.parameters(), snapshot, strict=True):
        assert float((p.detach() - old).abs().max()) > 0
        assert torch.isfinite(p).all()


def _state_params(model, name):
    layer = model.get_submodule(name)
    return [
        getattr(layer, n)
        for n in ("nu_log", "theta_log", "gamma_log", "B_re", "B_im", "C_re", "C_im")
    ]


def test_random_selection_slices_moments_exactly():
    model, opt = make()
    for batch in batches(3):
        train_step(model, opt, batch)
    layer = model.get_submodule(LAYERS[0])
    before = opt.state[layer.C_re]["exp_avg"].clone()
    ctl = CompreSSM(
        model,
        opt,
        total_steps=10,
        mode="fixed",
        fraction=0.5,
        selection="random",
        reduction_steps=[1],
        layers=[LAYERS[0]],
    )
    ctl.step()
    assert layer.d_state == 16
    kept = torch.isin(before, opt.state[layer.C_re]["exp_avg"]).all(dim=0).nonzero().flatten()
    torch.testing.assert_close(opt.state[layer.C_re]["exp_avg"], before[:, kept])
    assert float(opt.state[layer.C_re]["step"]) == 3.0


def test_fixed_mode_and_gate():
    model, opt = make()
    ctl = CompreSSM(
        model, opt, total_steps=10, mode="fixed", fraction=0.25, reduction_steps=[1, 2]
    )
    ctl.step()
    assert ctl.state_sizes == dict.fromkeys(LAYERS, 24)
    ctl.step()
    assert ctl.state_sizes == dict.fromkeys(LAYERS, 18)
    model, opt = make()
    ctl = CompreSSM(model, opt, total_steps=10, mode="fixed", fraction=0.03, reduction_steps=[1])
    events = ctl.step()
    assert [e.status for e in events] == ["skipped", "skipped"]
    assert "gate" in events[0].reason
    assert ctl.state_sizes == dict.fromkeys(LAYERS, 32)


def test_tolerance_rank_is_select_rank_with_min_rank():
    model, opt = make()
    hsv = hankel_singular_values(to_state_space(model.get_submodule(LAYERS[0])))
    cumulative = torch.cumsum(hsv, 0) / hsv.sum()
    expected = int(torch.searchsorted(cumulative, torch.tensor(0.5, dtype=hsv.dtype))) + 1
    ctl = CompreSSM(model, opt, total_steps=10, tau=0.5, reduction_steps=[1], min_rank=3)
    ctl.step()
    assert ctl.state_sizes[LAYERS[0]] == max(3, expected)


def test_horizon_auto_records_the_sequence_length():
    model, opt = make()
    ctl = CompreSSM(model, opt, total_steps=10, tau=0.2, horizon="auto", reduction_steps=[1])
    train_step(model, opt, batches(1)[0])
    assert ctl.seen_length == 16
    expected = hankel_singular_values(to_state_space(model.get_submodule(LAYERS[0])), horizon=16)
    events = ctl.step()
    torch.testing.assert_close(torch.tensor(events[0].hsv, dtype=torch.float64), expected)
    ctl.remove_hooks()
    model(torch.randn(1, 40, 2))
    assert ctl.seen_length == 16


def test_refused_reduction_leaves_the_layer_and_warns():
    model, opt = make()
    bad = model.get_submodule(LAYERS[0])
    with torch.no_grad():
        bad.nu_log[0] = -80.0  # a pole on the unit circle
    before = {n: p.detach().clone() for n, p in bad.named_parameters()}
    ctl = CompreSSM(model, opt, total_steps=10, tau=0.3, reduction_steps=[1])
    with pytest.warns(ReductionWarning, match="refused"):
        events = ctl.step()
    assert [e.status for e in events] == ["refused", "reduced"]
    assert "StabilityError" in events[0].reason
    for n, p in bad.named_parameters():
        assert torch.equal(p, before[n])


def run_pragmatic(metric_after):
    model, opt = make()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    ctl = CompreSSM(
        model,
        opt,
        total_steps=100,
        mode="pragmatic",
        fraction=0.25,
        reduction_steps=[3, 6],
        lr_scheduler=sched,
        rollback_rtol=0.02,
    )
    data = batches(8)
    for batch in data[:3]:
        train_step(model, opt, batch)
        sched.step()
        ctl.step(val_metric=0.80 if ctl.num_steps == 2 else None)
    snapshot = ctl._pending["model"]
    opt_snapshot = ctl._pending["optimizer"]
    lr = opt_snapshot["param_groups"][0]["lr"]
    assert ctl.state_sizes == dict.fromkeys(LAYERS, 24)
    for batch in data[3:5]:
        train_step(model, opt, batch)
        sched.step()
        ctl.step()
    events = ctl.step(val_metric=metric_after)  # step 6: check, then maybe the next reduction
    return model, opt, ctl, events, snapshot, opt_snapshot, lr


def test_pragmatic_rolls_back_and_stops():
    model, opt, ctl, events, snap, opt_snap, lr = run_pragmatic(0.70)
    assert ctl.stopped
    assert [e.status for e in events] == ["rolled_back", "rolled_back"]
    assert ctl.state_sizes == dict.fromkeys(LAYERS, 32)
    # restored to the snapshot taken at step 3 before reducing: model and optimizer moments
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), k
    assert opt.state_dict()["state"].keys() == opt_snap["state"].keys()
    for key, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            assert torch.equal(value, opt_snap["state"][key][name]), (key, name)
    # the learning-rate schedule is not rolled back: 5 scheduler steps since the start
    assert lr == pytest.approx(1e-2 * 0.9**3)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.9**5)
    assert all(e.status != "reduced" or e.step == 3 for e in ctl.history)
    for batch in batches(2):
        train_step(model, opt, batch)
    assert ctl.step() == []


def test_pragmatic_keeps_a_reduction_that_holds():
    _, _, ctl, events, *_ = run_pragmatic(0.795)
    assert not ctl.stopped
    assert [e.status for e in events] == ["reduced", "reduced"]
    assert ctl.state_sizes == dict.fromkeys(LAYERS, 18)


def test_pragmatic_without_metric_skips_with_warning():
    model, opt = make()
    ctl = CompreSSM(model, opt, total_steps=10, mode="pragmatic", reduction_steps=[1])
    with pytest.warns(ReductionWarning, match="needs a val_metric"):
        events = ctl.step()
    assert [e.status for e in events] == ["skipped", "skipped"]


def test_state_dict_round_trip():
    model, opt = make()
    ctl = CompreSSM(model, opt, total_steps=40, tau=0.2, selection="random")
    data = batches(12)
    for batch in data[:10]:
        train_step(model, opt, batch)
        ctl.step()
    state = ctl.state_dict()
    other_model, other_opt = make(seed=1)
    other = CompreSSM(other_model, other_opt, total_steps=40, tau=0.2, selection="random")
    with pytest.raises(ValueError, match="state sizes"):
        other.load_state_dict(state)
    from compressm_torch import resize_layers

    resize_layers(other_model, state["state_sizes"])
    other.load_state_dict(state)
    assert other.history == ctl.history
    assert other.num_steps == 10
    assert torch.equal(other._generator.get_state(), ctl._generator.get_state())


def test_argument_errors():
    model, opt = make()
    with pytest.raises(ValueError, match=r"`tau` must be a float in \[0, 1\)"):
        CompreSSM(model, opt, total_steps=10, tau=1.0)
    with pytest.raises(ValueError, match="`mode`"):
        CompreSSM(model, opt, total_steps=10, mode="adaptive")
    with pytest.raises(ValueError, match="`total_steps`"):
        CompreSSM(model, opt, total_steps=0)
    with pytest.raises(ValueError, match="`horizon`"):
        CompreSSM(model, opt, total_steps=10, horizon=0)
    with pytest.raises(TypeError, match="`optimizer`"):
        CompreSSM(model, "adam", total_steps=10)
    with pytest.raises(KeyError, match="does not have"):
        CompreSSM(model, opt, total_steps=10, layers=["encoder"])
    with pytest.raises(ValueError, match="no supported SSM layer"):
        CompreSSM(torch.nn.Linear(2, 2), None, total_steps=10)


def test_s5_model_is_reduced_too():
    model, opt = make(layer="s5", d_state=16)
    ctl = CompreSSM(model, opt, total_steps=10, mode="fixed", fraction=0.5, reduction_steps=[2])
    for batch in batches(4):
        train_step(model, opt, batch)
        ctl.step()
    assert ctl.state_sizes == dict.fromkeys(LAYERS, 8)
    assert state_sizes(model) == ctl.state_sizes


# torch's Dynamo instantiates autograd.Function classes internally and warns about it.
@pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")
def test_compiled_model_recompiles_after_reduction():
    model, opt = make()
    compiled = torch.compile(model, backend="aot_eager")
    ctl = CompreSSM(compiled, opt, total_steps=10, mode="fixed", fraction=0.5, reduction_steps=[2])
    assert list(ctl.layers) == LAYERS
    data = batches(4)
    for batch in data:
        train_step(compiled, opt, batch)
        ctl.step()
    assert ctl.state_sizes == dict.fromkeys(LAYERS, 16)
    x = data[0][0]
    torch.testing.assert_close(compiled(x), model(x))


def test_bf16_autocast_training():
    model, opt = make()
    ctl = CompreSSM(model, opt, total_steps=10, mode="fixed", fraction=0.5, reduction_steps=[2])
    for x, y in batches(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctl.step()
    assert ctl.state_sizes == dict.fromkeys(LAYERS, 16)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_no_warnings_on_a_normal_run():
    model, opt = make()
    ctl = CompreSSM(model, opt, total_steps=40, tau=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for batch in batches(12):
            train_step(model, opt, batch)
            ctl.step()


def test_report_metric_does_not_advance_and_rejects_inf():
    model, opt = make()
    ctl = CompreSSM(model, opt, total_steps=10, mode="pragmatic", reduction_steps=[1])
    assert ctl.report_metric(0.5) == []
    assert ctl.num_steps == 0
    assert [e.status for e in ctl.step()] == ["reduced", "reduced"]
    events = ctl.report_metric(0.1)  # judged at once: fell by 80 %
    assert [e.status for e in events] == ["rolled_back", "rolled_back"]
    assert ctl.stopped
    with pytest.raises(ValueError, match="`value` must be a finite number"):
        ctl.report_metric(float("inf"))
    assert ctl.report_metric(float("nan")) == []  # nothing pending: no baseline, no error


def test_a_layer_resized_behind_the_controller_is_refused():
    from compressm_torch import resize_layers

    model, opt = make(d_state=16)
    old = copy.deepcopy(model.state_dict())
    ctl = CompreSSM(model, opt, total_steps=10, mode="fixed", fraction=0.5, reduction_steps=[1])
    ctl.step()
    resize_layers(model, dict.fromkeys(LAYERS, 16))
    model.load_state_dict(old)  # a state from before the cut
    with pytest.raises(ValueError, match=r"'blocks.0.ssm' has 16 states \(left at 8\)"):
        ctl.step()
    with pytest.raises(ValueError, match="changed size outside the controller"):
        ctl.reduce()
    assert ctl.num_steps == 1
    state = ctl.state_dict()
    state["state_sizes"] = dict.fromkeys(LAYERS, 16)
    state["history"] = []
    ctl.load_state_dict(state)  # model and controller restored together: accepted
    assert ctl.step() == []
