"""Parts of ``gpu_suite.py``: the core on a GPU, the LRU at the sCIFAR shape, end to end.

- :func:`core`: :func:`compressm_core.balanced_truncation` of a batch of SISO channels (Mamba
  style, real poles ``exp(dt A)``) on the torch device in float64, against SciPy looped over
  the channels and NumPy batched, with the HSV agreement; and the HSVs of one LRU layer (complex
  poles, real output ``Re(C x)``), torch device against NumPy.
- :func:`lru`: the training step of :class:`compressm_torch.SequenceModel` (LRU blocks) at the
  paper's sCIFAR shape at the large and the reduced state size, in fp32, TF32 and bf16
  autocast, and one reduction event of all layers by :class:`compressm_torch.CompreSSM`.
- :func:`e2e`: the same model trained from scratch for a few hundred steps at full size and
  with CompreSSM cutting in the first 10 % of training: wall times, their ratio, final losses.
"""

from __future__ import annotations

import copy
import statistics
import time
from functools import partial
from typing import Any

from _gpu_common import (
    Record,
    autocast,
    finite,
    progress,
    time_calls,
    torch_device,
    torch_env,
    torch_precision,
)

__all__ = ["core", "core_markdown", "e2e", "e2e_markdown", "lru", "lru_markdown"]

CORE: dict[str, dict[str, Any]] = {
    "full": {"channels": 1536, "n": 16, "rank": 8, "poles": 256, "io": 256, "repeats": 5},
    "smoke": {"channels": 24, "n": 8, "rank": 4, "poles": 8, "io": 4, "repeats": 2},
}
SCIFAR: dict[str, dict[str, Any]] = {
    "full": {"d_model": 512, "layers": 6, "batch": 50, "length": 1024, "big": 384, "small": 96},
    "smoke": {"d_model": 16, "layers": 2, "batch": 2, "length": 16, "big": 16, "small": 4},
}
LRU_TIMING: dict[str, dict[str, Any]] = {
    "full": {"warmup": 3, "repeats": 10, "train_steps": 3, "event_repeats": 2},
    "smoke": {"warmup": 1, "repeats": 2, "train_steps": 2, "event_repeats": 1},
}
E2E: dict[str, dict[str, Any]] = {
    "full": {"steps": 300, "pool": 4},
    "smoke": {"steps": 12, "pool": 2},
}
PRECISIONS = ("fp32", "tf32", "bf16")


def _sizes(table: dict[str, dict[str, Any]], cfg: dict[str, Any]) -> dict[str, Any]:
    return dict(table["smoke" if cfg["smoke"] else "full"])


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# core


def core(cfg: dict[str, Any], rec: Record) -> None:
    """Balanced truncation of many SISO channels and the HSVs of one LRU layer."""
    import numpy as np
    import torch

    import compressm_core as cc
    from core_hsv import dense_members, hsv_errors, lru_layer, mamba_channels, scipy_path

    device = torch_device(cfg)
    s = _sizes(CORE, cfg)
    rec["env"] = torch_env(device)
    rec["config"] = s
    rng = np.random.default_rng(0)

    def on_device(sys: Any) -> Any:
        return type(sys)(*(None if f is None else torch.from_numpy(f).to(device) for f in sys))

    channels = mamba_channels(rng, s["channels"], s["n"])
    dev = on_device(channels)
    members = dense_members(channels, real_output=False)
    rank, repeats = s["rank"], s["repeats"]
    progress(f"core: {s['channels']} SISO channels, n = {s['n']}")
    t_dev = time_calls(lambda: cc.balanced_truncation(dev, rank), device, 1, repeats)
    cpu = torch.device("cpu")
    t_np = time_calls(lambda: cc.balanced_truncation(channels, rank), cpu, 1, repeats)
    t_sp = time_calls(lambda: [scipy_path(m, rank) for m in members], cpu, 0, min(repeats, 2))
    hsv_dev = cc.balanced_truncation(dev, rank).hsv.cpu().numpy()
    hsv_np = np.asarray(cc.balanced_truncation(channels, rank).hsv)
    hsv_sp = np.stack([scipy_path(m, rank)[0] for m in members])
    rec["channels"] = {
        "torch_ms": t_dev["median_ms"],
        "numpy_batched_ms": t_np["median_ms"],
        "scipy_loop_ms": t_sp["median_ms"],
        "scipy_over_torch": t_sp["median_ms"] / t_dev["median_ms"],
        "numpy_over_torch": t_np["median_ms"] / t_dev["median_ms"],
        "hsv_torch_vs_scipy": hsv_errors(hsv_dev, hsv_sp),
        "hsv_numpy_vs_scipy": hsv_errors(hsv_np, hsv_sp),
        "dtype": str(dev.poles.dtype),
        "all_ms": {"torch": t_dev["all_ms"], "numpy": t_np["all_ms"], "scipy": t_sp["all_ms"]},
    }
    progress(f"core: one LRU layer, {2 * s['poles']} real states, m = p = {s['io']}")
    layer = lru_layer(rng, s["poles"], s["io"])
    layer_dev = on_device(layer)
    t_dev = time_calls(
        lambda: cc.hankel_singular_values(layer_dev, real_output=True), device, 1, repeats
    )
    t_np = time_calls(lambda: cc.hankel_singular_values(layer, real_output=True), cpu, 1, repeats)
    hsv_dev = cc.hankel_singular_values(layer_dev, real_output=True).cpu().numpy()
    hsv_np = np.asarray(cc.hankel_singular_values(layer, real_output=True))
    rec["lru_layer"] = {
        "real_states": 2 * s["poles"],
        "torch_ms": t_dev["median_ms"],
        "numpy_ms": t_np["median_ms"],
        "numpy_over_torch": t_np["median_ms"] / t_dev["median_ms"],
        "hsv_torch_vs_numpy": hsv_errors(hsv_dev, hsv_np),
        "all_ms": {"torch": t_dev["all_ms"], "numpy": t_np["all_ms"]},
    }


def core_markdown(r: dict[str, Any]) -> list[str]:
    c, s, lay = r["config"], r.get("channels"), r.get("lru_layer")
    out = []
    if s is not None:
        out.append(
            f"- {c['channels']} SISO channels, n = {c['n']}, rank {c['rank']}, "
            f"`balanced_truncation` batched ({s['dtype']}, {r['env']['device']}): "
            f"{s['torch_ms']:.3g} ms; SciPy looped {s['scipy_loop_ms']:.3g} ms "
            f"({s['scipy_over_torch']:.3g}x); NumPy batched {s['numpy_batched_ms']:.3g} ms "
            f"({s['numpy_over_torch']:.3g}x); HSVs against SciPy: max |Δσ| / σ1 = "
            f"{s['hsv_torch_vs_scipy']['max_abs_over_s1']:.2g} (torch), "
            f"{s['hsv_numpy_vs_scipy']['max_abs_over_s1']:.2g} (NumPy)."
        )
    if lay is not None:
        out.append(
            f"- One LRU layer, {lay['real_states']} real states, m = p = {c['io']}, HSVs: "
            f"{lay['torch_ms']:.3g} ms (torch) vs {lay['numpy_ms']:.3g} ms (NumPy), "
            f"{lay['numpy_over_torch']:.3g}x; max |Δσ| / σ1 = "
            f"{lay['hsv_torch_vs_numpy']['max_abs_over_s1']:.2g}."
        )
    return out


# --------------------------------------------------------------------------------------------
# the LRU at the sCIFAR shape


def _scifar_model(s: dict[str, Any], d_state: int, device: Any, seed: int = 0) -> Any:
    import torch

    from compressm_torch import SequenceModel

    torch.manual_seed(seed)
    model = SequenceModel(
        3, 10, d_model=s["d_model"], d_state=d_state, n_layers=s["layers"], layer="lru"
    )
    return model.to(device)


def _scifar_batches(s: dict[str, Any], count: int, device: Any) -> list[tuple[Any, Any]]:
    """Inputs (batch, length, 3) and labels: the decile of the scaled mean of channel 0."""
    import torch

    gen = torch.Generator().manual_seed(1)
    edges = torch.distributions.Normal(0.0, 1.0).icdf(torch.arange(1, 10) / 10)
    out = []
    for _ in range(count):
        x = torch.randn(s["batch"], s["length"], 3, generator=gen)
        labels = torch.bucketize(x[..., 0].mean(-1) * s["length"] ** 0.5, edges)
        out.append((x.to(device), labels.to(device)))
    return out


class _Trainer:
    """Model, AdamW and the cross-entropy training step in one precision mode."""

    def __init__(self, model: Any, mode: str, device: Any) -> None:
        import torch

        self.model, self.mode, self.device = model, mode, device
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(self, batch: tuple[Any, Any]) -> Any:
        from torch.nn import functional as F

        x, labels = batch
        self.opt.zero_grad(set_to_none=True)
        with autocast(self.mode, self.device):
            loss = F.cross_entropy(self.model(x).float(), labels)
        loss.backward()
        self.opt.step()
        return loss.detach()


def lru(cfg: dict[str, Any], rec: Record) -> None:
    """sCIFAR-shape training steps at two state sizes and precisions; one reduction event."""
    import torch

    from compressm_torch import CompreSSM

    device = torch_device(cfg)
    s, t = _sizes(SCIFAR, cfg), _sizes(LRU_TIMING, cfg)
    rec["env"] = torch_env(device)
    rec["config"] = {**s, **t}
    (batch,) = _scifar_batches(s, 1, device)
    steps: dict[str, dict[str, Any]] = {}
    for mode in PRECISIONS:
        steps[mode] = {}
        with torch_precision(mode):
            for n in (s["big"], s["small"]):
                trainer = _Trainer(_scifar_model(s, n, device), mode, device)
                timing = time_calls(
                    partial(trainer.step, batch), device, t["warmup"], t["repeats"]
                )
                steps[mode][str(n)] = timing
                progress(f"lru: {mode} N = {n}: {timing['median_ms']:.4g} ms")
                del trainer
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        big, small = (steps[mode][str(n)]["median_ms"] for n in (s["big"], s["small"]))
        steps[mode]["ratio"] = big / small
        rec["steps"] = steps
    # one event big -> small on every layer, on copies of a model trained for a few steps
    trainer = _Trainer(_scifar_model(s, s["big"], device), "fp32", device)
    with torch_precision("fp32"):
        for _ in range(t["train_steps"]):
            trainer.step(batch)
    weights = copy.deepcopy(trainer.model.state_dict())
    moments = copy.deepcopy(trainer.opt.state_dict())
    runs: list[dict[str, Any]] = []
    for _ in range(1 + t["event_repeats"]):  # the first one is a warm-up
        model = _scifar_model(s, s["big"], device)
        model.load_state_dict(weights)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        opt.load_state_dict(moments)
        ctl = CompreSSM(
            model,
            opt,
            total_steps=1000,
            mode="fixed",
            fraction=1 - s["small"] / s["big"],
            reduction_steps=[1],
        )
        _sync(device)
        t0 = time.perf_counter()
        events = ctl.step()
        _sync(device)
        runs.append(
            {
                "seconds": time.perf_counter() - t0,
                "ranks": sorted({(e.old_rank, e.new_rank) for e in events}),
                "status": sorted({e.status for e in events}),
                "layers": {e.layer: e.seconds for e in events},
            }
        )
        progress(f"lru: event {runs[-1]['seconds']:.3g} s")
    seconds = statistics.median(r["seconds"] for r in runs[1:])
    step_ms = steps["fp32"][str(s["big"])]["median_ms"]
    rec["event"] = {
        "seconds": seconds,
        "training_steps": seconds * 1e3 / step_ms,
        "first_event_seconds": runs[0]["seconds"],
        "runs": runs,
    }


def lru_markdown(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    big, small = str(c["big"]), str(c["small"])
    out = [
        f"SequenceModel, {c['layers']} LRU blocks, d_model {c['d_model']}, batch {c['batch']}, "
        f"length {c['length']} ({r['env']['device']}); training step, median of "
        f"{c['repeats']} after {c['warmup']} warm-up steps:",
        "",
        f"| precision | N = {big} [ms] | N = {small} [ms] | ratio |",
        "|---|---|---|---|",
    ]
    for mode, row in r.get("steps", {}).items():
        if "ratio" in row:
            out.append(
                f"| {mode} | {row[big]['median_ms']:.4g} | {row[small]['median_ms']:.4g} | "
                f"{row['ratio']:.2f}x |"
            )
    ev = r.get("event")
    if ev is not None:
        ranks = sorted({tuple(x) for run in ev["runs"] for x in run["ranks"]})
        out += [
            "",
            f"One reduction event {big} -> {small} on all {c['layers']} layers (ranks {ranks}): "
            f"{ev['seconds']:.3g} s = {ev['training_steps']:.3g} fp32 training steps at "
            f"N = {big} (first event of the process: {ev['first_event_seconds']:.3g} s).",
        ]
    return out


# --------------------------------------------------------------------------------------------
# end to end


def e2e(cfg: dict[str, Any], rec: Record) -> None:
    """Full-size training against CompreSSM (cuts at 5 % and 10 % of training), wall times."""
    import torch

    from compressm_torch import CompreSSM, state_sizes

    device = torch_device(cfg)
    s, e = _sizes(SCIFAR, cfg), _sizes(E2E, cfg)
    steps = e["steps"]
    cuts = [max(1, steps // 20), max(2, steps // 10)]
    rec["env"] = torch_env(device)
    rec["config"] = {**s, **e, "cuts": cuts, "fraction": 0.5, "precision": "fp32"}
    pool = _scifar_batches(s, e["pool"], device)
    with torch_precision("fp32"):
        for n in (s["big"], s["small"]):  # warm-up of both sizes' kernels and the allocator
            warm = _Trainer(_scifar_model(s, n, device, seed=1), "fp32", device)
            for i in range(2):
                warm.step(pool[i % len(pool)])
        del warm
        arms: dict[str, Any] = {}
        for arm in ("full", "compressm"):
            trainer = _Trainer(_scifar_model(s, s["big"], device), "fp32", device)
            ctl = None
            if arm == "compressm":
                ctl = CompreSSM(
                    trainer.model,
                    trainer.opt,
                    total_steps=steps,
                    mode="fixed",
                    fraction=0.5,
                    reduction_steps=cuts,
                )
            _sync(device)
            t0 = time.perf_counter()
            losses = []
            for i in range(steps):
                losses.append(trainer.step(pool[i % len(pool)]))
                if ctl is not None:
                    ctl.step()
            _sync(device)
            wall = time.perf_counter() - t0
            curve = torch.stack(losses).float().cpu().tolist()
            history = [] if ctl is None else ctl.history
            arms[arm] = {
                "seconds": wall,
                "final_loss": statistics.mean(curve[-10:]),
                "first_loss": curve[0],
                "losses_every_10": curve[::10],
                "finite": all(finite(x) for x in curve),
                "state_sizes": state_sizes(trainer.model),
                "events": [
                    {"step": ev.step, "layer": ev.layer, "old": ev.old_rank, "new": ev.new_rank}
                    for ev in history
                ],
                "event_seconds": sum(ev.seconds for ev in history),
            }
            progress(f"e2e: {arm} {wall:.3g} s, final loss {arms[arm]['final_loss']:.4g}")
            rec["arms"] = arms
            del trainer, ctl
            if device.type == "cuda":
                torch.cuda.empty_cache()
    rec["ratio"] = arms["compressm"]["seconds"] / arms["full"]["seconds"]


def e2e_markdown(r: dict[str, Any]) -> list[str]:
    c, arms = r["config"], r.get("arms", {})
    out = [
        f"{c['steps']} training steps ({c['precision']}) at the sCIFAR LRU shape (batch "
        f"{c['batch']}, length {c['length']}, N0 = {c['big']}); CompreSSM `mode='fixed'`, "
        f"fraction {c['fraction']} at steps {c['cuts']}; synthetic labels (decile of the mean of "
        "one input channel).",
        "",
    ]
    for arm, a in arms.items():
        sizes = sorted(set(a["state_sizes"].values()))
        out.append(
            f"- {arm}: {a['seconds']:.3g} s, loss {a['first_loss']:.3g} -> {a['final_loss']:.3g} "
            f"(finite: {a['finite']}), final state sizes {sizes}, time in events "
            f"{a['event_seconds']:.3g} s."
        )
    if "ratio" in r:
        out.append(
            f"- CompreSSM / full wall time: {r['ratio']:.3f} (speed-up {1 / r['ratio']:.2f}x)."
        )
    return out
