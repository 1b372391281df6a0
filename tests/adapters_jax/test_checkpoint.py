"""Orbax checkpoints of reduced NNX models (``compressm_jax.checkpoint``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
nnx = pytest.importorskip("flax.nnx")
pytest.importorskip("orbax.checkpoint")

jax.config.update("jax_enable_x64", True)

from compressm_core.errors import CheckpointError  # noqa: E402
from compressm_jax import LRU, CompreSSM, state_sizes  # noqa: E402
from compressm_jax.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402


class Net(nnx.Module):
    def __init__(self, seed=0):
        rngs = nnx.Rngs(seed)
        self.enc = nnx.Linear(2, 8, rngs=rngs)
        self.ssm = LRU(8, 16, r_min=0.3, r_max=0.95, rngs=rngs)
        self.dec = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        return self.dec(jax.nn.gelu(self.ssm(self.enc(x)))).mean(axis=1)


def build(seed=0):
    model = Net(seed)
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    ctl = CompreSSM(model, opt, total_steps=20, mode="fixed", fraction=0.5, reduction_steps=[2])
    return model, opt, ctl


def train(model, opt, ctl, steps, seed=0):
    losses = []
    for i in range(steps):
        x = jax.random.normal(jax.random.PRNGKey(seed + i), (4, 12, 2))
        y = x.sum((1, 2))[:, None]

        def loss_fn(m, x=x, y=y):
            return ((m(x) - y) ** 2).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        ctl.step()
        losses.append(float(loss))
    return losses


def leaves(tree):
    return {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_round_trip_into_a_full_size_model_resumes_exactly(tmp_path):
    model, opt, ctl = build()
    train(model, opt, ctl, 4)
    assert state_sizes(model) == {"ssm": 8}
    save_checkpoint(tmp_path / "ckpt", model, opt, controller=ctl)
    expected = train(model, opt, ctl, 3, seed=100)

    fresh, fresh_opt, fresh_ctl = build(seed=1)  # other weights, full size
    sizes = load_checkpoint(tmp_path / "ckpt", fresh, fresh_opt, controller=fresh_ctl)
    assert sizes == {"ssm": 8}
    assert state_sizes(fresh) == {"ssm": 8}
    assert fresh_ctl.num_steps == 4
    assert [e.new_rank for e in fresh_ctl.history] == [8]
    assert train(fresh, fresh_opt, fresh_ctl, 3, seed=100) == expected
    a, b = leaves(nnx.state(model)), leaves(nnx.state(fresh))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_failures_leave_the_model_as_it_was(tmp_path):
    model, opt, ctl = build()
    train(model, opt, ctl, 4)
    save_checkpoint(tmp_path / "ckpt", model, opt, controller=ctl)
    with pytest.raises(FileExistsError, match="`directory`"):
        save_checkpoint(tmp_path / "ckpt", model)
    fresh, fresh_opt, _ = build(seed=1)
    before = leaves(nnx.state(fresh))

    meta = tmp_path / "ckpt" / "compressm.json"
    good = meta.read_text()
    meta.write_text(json.dumps({"state_sizes": {"ssm": 4}, "controller": None, "optimizer": True}))
    with pytest.raises(CheckpointError, match="does not fit `model` at the recorded state sizes"):
        load_checkpoint(tmp_path / "ckpt", fresh, fresh_opt)
    meta.write_text(json.dumps({"state_sizes": {"other": 4}, "controller": None}))
    with pytest.raises(CheckpointError, match=r"layers that `model` does not have: \['other'\]"):
        load_checkpoint(tmp_path / "ckpt", fresh)
    meta.write_text(good)
    with pytest.raises(CheckpointError, match="no compressm.json"):
        load_checkpoint(tmp_path, fresh)
    after = leaves(nnx.state(fresh))
    assert after.keys() == before.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])
    assert state_sizes(fresh) == {"ssm": 16}
    save_checkpoint(tmp_path / "ckpt", fresh, overwrite=True)  # replaces the folder whole
    assert load_checkpoint(tmp_path / "ckpt", model) == {"ssm": 16}
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
