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


# --- through a layer reduction ------------------------------------------------------------------


def _trained_lru(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """An LRU (6 states) and an Adam optimizer with three steps of state."""
    from compressm_torch import LRU

    torch.manual_seed(seed)
    layer = LRU(d_model=3, d_state=6, dtype=torch.float64)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        opt.zero_grad()
        x = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
        layer(x).pow(2).sum().backward()
        opt.step()
    return layer, opt


def _saved(
    layer: torch.nn.Module, opt: torch.optim.Optimizer
) -> dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """``{name: (value, optimizer state)}`` of every parameter, cloned."""
    return {
        name: (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
        for name, p in layer.named_parameters()
    }


def _kept_positions(before: torch.Tensor, after: torch.Tensor, axis: int) -> torch.Tensor:
    """Where each slice of ``after`` along ``axis`` sits in ``before`` (slices must be unique)."""
    old = before.movedim(axis, 0).reshape(before.shape[axis], -1)
    new = after.movedim(axis, 0).reshape(after.shape[axis], -1)
    matches = (new[:, None, :] == old[None, :, :]).all(-1)
    assert bool((matches.sum(-1) == 1).all()), "every kept slice is one old slice"
    return matches.int().argmax(-1)


@pytest.mark.parametrize("resize", [resize_optimizer_state, update_optimizer_state])
def test_random_selection_slices_adam_moments_at_the_kept_states(resize: object) -> None:
    """After ``reduce_layer(selection="random")`` (an index selection), resizing with the
    report's slices leaves, for every state parameter, ``m_new = m_old[..., keep, ...]`` and
    ``v_new = v_old[..., keep, ...]`` exactly, where ``keep`` is read off the parameter values
    themselves; parameters without a state axis keep their state untouched."""
    from compressm_torch import get_adapter, reduce_layer

    layer, opt = _trained_lru()
    before = _saved(layer, opt)
    adapter = get_adapter(layer)
    report = reduce_layer(layer, 4, selection="random", generator=torch.Generator().manual_seed(3))
    assert report.indices is not None
    assert set(report.slices) == set(adapter.state_axes)
    for name, (axis, positions) in report.slices.items():
        param = layer.get_parameter(name)
        old_shape = tuple(before[name][0].shape)
        if resize is update_optimizer_state:
            with pytest.warns(DeprecationWarning, match="resize_optimizer_state"):
                status = update_optimizer_state(
                    opt, param, old_shape, axis=axis, indices=positions
                )
        else:
            status = resize_optimizer_state(opt, param, old_shape, axis=axis, indices=positions)
        assert status == "sliced"
    kept = None
    for name, param in layer.named_parameters():
        value, state = before[name]
        if name not in adapter.state_axes:
            assert param.shape == value.shape
            for key in state:
                torch.testing.assert_close(opt.state[param][key], state[key], rtol=0, atol=0)
            continue
        axis = adapter.state_axes[name]
        keep = _kept_positions(value, param.detach(), axis)
        if kept is None:
            kept = keep
        assert torch.equal(keep, kept), name  # one selection of states for every parameter
        for key in ("exp_avg", "exp_avg_sq"):
            expected = state[key].index_select(axis, keep)
            torch.testing.assert_close(opt.state[param][key], expected, rtol=0, atol=0)
        torch.testing.assert_close(opt.state[param]["step"], state["step"], rtol=0, atol=0)
    assert kept is not None
    assert kept.tolist() == torch.as_tensor(report.indices).tolist()
    opt.zero_grad()
    layer(torch.ones(1, 2, 3, dtype=torch.float64)).sum().backward()
    opt.step()  # Adam steps at the new shapes


@pytest.mark.parametrize(
    ("policy", "status", "step"), [("reset", "reset", 0.0), ("zero", "zeroed", 3.0)]
)
def test_basis_change_resets_adam_moments_of_the_state_parameters(
    policy: str, status: str, step: float
) -> None:
    """After balanced truncation (a change of basis, ``report.slices`` empty), the moments of
    every state parameter are zeros of the new shape and the step count follows ``policy``;
    the state of the other parameters is untouched."""
    from compressm_torch import get_adapter, reduce_layer

    layer, opt = _trained_lru(1)
    before = _saved(layer, opt)
    adapter = get_adapter(layer)
    report = reduce_layer(layer, 3)
    assert report.indices is None
    assert not report.slices
    for name, axis in adapter.state_axes.items():
        param = layer.get_parameter(name)
        old_shape = tuple(before[name][0].shape)
        got = resize_optimizer_state(opt, param, old_shape, axis=axis, policy=policy)  # type: ignore[arg-type]
        assert got == status
    for name, param in layer.named_parameters():
        _, state = before[name]
        if name not in adapter.state_axes:
            for key in state:
                torch.testing.assert_close(opt.state[param][key], state[key], rtol=0, atol=0)
            continue
        assert param.shape[adapter.state_axes[name]] == 3
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state[param][key].shape == param.shape
            assert opt.state[param][key].dtype == state[key].dtype
            assert not opt.state[param][key].any()
        assert float(opt.state[param]["step"]) == step
