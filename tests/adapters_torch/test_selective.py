"""Selective (Mamba) layers: reference layer, statistics, index-selection reduction, controller.

Real third-party layers: Hugging Face transformers' ``MambaMixer`` / ``Mamba2Mixer`` (pure-torch
path, tiny configs, no download). ``mamba_ssm`` cannot be imported without its CUDA extension,
so its ``Mamba`` and ``Mamba2`` are covered by stand-ins with the same module path, attribute
names and parameter shapes.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from compressm_core import (  # noqa: E402
    init_selective_statistics,
    merge_selective_statistics,
    update_selective_statistics,
)
from compressm_torch import (  # noqa: E402
    LRU,
    CompreSSM,
    Mamba,
    ReductionWarning,
    SelectiveRecorder,
    find_layers,
    get_adapter,
    load_checkpoint,
    reduce_layer,
    reduce_selective_layer,
    resize_layers,
    save_checkpoint,
    selective_importance,
    state_sizes,
    to_state_space,
)

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
)


def reference_mamba(layer, h):
    """Mamba-1 forward in float64, one step at a time, from the equations (independent code)."""
    p = {k: v.detach().double() for k, v in layer.state_dict().items()}
    n, d_inner = layer.d_state, layer.d_inner
    x, z = (h.double() @ p["in_proj.weight"].T).chunk(2, dim=-1)
    length = h.shape[1]
    w = p["conv1d.weight"][:, 0, :]  # (d_inner, K)
    k = w.shape[-1]
    xp = F.pad(x, (0, 0, k - 1, 0))
    conv = sum(xp[:, j : j + length, :] * w[:, j] for j in range(k)) + p["conv1d.bias"]
    u = F.silu(conv)
    r = layer.dt_rank
    dbl = u @ p["x_proj.weight"].T
    delta, b, c = dbl[..., :r], dbl[..., r : r + n], dbl[..., r + n :]
    dt = F.softplus(delta @ p["dt_proj.weight"].T + p["dt_proj.bias"])
    a = -torch.exp(p["A_log"])
    s = torch.zeros(h.shape[0], d_inner, n, dtype=torch.float64)
    ys = []
    for t in range(length):
        s = (
            torch.exp(dt[:, t, :, None] * a) * s
            + dt[:, t, :, None] * b[:, t, None, :] * u[:, t, :, None]
        )
        ys.append((s * c[:, t, None, :]).sum(-1) + p["D"] * u[:, t])
    y = torch.stack(ys, dim=1) * F.silu(z)
    return y @ p["out_proj.weight"].T


def hf_mamba(state_size=16, layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = MambaConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=layers, state_size=state_size
    )
    return MambaForCausalLM(cfg)


def hf_mamba2(state_size=16, groups=2, seed=0):
    torch.manual_seed(seed)
    cfg = Mamba2Config(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=2,
        state_size=state_size,
        num_heads=4,
        head_dim=8,
        n_groups=groups,
        expand=2,
        chunk_size=8,
    )
    return Mamba2ForCausalLM(cfg)


# --- stand-ins for mamba_ssm (same module path, attribute names and shapes) ------------------


class StandInMamba(Mamba):
    """mamba_ssm.modules.mamba_simple.Mamba: same constructor and names as ours."""


StandInMamba.__module__ = "mamba_ssm.modules.mamba_simple"
StandInMamba.__qualname__ = StandInMamba.__name__ = "Mamba"


class StandInMamba2(torch.nn.Module):
    """mamba_ssm.modules.mamba2.Mamba2 layout: in_proj [z0 | x0 | z | xBC | dt], d_mlp > 0."""

    def __init__(self, d_model=16, d_state=12, headdim=4, ngroups=2, d_ssm=16, d_conv=4):
        super().__init__()
        self.d_model, self.d_state, self.headdim, self.ngroups = d_model, d_state, headdim, ngroups
        self.d_inner = 2 * d_model
        self.d_ssm = d_ssm
        self.nheads = d_ssm // headdim
        self.dt_limit = (0.0, float("inf"))
        d_mlp = self.d_inner - d_ssm
        conv_dim = d_ssm + 2 * ngroups * d_state
        self.in_proj = torch.nn.Linear(d_model, 2 * d_mlp + d_ssm + conv_dim + self.nheads)
        self.conv1d = torch.nn.Conv1d(
            conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1
        )
        self.dt_bias = torch.nn.Parameter(torch.rand(self.nheads) - 3)
        self.A_log = torch.nn.Parameter(torch.log(torch.linspace(1, 8, self.nheads)))
        self.D = torch.nn.Parameter(torch.ones(self.nheads))
        self.out_proj = torch.nn.Linear(self.d_inner, d_model, bias=False)

    def forward(self, u, inference_params=None):
        """Plain recurrence in float64 (what the SSD kernels compute)."""
        batch, length, _ = u.shape
        n, g, hd = self.d_state, self.ngroups, self.headdim
        d_mlp = (self.in_proj.out_features - 2 * self.d_ssm - 2 * g * n - self.nheads) // 2
        proj = self.in_proj(u).double()
        z0, x0, z, xbc, dt = torch.split(
            proj,
            [d_mlp, d_mlp, self.d_ssm, self.d_ssm + 2 * g * n, self.nheads],
            dim=-1,
        )
        w = self.conv1d.weight.double()
        xbc = F.conv1d(
            xbc.transpose(1, 2),
            w,
            self.conv1d.bias.double(),
            padding=w.shape[-1] - 1,
            groups=xbc.shape[-1],
        )
        xbc = F.silu(xbc[..., :length]).transpose(1, 2)
        x, b, c = torch.split(xbc, [self.d_ssm, g * n, g * n], dim=-1)
        x = x.reshape(batch, length, self.nheads, hd)
        b = b.reshape(batch, length, g, n).repeat_interleave(self.nheads // g, dim=2)
        c = c.reshape(batch, length, g, n).repeat_interleave(self.nheads // g, dim=2)
        dt = F.softplus(dt + self.dt_bias.double())
        a = -torch.exp(self.A_log.double())
        s = torch.zeros(batch, self.nheads, hd, n, dtype=torch.float64)
        ys = []
        for t in range(length):
            decay = torch.exp(dt[:, t] * a)[:, :, None, None]
            s = decay * s + (dt[:, t, :, None, None] * x[:, t, :, :, None]) * b[:, t, :, None, :]
            y = (s * c[:, t, :, None, :]).sum(-1) + self.D.double()[:, None] * x[:, t]
            ys.append(y.reshape(batch, -1))
        y = torch.stack(ys, dim=1) * F.silu(z)
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return y.float() @ self.out_proj.weight.T


StandInMamba2.__module__ = "mamba_ssm.modules.mamba2"
StandInMamba2.__qualname__ = StandInMamba2.__name__ = "Mamba2"


# --- the reference layer ----------------------------------------------------------------------


def test_mamba_matches_a_float64_step_by_step_reference():
    torch.manual_seed(0)
    layer = Mamba(d_model=6, d_state=5, dt_rank=2)
    h = torch.randn(3, 11, 6)
    torch.testing.assert_close(layer(h).double(), reference_mamba(layer, h), atol=2e-5, rtol=1e-4)
    layer.double()
    out = layer(h.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference_mamba(layer, h), atol=1e-11, rtol=1e-9)


def test_mamba_matches_transformers_mamba_mixer_both_ways():
    hf_layer = hf_mamba(layers=1).backbone.layers[0].mixer
    ours = Mamba(d_model=16, d_state=16)
    assert set(ours.state_dict()) == set(hf_layer.state_dict())
    ours.load_state_dict(hf_layer.state_dict())
    h = torch.randn(2, 9, 16)
    for training in (True, False):
        hf_layer.train(training)
        torch.testing.assert_close(ours(h), hf_layer(h), atol=1e-6, rtol=1e-5)
    # gradients agree too
    ours(h).square().sum().backward()
    hf_layer(h).square().sum().backward()
    theirs = dict(hf_layer.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-5, rtol=1e-4)


def test_mamba_initialisation_and_errors():
    layer = Mamba(d_model=32, d_state=8, expand=2, dt_min=1e-3, dt_max=1e-1)
    assert layer.dt_rank == 2
    assert layer.x_proj.weight.shape == (2 + 16, 64)
    torch.testing.assert_close(layer.A_log[0].exp(), torch.arange(1.0, 9.0))
    dt = F.softplus(layer.dt_proj.bias)
    assert bool(torch.all((dt > 9e-4) & (dt < 0.11)))
    assert layer.A_log._no_weight_decay
    assert layer.D._no_weight_decay
    with pytest.raises(ValueError, match="`d_state`"):
        Mamba(4, 0)
    with pytest.raises(ValueError, match="`hidden_states`"):
        layer(torch.randn(2, 3, 5))


def test_mamba_under_bf16_autocast_runs_the_scan_in_float32():
    torch.manual_seed(0)
    layer = Mamba(d_model=8, d_state=4)
    h = torch.randn(2, 7, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(h)
    torch.testing.assert_close(out.float(), layer(h), atol=0.05, rtol=0.05)


# --- statistics -------------------------------------------------------------------------------


def test_recorder_equals_direct_statistics_and_streams_exactly():
    torch.manual_seed(0)
    layer = Mamba(d_model=8, d_state=6)
    h1, h2 = torch.randn(3, 10, 8), torch.randn(2, 10, 8)
    with SelectiveRecorder(layer) as recorder:
        layer(h1)
        layer(h2)
        layer.eval()
        layer(h1)  # eval passes are ignored by default
    _, _, dt, b, c = layer.selective_inputs(torch.cat([h1, h2]))
    a = -torch.exp(layer.A_log.detach())
    direct = update_selective_statistics(
        init_selective_statistics(a), dt.detach(), a, b.detach(), c.detach()
    )
    got = recorder.statistics[""]
    assert recorder.samples("") == 5 * 10
    for x, y in zip(got, direct, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)
    # two recorders merged = one recorder over both batches
    layer.train()
    parts = []
    for h in (h1, h2):
        with SelectiveRecorder(layer) as rec:
            layer(h)
        parts.append(rec.statistics[""])
    merged = merge_selective_statistics(*parts)
    for x, y in zip(merged, got, strict=True):
        torch.testing.assert_close(x, y)
    layer(h1)  # hooks removed on exit: no error, nothing recorded
    assert recorder.samples("") == 50


def test_recorder_max_sequences_records_the_first_sequences_of_each_batch():
    torch.manual_seed(1)
    layer = Mamba(d_model=8, d_state=6)
    h1, h2 = torch.randn(5, 10, 8), torch.randn(1, 10, 8)
    with SelectiveRecorder(layer, max_sequences=2) as recorder:
        layer(h1)
        layer(h2)
    assert recorder.samples("") == (2 + 1) * 10
    _, _, dt, b, c = layer.selective_inputs(torch.cat([h1[:2], h2]))
    a = -torch.exp(layer.A_log.detach())
    direct = update_selective_statistics(
        init_selective_statistics(a), dt.detach(), a, b.detach(), c.detach()
    )
    for x, y in zip(recorder.statistics[""], direct, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="`max_sequences` must be an int >= 1"):
            SelectiveRecorder(layer, max_sequences=bad)


def test_recorder_ignores_single_step_decoding_and_inactive_periods():
    model = hf_mamba(layers=1)
    recorder = SelectiveRecorder(model, active=False)
    ids = torch.randint(0, 32, (2, 6))
    model(ids)
    assert recorder.statistics == {}
    recorder.active = True
    recorder.training_only = False
    model.eval()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    # the prompt pass counts (2 x 6 samples), the single-step decoding passes do not
    assert recorder.samples("backbone.layers.0.mixer") == 12
    model(ids[:, :4])
    assert recorder.samples("backbone.layers.0.mixer") == 12 + 8
    recorder.remove()
    with pytest.raises(ValueError, match="no selective layer"):
        SelectiveRecorder(LRU(2, 3))
    with pytest.raises(KeyError, match="`layers`"):
        SelectiveRecorder(model, layers=["nope"])


# --- reduction: exactness of the slicing -------------------------------------------------------


def _silence_states(layer, keep):
    """Make the input projection B of every state not in ``keep`` zero (in every group)."""
    adapter = get_adapter(layer)
    groups = adapter.groups(layer) or 1
    n = adapter.state_size(layer)
    drop = torch.tensor([i for i in range(n) if i not in keep], dtype=torch.long)
    with torch.no_grad():
        if hasattr(layer, "x_proj"):  # Mamba-1: B rows of x_proj
            r = layer.x_proj.weight.shape[0] - 2 * n
            layer.x_proj.weight[r + drop] = 0
        else:  # Mamba-2: B channels of the conv (weight and bias): B_t = SiLU(0) = 0
            d_x = layer.conv1d.weight.shape[0] - 2 * groups * n
            for g in range(groups):
                layer.conv1d.weight[d_x + g * n + drop] = 0
                layer.conv1d.bias[d_x + g * n + drop] = 0


def _run(layer, h):
    out = layer(h)
    return out[0] if isinstance(out, tuple) else out


LAYERS = {
    "ours": lambda: Mamba(d_model=16, d_state=12),
    "mamba_ssm.Mamba": lambda: StandInMamba(d_model=16, d_state=12),
    "transformers.MambaMixer": lambda: hf_mamba(12, layers=1).backbone.layers[0].mixer,
    "mamba_ssm.Mamba2": lambda: StandInMamba2(d_state=12),
    "transformers.Mamba2Mixer": lambda: hf_mamba2(12).backbone.layers[0].mixer,
}


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("importance", ["gramian", "mean_lti"])
def test_states_that_are_never_excited_are_dropped_without_changing_the_output(kind, importance):
    torch.manual_seed(1)
    layer = LAYERS[kind]()
    keep = [0, 3, 4, 7, 8, 11]
    _silence_states(layer, keep)
    assert kind.split(".")[0] in {"ours", "mamba_ssm", "transformers"}
    assert get_adapter(layer) is get_adapter(LAYERS[kind]())
    h = torch.randn(3, 14, 16)
    with SelectiveRecorder(layer) as recorder:
        before = _run(layer, h)
    stats = recorder.statistics[""]
    scores = selective_importance(layer, stats, importance=importance)
    dropped = [i for i in range(12) if i not in keep]
    assert float(scores[..., dropped].abs().max()) == 0.0
    assert float(scores[..., keep].min()) > 0.0
    report = reduce_selective_layer(layer, stats, tau=0.0, importance=importance)
    assert report.new_rank == 6
    assert report.error_bound is None
    assert torch.equal(report.indices.reshape(-1, 6)[0], torch.tensor(keep))
    assert get_adapter(layer).state_size(layer) == 6
    for attr in ("d_state", "ssm_state_size"):
        if hasattr(layer, attr):
            assert getattr(layer, attr) == 6
    torch.testing.assert_close(_run(layer, h), before, atol=1e-5, rtol=1e-5)
    # every sliced parameter lost exactly the dropped entries along its state axis
    for name, (axis, pos) in report.slices.items():
        assert layer.get_parameter(name).shape[axis] == pos.numel()


def test_reduction_keeps_parameter_objects_and_grouped_indices():
    layer = LAYERS["transformers.Mamba2Mixer"]()
    params = dict(layer.named_parameters())
    with SelectiveRecorder(layer) as recorder:
        layer(torch.randn(2, 10, 16))
    report = reduce_selective_layer(layer, recorder.statistics[""], rank=4)
    assert report.indices.shape == (2, 4)  # one index set per group
    assert all(p is params[n] for n, p in layer.named_parameters())
    assert layer.conv_dim == 32 + 2 * 2 * 4 == layer.conv1d.groups == layer.conv1d.in_channels
    assert layer.in_proj.weight.shape[0] == 32 + layer.conv_dim + 4
    layer(torch.randn(2, 10, 16))  # still runs


def test_mamba2_ranks_are_rounded_up_for_the_fused_kernels():
    # one group, d_x = 16 conv channels of x: (16 + 2 r) % 8 == 0 needs r % 4 == 0
    layer = StandInMamba2(d_state=12, ngroups=1)
    with SelectiveRecorder(layer) as recorder:
        layer(torch.randn(2, 10, 16))
    report = reduce_selective_layer(layer, recorder.statistics[""], rank=5)
    assert report.new_rank == 8
    assert layer.conv1d.weight.shape[0] % 8 == 0


def test_random_importance_keeps_the_rank_of_the_gramian_rule():
    layer = Mamba(d_model=8, d_state=16)
    with SelectiveRecorder(layer) as recorder:
        layer(torch.randn(4, 20, 8))
    stats = recorder.statistics[""]
    ref = reduce_selective_layer(copy.deepcopy(layer), stats, tau=0.3)
    rnd = reduce_selective_layer(copy.deepcopy(layer), stats, tau=0.3, importance="random")
    assert rnd.new_rank == ref.new_rank
    again = reduce_selective_layer(
        copy.deepcopy(layer), stats, tau=0.3, importance="random", seed=0
    )
    assert torch.equal(again.indices, rnd.indices)


def test_selective_errors_name_the_problem():
    layer = Mamba(d_model=8, d_state=6)
    with SelectiveRecorder(layer) as recorder:
        layer(torch.randn(2, 5, 8))
    stats = recorder.statistics[""]
    with pytest.raises(TypeError, match="exactly one of `rank` and `tau`"):
        reduce_selective_layer(layer, stats)
    with pytest.raises(ValueError, match="`rank` must be an int in \\[1, 6\\]"):
        reduce_selective_layer(layer, stats, rank=7)
    with pytest.raises(ValueError, match="`importance`"):
        reduce_selective_layer(layer, stats, rank=2, importance="hsv")
    with pytest.raises(TypeError, match="not selective"):
        reduce_selective_layer(LRU(2, 4), stats, rank=2)
    with pytest.raises(TypeError, match="selective"):
        to_state_space(layer)
    with pytest.raises(TypeError, match="reduce_selective_layer"):
        reduce_layer(layer, 2)
    bad = stats._replace(count=stats.count * 0)
    with pytest.raises(ValueError, match="at least one sample"):
        reduce_selective_layer(layer, bad, rank=2)
    assert layer.d_state == 6


def test_detection_by_qualified_name_without_importing_mamba_ssm():
    import sys

    model = torch.nn.Sequential(StandInMamba(8, 4), StandInMamba2(d_model=8, d_ssm=8))
    assert list(find_layers(model)) == ["0", "1"]
    assert "mamba_ssm" not in sys.modules
    assert state_sizes(model) == {"0": 4, "1": 12}
    resize_layers(model, {"0": 3, "1": 4})
    assert state_sizes(model) == {"0": 3, "1": 4}
    assert model[0].A_log.shape == (16, 3)
    assert model[1].conv1d.weight.shape[0] == 8 + 2 * 2 * 4
    model(torch.randn(1, 5, 8))


# --- the controller on real transformers models ------------------------------------------------


def _train(model, opt, ctl, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    events = []
    for _ in range(steps):
        ids = torch.randint(0, 32, (4, 16), generator=g)
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        events += ctl.step()
    return events


@pytest.mark.parametrize("make", [hf_mamba, hf_mamba2], ids=["mamba", "mamba2"])
def test_controller_reduces_transformers_models_and_they_still_generate(make, tmp_path):
    model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ctl = CompreSSM(model, opt, total_steps=30, tau=0.3, reduction_steps=[6, 12])
    names = list(ctl.layers)
    assert len(names) == 2
    assert all(n.endswith("mixer") for n in names)
    # moments before the first reduction, to check the exact slicing
    _train(model, opt, ctl, 5)
    snapshot = {
        n: opt.state[p]["exp_avg"].clone() for n, p in model.named_parameters() if p in opt.state
    }
    events = _train(model, opt, ctl, 1, seed=1)
    reduced = [e for e in events if e.status == "reduced"]
    assert reduced
    assert all(e.new_rank < e.old_rank and e.error_bound is None for e in reduced)
    layer = ctl.layers[names[0]]
    for p in model.parameters():
        assert opt.state[p]["exp_avg"].shape == p.shape
    # moments of sliced tensors are sliced, not reset: still non-zero, and a subset of the old
    probe = "A_log" if hasattr(layer, "x_proj") else "conv1d.weight"
    old = snapshot[f"{names[0]}.{probe}"].flatten().tolist()
    moment = opt.state[layer.get_parameter(probe)]["exp_avg"]
    assert float(moment.abs().sum()) > 0
    assert moment.numel() < len(old)
    _train(model, opt, ctl, 24, seed=2)
    assert sum(state_sizes(model).values()) < 2 * 16
    # generation with the cache agrees with full forward passes after the reduction
    model.eval()
    prompt = torch.randint(0, 32, (2, 5))
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False
    )
    with torch.no_grad():
        logits = model(out[:, :-1]).logits
    greedy = logits[:, prompt.shape[1] - 1 :].argmax(-1)
    new = out[:, prompt.shape[1] :]
    eos = model.generation_config.eos_token_id
    for row_greedy, row_new in zip(greedy.tolist(), new.tolist(), strict=True):
        stop = row_new.index(eos) + 1 if eos in row_new else len(row_new)  # then padding
        assert row_greedy[:stop] == row_new[:stop]
    # the reduced model reloads into a freshly built one
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, opt, controller=ctl)
    fresh = make(seed=5)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=3e-3)
    load_checkpoint(path, fresh, fresh_opt)
    fresh.eval()
    torch.testing.assert_close(fresh(out).logits, model(out).logits)
    assert state_sizes(fresh) == state_sizes(model)


def test_controller_slices_optimizer_moments_exactly():
    torch.manual_seed(0)
    model = torch.nn.Sequential(Mamba(8, 12), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ctl = CompreSSM(model, opt, total_steps=10, mode="fixed", fraction=0.5, reduction_steps=[3])
    layer = model[0]
    for _ in range(3):
        loss = model(torch.randn(4, 10, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        a_log = layer.A_log.detach().clone()
        x_proj = layer.x_proj.weight.detach().clone()
        state = {k: v.clone() for k, v in opt.state[layer.A_log].items()}
        xstate = {k: v.clone() for k, v in opt.state[layer.x_proj.weight].items()}
        events = ctl.step()
    (event,) = events
    assert (event.old_rank, event.new_rank) == (12, 6)
    # which columns of A_log were kept (initial values log(1..12) keep them distinct)
    kept = [j for i in range(6) for j in range(12) if torch.equal(layer.A_log[:, i], a_log[:, j])]
    assert len(kept) == 6
    assert kept == sorted(kept)
    rows = [0] + [1 + k for k in kept] + [13 + k for k in kept]
    assert torch.equal(layer.x_proj.weight, x_proj[rows])
    new = opt.state[layer.A_log]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(new[key], state[key][:, kept])
        assert torch.equal(opt.state[layer.x_proj.weight][key], xstate[key][rows])
    assert torch.equal(new["step"], state["step"])  # an exact slice keeps Adam's step count
    loss = model(torch.randn(4, 10, 8)).square().mean()
    loss.backward()
    opt.step()


def test_controller_refuses_without_statistics_and_uses_calibration_batches():
    torch.manual_seed(0)
    model = Mamba(8, 12)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ctl = CompreSSM(model, opt, total_steps=10, mode="fixed", fraction=0.5, reduction_steps=[5])
    with pytest.warns(ReductionWarning, match="no statistics"):
        (event,) = ctl.reduce()
    assert event.status == "refused"
    assert model.d_state == 12
    data = [torch.randn(2, 10, 8) for _ in range(3)]
    ctl = CompreSSM(
        model,
        opt,
        total_steps=10,
        mode="fixed",
        fraction=0.5,
        reduction_steps=[5],
        calibration_batches=[(x, None) for x in data],
    )
    (event,) = ctl.reduce()
    assert event.status == "reduced"
    assert model.d_state == 6
    ctl.remove_hooks()


@pytest.mark.parametrize("sequences", [None, 1])
def test_controller_records_only_in_the_calibration_window(sequences):
    torch.manual_seed(0)
    model = Mamba(8, 12)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ctl = CompreSSM(
        model,
        opt,
        total_steps=20,
        tau=0.5,
        reduction_steps=[10],
        calibration_steps=3,
        calibration_sequences=sequences,
    )
    recorder = ctl._recorder
    seen = []
    for _ in range(12):
        model(torch.randn(2, 6, 8)).sum().backward()
        seen.append(recorder.samples(""))
        opt.step()
        opt.zero_grad()
        ctl.step()
    # steps 8, 9, 10 record (12 samples each, 6 with one sequence of the two); the event at
    # step 10 consumes them
    per_step = 12 if sequences is None else 6
    assert seen == [0] * 7 + [per_step, 2 * per_step, 3 * per_step, 0, 0]
    assert model.d_state < 12
    with pytest.raises(ValueError, match="`calibration_sequences` must be an int >= 1"):
        CompreSSM(model, opt, total_steps=20, calibration_sequences=0)


def test_pragmatic_rollback_restores_a_selective_layer():
    torch.manual_seed(0)
    model = Mamba(8, 12)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ctl = CompreSSM(
        model, opt, total_steps=10, mode="pragmatic", fraction=0.5, reduction_steps=[2]
    )

    def step():
        model(torch.randn(2, 6, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()

    step()
    ctl.step(val_metric=0.9)
    step()
    before = copy.deepcopy(model.state_dict())
    ctl.step()
    assert model.d_state == 6
    events = ctl.step(val_metric=0.1)
    assert [e.status for e in events] == ["rolled_back"]
    assert model.d_state == 12
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    step()  # the optimizer works on the restored shapes
