"""Checkpoints: a reduced model, its optimizer, scheduler and controller reload and resume."""

from __future__ import annotations

import io
import math

import pytest

torch = pytest.importorskip("torch")

from compressm_torch import (  # noqa: E402
    CompreSSM,
    SequenceModel,
    load_checkpoint,
    save_checkpoint,
    state_sizes,
)

TOTAL = 14


def build(seed):
    torch.manual_seed(seed)
    model = SequenceModel(2, 3, d_model=8, d_state=24, n_layers=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / TOTAL))
    )
    ctl = CompreSSM(
        model, opt, total_steps=TOTAL, tau=0.3, reduction_steps=[3, 6], lr_scheduler=sched
    )
    return model, opt, sched, ctl


def data():
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randn(8, 12, 2, generator=g), torch.randint(3, (8,), generator=g))
        for _ in range(TOTAL)
    ]


def run(model, opt, sched, ctl, batches):
    losses = []
    for x, y in batches:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ctl.step()
        losses.append(float(loss.detach()))
    return losses


def test_stop_reload_continue_matches_an_uninterrupted_run(tmp_path):
    batches = data()
    reference = run(*build(0), batches)

    model, opt, sched, ctl = build(0)
    first = run(model, opt, sched, ctl, batches[:8])
    sizes = state_sizes(model)
    assert all(size < 24 for size in sizes.values())
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, opt, lr_scheduler=sched, controller=ctl, extra={"epoch": 3})

    fresh = build(1)  # a freshly built full-size model with different weights
    assert all(size == 24 for size in state_sizes(fresh[0]).values())
    model2, opt2, sched2, ctl2 = fresh
    extra = load_checkpoint(path, model2, opt2, lr_scheduler=sched2, controller=ctl2)
    assert extra == {"epoch": 3}
    assert state_sizes(fresh[0]) == sizes
    assert fresh[3].history == ctl.history
    assert fresh[3].num_steps == 8
    second = run(*fresh, batches[8:])
    torch.testing.assert_close(first + second, reference, rtol=1e-6, atol=1e-6)


def test_checkpoint_of_model_only_and_errors():
    model, *_ = build(0)
    model.get_submodule("blocks.0.ssm")  # exists
    buf = io.BytesIO()
    save_checkpoint(buf, model)
    buf.seek(0)
    fresh, opt, _, _ = build(2)
    load_checkpoint(buf, fresh)
    for (k, v), (k2, v2) in zip(
        model.state_dict().items(), fresh.state_dict().items(), strict=True
    ):
        assert k == k2
        assert torch.equal(v, v2)
    buf.seek(0)
    with pytest.raises(ValueError, match="no `optimizer` state"):
        load_checkpoint(buf, fresh, opt)
    other = io.BytesIO()
    torch.save({"model": {}}, other)
    other.seek(0)
    with pytest.raises(ValueError, match="not a compressm checkpoint"):
        load_checkpoint(other, fresh)


@pytest.mark.parametrize("compiled", ["saved", "loaded", "submodule"])
def test_compiled_and_uncompiled_models_share_checkpoints(compiled):
    """Keys are stored without torch.compile's `_orig_mod.` segments: a checkpoint of a
    compiled model (whole or a submodule) loads into an uncompiled one and vice versa."""
    model, opt, sched, ctl = build(0)
    run(model, opt, sched, ctl, data()[:8])  # reduced
    x = torch.randn(4, 12, 2)
    model.eval()
    expected = model(x)
    source = model
    if compiled == "saved":
        source = torch.compile(model, backend="eager")
    elif compiled == "submodule":
        model.blocks[0] = torch.compile(model.blocks[0], backend="eager")
    buf = io.BytesIO()
    save_checkpoint(buf, source, opt)
    buf.seek(0)
    stored = torch.load(buf, weights_only=True)["model"]
    assert not any("_orig_mod" in key for key in stored)
    buf.seek(0)
    fresh, opt2, *_ = build(1)
    target = torch.compile(fresh, backend="eager") if compiled == "loaded" else fresh
    load_checkpoint(buf, target, opt2)
    assert state_sizes(fresh) == state_sizes(model)
    fresh.eval()
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
