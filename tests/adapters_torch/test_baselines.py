"""The library parts of the baselines: the Hankel nuclear-norm regulariser, the distillation
loss and the one-shot reduction of a trained model."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

from compressm_core import (  # noqa: E402
    StabilityError,
    balanced_truncation,
    frequency_response,
    hankel_singular_values,
)
from compressm_torch import (  # noqa: E402
    LRU,
    S4D,
    S5,
    Mamba,
    SequenceModel,
    distillation_loss,
    hankel_nuclear_norm,
    hankel_nuclear_norms,
    reduce_layer,
    reduce_model,
    state_sizes,
    to_state_space,
)


class _Penalty(nn.Module):
    """``hankel_nuclear_norm`` of a wrapped layer as a forward pass (for functional_call)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self) -> torch.Tensor:
        return hankel_nuclear_norm(self.layer)


@pytest.mark.parametrize("cls", [LRU, S5, S4D])
def test_regulariser_gradient_matches_finite_differences(cls):
    torch.manual_seed(0)
    layer = cls(2, 4, dtype=torch.float64)
    wrapper = _Penalty(layer)
    names = [name for name, _ in wrapper.named_parameters() if not name.endswith(".D")]
    start = tuple(wrapper.get_parameter(n).detach().clone().requires_grad_() for n in names)

    def penalty(*values: torch.Tensor) -> torch.Tensor:
        return functional_call(wrapper, dict(zip(names, values, strict=True)), ())

    assert torch.autograd.gradcheck(penalty, start, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cls", [LRU, S5])
def test_regulariser_is_the_sum_of_the_hankel_singular_values(cls):
    torch.manual_seed(1)
    model = SequenceModel(3, 2, d_model=4, d_state=8, n_layers=2, layer=cls.__name__.lower())
    norms = hankel_nuclear_norms(model)
    assert list(norms) == ["blocks.0.ssm", "blocks.1.ssm"]
    for name, value in norms.items():
        hsv = hankel_singular_values(to_state_space(model.get_submodule(name)))
        torch.testing.assert_close(value.detach(), hsv.sum())
    total = hankel_nuclear_norm(model)
    torch.testing.assert_close(total, sum(norms.values()))
    total.backward()
    assert all(
        torch.isfinite(p.grad).all()
        for p in model.blocks[0].ssm.parameters()
        if p.grad is not None
    )
    assert model.encoder.weight.grad is None  # only the SSM layers enter the penalty


def test_regulariser_refuses_models_without_lti_layers():
    with pytest.raises(ValueError, match="no layer with a registered adapter"):
        hankel_nuclear_norm(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="selective"):
        hankel_nuclear_norm(Mamba(d_model=4, d_state=4))


def _kd_reference(s, t, y, alpha, temp):
    """The distillation loss written out element by element (natural logs)."""
    total_ce = total_kl = 0.0
    for row_s, row_t, label in zip(s.tolist(), t.tolist(), y.tolist(), strict=True):
        norm = math.log(sum(math.exp(v) for v in row_s))
        total_ce += norm - row_s[label]
        zs = math.log(sum(math.exp(v / temp) for v in row_s))
        zt = math.log(sum(math.exp(v / temp) for v in row_t))
        for vs, vt in zip(row_s, row_t, strict=True):
            log_p, log_q = vt / temp - zt, vs / temp - zs
            total_kl += math.exp(log_p) * (log_p - log_q)
    n = len(y)
    return (1 - alpha) * total_ce / n + alpha * temp**2 * total_kl / n


@pytest.mark.parametrize(("alpha", "temp"), [(0.5, 2.0), (0.2, 1.0), (1.0, 4.0)])
def test_distillation_loss_matches_the_formula(alpha, temp):
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=gen), 3 * torch.randn(5, 4, generator=gen)
    y = torch.randint(4, (5,), generator=gen)
    loss = distillation_loss(s, t, y, alpha=alpha, temperature=temp)
    assert float(loss) == pytest.approx(_kd_reference(s, t, y, alpha, temp), rel=1e-5)


def test_distillation_loss_for_regression_and_its_gradient():
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(3, 7, 2, generator=gen, requires_grad=True)
    t, y = torch.randn(3, 7, 2, generator=gen), torch.randn(3, 7, 2, generator=gen)
    teacher = t.clone().requires_grad_()
    loss = distillation_loss(s, teacher, y, alpha=0.25, kind="regression")
    expected = 0.75 * ((s - y) ** 2).mean() + 0.25 * ((s - t) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert teacher.grad is None  # the teacher is a fixed signal
    with pytest.raises(ValueError, match="`alpha`"):
        distillation_loss(s, t, y, alpha=1.5)
    with pytest.raises(ValueError, match="same shape"):
        distillation_loss(s, t[:1], y)


def test_reduce_model_is_balanced_truncation_at_the_given_ranks():
    torch.manual_seed(2)
    model = SequenceModel(3, 2, d_model=4, d_state=12, n_layers=2).double()
    names = list(state_sizes(model))
    before = {n: to_state_space(model.get_submodule(n)) for n in names}
    reports = reduce_model(model, {names[0]: 5, names[1]: 3})
    assert state_sizes(model) == {names[0]: 5, names[1]: 3}
    omega = torch.linspace(0, math.pi, 33, dtype=torch.float64)
    for name, rank in ((names[0], 5), (names[1], 3)):
        expected = balanced_truncation(before[name], rank)
        after = to_state_space(model.get_submodule(name))
        torch.testing.assert_close(
            frequency_response(after, omega, real_output=True),
            frequency_response(expected.system, omega, real_output=True),
        )
        assert reports[name].error_bound == pytest.approx(float(expected.error_bound))
        assert (reports[name].old_rank, reports[name].new_rank) == (12, rank)


def test_reduce_model_is_all_or_nothing(monkeypatch):
    torch.manual_seed(3)
    model = SequenceModel(3, 2, d_model=4, d_state=10, n_layers=2).double()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="`rank` must be an int in"):
        reduce_model(model, {"blocks.0.ssm": 4, "blocks.1.ssm": 11})
    with pytest.raises(KeyError, match="does not have"):
        reduce_model(model, {"blocks.7.ssm": 4})
    # the second layer fails while it is written: the first is restored
    import compressm_torch.reduction as reduction

    original = reduction._apply
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise StabilityError("refused")
        return original(*args, **kwargs)

    monkeypatch.setattr(reduction, "_apply", failing)
    with pytest.raises(StabilityError, match="refused"):
        reduce_model(model, {"blocks.0.ssm": 4, "blocks.1.ssm": 4})
    assert state_sizes(model) == {"blocks.0.ssm": 10, "blocks.1.ssm": 10}
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[key])


def test_reduce_model_agrees_with_reduce_layer():
    torch.manual_seed(4)
    one = LRU(3, 9, dtype=torch.float64)
    two = LRU(3, 9, dtype=torch.float64)
    two.load_state_dict(one.state_dict())
    reduce_model(one, {"": 4})
    reduce_layer(two, 4)
    for key, value in one.state_dict().items():
        torch.testing.assert_close(value, two.state_dict()[key])


@pytest.mark.parametrize("cls", [LRU, S5, S4D])
def test_readers_differentiable_and_detached(cls):
    """``to_state_space`` stays detached (the feedthrough too, a view of a parameter); the
    adapter's differentiable reader gives the same values with a graph."""
    from compressm_torch import get_adapter

    layer = cls(2, 4, dtype=torch.float64)
    detached = to_state_space(layer)
    assert not any(f.requires_grad for f in detached)
    live = get_adapter(layer).differentiable_state_space(layer)
    assert live.poles.requires_grad
    for a, b in zip(detached, live, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)
