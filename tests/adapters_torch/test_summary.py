"""``summary()`` and ``repr`` of the torch controller (the JAX one: tests/adapters_jax)."""

from __future__ import annotations

import re

import pytest

torch = pytest.importorskip("torch")

from compressm_torch import CompreSSM, SequenceModel  # noqa: E402

LAYERS = ["blocks.0.ssm", "blocks.1.ssm"]


def make():
    torch.manual_seed(0)
    model = SequenceModel(2, 3, d_model=8, d_state=16, n_layers=2)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_summary_gives_sizes_parameters_and_each_cut_relative_bound():
    model, opt = make()
    start = count(model)
    ctl = CompreSSM(model, opt, total_steps=10, mode="fixed", fraction=0.5, reduction_steps=[2, 4])
    for _ in range(5):
        ctl.step()
    text = ctl.summary()
    head, _, *rows = text.splitlines()
    assert head.startswith("CompreSSM at step 5 of 10: 4 cut(s); states 32 -> 8")
    assert head.endswith(
        f"parameters {start:,} -> {count(model):,} ({100 * count(model) / start:.1f} %)"
    )
    assert count(model) < start
    cuts = {e.layer: [] for e in ctl.history}
    for e in ctl.history:
        cuts[e.layer].append(
            f"{e.step}: {e.old_rank} -> {e.new_rank} ({e.error_bound / e.hsv[0]:.2g})"
        )
    body = rows[2:]
    assert body == [f"| {n} | 16 -> 4 | {', '.join(cuts[n])} |" for n in LAYERS]
    bounds = [float(b) for b in re.findall(r"\(([0-9.e+-]+)\)", "".join(body))]
    assert len(bounds) == 4
    assert all(0 < b < 2 * 16 for b in bounds)


def test_summary_before_any_cut_and_after_a_checkpoint_round_trip():
    model, opt = make()
    ctl = CompreSSM(model, opt, total_steps=10, reduction_steps=[3])
    assert ctl.summary().splitlines()[-1] == f"| {LAYERS[1]} | 16 -> 16 | none |"
    start = count(model)
    ctl.reduce()
    state = ctl.state_dict()
    fresh, fresh_opt = make()
    from compressm_torch import resize_layers

    resize_layers(fresh, ctl.state_sizes)
    other = CompreSSM(fresh, fresh_opt, total_steps=10, reduction_steps=[3])
    other.load_state_dict(state)
    assert other.summary() == ctl.summary()
    assert f"parameters {start:,} -> " in other.summary()


def test_repr_is_one_line_with_the_state():
    model, opt = make()
    ctl = CompreSSM(model, opt, total_steps=10, mode="fixed", fraction=0.5, reduction_steps=[1])
    ctl.step()
    assert repr(ctl) == (
        "CompreSSM(layers=2, state_sizes={'blocks.0.ssm': 8, 'blocks.1.ssm': 8}, step=1/10, "
        "cuts=2, schedule='steps', mode='fixed', tau=0.1)"
    )
