"""`resize_optimizer_state`: per-parameter optimizer state after a reduction (PyTorch)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from compressm_torch import resize_optimizer_state, update_optimizer_state  # noqa: E402


def _trained(optimizer: type, **kw: object) -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
    """A (5, 3) parameter and an optimizer with two steps of state."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3, generator=gen, dtype=torch.float64))
    opt = optimizer([p], lr=1e-2, **kw)
    for _ in range(2):
        opt.zero_grad()
        (p**3).sum().backward()
        opt.step()
    return p, opt


def _shrink(p: torch.nn.Parameter, keep: torch.Tensor | None, axis: int) -> tuple[int, ...]:
    old = tuple(p.shape)
    with torch.no_grad():
        p.data = p.data.index_select(axis, keep) if keep is not None else p.data[:2].clone()
    return old


@pytest.mark.parametrize("axis", [0, 1])
def test_index_selection_slices_every_moment_exactly(axis: int) -> None:
    p, opt = _trained(torch.optim.Adam, amsgrad=True)
    before = {k: v.clone() for k, v in opt.state[p].items()}
    keep = torch.tensor([2, 0])
    old = _shrink(p, keep, axis)
    assert resize_optimizer_state(opt, p, old, axis=axis, indices=keep) == "sliced"
    state = opt.state[p]
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        torch.testing.assert_close(
            state[key], before[key].index_select(axis, keep), rtol=0, atol=0
        )
    torch.testing.assert_close(state["step"], before["step"])  # same coordinates: same age
    opt.zero_grad()
    (p**3).sum().backward()
    opt.step()  # the optimizer steps at the new shape


@pytest.mark.parametrize(
    ("policy", "status", "step"), [("reset", "reset", 0.0), ("zero", "zeroed", 2.0)]
)
def test_basis_change_zeroes_moments_and_resets_the_count_by_policy(
    policy: str, status: str, step: float
) -> None:
    p, opt = _trained(torch.optim.AdamW)
    old = _shrink(p, None, 0)
    assert resize_optimizer_state(opt, p, old, axis=0, policy=policy) == status  # type: ignore[arg-type]
    state = opt.state[p]
    assert state["exp_avg"].shape == p.shape
    assert not state["exp_avg"].any()
    assert state["exp_avg_sq"].shape == p.shape
    assert not state["exp_avg_sq"].any()
    assert float(state["step"]) == step


def test_sgd_momentum_and_untouched_parameters() -> None:
    p, opt = _trained(torch.optim.SGD, momentum=0.9)
    other = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt.add_param_group({"params": [other]})
    other.grad = torch.ones(4, dtype=torch.float64)
    opt.step()
    kept = opt.state[other]["momentum_buffer"]
    keep = torch.tensor([4, 1, 3])
    old = _shrink(p, keep, 0)
    assert resize_optimizer_state(opt, p, old, axis=0, indices=keep) == "sliced"
    assert opt.state[p]["momentum_buffer"].shape == (3, 3)
    assert opt.state[other]["momentum_buffer"] is kept


def test_no_state_and_unknown_layouts() -> None:
    fresh = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([fresh])
    assert resize_optimizer_state(opt, fresh, (6,), axis=0) == "none"
    p, opt = _trained(torch.optim.Adam)
    opt.state[p]["odd"] = torch.zeros(7)  # a state tensor of neither shape
    old = _shrink(p, torch.tensor([0, 1]), 0)
    assert resize_optimizer_state(opt, p, old, axis=0, indices=torch.tensor([0, 1])) == "dropped"
    assert p not in opt.state


def test_the_old_name_is_a_deprecated_alias() -> None:
    p, opt = _trained(torch.optim.Adam)
    keep = torch.tensor([1, 3])
    old = _shrink(p, keep, 0)
    with pytest.warns(DeprecationWarning, match="resize_optimizer_state"):
        assert update_optimizer_state(opt, p, old, axis=0, indices=keep) == "sliced"
    assert opt.state[p]["exp_avg"].shape == (2, 3)
