"""NNX adapters and reduce_layer: systems read from layers, reductions within their bounds."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from compressm_core import (  # noqa: E402
    ConditioningError,
    DiagonalStateSpace,
    StabilityError,
    hankel_singular_values,
    select_rank,
)
from compressm_jax import (  # noqa: E402
    LRU,
    S5,
    LayerAdapter,
    find_layers,
    get_adapter,
    reduce_layer,
    register_adapter,
    state_sizes,
    to_state_space,
)
from compressm_jax._systems import lru_from_state_space  # noqa: E402
from tests.adapters_jax._util import host, simulate, trained_like, values  # noqa: E402

LAYERS = [LRU, S5]
U = np.random.default_rng(0).normal(size=(2, 30, 4))


@pytest.mark.parametrize("cls", LAYERS)
def test_to_state_space_reproduces_the_layer(cls):
    layer = trained_like(cls)
    sys_ = to_state_space(layer)
    assert isinstance(sys_, DiagonalStateSpace)
    assert sys_.poles.dtype == jnp.complex128
    assert sys_.d.dtype == jnp.float64
    assert sys_.poles.shape == (24,)
    assert sys_.b.shape == (24, 4)
    assert sys_.c.shape == (4, 24)
    assert sys_.poles.devices() == layer.D[...].devices()
    np.testing.assert_allclose(simulate(sys_, U), layer(jnp.asarray(U)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize(
    ("selection", "real_output"),
    [("largest", False), ("smallest", False), ("random", False), ("largest", True)],
)
def test_output_change_within_bound(cls, selection, real_output):
    layer = trained_like(cls)
    params = {name: getattr(layer, name) for name in values(layer)}
    d_before = np.array(layer.D[...])
    before = to_state_space(layer)
    u = np.random.default_rng(1).normal(size=(3, 200, 4))
    rank = 12 if real_output else 6
    report = reduce_layer(
        layer,
        rank,
        selection=selection,
        real_output=real_output,
        compute_error=True,
        key=jax.random.key(0),
    )
    assert report.old_rank == 24
    assert layer.d_state == report.new_rank
    assert report.new_rank == rank if not real_output else rank // 2 <= report.new_rank <= rank
    assert report.hsv.shape == (48 if real_output else 24,)
    # Param objects are kept (with new arrays of the new shape); D is untouched bit for bit.
    assert all(getattr(layer, name) is param for name, param in params.items())
    assert all(getattr(layer, name).dtype == jnp.float64 for name in params)
    np.testing.assert_array_equal(layer.D[...], d_before)
    assert "D" not in report.changed
    # a-posteriori: measured H-infinity change <= bound, and the l2 gain on random inputs.
    assert report.hinf_error <= report.error_bound * (1 + 1e-6) + 1e-9
    err = np.linalg.norm(simulate(to_state_space(layer), u) - simulate(before, u), axis=(1, 2))
    gain = err / np.linalg.norm(u, axis=(1, 2))
    assert gain.max() <= report.hinf_error * (1 + 1e-6) + 1e-9
    assert (report.indices is None) == (selection != "random")


@pytest.mark.parametrize("cls", LAYERS)
def test_full_rank_largest_is_exact(cls):
    layer = trained_like(cls)
    before = to_state_space(layer)
    report = reduce_layer(layer, 24)
    assert report.error_bound == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(simulate(to_state_space(layer), U), simulate(before, U), atol=1e-9)


def test_tau_horizon_and_the_reported_hsv():
    layer = trained_like(LRU)
    hsv = hankel_singular_values(host(to_state_space(layer)))
    report = reduce_layer(layer, tau=0.2)
    assert report.new_rank == select_rank(hsv, tau=0.2)
    assert report.error_bound == pytest.approx(2 * hsv[report.new_rank :].sum())
    assert isinstance(report.hsv, np.ndarray)
    assert report.hsv.dtype == np.float64
    np.testing.assert_allclose(report.hsv, hsv, rtol=1e-12)
    short = trained_like(LRU)
    report = reduce_layer(short, 6, horizon=5)
    expected = hankel_singular_values(host(to_state_space(trained_like(LRU))), horizon=5)
    np.testing.assert_allclose(report.hsv, expected, rtol=1e-10, atol=1e-12)
    assert not np.allclose(report.hsv, hsv)


def test_random_selection_slices_parameters():
    layer = trained_like(LRU)
    before = values(layer)
    report = reduce_layer(layer, 5, selection="random", key=jax.random.key(3))
    idx = report.indices
    assert idx.shape == (5,)
    assert np.all(idx[1:] > idx[:-1])
    np.testing.assert_array_equal(layer.nu_log[...], before["nu_log"][idx])
    np.testing.assert_array_equal(layer.C_im[...], before["C_im"][:, idx])
    assert report.slices["C_im"][0] == 1
    again = reduce_layer(trained_like(LRU), 5, selection="random", key=jax.random.key(3))
    np.testing.assert_array_equal(again.indices, idx)  # the key decides


def test_lru_write_back_of_real_positive_pole_is_finite():
    sys_ = DiagonalStateSpace(np.array([0.5 + 0j, -0.3 + 0j]), np.ones((2, 2)), np.ones((2, 2)))
    new = lru_from_state_space(sys_)
    assert all(np.all(np.isfinite(v)) for v in new.values())
    np.testing.assert_allclose(np.exp(new["theta_log"]), [2 * np.pi, np.pi])


def _assert_unchanged(layer, before):
    after = values(layer)
    assert after.keys() == before.keys()
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)


def test_refusals_leave_the_layer_unchanged():
    layer = trained_like(LRU)
    layer.nu_log[...] = layer.nu_log[...].at[0].set(-80.0)  # |lambda_0| == 1.0 in float64
    before = values(layer)
    with pytest.raises(StabilityError):
        reduce_layer(layer, 6)
    _assert_unchanged(layer, before)
    layer = trained_like(S5)
    before = values(layer)
    with pytest.raises(ConditioningError, match="max_condition"):
        reduce_layer(layer, 6, max_condition=1.0)
    _assert_unchanged(layer, before)


def test_argument_errors_name_the_argument():
    layer = trained_like(LRU)
    before = values(layer)
    with pytest.raises(TypeError, match="exactly one of `rank` and `tau`"):
        reduce_layer(layer)
    with pytest.raises(TypeError, match="exactly one of `rank` and `tau`"):
        reduce_layer(layer, 3, tau=0.1)
    with pytest.raises(ValueError, match=r"`rank` must be an int in \[1, 24\]"):
        reduce_layer(layer, 25)
    with pytest.raises(ValueError, match=r"`rank` must be an int in \[1, 48\]"):
        reduce_layer(layer, 0, real_output=True)
    with pytest.raises(ValueError, match="`tau`"):
        reduce_layer(layer, tau=1.5)
    with pytest.raises(ValueError, match="`selection`"):
        reduce_layer(layer, 3, selection="best")
    with pytest.raises(ValueError, match="random"):
        reduce_layer(layer, 3, selection="random", real_output=True, key=jax.random.key(0))
    with pytest.raises(TypeError, match="`key`"):
        reduce_layer(layer, 3, selection="random")
    with pytest.raises(ValueError, match="`method`"):
        reduce_layer(layer, 3, method="qr")
    with pytest.raises(TypeError, match="No adapter registered for `layer` of type Linear"):
        reduce_layer(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), 1)
    _assert_unchanged(layer, before)


class RealDiagonal(nnx.Module):
    """A user's own layer family: real diagonal poles tanh(a), output C x + D u."""

    def __init__(self, h, n, seed):
        rng = np.random.default_rng(seed)
        self.a = nnx.Param(jnp.asarray(np.linspace(-2.0, 2.0, n)))
        self.B = nnx.Param(jnp.asarray(rng.normal(size=(n, h))))
        self.C = nnx.Param(jnp.asarray(rng.normal(size=(h, n))))
        self.D = nnx.Param(jnp.asarray(rng.normal(size=h)))
        self.n_cached = n


def _real_to_ss(layer):
    a, b, c, d = (np.asarray(p[...]) for p in (layer.a, layer.B, layer.C, layer.D))
    return DiagonalStateSpace(np.tanh(a), b, c, np.diag(d))


def _real_from_ss(layer, sys_):
    if np.any(np.abs(sys_.poles.imag) > 1e-9):
        raise StabilityError("RealDiagonal needs real poles")
    return {"a": np.arctanh(sys_.poles.real), "B": sys_.b.real, "C": sys_.c.real}


def _sync(layer):
    layer.n_cached = layer.a.shape[0]


REAL_ADAPTER = LayerAdapter(
    to_state_space=_real_to_ss,
    from_state_space=_real_from_ss,
    state_axes={"a": 0, "B": 0, "C": 1},
    real_output=False,
    on_resize=_sync,
)


def test_registry_reduces_a_users_layer():
    register_adapter(RealDiagonal, REAL_ADAPTER)
    layer = RealDiagonal(3, 10, seed=0)
    assert get_adapter(layer) is REAL_ADAPTER
    before = to_state_space(layer)
    assert before.poles.dtype == jnp.complex128
    report = reduce_layer(layer, 4, real_output=True, compute_error=True)
    assert layer.n_cached == 4 == report.new_rank
    assert report.hinf_error <= report.error_bound * (1 + 1e-6) + 1e-9
    with pytest.raises(TypeError, match="layer_type"):
        register_adapter(int, REAL_ADAPTER)
    with pytest.raises(TypeError, match="adapter"):
        register_adapter(RealDiagonal, object())


class Block(nnx.Module):
    def __init__(self, seed):
        self.scale = nnx.Param(jnp.ones(4))
        self.ssm = trained_like(LRU, seed=seed)


class Model(nnx.Module):
    def __init__(self):
        self.blocks = nnx.List([Block(0), Block(1)])
        self.head = trained_like(S5)


def test_find_layers_and_state_sizes():
    model = Model()
    assert set(find_layers(model)) == {"blocks.0.ssm", "blocks.1.ssm", "head"}
    reduce_layer(model.blocks[1].ssm, 5)
    assert state_sizes(model) == {"blocks.0.ssm": 24, "blocks.1.ssm": 5, "head": 24}
    # the reduced model's parameters have the new shapes in its state
    state = nnx.state(model, nnx.Param)
    assert state["blocks"][1]["ssm"]["B_re"].shape == (5, 4)


def test_reduction_is_float64_without_x64():
    # A fresh process with JAX's default float32: the reduction still runs in float64.
    code = textwrap.dedent(
        """
        import warnings
        warnings.simplefilter("error")
        import numpy as np
        import jax.numpy as jnp
        from flax import nnx
        from compressm_core import DiagonalStateSpace, hankel_singular_values
        from compressm_jax import LRU, reduce_layer, to_state_space
        from compressm_jax._systems import lru_discrete
        layer = LRU(4, 24, r_min=0.2, r_max=0.95, rngs=nnx.Rngs(0))
        assert to_state_space(layer).poles.dtype == jnp.complex64
        names = ["nu_log", "theta_log", "gamma_log", "B_re", "B_im", "C_re", "C_im"]
        params = [np.asarray(getattr(layer, n)[...], dtype=np.float64) for n in names]
        hsv = hankel_singular_values(DiagonalStateSpace(*lru_discrete(*params, xp=np)))
        report = reduce_layer(layer, 6)
        assert report.hsv.dtype == np.float64
        np.testing.assert_allclose(report.hsv, hsv, rtol=1e-12)
        assert layer.nu_log.dtype == jnp.float32 and layer.d_state == 6
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("commit", [False, True])
def test_reduction_keeps_the_commitment_so_jit_compiles_once(commit):
    """Written-back values are committed exactly when the old ones were: ``jax.jit`` compiles
    again for every change of commitment among its arguments, so a committed value among
    uncommitted ones cost a second compilation at the second step after an event."""
    layer = trained_like(LRU, seed=3)
    if commit:
        nnx.update(layer, jax.device_put(nnx.state(layer), jax.devices()[0]))
    assert {leaf.committed for leaf in jax.tree_util.tree_leaves(nnx.state(layer))} == {commit}
    u = jnp.ones((2, 5, 4))

    @nnx.jit
    def energy(module, u):
        return jnp.sum(jnp.abs(module(u)) ** 2)

    energy(layer, u)
    reduce_layer(layer, 3)
    assert {leaf.committed for leaf in jax.tree_util.tree_leaves(nnx.state(layer))} == {commit}
    handler = _Messages()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            for _ in range(3):
                energy(layer, u)
    finally:
        logger.removeHandler(handler)
    compiles = [m for m in handler.messages if m.startswith("Compiling")]
    assert len(compiles) == 1, compiles  # the reduced shapes, once
