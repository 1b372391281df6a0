"""Pure functions on LRU parameter trees: Equinox-style modules and Flax linen param dicts."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np
import pytest

jax = pytest.importorskip("jax")
flax = pytest.importorskip("flax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from flax import linen  # noqa: E402

from compressm_core import StabilityError  # noqa: E402
from compressm_jax import (  # noqa: E402
    LRU,
    lru_to_state_space,
    reduce_layer,
    reduce_lru_params,
    to_state_space,
)
from tests.adapters_jax._util import simulate, trained_like, values  # noqa: E402

NAMES = ("nu_log", "theta_log", "gamma_log", "B_re", "B_im", "C_re", "C_im", "D")


def lru_dict(seed=0):
    """The weights of an NNX LRU (H=4, N=24) as a plain dict of JAX arrays."""
    return {name: jnp.asarray(v) for name, v in values(trained_like(LRU, seed=seed)).items()}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EqxStyleLRU:
    """Stands in for the official CompreSSM ``LRULayer`` (an equinox.Module: a frozen dataclass
    registered as a pytree whose children are its fields, in the same order)."""

    nu_log: Any
    theta_log: Any
    B_re: Any
    B_im: Any
    C_re: Any
    C_im: Any
    D: Any
    gamma_log: Any
    name: str = dataclasses.field(default="lru", metadata={"static": True})


class TupleLRU(NamedTuple):
    nu_log: Any
    theta_log: Any
    gamma_log: Any
    B_re: Any
    B_im: Any
    C_re: Any
    C_im: Any
    D: Any


class PlainLRU:
    """Not a pytree: an object that only has the attributes."""

    def __init__(self, params):
        for name, value in params.items():
            setattr(self, name, value)
        self.note = "kept"


def test_dict_path_equals_the_nnx_path():
    layer = trained_like(LRU)
    params = lru_dict()
    params["extra"] = jnp.ones(3)
    np.testing.assert_allclose(lru_to_state_space(params).b, to_state_space(layer).b)
    new, report = reduce_lru_params(params, 6, compute_error=True)
    expected = reduce_layer(layer, 6, compute_error=True)
    assert type(new) is dict
    assert new.keys() == params.keys()
    assert new["D"] is params["D"]
    assert new["extra"] is params["extra"]
    assert params["nu_log"].shape == (24,)  # the input is not modified
    for name in NAMES:
        np.testing.assert_allclose(new[name], getattr(layer, name)[...], rtol=1e-12, atol=1e-14)
        assert new[name].dtype == jnp.float64
    assert (report.old_rank, report.new_rank) == (24, 6)
    np.testing.assert_allclose(report.hsv, expected.hsv)
    assert report.error_bound == pytest.approx(expected.error_bound)
    assert report.hinf_error == pytest.approx(expected.hinf_error)
    assert report.hinf_error <= report.error_bound
    assert report.changed == expected.changed


@pytest.mark.parametrize("kind", [EqxStyleLRU, TupleLRU, PlainLRU])
def test_equinox_style_objects(kind):
    params = lru_dict()
    tree = kind(params) if kind is PlainLRU else kind(**params)
    new, report = reduce_lru_params(tree, 5)
    assert type(new) is kind
    assert new is not tree
    assert tree.nu_log.shape == (24,)  # the input is not modified
    assert new.B_re.shape == (5, 4)
    assert new.C_im.shape == (4, 5)
    assert new.D is tree.D
    if kind is EqxStyleLRU:
        assert new.name == "lru"
    if kind is PlainLRU:
        assert new.note == "kept"
    reference, _ = reduce_lru_params(params, 5)
    for name in NAMES:
        np.testing.assert_array_equal(getattr(new, name), reference[name])
    assert report.new_rank == 5


def test_random_selection_on_params():
    params = lru_dict()
    new, report = reduce_lru_params(params, 4, selection="random", key=jax.random.key(1))
    idx = report.indices
    np.testing.assert_array_equal(new["B_im"], params["B_im"][idx])
    np.testing.assert_array_equal(new["C_re"], params["C_re"][:, idx])
    assert report.slices["nu_log"][0] == 0


def test_params_errors():
    params = lru_dict()
    partial = {k: v for k, v in params.items() if k != "gamma_log"}
    with pytest.raises(
        TypeError, match=r"`params` must have the LRU keys .* missing \['gamma_log'\]"
    ):
        reduce_lru_params(partial, 3)
    with pytest.raises(TypeError, match="attributes"):
        lru_to_state_space(object())
    with pytest.raises(ValueError, match="`rank`"):
        reduce_lru_params(params, 30)
    with pytest.raises(TypeError, match="`key`"):
        reduce_lru_params(params, 3, selection="random")
    unstable = {**params, "nu_log": params["nu_log"].at[0].set(-80.0)}
    with pytest.raises(StabilityError):
        reduce_lru_params(unstable, 6)


class LinenLRU(linen.Module):
    """The parameters and recurrence of minimal-LRU's linen ``LRU`` (NicolasZucchet/minimal-LRU
    ``lru/model.py``, unbatched); its initialisers are not needed here."""

    d_hidden: int
    d_model: int

    @linen.compact
    def __call__(self, inputs):
        n, h = self.d_hidden, self.d_model
        shapes = {"nu_log": (n,), "theta_log": (n,), "gamma_log": (n,), "B_re": (n, h)}
        shapes |= {"B_im": (n, h), "C_re": (h, n), "C_im": (h, n), "D": (h,)}
        p = {
            name: self.param(name, linen.initializers.zeros, shape)
            for name, shape in shapes.items()
        }
        diag_lambda = jnp.exp(-jnp.exp(p["nu_log"]) + 1j * jnp.exp(p["theta_log"]))
        b_norm = (p["B_re"] + 1j * p["B_im"]) * jnp.expand_dims(jnp.exp(p["gamma_log"]), axis=-1)
        c = p["C_re"] + 1j * p["C_im"]
        lambdas = jnp.repeat(diag_lambda[None, ...], inputs.shape[0], axis=0)
        bu = jax.vmap(lambda u: b_norm @ u)(inputs)

        def step(q_i, q_j):
            return q_j[0] * q_i[0], q_j[0] * q_i[1] + q_j[1]

        _, hidden = jax.lax.associative_scan(step, (lambdas, bu))
        return jax.vmap(lambda x, u: (c @ x).real + p["D"] * u)(hidden, inputs)


def test_linen_params_reduce_and_rebuild():
    params = flax.core.freeze(lru_dict())  # a linen ``params`` sub-dict of one LRU
    u = np.random.default_rng(0).normal(size=(200, 4))
    new, report = reduce_lru_params(params, 8, compute_error=True)
    assert isinstance(new, flax.core.FrozenDict)
    # linen checks shapes: apply the reduced params with a module rebuilt with d_hidden = rank
    module = LinenLRU(d_hidden=report.new_rank, d_model=4)
    y_new = jax.jit(module.apply)({"params": new}, jnp.asarray(u))
    np.testing.assert_allclose(y_new, simulate(lru_to_state_space(new), u[None])[0], atol=1e-10)
    y = simulate(lru_to_state_space(params), u[None])[0]
    gain = np.linalg.norm(y_new - y) / np.linalg.norm(u)
    assert gain <= report.hinf_error * (1 + 1e-6) + 1e-12
    assert report.hinf_error <= report.error_bound * (1 + 1e-6)
