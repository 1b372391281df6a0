"""Training cost of the LRU against its state size, and one reduction event at the sCIFAR shape.

Two parts, each measured in fresh worker processes (``--worker``) on the CPU or, with
``--device cuda``, on a GPU:

1. **State-size sweep.** One :class:`compressm_torch.LRU` layer (input requiring a gradient, as
   inside a network), loss ``mean(y**2)``, AdamW: the time of a training step (forward, backward,
   optimizer step, each timed) and its peak memory for ``d_state`` in {8, ..., 1024} at a fixed
   ``(batch, length, d_model)``; ratios to ``d_state = 8`` and ``step(N) / step(N/4)``, the
   speed-up that a 4x reduction from ``N`` buys.
2. **The paper's sCIFAR shape.** A 6-block :class:`compressm_torch.SequenceModel` (input 3,
   10 classes, mean pooling, cross-entropy), ``d_model = 512``:

   a. the training step at ``d_state = 384`` and at ``96`` (a model built at 96), and the
      speed-up ``step(384) / step(96)`` (goal: at least 1.5);
   b. one reduction event 384 -> 96 on all six layers, the way training does it: a model trained
      for a few steps (so AdamW has moments), ``CompreSSM(model, opt, mode="fixed",
      fraction=0.75, reduction_steps=[1])`` and a timed ``ctl.step()`` (HSVs, balanced
      truncation, write-back, optimizer surgery, per layer in the events' ``seconds``); the goal
      is an event shorter than two training steps at 384. The reduced model's step is timed too;
   c. where the time goes: the forward and backward of ``diagonal_scan`` alone at one layer's
      shape, and a ``torch.profiler`` table of one training step at 384 and at 96.

Times are medians of several steps after warm-up steps; ``torch`` keeps its default number of
threads (recorded). Peak memory is what one steady-state training step allocates above what was
allocated when it started (activations saved for the backward, gradients, temporaries): on the
GPU ``torch.cuda.max_memory_allocated``, on the CPU the running sum of the allocation and free
events of the CPU allocator recorded by ``torch.profiler`` (``profile_memory=True``) during the
step; the CPU worker also records the resident-set growth of that step (``VmHWM``), which
understates it because glibc keeps freed pages from the warm-up steps.

Usage::

    python benchmarks/torch_lru.py                 # full CPU run, 2.5 minutes on 2 quiet cores
    python benchmarks/torch_lru.py --quick         # smoke test, about a minute
    python benchmarks/torch_lru.py --device cuda   # on a GPU: the paper's length 1024

Writes ``torch_lru.json`` and ``torch_lru.md`` (``torch_lru_cuda.*`` with ``--device cuda``)
under ``--out`` (default ``benchmarks/results``, ``benchmarks/results/quick`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

import compressm_core as cc
from _cpu import BUSY_THRESHOLD, CpuSample, cpu_busy, cpu_model, cpu_sample, others_share
from compressm_torch import LRU, CompreSSM, SequenceModel
from compressm_torch._scan import diagonal_scan

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
GOAL_SPEEDUP = 1.5  # step(384) / step(96) at the sCIFAR shape, at least
GOAL_EVENT_STEPS = 2.0  # reduction event / step(384), below
LR = 1e-3


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class Config:
    """Shapes, repeats and time limits of one run."""

    d_states: tuple[int, ...]  # sweep of the single layer
    batch: int
    length: int
    d_model: int
    scifar_batch: int
    scifar_length: int
    scifar_d_model: int
    scifar_layers: int
    scifar_d_state: int
    scifar_reduced: int
    warmup_steps: int = 2
    min_repeats: int = 3
    max_repeats: int = 25
    budget_s: float = 4.0  # repeats stop after this much time (once min_repeats are done)
    train_steps: int = 3  # training steps before the reduction event (AdamW moments)
    event_repeats: int = 3  # timed events after a warm-up event
    scan_repeats: int = 3
    profile_rows: int = 12
    idle_wait_s: float = 0.0  # before each worker, wait up to this long for idle CPUs ...
    idle_wait_total_s: float = 0.0  # ... and this long in all
    retry_limit_s: float = 60.0  # rerun a disturbed worker that took less than this
    worker_timeout_s: float = 900.0
    seed: int = 0


SWEEP = (8, 16, 32, 64, 128, 256, 512, 1024)

FULL_CPU = Config(
    d_states=SWEEP,
    batch=16,
    length=1024,
    d_model=128,
    scifar_batch=8,
    scifar_length=256,
    scifar_d_model=512,
    scifar_layers=6,
    scifar_d_state=384,
    scifar_reduced=96,
    idle_wait_s=15.0,
    idle_wait_total_s=60.0,
)

FULL_CUDA = replace(
    FULL_CPU,
    scifar_batch=50,  # the LRU paper's sCIFAR batch size
    scifar_length=1024,
    warmup_steps=3,
    min_repeats=10,
    max_repeats=50,
    budget_s=3.0,
)

QUICK_CPU = Config(
    d_states=(8, 16, 32, 64),
    batch=2,
    length=128,
    d_model=32,
    scifar_batch=2,
    scifar_length=64,
    scifar_d_model=64,
    scifar_layers=6,
    scifar_d_state=48,
    scifar_reduced=12,
    warmup_steps=1,
    min_repeats=3,
    max_repeats=5,
    budget_s=0.3,
    train_steps=2,
    event_repeats=2,
    scan_repeats=2,
    profile_rows=8,
)

QUICK_CUDA = replace(QUICK_CPU, min_repeats=5, max_repeats=10)

CONFIGS = {
    ("full", "cpu"): FULL_CPU,
    ("full", "cuda"): FULL_CUDA,
    ("quick", "cpu"): QUICK_CPU,
    ("quick", "cuda"): QUICK_CUDA,
}


# --------------------------------------------------------------------------------------------
# Worker side: training steps, timing and memory in a fresh process


class Trainer:
    """A model, its AdamW optimizer and one fixed batch; a step is forward, backward, update."""

    def __init__(
        self, model: torch.nn.Module, inputs: torch.Tensor, loss: Callable[[torch.Tensor], Any]
    ) -> None:
        self.model = model
        self.inputs = inputs
        self.loss = loss
        self.opt = torch.optim.AdamW(model.parameters(), lr=LR)

    def forward(self) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        self.inputs.grad = None
        out: torch.Tensor = self.loss(self.model(self.inputs))
        return out

    def step(self) -> None:
        self.forward().backward()
        self.opt.step()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(trainer: Trainer, device: torch.device) -> list[float]:
    """Seconds of the forward (with the loss), the backward and the optimizer step."""
    if device.type == "cuda":
        synchronize(device)
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        marks[0].record()
        loss = trainer.forward()
        marks[1].record()
        loss.backward()
        marks[2].record()
        trainer.opt.step()
        marks[3].record()
        marks[3].synchronize()
        return [marks[i].elapsed_time(marks[i + 1]) / 1000 for i in range(3)]
    t0 = time.perf_counter()
    loss = trainer.forward()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    trainer.opt.step()
    t3 = time.perf_counter()
    return [t1 - t0, t2 - t1, t3 - t2]


def pooled_share(samples: Sequence[tuple[CpuSample | None, CpuSample | None]]) -> float | None:
    """Others' CPU share over several runs together (short runs are unknown one by one)."""
    if not samples or any(a is None or b is None for a, b in samples):
        return None
    total = sum(b.total - a.total for a, b in samples)  # type: ignore[union-attr]
    idle = sum(b.idle - a.idle for a, b in samples)  # type: ignore[union-attr]
    own = sum(b.own_s - a.own_s for a, b in samples)  # type: ignore[union-attr]
    return others_share(CpuSample(0, 0, 0.0), CpuSample(total, idle, own))


def disturbed(share: float | None) -> bool:
    return share is not None and share > BUSY_THRESHOLD


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of the undisturbed runs (of all runs if fewer than half are undisturbed)."""
    clean = [r for r in runs if not disturbed(r["others_cpu"])]
    kept = clean if 2 * len(clean) >= len(runs) else runs
    share = pooled_share([r["_samples"] for r in kept])
    out: dict[str, Any] = {
        key: statistics.median(r[key] for r in kept)
        for key in ("seconds", "forward_s", "backward_s", "optimizer_s")
        if key in kept[0]
    }
    out.update(
        min_seconds=min(r["seconds"] for r in kept),
        repeats=len(runs),
        kept=len(kept),
        all_seconds=[r["seconds"] for r in runs],
        others_cpu=share,
        disturbed=disturbed(share),
    )
    return out


def time_steps(trainer: Trainer, device: torch.device, cfg: dict[str, Any]) -> dict[str, Any]:
    """Warm-up steps, then repeats (at least ``min_repeats``, more while within the budget)."""
    for _ in range(cfg["warmup_steps"]):
        timed_step(trainer, device)
    runs: list[dict[str, Any]] = []
    spent = 0.0
    while len(runs) < cfg["max_repeats"] and (
        len(runs) < cfg["min_repeats"] or spent < cfg["budget_s"]
    ):
        before = cpu_sample()
        parts = timed_step(trainer, device)
        after = cpu_sample()
        seconds = sum(parts)
        runs.append(
            {
                "seconds": seconds,
                "forward_s": parts[0],
                "backward_s": parts[1],
                "optimizer_s": parts[2],
                "others_cpu": others_share(before, after),
                "_samples": (before, after),
            }
        )
        spent += seconds
    return summarise(runs)


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _profiler_peak(prof: Any) -> float | None:
    """Peak of the running sum of the CPU allocator's events in a profile, in bytes."""
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:
        return None
    events = [e for e in events if e.device_type() == torch.autograd.DeviceType.CPU]
    if not events:
        return None
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return float(peak)


def memory_step(trainer: Trainer, device: torch.device) -> dict[str, Any]:
    """Peak memory one steady-state training step allocates above what it started with."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        trainer.step()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        return {"peak_mib": peak / MIB, "method": "torch.cuda.max_memory_allocated"}
    exact = _reset_peak_rss()
    base_kib = _status_kib("VmRSS")
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        trainer.step()
    hwm_kib = _status_kib("VmHWM")
    out: dict[str, Any] = {"method": "torch.profiler CPU allocator events (profile_memory)"}
    peak = _profiler_peak(prof)
    out["peak_mib"] = None if peak is None else peak / MIB
    if exact and base_kib is not None and hwm_kib is not None:
        out["peak_rss_growth_mib"] = max(0, hwm_kib - base_kib) / 1024
    return out


def op_table(trainer: Trainer, device: torch.device, rows: int) -> dict[str, Any]:
    """``torch.profiler`` self time per operator for one training step, largest first."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        trainer.step()
        synchronize(device)
    averages = prof.key_averages()

    def self_us(e: Any) -> float:
        if device.type == "cuda":
            return float(
                getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0))
            )
        return float(e.self_cpu_time_total)

    total = sum(self_us(e) for e in averages) or 1.0
    top = sorted(averages, key=self_us, reverse=True)[:rows]
    return {
        "clock": "self device time" if device.type == "cuda" else "self CPU time",
        "total_s": total / 1e6,
        "rows": [
            {
                "op": e.key,
                "self_s": self_us(e) / 1e6,
                "share": self_us(e) / total,
                "calls": int(e.count),
            }
            for e in top
        ],
    }


def scan_alone(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Forward + backward of ``diagonal_scan`` alone at one layer's (batch, length, d_state)."""
    b, n, d_state = spec["batch"], spec["length"], spec["d_state"]
    layer = LRU(spec["d_model"], d_state, device=device)
    poles = layer.discrete_system()[0].detach().requires_grad_(True)
    v = torch.randn(b, n, d_state, dtype=torch.complex64, device=device, requires_grad=True)
    grad = torch.randn_like(v)

    def run() -> float:
        synchronize(device)
        start = time.perf_counter()
        diagonal_scan(poles, v).backward(grad)
        synchronize(device)
        poles.grad = v.grad = None
        return time.perf_counter() - start

    run()
    times = [run() for _ in range(spec["scan_repeats"])]
    return {"seconds": statistics.median(times), "all_seconds": times}


def build_model(spec: dict[str, Any], d_state: int, device: torch.device) -> torch.nn.Module:
    if spec["kind"] == "lru_step":
        return LRU(spec["d_model"], d_state, device=device)
    model = SequenceModel(
        3, 10, d_model=spec["d_model"], d_state=d_state, n_layers=spec["layers"], layer="lru"
    )
    return model.to(device)


def make_trainer(spec: dict[str, Any], model: torch.nn.Module, device: torch.device) -> Trainer:
    gen = torch.Generator(device="cpu").manual_seed(spec["seed"] + 1)
    b, n = spec["batch"], spec["length"]
    if spec["kind"] == "lru_step":
        u = torch.randn(b, n, spec["d_model"], generator=gen).to(device).requires_grad_(True)
        return Trainer(model, u, lambda y: y.pow(2).mean())
    x = torch.randn(b, n, 3, generator=gen).to(device)
    labels = torch.randint(0, 10, (b,), generator=gen).to(device)
    return Trainer(model, x, lambda y: F.cross_entropy(y, labels))


def step_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Time and measure the training step of one layer or model."""
    device = torch.device(spec["device"])
    torch.manual_seed(spec["seed"])
    trainer = make_trainer(spec, build_model(spec, spec["d_state"], device), device)
    out: dict[str, Any] = {"run": time_steps(trainer, device, spec)}
    out["memory"] = memory_step(trainer, device)
    if spec.get("profile"):
        out["ops"] = op_table(trainer, device, spec["profile_rows"])
        out["scan"] = scan_alone(spec, device)
    return out


def event_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One reduction event by the controller on a trained model, timed; then the reduced step."""
    device = torch.device(spec["device"])
    torch.manual_seed(spec["seed"])
    spec = {**spec, "kind": "model_step"}
    trainer = make_trainer(spec, build_model(spec, spec["d_state"], device), device)
    for _ in range(spec["train_steps"]):
        trainer.step()
    model_state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    opt_state = copy.deepcopy(trainer.opt.state_dict())
    fraction = 1 - spec["reduced"] / spec["d_state"]
    events_runs: list[dict[str, Any]] = []
    for _ in range(1 + spec["event_repeats"]):  # the first event is the warm-up
        model = build_model(spec, spec["d_state"], device)
        model.load_state_dict(model_state)
        trainer = make_trainer(spec, model, device)
        trainer.opt.load_state_dict(opt_state)
        ctl = CompreSSM(
            model,
            trainer.opt,
            total_steps=1000,
            mode="fixed",
            fraction=fraction,
            reduction_steps=[1],
        )
        gc.collect()
        synchronize(device)
        before = cpu_sample()
        start = time.perf_counter()
        events = ctl.step()
        synchronize(device)
        seconds = time.perf_counter() - start
        after = cpu_sample()
        events_runs.append(
            {
                "seconds": seconds,
                "others_cpu": others_share(before, after),
                "_samples": (before, after),
                "layers": {e.layer: e.seconds for e in events},
                "status": sorted({e.status for e in events}),
                "ranks": sorted({(e.old_rank, e.new_rank) for e in events}),
            }
        )
    first, timed = events_runs[0], events_runs[1:]
    summary = summarise(timed)
    names = list(timed[0]["layers"])
    middle = min(timed, key=lambda r: abs(r["seconds"] - summary["seconds"]))
    summary["layers"] = middle["layers"]  # the breakdown of the median event
    summary["layers_median"] = {
        name: statistics.median(r["layers"][name] for r in timed) for name in names
    }
    summary["all_layers"] = [r["layers"] for r in timed]
    summary["first_event_seconds"] = first["seconds"]
    summary["status"] = sorted({s for r in events_runs for s in r["status"]})
    summary["ranks"] = sorted({tuple(x) for r in events_runs for x in r["ranks"]})
    summary["fraction"] = fraction
    out: dict[str, Any] = {"run": summary}
    out["reduced_step"] = time_steps(trainer, device, spec)  # the last reduced model
    return out


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    fn = event_worker if spec["kind"] == "event" else step_worker
    out = fn(spec)
    out["torch_threads"] = torch.get_num_threads()
    out["worker_seconds"] = time.perf_counter() - start
    return out


# --------------------------------------------------------------------------------------------
# Parent side: spawn workers, wait for idle CPUs, retry disturbed runs


class IdleGate:
    """Wait for other processes to leave the CPUs, within a total waiting budget."""

    def __init__(self, per_call_s: float, total_s: float) -> None:
        self.per_call_s = per_call_s
        self.left_s = total_s

    def wait(self) -> float | None:
        start = time.monotonic()
        deadline = start + min(self.per_call_s, self.left_s)
        busy = cpu_busy()
        while busy is not None and busy > BUSY_THRESHOLD and time.monotonic() < deadline:
            busy = cpu_busy(1.0)
        self.left_s = max(0.0, self.left_s - (time.monotonic() - start))
        return busy


class Runner:
    """Runs each measurement in a fresh process; again (once) if other processes disturbed it."""

    def __init__(self, cfg: Config, device: str) -> None:
        self.cfg = cfg
        self.device = device
        self.gate = IdleGate(cfg.idle_wait_s, cfg.idle_wait_total_s)
        self.start = time.monotonic()

    def base_spec(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "device": self.device,
            "seed": cfg.seed,
            "warmup_steps": cfg.warmup_steps,
            "min_repeats": cfg.min_repeats,
            "max_repeats": cfg.max_repeats,
            "budget_s": cfg.budget_s,
            "profile_rows": cfg.profile_rows,
            "scan_repeats": cfg.scan_repeats,
        }

    def spawn(self, spec: dict[str, Any]) -> dict[str, Any]:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        try:
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=self.cfg.worker_timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {self.cfg.worker_timeout_s:.0f} s"}
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
            print(proc.stderr[-3000:], file=sys.stderr)
            return {"error": f"worker failed ({proc.returncode}): {tail[0]}"}
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return result

    def measure(self, spec: dict[str, Any], label: str) -> dict[str, Any]:
        busy_before = self.gate.wait()
        tries = [self.spawn(spec)]
        while (
            "run" in tries[-1]
            and tries[-1]["run"]["disturbed"]
            and len(tries) < 2
            and tries[-1]["worker_seconds"] < self.cfg.retry_limit_s
        ):
            self.gate.wait()
            tries.append(self.spawn(spec))
        ok = [t for t in tries if "run" in t]
        if ok:
            clean = [t for t in ok if not t["run"]["disturbed"]] or ok
            kept = min(clean, key=lambda t: t["run"]["seconds"])
        else:
            kept = tries[-1]
        kept["others_cpu_before"] = busy_before
        kept["attempts"] = len(tries)
        if "run" in kept:
            run = kept["run"]
            mem = kept.get("memory", {}).get("peak_mib")
            print(
                f"[{label}] {run['seconds']:.4g} s"
                + ("" if mem is None else f", peak {mem:.0f} MiB")
                + (" (disturbed)" if run["disturbed"] else ""),
                file=sys.stderr,
                flush=True,
            )
        else:
            print(f"[{label}] {kept['error']}", file=sys.stderr, flush=True)
        return kept

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def sweep(runner: Runner) -> list[dict[str, Any]]:
    cfg = runner.cfg
    rows = []
    for d_state in cfg.d_states:
        spec = {
            **runner.base_spec(),
            "kind": "lru_step",
            "d_state": d_state,
            "batch": cfg.batch,
            "length": cfg.length,
            "d_model": cfg.d_model,
        }
        result = runner.measure(spec, f"LRU d_state={d_state}")
        rows.append({"d_state": d_state, **result})
    base = next((r for r in rows if "run" in r), None)
    by_size = {r["d_state"]: r for r in rows if "run" in r}
    for r in rows:
        if "run" not in r:
            continue
        secs = r["run"]["seconds"]
        r["step_over_smallest"] = secs / base["run"]["seconds"] if base else None
        quarter = by_size.get(r["d_state"] // 4) if r["d_state"] % 4 == 0 else None
        r["step_over_quarter"] = secs / quarter["run"]["seconds"] if quarter else None
        mem, mem0 = r["memory"].get("peak_mib"), base["memory"].get("peak_mib") if base else None
        r["memory_over_smallest"] = mem / mem0 if mem and mem0 else None
    return rows


def scifar(runner: Runner) -> dict[str, Any]:
    cfg = runner.cfg
    shape = {
        "batch": cfg.scifar_batch,
        "length": cfg.scifar_length,
        "d_model": cfg.scifar_d_model,
        "layers": cfg.scifar_layers,
    }
    steps = {}
    for d_state in (cfg.scifar_d_state, cfg.scifar_reduced):
        spec = {
            **runner.base_spec(),
            **shape,
            "kind": "model_step",
            "d_state": d_state,
            "profile": True,
        }
        steps[d_state] = runner.measure(spec, f"sCIFAR model d_state={d_state}")
    spec = {
        **runner.base_spec(),
        **shape,
        "kind": "event",
        "d_state": cfg.scifar_d_state,
        "reduced": cfg.scifar_reduced,
        "train_steps": cfg.train_steps,
        "event_repeats": cfg.event_repeats,
    }
    event = runner.measure(spec, f"reduction event {cfg.scifar_d_state} -> {cfg.scifar_reduced}")
    big, small = steps[cfg.scifar_d_state], steps[cfg.scifar_reduced]
    out: dict[str, Any] = {
        "shape": shape,
        "d_state": cfg.scifar_d_state,
        "reduced": cfg.scifar_reduced,
        "steps": {str(k): v for k, v in steps.items()},
        "event": event,
        "speedup": None,
        "event_over_step": None,
    }
    if "run" in big and "run" in small:
        out["speedup"] = big["run"]["seconds"] / small["run"]["seconds"]
        layers = cfg.scifar_layers
        for entry in (big, small):
            entry["scan_share"] = layers * entry["scan"]["seconds"] / entry["run"]["seconds"]
    if "run" in big and "run" in event:
        out["event_over_step"] = event["run"]["seconds"] / big["run"]["seconds"]
        out["reduced_speedup"] = big["run"]["seconds"] / event["reduced_step"]["seconds"]
    return out


# --------------------------------------------------------------------------------------------
# Reporting


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device,
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "processor": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "compressm_core": cc.__version__,
        "load_average_start": list(os.getloadavg()),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def _s(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def _x(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _mark(entry: dict[str, Any]) -> str:
    return " †" if entry.get("run", {}).get("disturbed") else ""


def _phases(run: dict[str, Any]) -> str:
    return f"{run['forward_s']:.3g} / {run['backward_s']:.3g} / {run['optimizer_s']:.3g}"


def sweep_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| d_state | step [s] | fwd / bwd / AdamW [s] | step / step(8) | step(N) / step(N/4) "
        "| peak memory [MiB] | memory / memory(8) | steps timed |",
        "|" + "---|" * 8,
    ]
    for r in rows:
        if "run" not in r:
            lines.append(f"| {r['d_state']} | {r['error']} |" + " |" * 6)
            continue
        run, mem = r["run"], r["memory"]
        lines.append(
            f"| {r['d_state']}{_mark(r)} | {run['seconds']:.3g} | {_phases(run)} "
            f"| {_x(r['step_over_smallest'])} | {_x(r['step_over_quarter'])} "
            f"| {_s(mem.get('peak_mib'))} | {_x(r['memory_over_smallest'])} "
            f"| {run['kept']}/{run['repeats']} |"
        )
    return "\n".join(lines)


def scifar_tables(res: dict[str, Any]) -> str:
    n, r = res["d_state"], res["reduced"]
    lines = [
        "| model | step [s] | fwd / bwd / AdamW [s] | peak memory [MiB] "
        "| scan fwd+bwd, all layers [s] (share of step) |",
        "|" + "---|" * 5,
    ]
    for key, label in ((str(n), f"d_state {n}"), (str(r), f"d_state {r} (built at {r})")):
        e = res["steps"][key]
        if "run" not in e:
            lines.append(f"| {label} | {e['error']} | | | |")
            continue
        scan = res["shape"]["layers"] * e["scan"]["seconds"]
        share = e.get("scan_share")
        lines.append(
            f"| {label}{_mark(e)} | {e['run']['seconds']:.3g} | {_phases(e['run'])} "
            f"| {_s(e['memory'].get('peak_mib'))} | {scan:.3g} ({_pct(share)}) |"
        )
    ev = res["event"]
    if "run" in ev:
        red = ev["reduced_step"]
        lines.append(
            f"| d_state {r} (reduced by the event){' †' if red['disturbed'] else ''} "
            f"| {red['seconds']:.3g} | {_phases(red)} | – | – |"
        )
    lines += [
        "",
        f"Speed-up step({n}) / step({r}), models built at each size: **{_x(res['speedup'])}** "
        f"(goal ≥ {GOAL_SPEEDUP}); step({n}) / step of the model reduced by the event: "
        f"{_x(res.get('reduced_speedup'))}.",
        "",
    ]
    if "run" not in ev:
        lines.append(f"Reduction event: {ev['error']}")
        return "\n".join(lines)
    run = ev["run"]
    layers = " ".join(f"{v:.3g}" for v in run["layers"].values())
    rest = run["seconds"] - sum(run["layers"].values())
    lines += [
        f"| reduction event {n} -> {r}, {len(run['layers'])} layers | seconds |",
        "|---|---|",
        f"| whole event, `ctl.step()` (median of {run['kept']}){_mark(ev)} "
        f"| {run['seconds']:.3g} |",
        f"| first event in the process (warm-up, not in the median) "
        f"| {run['first_event_seconds']:.3g} |",
        f"| per layer in that event (HSVs, truncation, write-back, AdamW surgery) | {layers} |",
        f"| outside the layers | {rest:.2g} |",
        f"| event / step({n}) | **{_x(res['event_over_step'])}** (goal < {GOAL_EVENT_STEPS:g}) |",
    ]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"


def ops_tables(res: dict[str, Any]) -> str:
    lines: list[str] = []
    for key, e in res["steps"].items():
        if "ops" not in e:
            continue
        ops = e["ops"]
        lines += [
            f"One training step at d_state {key} under `torch.profiler` ({ops['clock']}, "
            f"{ops['total_s']:.3g} s in all, profiler overhead included):",
            "",
            "| operator | self [s] | share | calls |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| `{row['op']}` | {row['self_s']:.3g} | {_pct(row['share'])} | {row['calls']} |"
            for row in ops["rows"]
        ]
        lines.append("")
    return "\n".join(lines)


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    res = result["scifar"]
    n, r = res["d_state"], res["reduced"]
    out = []
    v = res["speedup"]
    out.append(
        {
            "goal": f"sCIFAR shape: step({n}) / step({r}) >= {GOAL_SPEEDUP}",
            "measured": v,
            "met": None if v is None else v >= GOAL_SPEEDUP,
        }
    )
    v = res["event_over_step"]
    out.append(
        {
            "goal": f"sCIFAR shape: reduction event {n} -> {r} "
            f"< {GOAL_EVENT_STEPS:g} steps at {n}",
            "measured": v,
            "met": None if v is None else v < GOAL_EVENT_STEPS,
        }
    )
    return out


def notes(result: dict[str, Any]) -> list[str]:
    cfg = result["config"]
    out = [
        "Times: median wall-clock seconds of the timed training steps after "
        f"{cfg['warmup_steps']} warm-up steps (at least {cfg['min_repeats']}, more while under "
        f"{cfg['budget_s']:g} s, at most {cfg['max_repeats']}), each measurement in a fresh "
        "process; forward (zero_grad, model, loss), backward and AdamW step timed apart"
        + (" with CUDA events." if result["machine"]["device"] == "cuda" else "."),
        "Sweep: one LRU layer, input (batch, length, d_model) requiring a gradient as inside a "
        "network, loss mean(y²), AdamW (lr 1e-3). step(N) / step(N/4) is what a 4x reduction "
        "from N saves.",
        "sCIFAR: SequenceModel(3, 10, n_layers=6, layer='lru', pool='mean'), pre-LayerNorm, "
        "GELU, GLU blocks, cross-entropy on random data; the scan column is 6 x the forward and "
        "backward of diagonal_scan alone at one layer's (batch, length, d_state), complex64.",
        "Reduction event: a model trained for "
        f"{cfg['train_steps']} steps, then CompreSSM(mode='fixed', fraction="
        f"{result['scifar']['event'].get('run', {}).get('fraction', float('nan')):.4g}, "
        "reduction_steps=[1]) and one timed ctl.step() on a fresh copy (same weights and AdamW "
        f"state) per repeat: one warm-up event, then the median of {cfg['event_repeats']}.",
    ]
    if result["machine"]["device"] == "cuda":
        out.append(
            "Peak memory: torch.cuda.max_memory_allocated during one steady-state step minus "
            "torch.cuda.memory_allocated at its start."
        )
    else:
        out.append(
            "Peak memory: bytes allocated by torch's CPU allocator during one steady-state step "
            "above those allocated at its start (running sum of the allocation events that "
            "torch.profiler records with profile_memory=True): activations saved for the "
            "backward, gradients, temporaries. The JSON also has the resident-set growth of "
            "that step (VmHWM reset through /proc/self/clear_refs), an underestimate: glibc "
            "keeps freed pages from the warm-up steps."
        )
    out.append(
        f"†: other processes took more than {BUSY_THRESHOLD:.0%} of the CPUs during the kept "
        "runs (from /proc/stat, this process's CPU time subtracted); before each measurement "
        "the script waits for idle CPUs and reruns a disturbed measurement once."
    )
    return out


def markdown_report(result: dict[str, Any]) -> str:
    info, cfg = result["machine"], result["config"]
    where = (
        f"GPU {info['gpu']} (CUDA {info['cuda']}), host CPU {info['processor']}"
        if info["device"] == "cuda"
        else f"CPU {info['processor']}, {info['usable_cpus']} usable cores"
    )
    threads = sorted({e["torch_threads"] for e in _entries(result) if "torch_threads" in e})
    shape = result["scifar"]["shape"]
    lines = [
        f"{where}; torch {info['torch']}, torch threads {', '.join(map(str, threads))} "
        f"(default); float32 parameters, complex64 recurrence. {result['mode']} run, "
        f"{result['wall_seconds']:.0f} s.",
        "",
        f"## Training step against d_state: one LRU, batch {cfg['batch']}, length "
        f"{cfg['length']}, d_model {cfg['d_model']}",
        "",
        sweep_table(result["sweep"]),
        "",
        f"## The sCIFAR shape: {shape['layers']} LRU blocks, d_model {shape['d_model']}, batch "
        f"{shape['batch']}, length {shape['length']}, input 3, 10 classes",
        "",
        scifar_tables(result["scifar"]),
        "",
        "Goals (measured; a miss is reported, not hidden):",
        "",
    ]
    for g in result["goals"]:
        mark = {True: "met", False: "MISSED", None: "not measured"}[g["met"]]
        lines.append(f"- {g['goal']}: {_s(g['measured'])} ({mark})")
    lines += ["", "## Where the time goes", "", ops_tables(result["scifar"]), "## Notes", ""]
    lines += [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def _entries(result: dict[str, Any]) -> list[dict[str, Any]]:
    res = result["scifar"]
    return [*result["sweep"], *res["steps"].values(), res["event"]]


# --------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke test")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default benchmarks/results, benchmarks/results/quick with --quick)",
    )
    parser.add_argument("--d-states", type=int, nargs="+", help="override the swept d_state")
    parser.add_argument("--scifar-batch", type=int, help="override the sCIFAR batch size")
    parser.add_argument("--scifar-length", type=int, help="override the sCIFAR length")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=None,
        metavar="SECONDS",
        help="before each measurement wait up to SECONDS for other processes to leave the CPUs "
        "(at most 4 x SECONDS in all; default 15 and 60 in all on a full run, 0 with --quick)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return None
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch.cuda.is_available() is False")
    mode = "quick" if args.quick else "full"
    cfg = CONFIGS[mode, args.device]
    if args.d_states:
        cfg = replace(cfg, d_states=tuple(args.d_states))
    if args.scifar_batch:
        cfg = replace(cfg, scifar_batch=args.scifar_batch)
    if args.scifar_length:
        cfg = replace(cfg, scifar_length=args.scifar_length)
    if args.wait_idle is not None:
        cfg = replace(cfg, idle_wait_s=args.wait_idle, idle_wait_total_s=4 * args.wait_idle)
    info = machine_info(args.device)
    runner = Runner(cfg, args.device)
    rows = sweep(runner)
    res = scifar(runner)
    info["load_average_end"] = list(os.getloadavg())
    result: dict[str, Any] = {
        "machine": info,
        "config": dict(vars(cfg)),
        "mode": mode,
        "wall_seconds": runner.elapsed(),
        "sweep": rows,
        "scifar": res,
    }
    result["goals"] = goals(result)
    result["notes"] = notes(result)
    out = args.out or ROOT / "benchmarks" / "results" / ("quick" if args.quick else "")
    write_outputs(result, out)
    return result


def write_outputs(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = "torch_lru" + ("_cuda" if result["machine"]["device"] == "cuda" else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    report = markdown_report(result)
    title = "# compressm_torch: LRU training cost against d_state, and one reduction event\n\n"
    (out / f"{stem}.md").write_text(title + report)
    print(report)
    print(
        f"Wrote {out / (stem + '.json')} and {out / (stem + '.md')} "
        f"({result['wall_seconds']:.0f} s).",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
