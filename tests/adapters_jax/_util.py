"""Builders and NumPy references shared by the JAX adapter tests (x64 on)."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from compressm_jax import LRU  # noqa: E402


def loop_scan(poles, v, h0=None):
    """x_k = lambda_k x_{k-1} + v_k, one step at a time (NumPy)."""
    x = np.zeros_like(v[..., 0, :]) if h0 is None else h0
    out = []
    for k in range(v.shape[-2]):
        lam = poles if poles.ndim == 1 else poles[..., k, :]
        x = lam * x + v[..., k, :]
        out.append(x)
    return np.stack(out, axis=-2)


def simulate(sys, u):
    """Output Re(C x) + D u of a diagonal system (NumPy, float64)."""
    poles, b, c, d = (np.asarray(x) for x in sys)
    x = loop_scan(poles, u.astype(np.complex128) @ b.T)
    return (x @ c.T).real + u @ d.T.real


def host(sys):
    """A system of JAX arrays as NumPy (so core functions run without compiling anything)."""
    return type(sys)(*(None if x is None else np.asarray(x) for x in sys))


def trained_like(cls, n=24, h=4, seed=0, dtype=jnp.float64):
    """A layer with spread-out poles and a decaying Hankel spectrum, like a trained one."""
    kw = {"r_min": 0.2, "r_max": 0.95} if cls is LRU else {}
    return cls(h, n, param_dtype=dtype, rngs=nnx.Rngs(seed), **kw)


def values(layer):
    """``{name: NumPy copy}`` of every parameter of ``layer``."""
    return {
        "/".join(map(str, path)): np.array(var[...])
        for path, var in nnx.to_flat_state(nnx.state(layer, nnx.Param))
    }
