"""NNX LRU and S5 layers: recurrences against a step-by-step reference, initialisation, dtypes."""

from __future__ import annotations

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from compressm_jax import LRU, S5, hippo_n_eigenpairs  # noqa: E402
from compressm_jax._scan import diagonal_scan  # noqa: E402
from tests.adapters_jax._util import loop_scan, trained_like  # noqa: E402


@pytest.mark.parametrize(("length", "varying"), [(1, False), (7, True), (100, False)])
def test_diagonal_scan_matches_loop(length, varying):
    rng = np.random.default_rng(length)
    shape = (3, length, 5)
    poles = (0.5 + 0.5 * rng.random(5)) * np.exp(6j * rng.random(5))
    if varying:
        poles = poles * rng.random(shape)
    v = rng.normal(size=shape) + 1j * rng.normal(size=shape)
    h0 = rng.normal(size=(3, 5)) + 1j * rng.normal(size=(3, 5))
    scan = jax.jit(diagonal_scan)
    if varying:
        out = scan(jnp.asarray(poles), jnp.asarray(v), initial_state=jnp.asarray(h0))
        np.testing.assert_allclose(out, loop_scan(poles, v, h0))
    else:
        np.testing.assert_allclose(scan(jnp.asarray(poles), jnp.asarray(v)), loop_scan(poles, v))


def reference_output(layer, u):
    """y_k = Re(C x_k) + D u_k with x_k = lambda x_{k-1} + B u_k, one step at a time."""
    poles, b, c = (np.asarray(x) for x in layer.discrete_system(jnp.float64))
    x = loop_scan(poles, u.astype(np.complex128) @ b.T)
    return (x @ c.T).real + np.asarray(layer.D[...]) * u


@pytest.mark.parametrize("cls", [LRU, S5])
def test_forward_matches_recurrence(cls):
    layer = trained_like(cls)
    u = np.random.default_rng(0).normal(size=(2, 30, 4))
    y = layer(jnp.asarray(u))
    assert y.dtype == jnp.float64
    np.testing.assert_allclose(y, reference_output(layer, u), rtol=1e-10, atol=1e-12)
    if cls is LRU:  # extra leading dimensions, under nnx.jit
        u3 = jnp.asarray(u.reshape(1, 2, 30, 4))
        np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(layer, u3)[0], y)


def test_lru_initialisation_follows_the_paper():
    layer = LRU(64, 4096, r_min=0.4, r_max=0.9, max_phase=math.pi, rngs=nnx.Rngs(0))
    assert layer.nu_log.dtype == jnp.float32
    poles = np.asarray(layer.discrete_system(jnp.float64)[0])
    radius = np.abs(poles)
    assert radius.min() >= 0.4 - 1e-6
    assert radius.max() <= 0.9 + 1e-6
    # |lambda|^2 uniform on [r_min^2, r_max^2]
    assert abs((radius**2).mean() - (0.4**2 + 0.9**2) / 2) < 0.01
    assert np.angle(poles).min() >= 0
    assert np.angle(poles).max() <= math.pi + 1e-6
    gamma = np.exp(np.asarray(layer.gamma_log[...], dtype=np.float64))
    np.testing.assert_allclose(gamma, np.sqrt(1 - radius**2), rtol=1e-5, atol=1e-6)
    assert abs(float(jnp.std(layer.B_re[...])) - 1 / math.sqrt(128)) < 0.005
    assert abs(float(jnp.std(layer.C_re[...])) - 1 / math.sqrt(4096)) < 0.001
    assert layer.D.shape == (64,)
    # the same seed gives the same layer
    again = LRU(64, 4096, r_min=0.4, r_max=0.9, max_phase=math.pi, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(again.C_im[...], layer.C_im[...])


def test_hippo_n_eigenpairs_and_s5_initialisation():
    lam, v = hippo_n_eigenpairs(16)
    q = np.sqrt(1 + 2 * np.arange(16))
    hippo = -(np.tril(q[:, None] * q[None, :]) - np.diag(np.arange(16.0)))
    p = np.sqrt(np.arange(16) + 0.5)
    np.testing.assert_allclose(v @ np.diag(lam) @ v.conj().T, hippo + np.outer(p, p), atol=1e-10)
    np.testing.assert_allclose(lam.real, -0.5, atol=1e-12)
    layer = S5(4, 8, blocks=2, dt_min=0.01, dt_max=0.1, rngs=nnx.Rngs(0))
    shapes = {n: getattr(layer, n).shape for n in ("Lambda_re", "B", "C", "D", "log_step")}
    assert shapes == {
        "Lambda_re": (8,),
        "B": (8, 4, 2),
        "C": (4, 8, 2),
        "D": (4,),
        "log_step": (8,),
    }
    np.testing.assert_allclose(layer.Lambda_re[...], -0.5, atol=1e-6)
    np.testing.assert_allclose(layer.Lambda_im[...][:4], layer.Lambda_im[...][4:])
    step = np.exp(np.asarray(layer.log_step[...]))
    assert step.min() >= 0.01 - 1e-7
    assert step.max() <= 0.1 + 1e-7


def test_s5_conj_sym_output_is_twice_the_real_part():
    a = trained_like(S5)
    b = trained_like(S5)
    b.conj_sym = False
    u = jnp.asarray(np.random.default_rng(0).normal(size=(2, 30, 4)))
    d = a.D[...] * u
    np.testing.assert_allclose(a(u) - d, 2 * (b(u) - d), rtol=1e-12, atol=1e-12)
    assert float(jnp.max(jnp.abs(a.discrete_system()[0]))) < 1


@pytest.mark.parametrize("cls", [LRU, S5])
def test_sizes_and_errors(cls):
    small = trained_like(cls)
    assert small.d_state == 24
    with pytest.raises(ValueError, match="d_state"):
        cls(4, 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="d_model"):
        cls(True, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`u` must have shape"):
        small(jnp.ones((2, 3, 5)))
    with pytest.raises(ValueError, match="`u` must have shape"):
        small(jnp.ones(4))
    bad = {"r_min": 0.9, "r_max": 0.5} if cls is LRU else {"dt_min": 0.1, "dt_max": 0.01}
    with pytest.raises(ValueError, match="r_min" if cls is LRU else "dt_min"):
        cls(4, 4, rngs=nnx.Rngs(0), **bad)


def test_dtypes():
    layer = trained_like(LRU, dtype=jnp.float32)
    u = jnp.asarray(np.random.default_rng(0).normal(size=(2, 30, 4)), jnp.float32)
    ref = layer(u)
    assert ref.dtype == jnp.float32
    out = layer(u.astype(jnp.bfloat16))  # the core runs in float32; the output is bfloat16
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=0.1, rtol=0.05)
    half = trained_like(LRU, dtype=jnp.bfloat16)
    assert half.nu_log.dtype == jnp.bfloat16
    out = half(u)  # bfloat16 parameters: float32 core and output for float32 inputs
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, atol=0.2, rtol=0.1)
