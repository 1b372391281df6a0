"""The Flax NNX training controller: schedule, optax surgery, rollback, re-jit, checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
nnx = pytest.importorskip("flax.nnx")
torch = pytest.importorskip("torch")
jax.config.update("jax_enable_x64", True)
jnp = jax.numpy

import compressm_torch  # noqa: E402
from compressm_jax import LRU  # noqa: E402
from compressm_jax.controller import CompreSSM, ReductionWarning, resize_layers  # noqa: E402


class Net(nnx.Module):
    def __init__(self, d_state=32, seed=0):
        rngs = nnx.Rngs(seed)
        self.enc = nnx.Linear(2, 8, rngs=rngs)
        self.ssm = LRU(8, d_state, r_min=0.3, r_max=0.95, rngs=rngs)
        self.dec = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        return self.dec(jax.nn.gelu(self.ssm(self.enc(x)))).mean(axis=1)


TRACES = []


@nnx.jit
def train_step(model, opt, x, y):
    TRACES.append(1)  # runs once per trace (compilation), not per call

    def loss_fn(model):
        return ((model(x) - y) ** 2).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss


def batch(i):
    x = jax.random.normal(jax.random.PRNGKey(i), (4, 16, 2))
    return x, x.sum((1, 2))[:, None]


def leaves(tree):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_training_with_reductions_resizes_only_the_ssm_moments_and_retraces_once_per_event():
    model = Net()
    opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
    ctl = CompreSSM(model, opt, total_steps=40, tau=0.2, reduction_steps=[4, 8])
    TRACES.clear()
    for i in range(3):
        train_step(model, opt, *batch(i))
    assert len(TRACES) == 1
    train_step(model, opt, *batch(3))
    before = leaves(nnx.state(opt, nnx.OptState))
    (event,) = ctl.step() + ctl.step() + ctl.step() + ctl.step()
    assert event.status == "reduced"
    assert event.new_rank < event.old_rank == 32
    assert event.error_bound == pytest.approx(2 * sum(sorted(event.hsv)[: 32 - event.new_rank]))
    after = leaves(nnx.state(opt, nnx.OptState))
    assert set(after) == set(before)
    for path, old in before.items():
        new = after[path]
        if "['ssm']" in path and "['D']" not in path:
            assert new.shape[-1 if "['C_" in path else 0] == event.new_rank
            assert not np.any(np.asarray(new))  # reset after the change of basis
        else:  # encoder, decoder, counts, the optimizer's step: untouched
            assert new is old
    for i in range(4, 12):
        train_step(model, opt, *batch(i))
        ctl.step()
    assert len(TRACES) == 3  # one retrace per reduction event
    assert [e.status for e in ctl.history] == ["reduced", "reduced"]
    params = leaves(nnx.state(model, nnx.Param))
    moments = leaves(nnx.state(opt, nnx.OptState))
    for path, p in params.items():
        matching = [m for k, m in moments.items() if k.endswith(path)]
        assert matching
        assert all(m.shape == p.shape for m in matching)


def test_same_decisions_as_the_torch_controller_on_the_same_weights():
    model = Net(d_state=24, seed=3)
    layer = compressm_torch.LRU(8, 24)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            param.copy_(torch.from_numpy(np.array(getattr(model.ssm, name)[...])))
    ours = CompreSSM(model, None, total_steps=10, tau=0.15, reduction_steps=[1])
    theirs = compressm_torch.CompreSSM(
        torch.nn.Sequential(layer), None, total_steps=10, tau=0.15, reduction_steps=[1]
    )
    (a,), (b,) = ours.step(), theirs.step()
    assert (a.status, a.old_rank, a.new_rank) == (b.status, b.old_rank, b.new_rank)
    np.testing.assert_allclose(a.hsv, b.hsv, rtol=1e-9)
    assert a.error_bound == pytest.approx(b.error_bound, rel=1e-9)


def test_pragmatic_rollback_restores_model_and_optimizer():
    model = Net()
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    ctl = CompreSSM(
        model, opt, total_steps=20, mode="pragmatic", fraction=0.5, reduction_steps=[2]
    )
    train_step(model, opt, *batch(0))
    ctl.step(val_metric=0.9)
    train_step(model, opt, *batch(1))
    params = leaves(nnx.state(model))
    moments = leaves(nnx.state(opt))
    ctl.step()
    assert ctl.state_sizes == {"ssm": 16}
    (event,) = ctl.step(val_metric=0.5)
    assert event.status == "rolled_back"
    assert ctl.stopped
    assert ctl.state_sizes == {"ssm": 32}
    for path, value in leaves(nnx.state(model)).items():
        np.testing.assert_array_equal(value, params[path])
    for path, value in leaves(nnx.state(opt)).items():
        np.testing.assert_array_equal(value, moments[path])
    train_step(model, opt, *batch(2))


def test_refused_reduction_leaves_the_layer_unchanged():
    model = Net()
    model.ssm.nu_log.set_value(jnp.full_like(model.ssm.nu_log[...], 5.0))  # |lambda| ~ 0
    ctl = CompreSSM(model, None, total_steps=10, mode="fixed", fraction=0.5, reduction_steps=[1])
    before = leaves(nnx.state(model))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (event,) = ctl.step()
    if event.status == "refused":
        assert any(issubclass(w.category, ReductionWarning) for w in caught)
        for path, value in leaves(nnx.state(model)).items():
            np.testing.assert_array_equal(value, before[path])
    else:  # the reduction was representable: it must then be a valid, smaller layer
        assert event.status == "reduced"
        assert np.all(np.isfinite(np.asarray(model.ssm.nu_log[...])))


def test_options_are_checked_and_name_the_argument():
    model = Net()
    for kwargs, name in [
        ({"tau": 1.5}, "`tau`"),
        ({"mode": "greedy"}, "`mode`"),
        ({"horizon": 0}, "`horizon`"),
        ({"layers": ["nope"]}, "`layers`"),
    ]:
        with pytest.raises((ValueError, KeyError), match=name):
            CompreSSM(model, None, total_steps=10, **kwargs)
    with pytest.raises(TypeError, match="`optimizer`"):
        CompreSSM(model, optax.adam(1e-3), total_steps=10)


def test_checkpoint_of_a_reduced_model_restores_into_a_fresh_one(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    model = Net()
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    ctl = CompreSSM(model, opt, total_steps=20, mode="fixed", fraction=0.5, reduction_steps=[1])
    train_step(model, opt, *batch(0))
    ctl.step()
    train_step(model, opt, *batch(1))
    ctl.step()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "model", nnx.state(model))
    checkpointer.save(tmp_path / "opt", nnx.state(opt))
    checkpointer.wait_until_finished()
    (tmp_path / "controller.json").write_text(json.dumps(ctl.state_dict()))
    # a fresh full-size model: resize to the recorded sizes, then restore into it
    fresh = Net(seed=9)
    meta = json.loads((tmp_path / "controller.json").read_text())
    resize_layers(fresh, meta["state_sizes"])
    fresh_opt = nnx.Optimizer(fresh, optax.adam(1e-2), wrt=nnx.Param)
    nnx.update(fresh, checkpointer.restore(tmp_path / "model", nnx.state(fresh)))
    nnx.update(fresh_opt, checkpointer.restore(tmp_path / "opt", nnx.state(fresh_opt)))
    again = CompreSSM(fresh, fresh_opt, total_steps=20, mode="fixed", fraction=0.5)
    again.load_state_dict(meta)
    assert again.state_sizes == ctl.state_sizes == {"ssm": 16}
    x, y = batch(2)
    np.testing.assert_array_equal(fresh(x), model(x))
    np.testing.assert_array_equal(train_step(fresh, fresh_opt, x, y), train_step(model, opt, x, y))
    with pytest.raises(KeyError, match="`sizes`"):
        resize_layers(fresh, {"nope": 3})


SHARDED = """
import jax, jax.numpy as jnp, optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from compressm_jax import LRU
from compressm_jax.controller import CompreSSM
mesh = Mesh(jax.devices(), ("d",))
layer = LRU(8, 32, rngs=nnx.Rngs(0))
specs = {"B_re": P(None, "d"), "C_re": P(None, "d"), "B_im": P("d", None)}  # 32 -> 16 states
wanted = {}
for path, var in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
    sharding = NamedSharding(mesh, specs.get(path[-1], P()))
    var.set_value(jax.device_put(var[...], sharding))
    wanted[path] = sharding
opt = nnx.Optimizer(layer, optax.adam(1e-3), wrt=nnx.Param)
ctl = CompreSSM(layer, opt, total_steps=10, mode="fixed", fraction=0.5, reduction_steps=[1])
ctl.step()
for path, var in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
    assert var[...].sharding.is_equivalent_to(wanted[path], var[...].ndim), path
print(len(jax.devices()), layer.d_state)
"""


def test_reduced_parameters_keep_their_sharding_on_several_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    out = subprocess.run(
        [sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["4", "16"]


def test_certified_schedule_matches_the_torch_flow():
    """Same checks, triggers and cut steps as the torch controller (static parameters: the
    Weyl bound between checks is 0, so each cut is certified after `certify_window` checks)."""
    net = Net(d_state=32)
    opts = {
        "total_steps": 400,
        "schedule": "certified",
        "mode": "fixed",
        "fraction": 0.5,
        "check_every": 10,
        "certify_window": 2,
        "num_reductions": 2,
        "warmup_fraction": 0.5,
    }
    ctl = CompreSSM(net, None, **opts)
    cuts = []
    for loss in [2.3] * 30 + [1.0] * 100:
        cuts += [e for e in ctl.step(loss=jnp.asarray(loss)) if e.status == "reduced"]
    assert [(e.step, e.old_rank, e.new_rank, e.trigger) for e in cuts] == [
        (60, 32, 16, "certified"),
        (90, 16, 8, "certified"),
    ]
    assert all(e.loss == pytest.approx(1.0) for e in cuts)
    late = CompreSSM(Net(d_state=32), None, **opts)
    for _ in range(199):
        late.step(loss=2.3)
    with pytest.warns(ReductionWarning, match="has not fallen"):
        late.step(loss=2.3)  # the deadline
    assert [e.trigger for e in late.history if e.status == "reduced"] == ["deadline"] * 2
    assert late.lr_factor == 1.0  # no re-warm-up asked for


def test_summary_and_repr_count_the_nnx_parameters():
    model = Net(d_state=16)
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    def count():
        return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

    start = count()
    ctl = CompreSSM(model, opt, total_steps=10, mode="fixed", fraction=0.5, reduction_steps=[1])
    ctl.step()
    (event,) = ctl.history
    head, _, _, _, row = ctl.summary().splitlines()
    share = 100 * count() / start
    assert head == (
        f"CompreSSM at step 1 of 10: 1 cut(s); states 16 -> 8; parameters {start:,} -> "
        f"{count():,} ({share:.1f} %)"
    )
    assert row == f"| ssm | 16 -> 8 | 1: 16 -> 8 ({event.error_bound / event.hsv[0]:.2g}) |"
    assert repr(ctl).startswith("CompreSSM(layers=1, state_sizes={'ssm': 8}, step=1/10, cuts=1")


def test_a_pre_reduction_state_pushed_back_with_nnx_update_is_refused():
    model = Net(d_state=16)
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    old = jax.tree.map(lambda x: x, nnx.state(model))
    ctl = CompreSSM(model, opt, total_steps=10, mode="fixed", fraction=0.5, reduction_steps=[1])
    ctl.step()
    assert ctl.state_sizes == {"ssm": 8}
    nnx.update(model, old)  # the split/jit pattern writing back a state from before the cut
    assert model.ssm.B_re.shape[0] == 16
    with pytest.raises(ValueError, match=r"'ssm' has 16 states \(left at 8\)"):
        ctl.step()
    assert ctl.num_steps == 1
    resize_layers(model, {"ssm": 8})  # back to the size the controller left: it goes on
    ctl.step()
    assert ctl.num_steps == 2
