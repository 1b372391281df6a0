"""Selective-Gramian statistics at Mamba-130M-like shapes, against one forward pass of the scan.

A Mamba-130M layer has ``D = 1536`` channels (``d_inner``) and ``N = 16`` states; ``N = 128``
is the Mamba2 state size. Two ``N = 128`` cases are run: per-channel step sizes and ``A`` (a
Mamba-1 layer with a large state), and the Mamba-2 layout, where step size and ``A`` are per
head of 64 channels (24 heads), so the statistics, which only depend on the step size, ``A``,
``B`` and ``C``, have 64 times fewer (channel, state) pairs than the scan. For a batch of
``batch = 8`` calibration sequences of ``L = 1024`` steps with float32 activations (CPU), this
script times and measures the peak memory of

* **scan forward**: a reference selective scan in plain torch, the algorithm of
  ``mamba_ssm``'s ``selective_scan_ref`` (``deltaA = exp(einsum(delta, A))``,
  ``deltaB_u = einsum(delta, B, u)``, a Python loop over ``L`` updating the ``(batch, D, N)``
  state, ``y = einsum(state, C)``, then ``y + u * D`` and the ``silu(z)`` gate), under
  ``torch.no_grad``, in mamba's ``(batch, D, L)`` / ``(batch, N, L)`` layout;
* **update torch / update NumPy**: one ``update_selective_statistics`` call on that batch (the
  streamed statistics; ``time_block`` at its default) from the same activations, passed as
  the ``(batch, L, D)`` / ``(batch, L, N)`` views a forward hook would pass
  (``delta.transpose(1, 2)``), as torch tensors and as NumPy arrays;
* **finalize + importance**: ``finalize_selective_statistics`` followed by
  ``state_importance`` on the accumulated statistics (done once per reduction, not per step);

and reports the ratio *update time / scan time* against the goal of 10 %. Where a case would
take too long on a small machine (``N = 128``), it is run at a shorter ``L`` and the times are
extrapolated linearly in ``L`` (every time step and every block of ``time_block`` steps has the
same shapes, so the cost is proportional to ``L``; the ratio is measured, not extrapolated);
the table says so.

Each case also times the update on the first ``k = 1`` sequences of the batch only, what
``SelectiveRecorder(max_sequences=k)`` (the controller's ``calibration_sequences``) records per
batch, against the scan of the whole batch; and ``step_loop_statistics``, a sequential
step-loop prototype written in this file (not part of the library: torch only, ``out=``
buffers) that computes the same sums, to show how close the library's Array-API loop comes to
hand-written torch.

A profile section then times variants at ``N = 16``, ``L = 128`` to show where the time goes:
``time_block``, a float32 accumulator (``SelectiveStatistics`` of float32 zeros makes the
sums float32 too), NumPy, ``mean_lti_surrogate`` (means only), the prototype, the default
in processes where glibc does not ``mmap`` large blocks (``MALLOC_MMAP_MAX_=0``) or torch asks
for transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``), with the CPU user / kernel time and the
minor page faults of each run, and a ``torch.profiler`` table of the default update.

Every measurement runs in a fresh subprocess (``--worker``), so that its peak memory can be
read in isolation: the peak resident set size (``VmHWM`` after resetting it through
``/proc/self/clear_refs``) minus the resident set size just before the call, i.e. the extra
memory the call held at its peak (temporaries, outputs, allocator slack, page granular); for
NumPy also ``tracemalloc``'s peak (NumPy reports its buffers to it; its overhead on these few,
large allocations is negligible).

Usage::

    python benchmarks/selective_gramians.py            # full run, 5-6 minutes on 2 cores
    python benchmarks/selective_gramians.py --quick    # smoke test, under a minute
    python benchmarks/selective_gramians.py --no-profile --out benchmarks/results

Runs disturbed by other processes (their CPU share, from ``/proc/stat``, above 15%) are retried
within the time budget and marked. Writes ``selective_gramians.json`` and
``selective_gramians.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import platform
import resource
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import compressm_core as cc
from _cpu import BUSY_THRESHOLD, cpu_busy, cpu_model, cpu_sample, others_share

ROOT = Path(__file__).resolve().parents[1]
GOAL = 0.10  # update time / scan time
MIB = 2**20
SUBSET = 1  # sequences of each batch recorded in the "subset" measurement
DEFAULT_TIME_BLOCK = (
    inspect.signature(cc.update_selective_statistics).parameters["time_block"].default
)


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class Case:
    """One shape: ``steps`` are run, ``full_steps`` is what the times are reported for."""

    states: int
    batch: int
    steps: int
    full_steps: int
    headdim: int | None = None  # Mamba-2 layout: dt and A per head of `headdim` channels

    @property
    def extrapolated(self) -> bool:
        return self.steps != self.full_steps

    @property
    def scale(self) -> float:
        return self.full_steps / self.steps


@dataclass(frozen=True)
class Config:
    """Sizes and time limits of one run."""

    channels: int
    cases: tuple[Case, ...]
    profile_case: Case  # shape of the profile section
    profiler_steps: int  # steps under torch.profiler
    time_block: int | None  # None: the library default
    budget_s: float  # time spent on repeats of one short measurement
    scan_budget_s: float  # the same for the scan and the prototype (the ratios' denominators)
    max_repeats: int
    deadline_s: float  # no retry of a disturbed run is started after this (from the start)
    idle_wait_s: float = 0.0  # before each measurement wait up to this long for idle CPUs ...
    idle_wait_total_s: float = 0.0  # ... and this long in all
    worker_timeout_s: float = 600.0
    seed: int = 0


FULL = Config(
    channels=1536,
    cases=(Case(16, 8, 1024, 1024), Case(128, 8, 64, 1024), Case(128, 8, 64, 1024, headdim=64)),
    profile_case=Case(16, 8, 128, 128),
    profiler_steps=64,
    time_block=None,
    budget_s=8.0,
    scan_budget_s=16.0,
    max_repeats=3,
    deadline_s=300.0,
    idle_wait_s=15.0,
    idle_wait_total_s=45.0,
)

QUICK = Config(
    channels=256,
    cases=(Case(16, 2, 256, 256), Case(128, 2, 64, 256), Case(128, 2, 64, 256, headdim=64)),
    profile_case=Case(16, 2, 64, 64),
    profiler_steps=64,
    time_block=None,
    budget_s=0.5,
    scan_budget_s=0.5,
    max_repeats=3,
    deadline_s=60.0,
)


# --------------------------------------------------------------------------------------------
# CPU contention (as in core_hsv.py)


def disturbed(share: float | None) -> bool:
    return share is not None and share > BUSY_THRESHOLD


class IdleGate:
    """Wait for other processes to leave the CPUs, within a total waiting budget."""

    def __init__(self, per_call_s: float, total_s: float) -> None:
        self.per_call_s = per_call_s
        self.left_s = total_s

    def wait(self) -> float | None:
        """Wait until idle (or out of budget); returns the last share of others measured."""
        start = time.monotonic()
        deadline = start + min(self.per_call_s, self.left_s)
        busy = cpu_busy()
        while disturbed(busy) and time.monotonic() < deadline:
            busy = cpu_busy(1.0)
        self.left_s = max(0.0, self.left_s - (time.monotonic() - start))
        return busy


# --------------------------------------------------------------------------------------------
# Inputs and the three computations


def make_inputs(
    batch: int, steps: int, channels: int, states: int, seed: int, headdim: int | None = None
) -> dict[str, torch.Tensor]:
    """Float32 activations of one Mamba layer, in mamba's layout.

    ``delta (batch, D, L)``: softplus of per-channel biases (step sizes log-uniform in
    ``[1e-3, 1e-1]``, the Mamba initialisation) plus noise; ``A = -(1, ..., N)`` per channel
    (S4D-real, Mamba's ``A_log`` initialisation); ``B, C (batch, N, L)``, ``u, z (batch, D, L)``
    standard normal; ``D`` ones.

    With ``headdim`` (Mamba-2 layout): one step size and one scalar ``A`` (uniform in
    ``-[1, 16]``, Mamba-2's initialisation) per head of ``headdim`` channels, repeated over the
    head's channels for the scan; ``delta_heads (batch, H, L)`` and ``A_heads (H, N)`` are what
    the statistics receive (the library's Mamba-2 adapter passes heads as channels).
    """
    gen = torch.Generator().manual_seed(seed)
    width = 1 if headdim is None else headdim
    units = channels // width
    dt0 = torch.exp(torch.empty(units).uniform_(np.log(1e-3), np.log(1e-1), generator=gen))
    bias = torch.log(torch.expm1(dt0))  # inverse softplus, as mamba's dt_proj.bias
    noise = 0.5 * torch.randn(batch, units, steps, generator=gen)
    delta = torch.nn.functional.softplus(bias[None, :, None] + noise)
    if headdim is None:
        a = -torch.arange(1, states + 1, dtype=torch.float32).repeat(channels, 1)
        heads = {}
    else:
        a_heads = -torch.empty(units, 1).uniform_(1.0, 16.0, generator=gen).expand(units, states)
        heads = {"delta_heads": delta, "A_heads": a_heads.contiguous()}
        delta = delta.repeat_interleave(headdim, dim=1)
        a = a_heads.repeat_interleave(headdim, dim=0)
    return {
        **heads,
        "delta": delta,
        "A": a,
        "B": torch.randn(batch, states, steps, generator=gen),
        "C": torch.randn(batch, states, steps, generator=gen),
        "u": torch.randn(batch, channels, steps, generator=gen),
        "z": torch.randn(batch, channels, steps, generator=gen),
        "D": torch.ones(channels),
    }


def selective_scan_ref(x: dict[str, torch.Tensor]) -> torch.Tensor:
    """``mamba_ssm.ops.selective_scan_interface.selective_scan_ref`` for real ``A`` and
    variable ``B``, ``C`` of shape ``(batch, N, L)`` (``delta`` already after softplus)."""
    u, delta, a, b, c = x["u"], x["delta"], x["A"], x["B"], x["C"]
    batch, dim, steps = u.shape
    delta_a = torch.exp(torch.einsum("bdl,dn->bdln", delta, a))
    delta_b_u = torch.einsum("bdl,bnl,bdl->bdln", delta, b, u)
    state = u.new_zeros((batch, dim, a.shape[1]))
    ys = []
    for i in range(steps):
        state = delta_a[:, :, i] * state + delta_b_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", state, c[:, :, i]))
    y = torch.stack(ys, dim=2)
    out = y + u * x["D"][None, :, None]
    return out * torch.nn.functional.silu(x["z"])


def hook_views(x: dict[str, torch.Tensor], backend: str) -> tuple[Any, Any, Any, Any]:
    """``(dt, a, b, c)`` in the library's layout, as a forward hook would pass them (per
    head for the Mamba-2 layout)."""
    dt, a, b, c = x["delta"], x["A"], x["B"], x["C"]
    if "delta_heads" in x:
        dt, a = x["delta_heads"], x["A_heads"]
    if backend == "numpy":
        dt, a, b, c = (t.numpy() for t in (dt, a, b, c))
        return np.swapaxes(dt, 1, 2), a, np.swapaxes(b, 1, 2), np.swapaxes(c, 1, 2)
    return dt.transpose(1, 2), a, b.transpose(1, 2), c.transpose(1, 2)


def float32_stats(a: Any) -> cc.SelectiveStatistics:
    """An empty accumulator in float32: the update then works in float32."""
    stats = cc.init_selective_statistics(a)
    if isinstance(a, torch.Tensor):
        return cc.SelectiveStatistics(*(s.to(torch.float32) for s in stats))
    return cc.SelectiveStatistics(*(np.asarray(s, dtype=np.float32) for s in stats))


def step_loop_statistics(
    dt: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    chunk: int = 32,
) -> cc.SelectiveStatistics:
    """Prototype (not in the library): the sums of ``update_selective_statistics`` by a
    sequential loop over time with in-place operations on ``(batch, D, N)`` buffers.

    O(L) work instead of the doubling scan's O(L log T), no concatenation, no allocation inside
    the loop over steps (the ``(batch, T, D, N)`` chunk buffers are reused through ``out=``),
    ``dtype`` for the per-step work and float64 for the sums over chunks. ``b``, ``c`` of shape
    ``(batch, L, N)`` (one group).
    """
    batch, steps, channels = dt.shape
    states = a.shape[1]
    f64 = torch.float64
    sums = {k: torch.zeros(channels, states, dtype=f64) for k in ("p", "q", "e", "pole", "b")}
    shape = (batch, channels, states)
    p, m, r, acc_p, acc_q, acc_e = (torch.zeros(shape, dtype=dtype) for _ in range(6))
    a_work = a.to(dtype)
    pole = torch.empty((batch, chunk, channels, states), dtype=dtype)
    alpha = torch.empty_like(pole)
    for lo in range(0, steps, chunk):
        hi = min(lo + chunk, steps)
        width = hi - lo
        # contiguous (batch, T, D) and (batch, T, N) chunks: mamba's (batch, D, L) layout makes
        # the hook's views strided along D
        dt_c = dt[:, lo:hi, :].to(dtype).contiguous()
        b_c, c_c = (x[:, lo:hi, :].to(dtype).contiguous() for x in (b, c))
        pole_c, alpha_c = pole[:, :width], alpha[:, :width]
        torch.mul(dt_c[..., None], a_work, out=pole_c)
        torch.exp(pole_c, out=pole_c)
        torch.mul(pole_c, pole_c, out=alpha_c)
        sums["pole"] += pole_c.sum(dim=(0, 1)).to(f64)  # sum(dtype=f64) would copy pole_c
        sums["b"] += torch.einsum("btd,btn->dn", dt_c, b_c).to(f64)
        dt2, b2, gamma = dt_c * dt_c, b_c * b_c, c_c * c_c
        for t in range(width):
            a_t = alpha_c[:, t]
            p.mul_(a_t).addcmul_(dt2[:, t, :, None], b2[:, t, None, :])
            m.mul_(a_t).add_(1.0)
            r.mul_(a_t).add_(p)
            g_t = gamma[:, t, None, :]
            acc_p.add_(p)
            acc_q.addcmul_(g_t, m)
            acc_e.addcmul_(g_t, r)
        for key, acc in (("p", acc_p), ("q", acc_q), ("e", acc_e)):
            sums[key] += acc.to(f64).sum(dim=0)
            acc.zero_()
    count = torch.tensor(float(batch * steps), dtype=f64)
    c_sum = c.to(f64).sum(dim=(0, 1))[None, :].expand(channels, states)
    return cc.SelectiveStatistics(
        count, sums["p"], sums["q"], sums["e"], sums["pole"], sums["b"], c_sum
    )


# --------------------------------------------------------------------------------------------
# Worker side: one measurement in a fresh process


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


def measure_once(fn: Callable[[], Any], *, trace: bool = False) -> tuple[dict[str, Any], Any]:
    """One timed call: wall time, others' CPU share, peak extra RSS, page faults."""
    gc.collect()
    exact = _reset_peak_rss()
    base_kib = _status_kib("VmRSS")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    if trace:
        tracemalloc.start()
        traced0 = tracemalloc.get_traced_memory()[0]
    before = cpu_sample()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    share = others_share(before, cpu_sample())
    after = resource.getrusage(resource.RUSAGE_SELF)
    run: dict[str, Any] = {"seconds": seconds, "others_cpu": share}
    if trace:
        run["tracemalloc_peak_mib"] = (tracemalloc.get_traced_memory()[1] - traced0) / MIB
        tracemalloc.stop()
    hwm_kib = _status_kib("VmHWM") if exact else after.ru_maxrss
    if base_kib is not None and hwm_kib is not None:
        run["peak_rss_mib"] = max(0, hwm_kib - base_kib) / 1024
        run["peak_rss_method"] = "VmHWM reset" if exact else "ru_maxrss (lower bound)"
    run["minor_page_faults"] = after.ru_minflt - usage.ru_minflt
    run["cpu_user_s"] = after.ru_utime - usage.ru_utime
    run["cpu_sys_s"] = after.ru_stime - usage.ru_stime
    return run, result


def best_runs(
    fn: Callable[[], Any], budget_s: float, repeats: int, *, trace: bool = False
) -> tuple[dict[str, Any], Any]:
    """First run (memory, result), then repeats while under ``budget_s``; keeps the fastest
    undisturbed time (the fastest of all if every run was disturbed)."""
    first, result = measure_once(fn, trace=trace)
    runs = [first]
    spent = first["seconds"]
    while len(runs) < repeats and spent + first["seconds"] <= budget_s:
        runs.append(measure_once(fn)[0])
        spent += runs[-1]["seconds"]
    clean = [r for r in runs if not disturbed(r["others_cpu"])] or runs
    best = min(clean, key=lambda r: r["seconds"])
    out = dict(first)
    out.update(
        seconds=best["seconds"],
        others_cpu=best["others_cpu"],
        disturbed=disturbed(best["others_cpu"]),
        repeats=len(runs),
        all_seconds=[r["seconds"] for r in runs],
        all_peak_rss_mib=[r.get("peak_rss_mib") for r in runs],
    )
    return out, result


def _relative_gap(x: cc.SelectiveStatistics, ref: cc.SelectiveStatistics) -> float:
    """Largest relative difference of the sums in ``x`` against ``ref`` (per field, scaled by
    the field's largest magnitude)."""
    gaps = []
    for name in ("controllability", "observability", "energy", "poles", "b", "c"):
        u, v = _host(getattr(x, name)), _host(getattr(ref, name))
        gaps.append(float(np.max(np.abs(u - v)) / np.max(np.abs(v))))
    return max(gaps)


def _host(x: Any) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


Inputs = dict[str, torch.Tensor]


def _update_fn(
    backend: str,
    time_block: int | None,
    precision: str = "float64",
    sequences: int | None = None,
) -> Callable[[Inputs], cc.SelectiveStatistics]:
    """``update_selective_statistics`` on one batch from an empty accumulator (created inside
    the timed call: ``(D, N)`` zeros, negligible); ``time_block=None``: the default;
    ``sequences``: only the first ``sequences`` sequences of the batch (what
    ``SelectiveRecorder(max_sequences=...)`` records)."""
    kwargs = {} if time_block is None else {"time_block": time_block}

    def run(x: Inputs) -> cc.SelectiveStatistics:
        dt, a, b, c = hook_views(x, backend)
        dt, b, c = dt[:sequences], b[:sequences], c[:sequences]
        stats = float32_stats(a) if precision == "float32" else cc.init_selective_statistics(a)
        return cc.update_selective_statistics(stats, dt, a, b, c, **kwargs)

    return run


def _mean_lti_fn(x: Inputs) -> cc.DiagonalStateSpace:
    return cc.mean_lti_surrogate(*hook_views(x, "torch"))


def _step_loop_fn(dtype: torch.dtype) -> Callable[[Inputs], cc.SelectiveStatistics]:
    return lambda x: step_loop_statistics(*hook_views(x, "torch"), dtype=dtype)


def _inputs(spec: dict[str, Any], steps: int | None = None, seed: int | None = None) -> Inputs:
    return make_inputs(
        spec["batch"],
        spec["steps"] if steps is None else steps,
        spec["channels"],
        spec["states"],
        spec["seed"] if seed is None else seed,
        spec.get("headdim"),
    )


WARM_STEPS = 64  # warm-up runs: same batch, D and N, two blocks of 32 steps


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the measurement described by ``spec`` in this (fresh) process."""
    torch.set_num_threads(spec["threads"])
    torch.set_grad_enabled(False)
    if spec["kind"] == "variants":
        return variants_worker(spec)
    budget, repeats = spec["budget_s"], spec["max_repeats"]
    x = _inputs(spec)
    if spec["kind"] in ("scan", "steploop"):
        fn = selective_scan_ref if spec["kind"] == "scan" else _step_loop_fn(torch.float32)
        fn(_inputs(spec, WARM_STEPS, 1))
        run, _ = best_runs(lambda: fn(x), spec["scan_budget_s"], repeats)
        return {"run": run}
    backend = spec["backend"]
    fn = _update_fn(
        backend, spec.get("time_block"), spec.get("precision", "float64"), spec.get("sequences")
    )
    fn(_inputs(spec, WARM_STEPS, 1))
    run, stats = best_runs(lambda: fn(x), budget, repeats, trace=backend == "numpy")

    def finalize() -> Any:
        return cc.state_importance(cc.finalize_selective_statistics(stats))

    finalize()
    fin, importance = best_runs(finalize, 1.0, 5)
    return {
        "run": run,
        "finalize_importance": fin,
        "importance_finite": bool(np.all(np.isfinite(_host(importance)))),
    }


VARIANTS: tuple[tuple[str, str], ...] = (
    (
        "library default (time_block=32, float32 steps, float64 sums), torch",
        "update torch default",
    ),
    ("library time_block=8, torch", "update torch tb8"),
    ("library float32 accumulator, torch", "update torch f32"),
    ("library time_block=8 + float32 accumulator, torch", "update torch tb8 f32"),
    ("library default, NumPy", "update numpy default"),
    ("library time_block=8 + float32 accumulator, NumPy", "update numpy tb8 f32"),
    ("library mean_lti_surrogate (means only, no Gramians), torch", "mean lti torch"),
    ("prototype step loop (this file), float64, torch", "step loop f64"),
    ("prototype step loop (this file), float32, torch", "step loop f32"),
)


def _variant_fn(key: str) -> Callable[[Inputs], cc.SelectiveStatistics]:
    return {
        "update torch default": _update_fn("torch", None),
        "update torch tb8": _update_fn("torch", 8),
        "update torch f32": _update_fn("torch", None, "float32"),
        "update torch tb8 f32": _update_fn("torch", 8, "float32"),
        "update numpy default": _update_fn("numpy", None),
        "update numpy tb8 f32": _update_fn("numpy", 8, "float32"),
        "mean lti torch": _mean_lti_fn,
        "step loop f64": _step_loop_fn(torch.float64),
        "step loop f32": _step_loop_fn(torch.float32),
    }[key]


def variants_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Profile section: the same batch through several variants, in one process."""
    x = _inputs(spec)
    warm = _inputs(spec, WARM_STEPS // 2, 1)
    budget, repeats = spec["budget_s"], spec["max_repeats"]
    selective_scan_ref(warm)
    scan, _ = best_runs(lambda: selective_scan_ref(x), budget, repeats)
    rows: list[dict[str, Any]] = [{"variant": "scan forward (reference)", "run": scan}]
    reference = None
    for label, key in VARIANTS:
        fn = _variant_fn(key)
        fn(warm)
        run, stats = best_runs(lambda fn=fn: fn(x), budget, repeats)
        reference = stats if reference is None else reference
        rows.append(
            {
                "variant": label,
                "run": run,
                "ratio_to_scan": run["seconds"] / scan["seconds"],
                "max_rel_gap_vs_default": (
                    _relative_gap(stats, reference)
                    if isinstance(stats, cc.SelectiveStatistics)
                    else None
                ),
            }
        )
    return {"rows": rows, "torch_profiler": profiler_table(x, spec["profiler_steps"])}


def profiler_table(x: Inputs, steps: int) -> dict[str, Any]:
    """Self CPU time per operator of the default torch update on the first ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    short = {k: (v[..., :steps] if v.ndim == 3 else v) for k, v in x.items()}
    fn = _update_fn("torch", None)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(short)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    return {
        "steps": steps,
        "total_self_cpu_s": total / 1e6,
        "ops": [
            {
                "op": e.key,
                "calls": int(e.count),
                "self_cpu_s": e.self_cpu_time_total / 1e6,
                "share": e.self_cpu_time_total / total,
            }
            for e in rows
        ],
    }


# --------------------------------------------------------------------------------------------
# Parent side: spawn the workers, retry disturbed runs, extrapolate, report


GATE = IdleGate(0.0, 0.0)


class Runner:
    """Spawns workers, waits for idle CPUs before each and retries disturbed runs in time."""

    def __init__(self, cfg: Config, threads: int) -> None:
        self.cfg = cfg
        self.threads = threads
        self.start = time.monotonic()

    def spec(self, case: Case, **extra: Any) -> dict[str, Any]:
        return {
            "channels": self.cfg.channels,
            "states": case.states,
            "batch": case.batch,
            "steps": case.steps,
            "headdim": case.headdim,
            "seed": self.cfg.seed,
            "threads": self.threads,
            "budget_s": self.cfg.budget_s,
            "scan_budget_s": self.cfg.scan_budget_s,
            "max_repeats": self.cfg.max_repeats,
            "time_block": self.cfg.time_block,
            "profiler_steps": self.cfg.profiler_steps,
            **extra,
        }

    def spawn(self, spec: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=self.cfg.worker_timeout_s,
            env={**os.environ, **(env or {})},
            check=False,
        )
        if proc.returncode != 0:
            msg = f"worker {spec['kind']} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
            raise RuntimeError(msg)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def measure(self, spec: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
        """One worker; again (up to twice) while disturbed and time is left."""
        busy_before = GATE.wait()
        tries = [self.spawn(spec, env)]
        while (
            "run" in tries[-1]
            and tries[-1]["run"]["disturbed"]
            and len(tries) <= 2
            and self.elapsed() + 1.5 * tries[-1]["run"]["seconds"] + 10 < self.cfg.deadline_s
        ):
            GATE.wait()
            tries.append(self.spawn(spec, env))
        if "run" in tries[0]:
            clean = [t for t in tries if not t["run"]["disturbed"]] or tries
            kept = min(clean, key=lambda t: t["run"]["seconds"])
        else:
            kept = tries[0]
        kept["others_cpu_before"] = busy_before
        kept["attempts"] = len(tries)
        label = spec["kind"] + (f"/{spec['backend']}" if "backend" in spec else "")
        if "run" in kept:
            run = kept["run"]
            print(
                f"[N={spec['states']} headdim={spec['headdim']} batch={spec['batch']} "
                f"L={spec['steps']}] {label}: "
                f"{run['seconds']:.3g} s, peak +{run.get('peak_rss_mib', float('nan')):.0f} MiB"
                f"{' (disturbed)' if run['disturbed'] else ''}",
                file=sys.stderr,
                flush=True,
            )
        return kept

    def elapsed(self) -> float:
        return time.monotonic() - self.start


BACKENDS = ("torch", "numpy")


def cast_bytes(case: Case, channels: int, steps: int) -> int:
    """Bytes of the copies of ``dt``, ``b``, ``c`` that the update makes up front: float64 for
    the mean sums and dense float32 for the recursions (12 bytes per element)."""
    return case.batch * steps * (channels + 2 * case.states) * 12


def measure_case(case: Case, runner: Runner) -> dict[str, Any]:
    """Scan forward, torch and NumPy updates, finalize + importance for one shape."""
    cfg = runner.cfg
    scan = runner.measure(runner.spec(case, kind="scan"))
    updates = {
        backend: runner.measure(runner.spec(case, kind="update", backend=backend))
        for backend in ("torch", "numpy")
    }
    subset = runner.measure(
        runner.spec(case, kind="update", backend="torch", sequences=min(SUBSET, case.batch))
    )
    steploop = runner.measure(runner.spec(case, kind="steploop"))
    units = cfg.channels // (case.headdim or 1)  # channels of the statistics' dt
    extra_cast = cast_bytes(case, units, case.full_steps - case.steps) / MIB

    def entry(result: dict[str, Any], memory: str) -> dict[str, Any]:
        run = result["run"]
        out = {
            "seconds_measured": run["seconds"],
            "seconds": run["seconds"] * case.scale,
            "repeats": run["repeats"],
            "all_seconds_measured": run["all_seconds"],
            "all_peak_rss_mib_measured": run["all_peak_rss_mib"],
            "others_cpu": run["others_cpu"],
            "disturbed": run["disturbed"],
            "attempts": result["attempts"],
            "others_cpu_before": result["others_cpu_before"],
            "peak_rss_method": run.get("peak_rss_method"),
            "minor_page_faults_measured": run["minor_page_faults"],
            "cpu_user_s_measured": run["cpu_user_s"],
            "cpu_sys_s_measured": run["cpu_sys_s"],
        }
        for key in ("peak_rss_mib", "tracemalloc_peak_mib"):
            value = run.get(key)
            if value is None:
                continue
            out[f"{key}_measured"] = value
            if not case.extrapolated:
                out[f"{key}_full"] = value
            else:  # see NOTES: the scan's tensors scale with L, the update's casts only
                extra = {"scales": value * (case.scale - 1), "casts": extra_cast, "constant": 0}
                out[f"{key}_full"] = value + extra[memory]
        return out

    times = {
        "scan_torch": entry(scan, "scales"),
        # the prototype's buffers do not depend on L
        "prototype_step_loop_float32_torch": entry(steploop, "constant"),
    }
    finalize: dict[str, Any] = {}
    for backend, result in updates.items():
        times[f"update_{backend}"] = entry(result, "casts")
        fin = result["finalize_importance"]
        finalize[backend] = {
            "seconds": fin["seconds"],
            "repeats": fin["repeats"],
            "importance_finite": result["importance_finite"],
        }
    times["update_torch_subset"] = entry(subset, "casts")
    scan_s = times["scan_torch"]["seconds"]
    ratios = {backend: times[f"update_{backend}"]["seconds"] / scan_s for backend in BACKENDS}
    ratios["torch_subset"] = times["update_torch_subset"]["seconds"] / scan_s
    prototype = times["prototype_step_loop_float32_torch"]["seconds"] / scan_s
    return {
        "states": case.states,
        "channels": cfg.channels,
        "heads": None if case.headdim is None else units,
        "headdim": case.headdim,
        "batch": case.batch,
        "steps_run": case.steps,
        "steps_reported": case.full_steps,
        "extrapolated": case.extrapolated,
        "time_block": cfg.time_block or DEFAULT_TIME_BLOCK,
        "subset_sequences": min(SUBSET, case.batch),
        "scan_state_tensor_mib_full": case.batch
        * case.full_steps
        * cfg.channels
        * case.states
        * 4
        / MIB,
        "times": times,
        "ratio_update_over_scan": ratios,
        "goal_met": {k: v < GOAL for k, v in ratios.items()},
        "ratio_prototype_step_loop_over_scan": prototype,
        "finalize_importance": finalize,
    }


def measure_profile(runner: Runner) -> dict[str, Any]:
    """Variants at the profile shape, and the default with glibc's mmap disabled."""
    case = runner.cfg.profile_case
    out = runner.measure(runner.spec(case, kind="variants"))
    settings = (
        (
            {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)},
            "MALLOC_MMAP_MAX_=0 (glibc reuses freed memory, no fresh mmap pages)",
        ),
        (
            {"THP_MEM_ALLOC_ENABLE": "1"},
            "THP_MEM_ALLOC_ENABLE=1 (torch asks for transparent huge pages)",
        ),
    )
    for env, label in settings:
        scan = runner.measure(runner.spec(case, kind="scan"), env=env)["run"]
        update = runner.measure(runner.spec(case, kind="update", backend="torch"), env=env)["run"]
        out["rows"] += [
            {"variant": f"scan forward, {label}", "run": scan},
            {
                "variant": f"library default, torch, {label}",
                "run": update,
                "ratio_to_scan": update["seconds"] / scan["seconds"],
                "max_rel_gap_vs_default": None,
            },
        ]
    out["case"] = {"states": case.states, "batch": case.batch, "steps": case.steps}
    return out


# --------------------------------------------------------------------------------------------
# Reporting


def machine_info(threads: int) -> dict[str, Any]:
    """CPU, memory, thread and library versions."""
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "processor": cpu_model(),
        "memory_gib": _mem_total_gib(),
        "platform": platform.platform(),
        "libc": " ".join(platform.libc_ver()),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": threads,
        "compressm_core": cc.__version__,
        "load_average_start": list(os.getloadavg()),
    }


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError):
        pass
    return None


def _t(entry: dict[str, Any], extrapolated: bool) -> str:
    s = f"{entry['seconds']:.3g}"
    if extrapolated:
        s += f" (extrap.; run {entry['seconds_measured']:.3g})"
    return s + (" †" if entry["disturbed"] else "")


def _mem(entry: dict[str, Any], key: str, extrapolated: bool) -> str:
    full, measured = entry.get(f"{key}_full"), entry.get(f"{key}_measured")
    if full is None:
        return "–"
    return f"{full:,.0f}" + (f" (extrap.; run {measured:,.0f})" if extrapolated else "")


def _states(c: dict[str, Any]) -> str:
    """N, with the Mamba-2 layout named."""
    heads = c.get("heads")
    return str(c["states"]) + (
        "" if heads is None else f" (Mamba-2: {heads} heads × {c['headdim']})"
    )


def _shape(c: dict[str, Any]) -> str:
    shape = f"{c['batch']} × {c['steps_reported']}"
    return shape + (f" (run at L = {c['steps_run']})" if c["extrapolated"] else "")


def _ratio(value: float) -> str:
    return f"{value:.1%}" + ("" if value < GOAL else " (goal missed)")


def markdown_table(cases: list[dict[str, Any]]) -> str:
    """Times and ratios, one row per shape."""
    head = (
        "| N | batch × L | scan forward, torch [s] | update, torch [s] | update, NumPy [s] "
        "| update / scan, torch | update / scan, NumPy "
        "| update, torch, first k sequences [s] | update (k sequences) / scan, torch "
        "| finalize + importance, torch / NumPy [ms] | prototype step loop, float32 torch [s] "
        "| prototype / scan |"
    )
    lines = [head, "|" + "---|" * 12]
    for c in cases:
        t, ext = c["times"], c["extrapolated"]
        r = c["ratio_update_over_scan"]
        fin = c["finalize_importance"]
        row = [
            _states(c),
            _shape(c),
            _t(t["scan_torch"], ext),
            _t(t["update_torch"], ext),
            _t(t["update_numpy"], ext),
            _ratio(r["torch"]),
            _ratio(r["numpy"]),
            f"{_t(t['update_torch_subset'], ext)} (k = {c['subset_sequences']})",
            _ratio(r["torch_subset"]),
            f"{1e3 * fin['torch']['seconds']:.3g} / {1e3 * fin['numpy']['seconds']:.3g}",
            _t(t["prototype_step_loop_float32_torch"], ext),
            _ratio(c["ratio_prototype_step_loop_over_scan"]),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def memory_table(cases: list[dict[str, Any]]) -> str:
    """Peak extra memory, one row per shape."""
    head = (
        "| N | batch × L | scan forward, torch | update, torch | update, NumPy "
        "| update, NumPy (tracemalloc) | prototype step loop | (batch, L, D, N) float32 tensor |"
    )
    lines = [head, "|" + "---|" * 8]
    for c in cases:
        t, ext = c["times"], c["extrapolated"]
        row = [
            _states(c),
            _shape(c),
            _mem(t["scan_torch"], "peak_rss_mib", ext),
            _mem(t["update_torch"], "peak_rss_mib", ext),
            _mem(t["update_numpy"], "peak_rss_mib", ext),
            _mem(t["update_numpy"], "tracemalloc_peak_mib", ext),
            _mem(t["prototype_step_loop_float32_torch"], "peak_rss_mib", False),
            f"{c['scan_state_tensor_mib_full']:,.0f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def profile_tables(profile: dict[str, Any]) -> str:
    c = profile["case"]
    lines = [
        f"Profile (N = {c['states']}, batch × L = {c['batch']} × {c['steps']}, D as above; "
        "each variant on the same batch):",
        "",
        "| variant | time [s] | / scan forward | CPU user / sys [s] | minor page faults "
        "| max rel. gap of the sums vs the default |",
        "|---|---|---|---|---|---|",
    ]
    for row in profile["rows"]:
        run = row["run"]
        ratio = row.get("ratio_to_scan")
        gap = row.get("max_rel_gap_vs_default")
        lines.append(
            f"| {row['variant']} | {run['seconds']:.3g}{' †' if run['disturbed'] else ''} | "
            f"{'–' if ratio is None else f'{ratio:.1%}'} | "
            f"{run['cpu_user_s']:.2f} / {run['cpu_sys_s']:.2f} | {run['minor_page_faults']:,} | "
            f"{'–' if gap is None else f'{gap:.1e}'} |"
        )
    prof = profile["torch_profiler"]
    lines += [
        "",
        f"`torch.profiler`, default torch update, first {prof['steps']} steps "
        f"(self CPU time {prof['total_self_cpu_s']:.3g} s, summed over threads):",
        "",
        "| op | calls | self CPU [s] | share |",
        "|---|---|---|---|",
    ]
    for op in prof["ops"]:
        lines.append(
            f"| `{op['op']}` | {op['calls']} | {op['self_cpu_s']:.3g} | {op['share']:.0%} |"
        )
    return "\n".join(lines)


NOTES = [
    "scan forward: mamba_ssm's selective_scan_ref algorithm in plain torch (float32, "
    "torch.no_grad, Python loop over L), including y + u * D and the silu(z) gate.",
    "update: one update_selective_statistics call on the batch (streamed statistics; the "
    "library's defaults: time_block=32, float64 accumulator; float32 activations make the "
    "per-step recursions run in float32, folded into the float64 sums every block) from "
    "float32 activations passed as transposed views of mamba's (batch, D, L) tensors; NumPy: "
    "the same arrays as NumPy float32. NumPy's elementwise operations use one thread, torch "
    "uses all.",
    "Mamba-2 layout: step size and A per head of headdim channels, repeated over the head's "
    "channels for the scan; the update receives them per head (dt (batch, L, H), a (H, N)), "
    "as compressm_torch's Mamba-2 adapter passes them.",
    "update, first k sequences: the same call on the first k sequences of the batch only, "
    "which is what SelectiveRecorder(max_sequences=k) (the controller's calibration_sequences) "
    "records from each batch; its ratio is to the scan of the whole batch. What this costs in "
    "selection quality is measured in mamba_selection.md.",
    "Ratio: update time / scan time at the same shape (for an extrapolated row both times are "
    "measured at the reduced L, so the ratio is measured, not extrapolated).",
    "finalize + importance: finalize_selective_statistics then state_importance "
    "(method='gramian', aggregate='sum'), best of up to 5; once per reduction.",
    "prototype step loop: step_loop_statistics in this benchmark file, NOT part of the "
    "library: the same sums by a sequential loop over time with in-place float32 operations "
    "on (batch, D, N) buffers and float64 sums per chunk of 32 steps (one group only). Its "
    "sums agree with the library's to the 'max rel. gap' of the profile table.",
    "Peak extra RSS: peak resident set size during the call (VmHWM, reset through "
    "/proc/self/clear_refs just before it) minus the resident set size before it, in a fresh "
    "process; inputs are allocated before. Reported for the first timed call in a fresh "
    "process (after a warm-up on 64 steps); later calls can reuse heap memory the allocator "
    "kept and show less (all runs are in the JSON). tracemalloc: NumPy buffers only.",
    "Extrapolated rows (run at a shorter L): times × L_full / L_run (every step and block has "
    "the same shapes); scan memory × L_full / L_run (every large tensor of the scan has an L "
    "axis); update memory + the float64 and dense float32 copies of dt, b, c for the missing "
    "steps (batch × ΔL × (D + 2N) × 12 bytes; its block temporaries do not depend on L); "
    "prototype memory as measured (its buffers do not depend on L).",
    "Profile: all variants run in one process on the same batch (the library rows from an "
    "empty accumulator; 'float32 accumulator' = SelectiveStatistics of float32 zeros, which "
    "makes the sums float32 too); the allocator rows run in fresh processes with the "
    "environment variable shown. CPU user / sys: this process's CPU seconds (all threads) in "
    "user and kernel mode; the kernel time is mostly page faults on freshly mapped memory.",
]


# The docs include the summary (tables and goals) by this section name (pymdownx.snippets).
SUMMARY_START = "<!-- --8<-- [start:summary] -->"
SUMMARY_END = "<!-- --8<-- [end:summary] -->"


def markdown_report(result: dict[str, Any]) -> str:
    info = result["machine"]
    lines = [
        SUMMARY_START,
        f"CPU: {info['processor']}, {info['usable_cpus']} cores, {info['memory_gib']:.0f} GiB, "
        f"torch threads {info['torch_threads']}; NumPy {info['numpy']}, torch {info['torch']}, "
        f"compressm_core {info['compressm_core']}. D = {result['cases'][0]['channels']} channels, "
        "float32 activations. Wall-clock seconds, best of k runs in a budget of "
        f"{result['config']['budget_s']:g} s per update and "
        f"{result['config']['scan_budget_s']:g} s per scan or prototype (k = 1 for the long "
        "updates).",
        "",
        markdown_table(result["cases"]),
        "",
        "Peak extra memory [MiB] (resident set size above the level before the call):",
        "",
        memory_table(result["cases"]),
        "",
        f"Goal: update / scan < {GOAL:.0%} (measured; a miss is reported, not hidden):",
        "",
    ]
    labels = {
        "torch": "torch, whole batch",
        "numpy": "NumPy, whole batch",
        "torch_subset": "torch, first k sequences of the batch (recorder's max_sequences = k)",
    }
    for c in result["cases"]:
        for key, label in labels.items():
            ratio = c["ratio_update_over_scan"][key]
            mark = "met" if ratio < GOAL else "MISSED"
            k = f", k = {c['subset_sequences']}" if key == "torch_subset" else ""
            lines.append(f"- N = {_states(c)}, {label}{k}: {ratio:.1%} ({mark})")
    lines.append(SUMMARY_END)
    if result.get("profile"):
        lines += ["", profile_tables(result["profile"])]
    lines += ["", *(f"- {note}" for note in result["notes"])]
    lines.append(
        f"- †: other processes took more than {BUSY_THRESHOLD:.0%} of the CPUs during the kept "
        "run; its time is less reliable."
    )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke test")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default benchmarks/results, benchmarks/results/quick with --quick)",
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the profile section")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=None,
        metavar="SECONDS",
        help="before each measurement wait up to SECONDS for other processes to leave the CPUs "
        "(at most 3 x SECONDS in all; default 15 per measurement and 45 in all on a full run, "
        "0 with --quick)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return None
    cfg = QUICK if args.quick else FULL
    if args.wait_idle is not None:
        cfg = replace(cfg, idle_wait_s=args.wait_idle, idle_wait_total_s=3 * args.wait_idle)
    GATE.per_call_s, GATE.left_s = cfg.idle_wait_s, cfg.idle_wait_total_s
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = cores or 1
    info = machine_info(threads)
    runner = Runner(cfg, threads)
    cases = [measure_case(case, runner) for case in cfg.cases]
    profile = None if args.no_profile else measure_profile(runner)
    info["load_average_end"] = list(os.getloadavg())
    config = {k: v for k, v in vars(cfg).items() if k not in ("cases", "profile_case")}
    config["cases"] = [vars(c) for c in cfg.cases]
    config["profile_case"] = vars(cfg.profile_case)
    result = {
        "machine": info,
        "config": config,
        "mode": "quick" if args.quick else "full",
        "goal_update_over_scan": GOAL,
        "wall_seconds": runner.elapsed(),
        "cases": cases,
        "profile": profile,
        "notes": NOTES,
    }
    out = args.out or ROOT / "benchmarks" / "results" / ("quick" if args.quick else "")
    write_outputs(result, out)
    return result


def write_outputs(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "selective_gramians.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    report = markdown_report(result)
    title = "# compressm_core: selective-Gramian statistics vs one scan forward pass\n\n"
    (out / "selective_gramians.md").write_text(title + report)
    print(report)
    print(
        f"Wrote {out / 'selective_gramians.json'} and {out / 'selective_gramians.md'} "
        f"({result['wall_seconds']:.0f} s).",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
