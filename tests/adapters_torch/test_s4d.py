"""The S4D layer and its adapters (ours and state-spaces' S4D by name): recurrence, system,
reduction of every channel to one shared rank, controller run."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from compressm_core import (  # noqa: E402
    balanced_truncation,
    h_infinity_norm,
    hankel_singular_values,
    select_rank,
)
from compressm_core.rank import shared_rank_hsv  # noqa: E402
from compressm_torch import (  # noqa: E402
    S4D,
    CompreSSM,
    SequenceModel,
    find_layers,
    reduce_layer,
    resize_layers,
    state_sizes,
    to_state_space,
)

H, N = 3, 12  # 3 channels, 6 stored modes each


def make_layer(seed: int = 0, h: int = H, n: int = N) -> S4D:
    """An S4D layer (float64) with spread-out random parameters."""
    torch.manual_seed(seed)
    layer = S4D(h, n, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    m = n // 2
    with torch.no_grad():
        layer.log_dt.copy_(torch.log(0.05 + 0.25 * torch.rand(h, generator=g)))
        layer.log_A_real.copy_(torch.log(0.1 + torch.rand(h, m, generator=g)))
        layer.A_imag.copy_(8 * torch.rand(h, m, generator=g) - 2)
        layer.C.copy_(torch.randn(h, m, 2, generator=g, dtype=torch.float64))
    return layer


def numpy_params(layer: nn.Module, prefix: str = "") -> tuple[np.ndarray, ...]:
    def get(name: str) -> np.ndarray:
        obj = layer
        for part in (prefix + name).split("."):
            obj = getattr(obj, part)
        return obj.detach().double().numpy()

    c = get("C")
    return get("log_dt"), get("log_A_real"), get("A_imag"), c[..., 0] + 1j * c[..., 1]


def numpy_recurrence(layer: S4D, u: np.ndarray) -> np.ndarray:
    """The defining equations, one step at a time: dA = exp(dt A), dB = (dA - 1) / A,
    x_k = dA x_{k-1} + dB u_k, y_k = 2 Re(C x_k) + D u_k."""
    log_dt, log_a_real, a_imag, c = numpy_params(layer)
    a = -np.exp(log_a_real) + 1j * a_imag
    d_a = np.exp(np.exp(log_dt)[:, None] * a)
    d_b = (d_a - 1) / a
    d = layer.D.detach().numpy()
    x = np.zeros(u.shape[:-2] + a.shape, dtype=complex)
    out = []
    for k in range(u.shape[-2]):
        x = d_a * x + d_b * u[..., k, :, None]
        out.append(2 * np.sum(c * x, axis=-1).real + d * u[..., k, :])
    return np.stack(out, axis=-2)


def real_response(sys, z: np.ndarray) -> np.ndarray:
    """Frequency response (H, len(z)) of a batch of SISO systems with output Re(c x):
    G(z) = (c (z - A)^-1 b + conj(c) (z - conj A)^-1 conj(b)) / 2, for diagonal or dense A."""
    a, b, c = (np.asarray(x) for x in sys[:3])
    if a.ndim == b.ndim - 1:  # diagonal
        a = a[..., :, None] * np.eye(a.shape[-1])
    eye = np.eye(a.shape[-1])
    out = []
    for zk in z:
        g = c @ np.linalg.solve(zk * eye - a, b)
        g_conj = c.conj() @ np.linalg.solve(zk * eye - a.conj(), b.conj())
        out.append(0.5 * (g + g_conj)[..., 0, 0])
    return np.stack(out, axis=-1)


def complex_response(sys, z: np.ndarray) -> np.ndarray:
    """Frequency response (H, len(z)) c (z - A)^-1 b of the complex systems."""
    a, b, c = (np.asarray(x) for x in sys[:3])
    if a.ndim == b.ndim - 1:
        a = a[..., :, None] * np.eye(a.shape[-1])
    eye = np.eye(a.shape[-1])
    return np.stack([(c @ np.linalg.solve(zk * eye - a, b))[..., 0, 0] for zk in z], axis=-1)


Z = np.exp(1j * np.linspace(0, 2 * np.pi, 257))


def test_forward_matches_numpy_recurrence():
    layer = make_layer()
    u = torch.randn(2, 25, H, dtype=torch.float64)
    expected = numpy_recurrence(layer, u.numpy())
    np.testing.assert_allclose(layer(u).detach().numpy(), expected, rtol=1e-10, atol=1e-10)


def test_forward_matches_the_state_spaces_convolution_kernel():
    """state-spaces' minimal S4D: K[l] = 2 Re sum_n C (e^{dt A} - 1) / A e^{dt A l}, y = K * u
    + D u (causal convolution)."""
    layer = make_layer(1)
    log_dt, log_a_real, a_imag, c = numpy_params(layer)
    a = -np.exp(log_a_real) + 1j * a_imag
    dta = np.exp(log_dt)[:, None] * a
    length = 20
    kernel = (
        2
        * np.einsum(
            "hn,hnl->hl", c * (np.exp(dta) - 1) / a, np.exp(dta[..., None] * np.arange(length))
        ).real
    )
    u = np.random.default_rng(0).normal(size=(length, H))
    y = (
        np.stack([np.convolve(u[:, h], kernel[h])[:length] for h in range(H)], axis=-1)
        + layer.D.detach().numpy() * u
    )
    out = layer(torch.from_numpy(u)).detach().numpy()
    np.testing.assert_allclose(out, y, rtol=1e-10, atol=1e-10)


def test_float32_layer_and_shape_errors():
    layer = S4D(4, 8)
    assert layer.n_modes == 4
    assert layer.d_state == 8
    assert layer.C.shape == (4, 4, 2)
    assert layer.log_dt.shape == (4,)
    np.testing.assert_allclose(layer.A_imag.detach().numpy()[0], np.pi * np.arange(4), rtol=1e-6)
    np.testing.assert_allclose(layer.log_A_real.detach().numpy(), math.log(0.5), rtol=1e-6)
    dt = layer.log_dt.exp()
    assert bool(((dt >= 1e-3 * (1 - 1e-6)) & (dt <= 1e-1 * (1 + 1e-6))).all())
    y = layer(torch.randn(2, 5, 4))
    assert y.dtype == torch.float32
    assert y.shape == (2, 5, 4)
    with pytest.raises(ValueError, match="`d_state` must be even"):
        S4D(4, 7)
    with pytest.raises(ValueError, match=r"`u` must have shape \(\.\.\., length, 4\)"):
        layer(torch.randn(2, 5, 3))


def test_to_state_space_impulse_response_equals_the_layers():
    """Markov parameters: y_0 = D + Re(c b), y_k = Re(c diag(mu)^k b) for an impulse."""
    layer = make_layer(2)
    sys = to_state_space(layer)
    assert sys.poles.shape == (H, N // 2)
    assert sys.b.shape == (H, N // 2, 1)
    assert sys.c.shape == (H, 1, N // 2)
    assert sys.d.shape == (H, 1, 1)
    length = 15
    u = torch.zeros(1, length, H, dtype=torch.float64)
    u[0, 0] = 1.0
    y = layer(u)[0].detach().numpy()
    poles, b, c = (np.asarray(x) for x in sys[:3])
    markov = np.stack(
        [np.sum(c[:, 0] * poles**k * b[..., 0], axis=-1).real for k in range(length)]
    )
    markov[0] += np.asarray(sys.d)[:, 0, 0]
    np.testing.assert_allclose(y, markov, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_reduction_is_balanced_truncation_of_every_channel_to_one_rank(rank):
    layer = make_layer(3)
    sys = to_state_space(layer)
    log_dt = layer.log_dt.detach().clone()
    bt = balanced_truncation(sys, rank)
    report = reduce_layer(layer, rank, compute_error=True)
    # every channel has the same number of modes, and the parameters are valid
    assert layer.n_modes == rank
    assert layer.d_state == 2 * rank
    assert layer.log_A_real.shape == layer.A_imag.shape == (H, rank)
    assert layer.C.shape == (H, rank, 2)
    assert state_sizes(layer) == {"": rank}
    assert report.old_rank == N // 2
    assert report.new_rank == rank
    for p in layer.parameters():
        assert bool(torch.isfinite(p).all())
    assert bool((-torch.exp(layer.log_A_real) < 0).all())
    torch.testing.assert_close(layer.log_dt.detach(), log_dt, rtol=0, atol=0)  # dt kept
    after = to_state_space(layer)
    assert bool((after.poles.abs() < 1).all())
    # the reduced layer realises the balanced truncation of each channel (complex systems)
    np.testing.assert_allclose(
        complex_response(after, Z), complex_response(bt.system, Z), rtol=1e-8, atol=1e-10
    )
    # its error on the layer's real output obeys the shared bound, channel by channel
    hsv = np.asarray(bt.hsv)
    bounds = 2 * hsv[:, rank:].sum(-1)
    err = np.abs(real_response(after, Z) - real_response(sys, Z)).max(-1)
    assert np.all(err <= bounds * (1 + 1e-9) + 1e-12)
    assert report.error_bound == pytest.approx(bounds.max(), rel=1e-12)
    assert report.error_bound <= 2 * float(shared_rank_hsv(bt.hsv)[rank:].sum()) + 1e-12
    assert report.hinf_error <= report.error_bound * (1 + 1e-6)
    assert report.hinf_error == pytest.approx(
        float(h_infinity_norm(sys, after, real_output=True).max()), rel=1e-9
    )
    np.testing.assert_allclose(report.hsv, shared_rank_hsv(bt.hsv), rtol=1e-12)


def test_full_rank_reduction_is_the_identity():
    layer = make_layer(4)
    sys = to_state_space(layer)
    u = torch.randn(2, 30, H, dtype=torch.float64)
    y = layer(u).detach()
    report = reduce_layer(layer, N // 2)
    assert report.new_rank == N // 2
    assert report.error_bound == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(
        real_response(to_state_space(layer), Z), real_response(sys, Z), rtol=1e-8, atol=1e-10
    )
    torch.testing.assert_close(layer(u).detach(), y, rtol=1e-8, atol=1e-9)


def test_tau_chooses_one_rank_from_the_shared_profile():
    layer = make_layer(5)
    hsv = hankel_singular_values(to_state_space(layer))
    expected = select_rank(shared_rank_hsv(hsv), tau=0.2)
    # the profile is the per-index maximum over channels
    np.testing.assert_allclose(shared_rank_hsv(hsv).numpy(), hsv.numpy().max(0))
    report = reduce_layer(layer, tau=0.2)
    assert report.new_rank == expected == layer.n_modes


def test_selection_smallest_and_random_give_every_channel_the_same_rank():
    for selection in ("smallest", "random"):
        layer = make_layer(6)
        sys = to_state_space(layer)
        g = torch.Generator().manual_seed(0)
        report = reduce_layer(layer, 2, selection=selection, generator=g, compute_error=True)
        assert layer.C.shape == (H, 2, 2)
        assert report.new_rank == 2
        assert report.hinf_error <= report.error_bound * (1 + 1e-6)
        if selection == "random":
            kept = report.indices
            np.testing.assert_allclose(
                to_state_space(layer).poles.numpy(), sys.poles.numpy()[:, kept.numpy()]
            )


def test_sequence_model_with_s4d_reduces_and_keeps_training():
    torch.manual_seed(0)
    model = SequenceModel(2, 1, d_model=4, d_state=8, layer="s4d", pool="mean").double()
    ssm = model.blocks[0].ssm
    assert isinstance(ssm, S4D)
    assert ssm.d_state == 16
    assert state_sizes(model) == {"blocks.0.ssm": 8}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ctl = CompreSSM(model, opt, total_steps=20, mode="fixed", fraction=0.5, reduction_steps=[3])
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(6):
        x = torch.randn(4, 12, 2, generator=g, dtype=torch.float64)
        loss = ((model(x)[:, 0] - x.sum((1, 2))) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        ctl.step()
    (event,) = [e for e in ctl.history if e.status == "reduced"]
    assert (event.old_rank, event.new_rank, event.step) == (8, 4, 3)
    assert event.error_bound <= 2 * sum(sorted(event.hsv)[:4]) + 1e-12
    assert state_sizes(model) == {"blocks.0.ssm": 4}
    assert ssm.d_state == 8
    for name in ("log_A_real", "A_imag", "C"):
        param = getattr(ssm, name)
        assert param.shape[1] == 4
        for moment in ("exp_avg", "exp_avg_sq"):
            assert opt.state[param][moment].shape == param.shape
    assert all(math.isfinite(v) for v in losses)
    # a model built from the reached sizes has the reduced architecture
    small = SequenceModel(2, 1, d_model=4, d_state=list(state_sizes(model).values()), layer="s4d")
    assert state_sizes(small) == state_sizes(model)


# --- state-spaces' own S4D (models/s4/s4d.py), rebuilt with the same names and shapes ---------


class S4DKernel(nn.Module):
    def __init__(self, d_model, N=64, dt_min=0.001, dt_max=0.1, lr=None):
        super().__init__()
        h = d_model
        log_dt = torch.rand(h) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        c = torch.randn(h, N // 2, dtype=torch.cfloat)
        self.C = nn.Parameter(torch.view_as_real(c))
        self.register("log_dt", log_dt, lr)
        self.register("log_A_real", torch.log(0.5 * torch.ones(h, N // 2)), lr)
        self.register("A_imag", math.pi * torch.arange(N // 2).repeat(h, 1).float(), lr)

    def forward(self, L):
        dt = torch.exp(self.log_dt)
        c = torch.view_as_complex(self.C)
        a = -torch.exp(self.log_A_real) + 1j * self.A_imag
        dta = a * dt.unsqueeze(-1)
        k = dta.unsqueeze(-1) * torch.arange(L, device=a.device)
        c = c * (torch.exp(dta) - 1.0) / a
        return 2 * torch.einsum("hn, hnl -> hl", c, torch.exp(k)).real

    def register(self, name, tensor, lr=None):
        if lr == 0.0:
            self.register_buffer(name, tensor)
        else:
            self.register_parameter(name, nn.Parameter(tensor))
            optim = {"weight_decay": 0.0}
            if lr is not None:
                optim["lr"] = lr
            getattr(self, name)._optim = optim


class StateSpacesS4D(nn.Module):
    def __init__(self, d_model, d_state=64, transposed=True, **kernel_args):
        super().__init__()
        self.h, self.n, self.transposed = d_model, d_state, transposed
        self.D = nn.Parameter(torch.randn(self.h))
        self.kernel = S4DKernel(self.h, N=self.n, **kernel_args)
        self.activation = nn.GELU()
        self.output_linear = nn.Sequential(
            nn.Conv1d(self.h, 2 * self.h, kernel_size=1), nn.GLU(dim=-2)
        )

    def ssm(self, u):
        """The SSM part of forward (before the activation), on (B, H, L)."""
        length = u.size(-1)
        k = self.kernel(L=length)
        k_f = torch.fft.rfft(k, n=2 * length)
        u_f = torch.fft.rfft(u, n=2 * length)
        y = torch.fft.irfft(u_f * k_f, n=2 * length)[..., :length]
        return y + u * self.D.unsqueeze(-1)

    def forward(self, u):
        if not self.transposed:
            u = u.transpose(-1, -2)
        y = self.output_linear(self.activation(self.ssm(u)))
        if not self.transposed:
            y = y.transpose(-1, -2)
        return y, None


StateSpacesS4D.__module__ = "models.s4.s4d"
StateSpacesS4D.__name__ = StateSpacesS4D.__qualname__ = "S4D"


@pytest.mark.parametrize("lr", [None, 0.0])
def test_state_spaces_s4d_is_found_and_reduced(lr):
    torch.manual_seed(0)
    outer = nn.Sequential(StateSpacesS4D(3, 16, lr=lr).double())
    assert list(find_layers(outer)) == ["0"]
    layer = outer[0]
    assert state_sizes(outer) == {"0": 8}
    sys = to_state_space(layer)
    # the system's Markov parameters are the layer's own convolution kernel
    poles, b, c = (np.asarray(x) for x in sys[:3])
    kernel = layer.kernel(L=10).detach().numpy()
    markov = np.stack([np.sum(c[:, 0] * poles**k * b[..., 0], -1).real for k in range(10)], -1)
    np.testing.assert_allclose(kernel, markov, rtol=1e-10, atol=1e-12)
    bt = balanced_truncation(sys, 3)
    reduce_layer(layer, 3)
    assert layer.kernel.log_A_real.shape == layer.kernel.A_imag.shape == (3, 3)
    assert layer.kernel.C.shape == (3, 3, 2)
    assert layer.n == 6
    if lr is None:
        assert layer.kernel.log_A_real._optim == {"weight_decay": 0.0}  # Parameter kept
    else:
        assert "log_A_real" in dict(layer.kernel.named_buffers())
    # its kernel is now the Markov parameters of the balanced truncation, Re(c A_r^k b)
    a_r, b_r, c_r = (np.asarray(x) for x in bt.system[:3])
    expected, power = [], np.broadcast_to(np.eye(3), a_r.shape)
    for _ in range(10):
        expected.append((c_r @ power @ b_r)[:, 0, 0].real)
        power = power @ a_r
    np.testing.assert_allclose(
        layer.kernel(L=10).detach().numpy(), np.stack(expected, -1), rtol=1e-8, atol=1e-10
    )
    y, _ = layer(torch.randn(2, 3, 10, dtype=torch.float64))
    assert y.shape == (2, 3, 10)
    resize_layers(outer, {"0": 5})
    assert layer.kernel.C.shape == (3, 5, 2)
    assert layer.n == 10


def test_certified_schedule_cuts_an_s4d_layer_with_the_batched_weyl_bound():
    """Parameters that do not move: the Weyl bound of the batch (its largest member's) is 0, so
    the cut is certified after the window, as for a single system."""
    torch.manual_seed(0)
    model = SequenceModel(2, 3, d_model=4, d_state=8, layer="s4d").double()
    ctl = CompreSSM(
        model,
        None,
        total_steps=400,
        schedule="certified",
        mode="fixed",
        fraction=0.5,
        check_every=10,
        certify_window=2,
        num_reductions=1,
        warmup_fraction=0.5,
    )
    events = []
    for loss in [2.3] * 30 + [1.0] * 40:
        events += [e for e in ctl.step(loss=loss) if e.status == "reduced"]
    assert [(e.step, e.old_rank, e.new_rank, e.trigger) for e in events] == [
        (60, 8, 4, "certified")
    ]
    assert events[0].margin is not None
    assert events[0].margin > 0
