"""The Flax NNX S4D layer and its adapter: recurrence, system, reduction of every channel to
one shared rank, controller run, and agreement with compressm_torch.S4D."""

from __future__ import annotations

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
pytest.importorskip("flax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from compressm_core import balanced_truncation, hankel_singular_values  # noqa: E402
from compressm_core.rank import shared_rank_hsv  # noqa: E402
from compressm_jax import (  # noqa: E402
    S4D,
    CompreSSM,
    SequenceModel,
    reduce_layer,
    resize_layers,
    state_sizes,
    to_state_space,
)
from tests.adapters_jax._util import host  # noqa: E402

H, N = 3, 12
Z = np.exp(1j * np.linspace(0, 2 * np.pi, 257))


def make_layer(seed: int = 0, h: int = H, n: int = N) -> S4D:
    """An S4D layer (float64) with spread-out random parameters."""
    layer = S4D(h, n, param_dtype=jnp.float64, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    m = n // 2
    layer.log_dt.set_value(jnp.asarray(np.log(0.05 + 0.25 * rng.random(h))))
    layer.log_A_real.set_value(jnp.asarray(np.log(0.1 + rng.random((h, m)))))
    layer.A_imag.set_value(jnp.asarray(8 * rng.random((h, m)) - 2))
    layer.C.set_value(jnp.asarray(rng.normal(size=(h, m, 2))))
    return layer


def numpy_recurrence(layer: S4D, u: np.ndarray) -> np.ndarray:
    """dA = exp(dt A), dB = (dA - 1) / A, x_k = dA x_{k-1} + dB u_k, y = 2 Re(C x) + D u."""
    log_dt, log_a_real, a_imag, c, d = (
        np.asarray(getattr(layer, n)[...]) for n in ("log_dt", "log_A_real", "A_imag", "C", "D")
    )
    a = -np.exp(log_a_real) + 1j * a_imag
    c = c[..., 0] + 1j * c[..., 1]
    d_a = np.exp(np.exp(log_dt)[:, None] * a)
    d_b = (d_a - 1) / a
    x = np.zeros(u.shape[:-2] + a.shape, dtype=complex)
    out = []
    for k in range(u.shape[-2]):
        x = d_a * x + d_b * u[..., k, :, None]
        out.append(2 * np.sum(c * x, axis=-1).real + d * u[..., k, :])
    return np.stack(out, axis=-2)


def complex_response(sys, z: np.ndarray) -> np.ndarray:
    """c (z - A)^-1 b (H, len(z)) of a batch of SISO systems, diagonal or dense ``A``."""
    a, b, c = (np.asarray(x) for x in sys[:3])
    if a.ndim == b.ndim - 1:
        a = a[..., :, None] * np.eye(a.shape[-1])
    eye = np.eye(a.shape[-1])
    return np.stack([(c @ np.linalg.solve(zk * eye - a, b))[..., 0, 0] for zk in z], axis=-1)


def real_response(sys, z: np.ndarray) -> np.ndarray:
    """Response of the output Re(c x): (G(z) + conj(G(conj z))) / 2."""
    return 0.5 * (complex_response(sys, z) + complex_response(sys, z.conj()).conj())


def test_forward_matches_numpy_recurrence():
    layer = make_layer()
    u = np.random.default_rng(1).normal(size=(2, 25, H))
    out = np.asarray(layer(jnp.asarray(u)))
    np.testing.assert_allclose(out, numpy_recurrence(layer, u), rtol=1e-10, atol=1e-10)


def test_initialisation_and_errors():
    layer = S4D(4, 8, rngs=nnx.Rngs(0))
    assert layer.n_modes == 4
    assert layer.d_state == 8
    assert layer.C.shape == (4, 4, 2)
    assert layer.log_dt[...].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(layer.A_imag[...])[2], np.pi * np.arange(4), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(layer.log_A_real[...]), math.log(0.5), rtol=1e-6)
    dt = np.exp(np.asarray(layer.log_dt[...], dtype=np.float64))
    assert np.all((dt >= 1e-3 * (1 - 1e-6)) & (dt <= 1e-1 * (1 + 1e-6)))
    assert layer(jnp.ones((2, 5, 4), jnp.float32)).dtype == jnp.float32
    with pytest.raises(ValueError, match="`d_state` must be even"):
        S4D(4, 7, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"`u` must have shape \(\.\.\., length, 4\)"):
        layer(jnp.ones((2, 5, 3)))


def test_to_state_space_impulse_response_equals_the_layers():
    layer = make_layer(2)
    sys = host(to_state_space(layer))
    assert sys.poles.shape == (H, N // 2)
    assert sys.b.shape == (H, N // 2, 1)
    assert sys.c.shape == (H, 1, N // 2)
    length = 15
    u = np.zeros((1, length, H))
    u[0, 0] = 1.0
    y = np.asarray(layer(jnp.asarray(u)))[0]
    markov = np.stack(
        [np.sum(sys.c[:, 0] * sys.poles**k * sys.b[..., 0], -1).real for k in range(length)]
    )
    markov[0] += sys.d[:, 0, 0]
    np.testing.assert_allclose(y, markov, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rank", [1, 4])
def test_reduction_is_balanced_truncation_of_every_channel_to_one_rank(rank):
    layer = make_layer(3)
    sys = host(to_state_space(layer))
    log_dt = np.asarray(layer.log_dt[...])
    bt = balanced_truncation(sys, rank)
    report = reduce_layer(layer, rank, compute_error=True)
    assert layer.n_modes == rank
    assert layer.C.shape == (H, rank, 2)
    assert layer.A_imag.shape == layer.log_A_real.shape == (H, rank)
    assert report.new_rank == rank
    np.testing.assert_array_equal(np.asarray(layer.log_dt[...]), log_dt)
    for name in ("log_A_real", "A_imag", "C"):
        assert np.all(np.isfinite(np.asarray(getattr(layer, name)[...])))
    after = host(to_state_space(layer))
    assert np.all(np.abs(after.poles) < 1)
    np.testing.assert_allclose(
        complex_response(after, Z), complex_response(bt.system, Z), rtol=1e-8, atol=1e-10
    )
    bounds = 2 * np.asarray(bt.hsv)[:, rank:].sum(-1)
    err = np.abs(real_response(after, Z) - real_response(sys, Z)).max(-1)
    assert np.all(err <= bounds * (1 + 1e-9) + 1e-12)
    assert report.error_bound == pytest.approx(bounds.max(), rel=1e-12)
    assert report.hinf_error <= report.error_bound * (1 + 1e-6)
    np.testing.assert_allclose(report.hsv, np.asarray(bt.hsv).max(0), rtol=1e-12)


def test_full_rank_reduction_is_the_identity():
    layer = make_layer(4)
    u = jnp.asarray(np.random.default_rng(0).normal(size=(2, 30, H)))
    y = np.asarray(layer(u))
    sys = host(to_state_space(layer))
    report = reduce_layer(layer, N // 2)
    assert report.error_bound == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(
        real_response(host(to_state_space(layer)), Z), real_response(sys, Z), rtol=1e-8, atol=1e-10
    )
    np.testing.assert_allclose(np.asarray(layer(u)), y, rtol=1e-8, atol=1e-9)


def test_tau_chooses_one_rank_from_the_shared_profile():
    from compressm_core import select_rank

    layer = make_layer(5)
    hsv = hankel_singular_values(host(to_state_space(layer)))
    expected = select_rank(shared_rank_hsv(hsv), tau=0.2)
    assert reduce_layer(layer, tau=0.2).new_rank == expected == layer.n_modes


def test_sequence_model_with_s4d_reduces_and_keeps_training():
    model = SequenceModel(
        2, 1, d_model=4, d_state=8, layer="s4d", param_dtype=jnp.float64, rngs=nnx.Rngs(0)
    )
    assert state_sizes(model) == {"blocks.0.ssm": 8}
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    ctl = CompreSSM(model, opt, total_steps=20, mode="fixed", fraction=0.5, reduction_steps=[1])

    @nnx.jit
    def train_step(model, opt, x, y):
        def loss_fn(model):
            return ((model(x)[:, 0] - y) ** 2).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = []
    for i in range(3):
        x = jax.random.normal(jax.random.PRNGKey(i), (4, 12, 2), jnp.float64)
        losses.append(float(train_step(model, opt, x, x.sum((1, 2)))))
        ctl.step()
    (event,) = [e for e in ctl.history if e.status == "reduced"]
    assert (event.old_rank, event.new_rank, event.step) == (8, 4, 1)
    assert state_sizes(model) == {"blocks.0.ssm": 4}
    assert all(math.isfinite(v) for v in losses)
    ssm = model.blocks[0].ssm
    opt_leaves = jax.tree_util.tree_leaves_with_path(nnx.state(opt, nnx.OptState))
    for path, leaf in opt_leaves:
        key = jax.tree_util.keystr(path)
        if "['ssm']" in key and "['C']" in key:
            assert leaf.shape == ssm.C.shape
    resize_layers(model, {"blocks.0.ssm": 2})
    assert ssm.C.shape == (4, 2, 2)
    assert ssm.log_dt.shape == (4,)


def test_torch_and_jax_layers_agree_on_the_same_parameters():
    torch = pytest.importorskip("torch")
    import compressm_torch as ct

    j_layer = make_layer(6)
    t_layer = ct.S4D(H, N, dtype=torch.float64)
    with torch.no_grad():
        for name, param in t_layer.named_parameters():
            param.copy_(torch.from_numpy(np.array(getattr(j_layer, name)[...])))
    u = np.random.default_rng(2).normal(size=(2, 20, H))
    np.testing.assert_allclose(
        t_layer(torch.from_numpy(u)).detach().numpy(),
        np.asarray(j_layer(jnp.asarray(u))),
        rtol=1e-10,
        atol=1e-10,
    )
    # and the same reduction
    ct.reduce_layer(t_layer, 3)
    reduce_layer(j_layer, 3)
    for name, param in t_layer.named_parameters():
        np.testing.assert_allclose(
            param.detach().numpy(), np.asarray(getattr(j_layer, name)[...]), rtol=1e-7, atol=1e-9
        )
