"""Shadow copies (an EMA module) kept in step with the JAX controller's reductions."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
nnx = pytest.importorskip("flax.nnx")

jax.config.update("jax_enable_x64", True)
jnp = jax.numpy

from compressm_jax import LRU, CompreSSM, get_adapter, state_sizes  # noqa: E402

STATE = ("nu_log", "theta_log", "gamma_log", "B_re", "B_im", "C_re", "C_im")


class Net(nnx.Module):
    def __init__(self, d_state=16, seed=0):
        rngs = nnx.Rngs(seed)
        self.enc = nnx.Linear(2, 8, rngs=rngs)
        self.ssm = LRU(8, d_state, r_min=0.3, r_max=0.95, rngs=rngs)
        self.dec = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        return self.dec(jax.nn.gelu(self.ssm(self.enc(x)))).mean(axis=1)


def make():
    model = Net()
    ema = nnx.clone(model)
    nnx.update(ema, jax.tree.map(lambda x: x * 0.9, nnx.state(ema)))  # its own values
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    return model, ema, opt


def values(module):
    return {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(module))
    }


def test_change_of_basis_gives_the_shadow_the_new_state_parameters():
    model, ema, opt = make()
    own = values(ema)
    ctl = CompreSSM(
        model, opt, total_steps=10, mode="fixed", fraction=0.5, reduction_steps=[1],
        extra_models=[ema],
    )  # fmt: skip
    ctl.step()
    assert state_sizes(ema) == {"ssm": 8}
    for name in STATE:
        np.testing.assert_array_equal(getattr(ema.ssm, name)[...], getattr(model.ssm, name)[...])
    np.testing.assert_array_equal(ema.enc.kernel[...], own["['enc']['kernel'].value"])
    np.testing.assert_array_equal(ema.ssm.D[...], own["['ssm']['D'].value"])
    assert ema(jnp.ones((2, 5, 2))).shape == (2, 1)


def test_index_selection_slices_the_shadow_own_values():
    model, ema, opt = make()
    live_nu = np.asarray(model.ssm.nu_log[...])
    own = {name: np.asarray(getattr(ema.ssm, name)[...]) for name in STATE}
    ctl = CompreSSM(
        model, opt, total_steps=10, mode="fixed", fraction=0.5, reduction_steps=[1],
        selection="random", extra_models=[ema],
    )  # fmt: skip
    ctl.step()
    kept = [int(np.flatnonzero(live_nu == v)[0]) for v in np.asarray(model.ssm.nu_log[...])]
    axes = get_adapter(model.ssm).state_axes
    for name in STATE:
        expected = np.take(own[name], kept, axis=axes[name])
        np.testing.assert_array_equal(getattr(ema.ssm, name)[...], expected)


def test_a_failed_event_leaves_the_shadow_as_it_was(monkeypatch):
    model, ema, opt = make()
    before = values(ema)
    ctl = CompreSSM(
        model, opt, total_steps=10, mode="fixed", fraction=0.5, reduction_steps=[1],
        extra_models=[ema],
    )  # fmt: skip

    def fail(*_):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(CompreSSM, "_end_event", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        ctl.step()
    assert state_sizes(ema) == {"ssm": 16}
    after = values(ema)
    assert after.keys() == before.keys()
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value)


def test_a_shadow_without_a_counterpart_is_refused():
    model, _, opt = make()
    with pytest.raises(ValueError, match="with 16 states, like the model's"):
        CompreSSM(model, opt, total_steps=10, extra_models=[Net(d_state=12)])
    with pytest.raises(TypeError, match=r"`extra_models\[0\]` must be a flax.nnx.Module"):
        CompreSSM(model, opt, total_steps=10, extra_models=[{"ssm": 1}])
