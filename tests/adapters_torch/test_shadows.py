"""Shadow copies (EMA, ``AveragedModel``) kept in step with the reductions (``extra_models``)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn  # noqa: E402

import compressm_torch.controller as controller_module  # noqa: E402
from compressm_torch import CompreSSM, SequenceModel, get_adapter, state_sizes  # noqa: E402

LAYERS = ["blocks.0.ssm", "blocks.1.ssm"]


def make(layer="lru", d_state=16):
    torch.manual_seed(0)
    model = SequenceModel(2, 3, d_model=8, d_state=d_state, n_layers=2, layer=layer)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    return model, opt, ema


def train(model, opt, ema, n=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.randn(4, 10, 2, generator=g), torch.randint(3, (4,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update_parameters(model)


def tensors(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_without_the_shadow_an_ema_breaks_after_a_reduction():
    model, opt, ema = make()
    train(model, opt, ema, 3)
    CompreSSM(model, opt, total_steps=10, mode="fixed", fraction=0.5).reduce()
    with pytest.raises(RuntimeError, match="size"):
        ema.update_parameters(model)


@pytest.mark.parametrize("layer", ["lru", "s5"])
def test_change_of_basis_gives_the_shadow_the_new_state_tensors_and_keeps_its_others(layer):
    model, opt, ema = make(layer)
    train(model, opt, ema, 5)
    own = tensors(ema.module)
    ctl = CompreSSM(model, opt, total_steps=10, mode="fixed", fraction=0.5, extra_models=[ema])
    events = ctl.reduce()
    assert [e.status for e in events] == ["reduced", "reduced"]
    assert state_sizes(ema) == {f"module.{n}": 8 for n in LAYERS}
    live = model.state_dict()
    state_keys = {
        f"{n}.{p}" for n in LAYERS for p in get_adapter(model.get_submodule(n)).state_axes
    }
    for key, value in ema.module.state_dict().items():
        if key in state_keys:  # the reduced layer's values, in its new basis
            torch.testing.assert_close(value, live[key], rtol=0, atol=0)
        else:  # the shadow's own average
            torch.testing.assert_close(value, own[key], rtol=0, atol=0)
    assert any(not torch.equal(own[k], live[k]) for k in own if k not in state_keys)
    train(model, opt, ema, 2)  # the average goes on, and the shadow runs
    x = torch.randn(2, 10, 2)
    assert ema(x).shape == model(x).shape


def test_index_selection_slices_the_shadow_own_values_at_the_kept_states():
    model, opt, ema = make("lru")
    train(model, opt, ema, 5)
    ema_old, live_old = tensors(ema.module), tensors(model)
    ctl = CompreSSM(
        model,
        opt,
        total_steps=10,
        mode="fixed",
        fraction=0.5,
        selection="random",
        extra_models=[ema],
    )
    ctl.reduce()
    for name in LAYERS:
        key = f"{name}.nu_log"  # distinct values: recover the kept states independently
        kept = [int((live_old[key] == v).nonzero()[0, 0]) for v in model.state_dict()[key]]
        assert len(kept) == 8
        for p, axis in get_adapter(model.get_submodule(name)).state_axes.items():
            expected = ema_old[f"{name}.{p}"].index_select(axis, torch.tensor(kept))
            torch.testing.assert_close(
                ema.module.state_dict()[f"{name}.{p}"], expected, rtol=0, atol=0
            )


def test_a_mamba_shadow_follows_the_selective_slices():
    model, opt, ema = make("mamba", d_state=8)
    train(model, opt, ema, 3)
    ema_old, live_old = tensors(ema.module), tensors(model)
    batches = [torch.randn(4, 10, 2)]
    ctl = CompreSSM(
        model,
        opt,
        total_steps=10,
        mode="fixed",
        fraction=0.5,
        calibration_batches=batches,
        extra_models=[ema],
    )
    assert [e.status for e in ctl.reduce()] == ["reduced", "reduced"]
    assert state_sizes(ema) == {f"module.{n}": 4 for n in LAYERS}
    for name in LAYERS:
        key = f"{name}.A_log"  # (d_inner, N): the kept columns, recovered from the live model
        new = model.state_dict()[key]
        kept = [
            int(((live_old[key] - new[:, [j]]).abs().sum(0) == 0).nonzero()[0, 0])
            for j in range(new.shape[1])
        ]
        expected = ema_old[key][:, kept]
        torch.testing.assert_close(ema.module.state_dict()[key], expected, rtol=0, atol=0)
    train(model, opt, ema, 1)


def test_a_failed_event_leaves_the_shadow_as_it_was(monkeypatch):
    model, opt, ema = make("lru")
    train(model, opt, ema, 3)
    before = tensors(ema)
    ctl = CompreSSM(model, opt, total_steps=10, mode="fixed", fraction=0.5, extra_models=[ema])

    def fail(*_):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(CompreSSM, "_end_event", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        ctl.reduce()
    assert state_sizes(ema) == {f"module.{n}": 16 for n in LAYERS}
    after = tensors(ema)
    assert after.keys() == before.keys()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0)
    monkeypatch.undo()
    ctl.reduce()
    train(model, opt, ema, 1)


def test_pragmatic_rollback_restores_the_shadow():
    model, opt, ema = make("lru")
    ctl = CompreSSM(
        model, opt, total_steps=20, mode="pragmatic", fraction=0.5, reduction_steps=[2],
        extra_models=[ema],
    )  # fmt: skip
    for step in range(1, 3):
        train(model, opt, ema, 1, seed=step)
        if step == 2:
            before = tensors(ema)  # what the cut at step 2 starts from
        ctl.step(val_metric=0.8 if step == 1 else None)
    assert state_sizes(ema) == {f"module.{n}": 8 for n in LAYERS}
    train(model, opt, ema, 1, seed=3)
    assert [e.status for e in ctl.step(val_metric=0.1)] == ["rolled_back", "rolled_back"]
    assert state_sizes(ema) == {f"module.{n}": 16 for n in LAYERS}
    for key, value in tensors(ema).items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    train(model, opt, ema, 1, seed=4)


def test_a_shadow_without_a_counterpart_is_refused():
    model, opt, _ = make("lru")
    other = SequenceModel(2, 3, d_model=8, d_state=16, n_layers=1)
    with pytest.raises(ValueError, match=r"`extra_models\[0\]` must have one layer named"):
        CompreSSM(model, opt, total_steps=10, extra_models=[other])
    small = SequenceModel(2, 3, d_model=8, d_state=12, n_layers=2)
    with pytest.raises(ValueError, match="with 16 states, like the model's"):
        CompreSSM(model, opt, total_steps=10, extra_models=[small])
    with pytest.raises(TypeError, match=r"`extra_models\[0\]` must be a torch.nn.Module"):
        CompreSSM(model, opt, total_steps=10, extra_models=["ema"])
    assert controller_module.match_shadows([], {}) == []
