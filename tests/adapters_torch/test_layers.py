"""LRU and S5 layers: recurrences against a step-by-step reference, initialisation, AMP."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from compressm_torch import LRU, S5, hippo_n_eigenpairs  # noqa: E402
from compressm_torch._scan import diagonal_scan  # noqa: E402


def loop_scan(poles, v, h0=None):
    x = torch.zeros_like(v[..., 0, :]) if h0 is None else h0
    out = []
    for k in range(v.shape[-2]):
        lam = poles if poles.ndim == 1 else poles[..., k, :]
        x = lam * x + v[..., k, :]
        out.append(x)
    return torch.stack(out, dim=-2)


@pytest.mark.parametrize("length", [1, 2, 7, 64, 100])
@pytest.mark.parametrize("varying", [False, True])
def test_diagonal_scan_matches_loop(length, varying):
    g = torch.Generator().manual_seed(length)
    shape = (3, length, 5)
    poles = torch.polar(
        0.5 + 0.5 * torch.rand(5, generator=g, dtype=torch.float64),
        6 * torch.rand(5, generator=g, dtype=torch.float64),
    )
    if varying:
        poles = poles * torch.rand(shape, generator=g, dtype=torch.float64)
    v = torch.randn(shape, generator=g, dtype=torch.complex128)
    h0 = torch.randn(3, 5, generator=g, dtype=torch.complex128)
    torch.testing.assert_close(diagonal_scan(poles, v), loop_scan(poles, v))
    torch.testing.assert_close(diagonal_scan(poles, v, initial_state=h0), loop_scan(poles, v, h0))


@pytest.mark.parametrize("varying", [False, True])
def test_diagonal_scan_gradients(varying):
    g = torch.Generator().manual_seed(0)
    shape = (2, 9, 3)
    poles = torch.polar(
        0.3 + 0.6 * torch.rand(3, generator=g, dtype=torch.float64),
        6 * torch.rand(3, generator=g, dtype=torch.float64),
    )
    if varying:
        poles = poles * torch.rand(shape, generator=g, dtype=torch.float64)
    poles.requires_grad_(True)
    v = torch.randn(shape, generator=g, dtype=torch.complex128, requires_grad=True)
    h0 = torch.randn(2, 3, generator=g, dtype=torch.complex128, requires_grad=True)

    def fn(p, v, h):
        return diagonal_scan(p, v, initial_state=h)

    assert torch.autograd.gradcheck(fn, (poles, v, h0))
    # and against autograd through the step-by-step loop
    out = fn(poles, v, h0)
    weights = torch.randn(shape, generator=g, dtype=torch.complex128)
    grads = torch.autograd.grad((out * weights).real.sum(), (poles, v, h0))
    ref = torch.autograd.grad((loop_scan(poles, v, h0) * weights).real.sum(), (poles, v, h0))
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b)


def reference_output(layer, u):
    """y_k = Re(C x_k) + D u_k with x_k = lambda x_{k-1} + B u_k, one step at a time."""
    poles, b, c = layer.discrete_system(torch.float64)
    u = u.to(torch.float64)
    v = u.to(torch.complex128) @ b.T
    x = loop_scan(poles, v)
    return (x @ c.T).real + layer.D.to(torch.float64) * u


@pytest.mark.parametrize("cls", [LRU, S5])
def test_forward_matches_recurrence(cls):
    torch.manual_seed(0)
    layer = cls(6, 8, dtype=torch.float64)
    u = torch.randn(2, 33, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(u), reference_output(layer, u))


@pytest.mark.parametrize("cls", [LRU, S5])
def test_gradients_match_recurrence(cls):
    torch.manual_seed(1)
    layer = cls(3, 4, dtype=torch.float64)
    u = torch.randn(2, 17, 3, dtype=torch.float64)
    layer(u).pow(2).sum().backward()
    fast = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    reference_output(layer, u).pow(2).sum().backward()
    for name, p in layer.named_parameters():
        torch.testing.assert_close(fast[name], p.grad, msg=name)


def test_lru_initialisation_follows_the_paper():
    torch.manual_seed(0)
    layer = LRU(64, 4096, r_min=0.4, r_max=0.9, max_phase=math.pi).requires_grad_(False)
    poles, _, _ = layer.discrete_system(torch.float64)
    radius = poles.abs()
    assert float(radius.min()) >= 0.4
    assert float(radius.max()) <= 0.9
    # |lambda|^2 uniform on [r_min^2, r_max^2]
    assert abs(float((radius**2).mean()) - (0.4**2 + 0.9**2) / 2) < 0.01
    assert float(torch.angle(poles).min()) >= 0
    assert float(torch.angle(poles).max()) <= math.pi
    gamma = torch.exp(layer.gamma_log.double())
    torch.testing.assert_close(gamma, torch.sqrt(1 - radius**2), rtol=1e-6, atol=1e-6)
    assert abs(float(layer.B_re.std()) - 1 / math.sqrt(128)) < 0.005
    assert abs(float(layer.C_re.std()) - 1 / math.sqrt(4096)) < 0.001


def test_hippo_n_eigenpairs():
    lam, v = hippo_n_eigenpairs(16)
    q = torch.sqrt(1 + 2 * torch.arange(16, dtype=torch.float64))
    hippo = -(torch.tril(q[:, None] * q[None, :]) - torch.diag(torch.arange(16.0).double()))
    p = torch.sqrt(torch.arange(16, dtype=torch.float64) + 0.5)
    normal = (hippo + p[:, None] * p[None, :]).numpy()
    import numpy as np

    np.testing.assert_allclose(v @ np.diag(lam) @ v.conj().T, normal, atol=1e-10)
    np.testing.assert_allclose(lam.real, -0.5, atol=1e-12)


def test_s5_conj_sym_output_is_twice_the_real_part():
    torch.manual_seed(0)
    a = S5(4, 6, conj_sym=True, dtype=torch.float64)
    b = S5(4, 6, conj_sym=False, dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    u = torch.randn(1, 9, 4, dtype=torch.float64)
    d = a.D * u
    torch.testing.assert_close(a(u) - d, 2 * (b(u) - d))
    assert a.discrete_system()[0].abs().max() < 1


@pytest.mark.parametrize("cls", [LRU, S5])
def test_reduced_size_on_construction(cls):
    big = cls(4, 16)
    small = cls(4, 5)
    assert (big.d_state, small.d_state) == (16, 5)
    with pytest.raises(ValueError, match="d_state"):
        cls(4, 0)
    with pytest.raises(ValueError, match="`u` must have shape"):
        small(torch.randn(2, 3, 5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_and_autocast(dtype):
    torch.manual_seed(0)
    layer = LRU(4, 8)
    u = torch.randn(2, 12, 4)
    ref = layer(u)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(u.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)
    half = LRU(4, 8, dtype=torch.bfloat16)
    out = half(u.to(torch.bfloat16))
    out.float().sum().backward()
    assert half.nu_log.grad is not None
    assert half.nu_log.grad.dtype == torch.bfloat16


def test_cost_falls_with_state_size():
    # Work per step is linear in N: counted in floating-point operations, not timed.
    from torch.utils.flop_counter import FlopCounterMode

    def flops(n):
        layer = LRU(16, n)
        with FlopCounterMode(display=False) as counter:
            layer(torch.randn(2, 64, 16))
        return counter.get_total_flops()

    assert flops(8) < flops(64) < flops(512)
