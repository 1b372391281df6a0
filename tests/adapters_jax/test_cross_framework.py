"""Same weights in compressm_torch and compressm_jax: same outputs, gradients and reductions."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
pytest.importorskip("flax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import compressm_jax as cj  # noqa: E402
import compressm_torch as ct  # noqa: E402
from compressm_core import DiagonalStateSpace, h_infinity_norm  # noqa: E402
from tests.adapters_jax._util import trained_like  # noqa: E402

DTYPES = {"float64": (torch.float64, jnp.float64), "float32": (torch.float32, jnp.float32)}
U = np.random.default_rng(0).normal(size=(2, 30, 4))


def pair(name, dtype="float64", seed=0):
    """A torch layer and an NNX layer of the same class holding the same weights."""
    torch_dtype, jax_dtype = DTYPES[dtype]
    torch.manual_seed(seed)
    kw = {"r_min": 0.2, "r_max": 0.95} if name == "LRU" else {}
    t_layer = getattr(ct, name)(4, 24, dtype=torch_dtype, **kw)
    j_layer = trained_like(getattr(cj, name), dtype=jax_dtype)
    for pname, p in t_layer.named_parameters():
        old = getattr(j_layer, pname)
        assert old.shape == p.shape, pname
        old.set_value(jnp.asarray(p.detach().numpy()))
    return t_layer, j_layer


def as_np(sys_):
    return DiagonalStateSpace(
        *(None if x is None else np.asarray(x.detach() if torch.is_tensor(x) else x) for x in sys_)
    )


def assert_same_system(a, b, rtol):
    """Same transfer function of the real-output layers: ||G_a - G_b||_inf <= rtol ||G_a||."""
    a, b = as_np(a), as_np(b)
    assert a.poles.shape == b.poles.shape
    diff = float(h_infinity_norm(a, b, real_output=True))
    assert diff <= rtol * float(h_infinity_norm(a, real_output=True))


@pytest.mark.parametrize("name", ["LRU", "S5"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_same_weights_same_outputs(name, dtype):
    t_layer, j_layer = pair(name, dtype)
    assert {n for n, _ in t_layer.named_parameters()} == set(nnx.state(j_layer, nnx.Param))
    y_t = t_layer(torch.from_numpy(U).to(DTYPES[dtype][0])).detach().numpy()
    y_j = np.asarray(j_layer(jnp.asarray(U, DTYPES[dtype][1])))
    assert y_j.dtype == y_t.dtype
    tol = 1e-12 if dtype == "float64" else 2e-5
    np.testing.assert_allclose(y_j, y_t, rtol=0, atol=tol * np.abs(y_t).max())
    for a, b in zip(t_layer.discrete_system(), j_layer.discrete_system(), strict=True):
        assert np.asarray(b).dtype == a.detach().numpy().dtype
        np.testing.assert_allclose(np.asarray(b), a.detach().numpy(), rtol=10 * tol, atol=tol)


@pytest.mark.parametrize("name", ["LRU", "S5"])
def test_same_weights_same_gradients(name):
    t_layer, j_layer = pair(name)
    u = U[:, :17]
    t_layer(torch.from_numpy(u)).pow(2).sum().backward()
    grads = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x) ** 2)))(j_layer, jnp.asarray(u))
    for pname, p in t_layer.named_parameters():
        expected = p.grad.numpy()
        np.testing.assert_allclose(
            grads[pname][...], expected, rtol=1e-9, atol=1e-11 * np.abs(expected).max()
        )


@pytest.mark.parametrize("name", ["LRU", "S5"])
@pytest.mark.parametrize(
    ("selection", "real_output", "method"),
    [
        ("largest", False, "sqrt"),
        ("smallest", False, "sqrt"),
        ("largest", True, "sqrt"),
        ("largest", False, "bfsr"),
    ],
)
def test_reduction_matches_torch(name, selection, real_output, method):
    t_layer, j_layer = pair(name)
    kw = {"selection": selection, "real_output": real_output, "method": method}
    rank = 13 if real_output else 6
    r_t = ct.reduce_layer(t_layer, rank, compute_error=True, **kw)
    r_j = cj.reduce_layer(j_layer, rank, compute_error=True, **kw)
    assert (r_j.old_rank, r_j.new_rank) == (r_t.old_rank, r_t.new_rank)
    assert j_layer.d_state == t_layer.d_state == r_t.new_rank
    np.testing.assert_allclose(r_j.hsv, r_t.hsv.numpy(), rtol=1e-10, atol=1e-13)
    assert r_j.error_bound == pytest.approx(r_t.error_bound, rel=1e-10, abs=1e-13)
    assert r_j.hinf_error == pytest.approx(r_t.hinf_error, rel=1e-6, abs=1e-12)
    assert r_j.changed == r_t.changed
    assert_same_system(ct.to_state_space(t_layer), cj.to_state_space(j_layer), rtol=1e-9)
    if (selection, real_output, method) == ("largest", False, "sqrt"):
        # the reduced layers themselves agree, step by step
        y_t = t_layer(torch.from_numpy(U)).detach().numpy()
        np.testing.assert_allclose(j_layer(jnp.asarray(U)), y_t, atol=1e-9 * np.abs(y_t).max())


def test_tau_and_horizon_match_torch():
    t_layer, j_layer = pair("LRU", seed=1)
    r_t = ct.reduce_layer(t_layer, tau=0.1, horizon=30)
    r_j = cj.reduce_layer(j_layer, tau=0.1, horizon=30)
    assert r_j.new_rank == r_t.new_rank
    np.testing.assert_allclose(r_j.hsv, r_t.hsv.numpy(), rtol=1e-10, atol=1e-13)
    assert_same_system(ct.to_state_space(t_layer), cj.to_state_space(j_layer), rtol=1e-8)


@pytest.mark.parametrize("name", ["LRU", "S5"])
def test_float32_layers_reduce_like_torch(name):
    # Both read float32 weights into float64 systems: the reductions agree to float64 rounding,
    # and the written float32 values to float32 rounding.
    t_layer, j_layer = pair(name, "float32")
    r_t = ct.reduce_layer(t_layer, 6)
    r_j = cj.reduce_layer(j_layer, 6)
    np.testing.assert_allclose(r_j.hsv, r_t.hsv.numpy(), rtol=1e-10, atol=1e-13)
    assert_same_system(ct.to_state_space(t_layer), cj.to_state_space(j_layer), rtol=1e-5)
    for pname, _ in t_layer.named_parameters():
        assert getattr(j_layer, pname).dtype == jnp.float32


def test_lru_params_path_matches_torch():
    t_layer, _ = pair("LRU", seed=2)
    params = {n: jnp.asarray(p.detach().numpy()) for n, p in t_layer.named_parameters()}
    new, r_j = cj.reduce_lru_params(params, 7, compute_error=True)
    r_t = ct.reduce_layer(t_layer, 7, compute_error=True)
    np.testing.assert_allclose(r_j.hsv, r_t.hsv.numpy(), rtol=1e-10, atol=1e-13)
    assert r_j.hinf_error == pytest.approx(r_t.hinf_error, rel=1e-6)
    assert_same_system(ct.to_state_space(t_layer), cj.lru_to_state_space(new), rtol=1e-9)
    for pname, p in t_layer.named_parameters():
        np.testing.assert_allclose(new[pname], p.detach().numpy(), rtol=1e-8, atol=1e-10)
