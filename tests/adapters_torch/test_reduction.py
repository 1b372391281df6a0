"""Adapters and reduce_layer: systems read from layers, reductions within their bounds."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from compressm_core import (  # noqa: E402
    DiagonalStateSpace,
    StabilityError,
    hankel_singular_values,
    select_rank,
)
from compressm_torch import (  # noqa: E402
    LRU,
    S5,
    LayerAdapter,
    SequenceModel,
    find_layers,
    get_adapter,
    reduce_layer,
    register_adapter,
    resize_layers,
    state_sizes,
    to_state_space,
)

LAYERS = [LRU, S5]


def simulate(sys, u):
    """Output Re(C x) + D u of a diagonal system, step by step (float64)."""
    x = torch.zeros(u.shape[0], sys.poles.shape[0], dtype=torch.complex128)
    out = []
    for k in range(u.shape[1]):
        x = sys.poles * x + u[:, k].to(torch.complex128) @ sys.b.T
        out.append((x @ sys.c.T).real + u[:, k] @ sys.d.T)
    return torch.stack(out, dim=1)


def trained_like(cls, n=24, h=4, seed=0):
    """A layer with spread-out poles and a decaying Hankel spectrum, like a trained one."""
    torch.manual_seed(seed)
    kw = {"r_min": 0.2, "r_max": 0.95} if cls is LRU else {}
    return cls(h, n, dtype=torch.float64, **kw)


@pytest.mark.parametrize("cls", LAYERS)
def test_to_state_space_reproduces_the_layer(cls):
    layer = trained_like(cls)
    sys = to_state_space(layer)
    assert sys.poles.dtype == torch.complex128
    assert sys.d.dtype == torch.float64
    assert sys.poles.device == layer.D.device
    u = torch.randn(2, 30, 4, dtype=torch.float64)
    torch.testing.assert_close(simulate(sys, u), layer(u).detach())


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize(
    ("selection", "real_output"),
    [
        ("largest", False),
        ("smallest", False),
        ("random", False),
        ("largest", True),
        ("smallest", True),
    ],
)
def test_output_change_within_bound(cls, selection, real_output):
    layer = trained_like(cls)
    params = dict(layer.named_parameters())
    d_before = layer.D.detach().clone()
    u = torch.randn(4, 200, 4, dtype=torch.float64)
    y = layer(u).detach()
    rank = 12 if real_output else 6
    report = reduce_layer(
        layer,
        rank,
        selection=selection,
        real_output=real_output,
        compute_error=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert report.old_rank == 24
    assert layer.d_state == report.new_rank
    assert report.new_rank == rank if not real_output else rank // 2 <= report.new_rank <= rank
    # Parameter objects are kept; D is untouched bit for bit.
    assert all(p is params[n] for n, p in layer.named_parameters())
    assert torch.equal(layer.D, d_before)
    assert "D" not in report.changed
    # a-posteriori: measured H-infinity change <= bound, and the l2 gain on random inputs.
    assert report.hinf_error <= report.error_bound * (1 + 1e-6) + 1e-9
    err = torch.linalg.vector_norm(layer(u).detach() - y, dim=(1, 2))
    gain = err / torch.linalg.vector_norm(u, dim=(1, 2))
    assert float(gain.max()) <= report.hinf_error * (1 + 1e-6) + 1e-9
    assert (report.indices is None) == (selection != "random")


@pytest.mark.parametrize("cls", LAYERS)
def test_full_rank_largest_is_exact(cls):
    layer = trained_like(cls, n=8)
    u = torch.randn(2, 40, 4, dtype=torch.float64)
    y = layer(u).detach()
    report = reduce_layer(layer, 8)
    assert report.error_bound == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(layer(u).detach(), y, rtol=1e-7, atol=1e-7)


def test_largest_beats_smallest_and_bound_is_tail_sum():
    layer = trained_like(LRU)
    hsv = hankel_singular_values(to_state_space(layer))
    a = trained_like(LRU)
    b = trained_like(LRU)
    ra = reduce_layer(a, 6, compute_error=True)
    rb = reduce_layer(b, 6, selection="smallest", compute_error=True)
    assert ra.error_bound == pytest.approx(float(2 * hsv[6:].sum()))
    assert rb.error_bound == pytest.approx(float(2 * hsv[:-6].sum()))
    assert ra.hinf_error < rb.hinf_error
    torch.testing.assert_close(ra.hsv, hsv.cpu())


def test_tau_picks_the_rank_of_select_rank():
    layer = trained_like(LRU)
    hsv = hankel_singular_values(to_state_space(layer))
    report = reduce_layer(layer, tau=0.2)
    assert report.new_rank == select_rank(hsv, tau=0.2)


def test_horizon_reduction_runs_and_changes_the_ranking():
    layer = trained_like(LRU)
    full = hankel_singular_values(to_state_space(layer))
    short = hankel_singular_values(to_state_space(layer), horizon=5)
    assert not torch.allclose(full, short)
    report = reduce_layer(layer, 6, horizon=5)
    assert report.new_rank == 6
    torch.testing.assert_close(report.hsv, short.cpu())


def test_random_selection_slices_parameters():
    layer = trained_like(LRU)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    report = reduce_layer(layer, 5, selection="random", generator=torch.Generator().manual_seed(3))
    idx = report.indices
    assert idx.shape == (5,)
    assert bool(torch.all(idx[1:] > idx[:-1]))
    torch.testing.assert_close(layer.nu_log, before["nu_log"][idx])
    torch.testing.assert_close(layer.C_im, before["C_im"][:, idx])


def test_lru_write_back_of_real_positive_pole_is_finite():
    layer = LRU(2, 2, dtype=torch.float64)
    adapter = get_adapter(layer)
    sys = DiagonalStateSpace(
        torch.tensor([0.5 + 0j, -0.3 + 0j], dtype=torch.complex128),
        torch.ones(2, 2, dtype=torch.complex128),
        torch.ones(2, 2, dtype=torch.complex128),
    )
    values = adapter.from_state_space(layer, sys)
    assert all(bool(torch.all(torch.isfinite(v))) for v in values.values())
    with torch.no_grad():
        for name, value in values.items():
            getattr(layer, name).data = value
    poles, _, _ = layer.discrete_system(torch.float64)
    torch.testing.assert_close(poles.detach(), sys.poles)


def test_unstable_layer_is_refused_and_left_unchanged():
    layer = trained_like(LRU)
    with torch.no_grad():
        layer.nu_log[0] = -80.0  # |lambda_0| = exp(-exp(-80)) == 1.0 in float64
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    with pytest.raises(StabilityError):
        reduce_layer(layer, 6)
    for name, p in layer.named_parameters():
        assert torch.equal(p, before[name])


class RealDiagonal(nn.Module):
    """A user's own layer family: real diagonal poles tanh(a), output C x + D u."""

    def __init__(self, h, n):
        super().__init__()
        self.a = nn.Parameter(torch.linspace(-2, 2, n, dtype=torch.float64))
        self.B = nn.Parameter(torch.randn(n, h, dtype=torch.float64))
        self.C = nn.Parameter(torch.randn(h, n, dtype=torch.float64))
        self.D = nn.Parameter(torch.randn(h, dtype=torch.float64))
        self.n_cached = n

    def forward(self, u):
        x = torch.zeros(u.shape[0], self.a.shape[0], dtype=u.dtype)
        out = []
        for k in range(u.shape[1]):
            x = torch.tanh(self.a) * x + u[:, k] @ self.B.T
            out.append(x @ self.C.T + self.D * u[:, k])
        return torch.stack(out, dim=1)


def _real_to_ss(layer):
    with torch.no_grad():
        return DiagonalStateSpace(
            torch.tanh(layer.a).to(torch.complex128),
            layer.B.to(torch.complex128),
            layer.C.to(torch.complex128),
            torch.diag(layer.D),
        )


def _real_from_ss(layer, sys):
    if bool(torch.any(sys.poles.imag.abs() > 1e-9)):
        raise StabilityError("RealDiagonal needs real poles")
    return {"a": torch.atanh(sys.poles.real), "B": sys.b.real, "C": sys.c.real}


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
    torch.manual_seed(0)
    layer = RealDiagonal(3, 10)
    u = torch.randn(2, 50, 3, dtype=torch.float64)
    y = layer(u).detach()
    report = reduce_layer(layer, 4, real_output=True, compute_error=True)
    assert layer.n_cached == 4 == report.new_rank
    gain = torch.linalg.vector_norm(layer(u).detach() - y) / torch.linalg.vector_norm(u)
    assert float(gain) <= report.hinf_error + 1e-9 <= report.error_bound * (1 + 1e-6) + 1e-9
    model = nn.Sequential(RealDiagonal(3, 10), LRU(3, 7))
    assert state_sizes(model) == {"0": 10, "1": 7}


def test_registry_errors():
    with pytest.raises(TypeError, match="No adapter registered for `layer` of type Linear"):
        get_adapter(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="layer_type"):
        register_adapter(int, REAL_ADAPTER)
    with pytest.raises(TypeError, match="adapter"):
        register_adapter(RealDiagonal, object())


def test_find_resize_and_state_sizes():
    model = SequenceModel(2, 3, d_model=8, d_state=12, n_layers=2)
    assert list(find_layers(model)) == ["blocks.0.ssm", "blocks.1.ssm"]
    resize_layers(model, {"blocks.1.ssm": 5})
    assert state_sizes(model) == {"blocks.0.ssm": 12, "blocks.1.ssm": 5}
    assert model(torch.randn(2, 7, 2)).shape == (2, 3)
    with pytest.raises(KeyError, match="does not have"):
        resize_layers(model, {"blocks.9.ssm": 5})
    with pytest.raises(ValueError, match=r"sizes\['blocks.0.ssm'\]"):
        resize_layers(model, {"blocks.0.ssm": 0})


def test_argument_errors():
    layer = trained_like(LRU, n=6)
    with pytest.raises(TypeError, match="exactly one of `rank` and `tau`"):
        reduce_layer(layer)
    with pytest.raises(ValueError, match=r"`rank` must be an int in \[1, 6\]"):
        reduce_layer(layer, 7)
    with pytest.raises(ValueError, match="`selection`"):
        reduce_layer(layer, 3, selection="best")
    with pytest.raises(ValueError, match="random"):
        reduce_layer(layer, 3, selection="random", real_output=True)
    assert layer.d_state == 6


@pytest.mark.parametrize("cls", LAYERS)
def test_backward_after_reduction_while_an_old_graph_is_alive(cls):
    # A training loop keeps the last `loss` (and its graph) alive across the reduction.
    layer = trained_like(cls, n=16)
    u = torch.randn(2, 10, 4, dtype=torch.float64)
    loss = layer(u).pow(2).sum()
    loss.backward()
    reduce_layer(layer, 5)
    new_loss = layer(u).pow(2).sum()
    new_loss.backward()
    assert loss.grad_fn is not None
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert p.grad.shape == p.shape, name
