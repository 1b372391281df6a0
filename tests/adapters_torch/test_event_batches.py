"""A reduction event measures the LTI layers of one shape in one batched core call and truncates
those of one rank together; it gives what reducing each layer alone gives (HSVs, ranks, reduced
parameters, bounds), refuses a failing layer alone, and runs in float64 under autocast."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.overrides import TorchFunctionMode  # noqa: E402

import compressm_core.layer_batches as layer_batches  # noqa: E402
import compressm_torch.controller as controller_module  # noqa: E402
from compressm_core import ConditioningError, select_rank  # noqa: E402
from compressm_core.reduction import layer_hsv  # noqa: E402
from compressm_torch import (  # noqa: E402
    CompreSSM,
    ReductionWarning,
    SequenceModel,
    reduce_layer,
    reduce_model,
    to_state_space,
)


def make(layer="lru", n_layers=3, d_state=16, seed=0):
    torch.manual_seed(seed)
    model = SequenceModel(2, 3, d_model=8, d_state=d_state, n_layers=n_layers, layer=layer)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(2):
        x, y = torch.randn(4, 10, 2, generator=g), torch.randint(3, (4,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def names(n_layers):
    return [f"blocks.{i}.ssm" for i in range(n_layers)]


class Calls:
    """Counts the calls of a function replaced by a spy."""

    def __init__(self, monkeypatch, module, name):
        self.count = 0
        function = getattr(module, name)

        def spy(*args, **kwargs):
            self.count += 1
            return function(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)


@pytest.mark.parametrize("layer", ["lru", "s5", "s4d"])
@pytest.mark.parametrize(("mode", "options"), [("fixed", {"fraction": 0.5}), ("tolerance", {})])
def test_batched_event_equals_reducing_each_layer_alone(monkeypatch, layer, mode, options):
    model, opt = make(layer)
    layers = names(3)
    # one layer of another size: two shape groups
    reduce_model(model, {layers[2]: 12})
    alone = copy.deepcopy(model)
    tau = 0.05
    measured = Calls(monkeypatch, layer_batches, "measure_layers")
    planned = Calls(monkeypatch, layer_batches, "plan_layers")
    per_layer = Calls(monkeypatch, controller_module, "hankel_singular_values")
    ctl = CompreSSM(model, opt, total_steps=10, mode=mode, tau=tau, **options)
    events = ctl.reduce()
    assert [e.layer for e in events] == layers
    assert measured.count == 2  # one batched call per shape
    assert per_layer.count == 0  # no layer measured alone
    ranks = set()
    for event in events:
        ref_layer = alone.get_submodule(event.layer)
        sys = to_state_space(ref_layer)
        hsv, _ = layer_hsv(sys, 1)
        hsv = hsv.numpy()
        n = hsv.size
        # the HSVs the event decided by are those of the layer alone
        np.testing.assert_allclose(event.hsv, hsv, rtol=1e-10, atol=1e-12 * hsv[0])
        want = math.floor(n * 0.5) if mode == "fixed" else select_rank(hsv, tau=tau)
        assert event.old_rank == n
        if not want < 0.95 * n:
            assert event.status == "skipped"
            continue
        assert event.status == "reduced"
        assert event.new_rank == want
        ranks.add((n, want))
        report = reduce_layer(ref_layer, want)  # the one-layer path
        assert event.error_bound == pytest.approx(report.error_bound, rel=1e-9)
        got = dict(model.get_submodule(event.layer).named_parameters())
        for pname, value in ref_layer.named_parameters():
            assert got[pname].shape == value.shape, pname
            torch.testing.assert_close(got[pname], value, rtol=1e-5, atol=1e-6)
    assert ranks
    assert planned.count == len(ranks)  # one batched truncation per shape and rank


class HostReads(TorchFunctionMode):
    """Counts the tensor methods that read values on the host (a device sync on a GPU)."""

    READS = frozenset(
        {"__bool__", "item", "tolist", "numpy", "__float__", "__int__", "__index__", "cpu"}
    )

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def host_reads_of_the_batched_maths(monkeypatch, n_layers):
    model, _ = make("lru", n_layers=n_layers)
    counter = HostReads()
    for name in ("measure_layers", "plan_layers"):
        function = getattr(layer_batches, name)

        def counted(*args, _function=function, **kwargs):
            with counter:
                return _function(*args, **kwargs)

        monkeypatch.setattr(layer_batches, name, counted)
    events = CompreSSM(model, None, total_steps=10, mode="fixed", fraction=0.5).reduce()
    assert [e.status for e in events] == ["reduced"] * n_layers
    monkeypatch.undo()
    return counter.count


def test_host_reads_of_an_event_do_not_grow_with_its_layers(monkeypatch):
    two = host_reads_of_the_batched_maths(monkeypatch, 2)
    five = host_reads_of_the_batched_maths(monkeypatch, 5)
    assert two == five
    assert 0 < two < 40


def test_a_failing_layer_is_refused_alone_and_the_others_are_reduced_as_alone():
    model, opt = make("lru")
    layers = names(3)
    with torch.no_grad():  # a pole on the unit circle: the batched measurement fails
        model.get_submodule(layers[1]).nu_log[0] = -torch.inf
    alone = copy.deepcopy(model)
    ctl = CompreSSM(model, opt, total_steps=10, mode="fixed", fraction=0.5)
    with pytest.warns(ReductionWarning, match="refused; the layer is unchanged"):
        events = ctl.reduce()
    assert [e.status for e in events] == ["reduced", "refused", "reduced"]
    for event in (events[0], events[2]):
        ref = alone.get_submodule(event.layer)
        reduce_layer(ref, 8)
        for pname, value in ref.named_parameters():
            got = model.get_submodule(event.layer).get_parameter(pname)
            torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6)
    before = alone.get_submodule(layers[1])
    for pname, value in model.get_submodule(layers[1]).named_parameters():
        assert torch.equal(value, before.get_parameter(pname)), pname


def test_a_failing_batched_truncation_is_planned_again_layer_by_layer(monkeypatch):
    model, opt = make("lru", n_layers=2)
    alone = copy.deepcopy(model)

    def refuse(*args, **kwargs):
        raise ConditioningError("batched")

    monkeypatch.setattr(layer_batches, "rediagonalize", refuse)
    events = CompreSSM(model, opt, total_steps=10, mode="fixed", fraction=0.5).reduce()
    assert [e.status for e in events] == ["reduced", "reduced"]
    monkeypatch.undo()
    events = CompreSSM(alone, None, total_steps=10, mode="fixed", fraction=0.5).reduce()
    for (name, got), value in zip(model.named_parameters(), alone.parameters(), strict=True):
        torch.testing.assert_close(got, value, rtol=1e-6, atol=1e-7, msg=name)


# --- autocast ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", ["lru", "s5", "s4d"])
def test_layer_under_bf16_autocast_keeps_its_recurrence_in_float32(layer):
    model, _ = make(layer, n_layers=1)
    ssm = model.get_submodule("blocks.0.ssm")
    u = torch.randn(2, 12, 8, requires_grad=True)
    ref = ssm(u)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ssm(u)
        low = ssm(u.to(torch.bfloat16))
    assert out.dtype == torch.float32
    assert low.dtype == torch.bfloat16
    # a bfloat16 recurrence would be off by ~1e-2 relative; float32 agrees to rounding
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(low.float(), ref, atol=0.1, rtol=0.05)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ssm.parameters())


@pytest.mark.parametrize("layer", ["s5", "s4d"])
def test_bf16_autocast_training_with_a_reduction(layer):
    model, opt = make(layer, n_layers=2)
    ctl = CompreSSM(model, opt, total_steps=10, mode="fixed", fraction=0.5, reduction_steps=[2])
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(4, 10, 2, generator=g), torch.randint(3, (4,), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctl.step()
    assert ctl.state_sizes == dict.fromkeys(names(2), 8)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("layer", ["lru", "s5", "s4d"])
def test_an_event_under_autocast_computes_in_float64(layer):
    model, _ = make(layer, n_layers=2)
    twin = copy.deepcopy(model)
    plain = CompreSSM(model, None, total_steps=10, mode="fixed", fraction=0.5).reduce()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = CompreSSM(twin, None, total_steps=10, mode="fixed", fraction=0.5).reduce()
    for a, b in zip(plain, cast, strict=True):
        assert a.status == b.status == "reduced"
        np.testing.assert_allclose(b.hsv, a.hsv, rtol=1e-12)
        assert b.error_bound == pytest.approx(a.error_bound, rel=1e-12)
    for x, y in zip(model.parameters(), twin.parameters(), strict=True):
        assert x.dtype == y.dtype == torch.float32
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7)


def test_batches_are_split_to_bound_the_memory_of_an_event(monkeypatch):
    import compressm_core._events as events_module

    model, _ = make("lru", n_layers=3)
    twin = copy.deepcopy(model)
    whole = CompreSSM(model, None, total_steps=10, mode="fixed", fraction=0.5).reduce()
    # room for two layers (16 states: 2 x 16 x (2 x 16)^2 bytes) per stacked array
    monkeypatch.setattr(events_module, "BATCH_BYTES", 2 * 16 * 32**2)
    measured = Calls(monkeypatch, layer_batches, "measure_layers")
    split = CompreSSM(twin, None, total_steps=10, mode="fixed", fraction=0.5).reduce()
    assert measured.count == 2
    for a, b in zip(whole, split, strict=True):
        assert (a.status, a.new_rank) == (b.status, b.new_rank) == ("reduced", 8)
        np.testing.assert_allclose(b.hsv, a.hsv, rtol=1e-12)
    for x, y in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_event_runs_its_maths_on_the_device_in_float64(monkeypatch):
    model, _ = make("lru")
    on_host = copy.deepcopy(model)
    model.cuda()
    seen = []
    measure = layer_batches.measure_layers

    def spy(systems, **kwargs):
        seen.extend((s.poles.device.type, s.poles.dtype, s.b.dtype) for s in systems)
        return measure(systems, **kwargs)

    monkeypatch.setattr(layer_batches, "measure_layers", spy)
    events = CompreSSM(model, None, total_steps=10, mode="fixed", fraction=0.5).reduce()
    monkeypatch.undo()
    assert seen == [("cuda", torch.complex128, torch.complex128)] * 3
    reference = CompreSSM(on_host, None, total_steps=10, mode="fixed", fraction=0.5).reduce()
    for got, want in zip(events, reference, strict=True):
        assert (got.status, got.new_rank) == (want.status, want.new_rank) == ("reduced", 8)
        np.testing.assert_allclose(got.hsv, want.hsv, rtol=1e-9)
    for x, y in zip(model.parameters(), on_host.parameters(), strict=True):
        assert x.is_cuda
        torch.testing.assert_close(x.cpu(), y, rtol=1e-5, atol=1e-6)
