"""Training cost of a Mamba block against its state size, and the cost of reducing it.

For one Mamba layer (``compressm_torch.Mamba``, the pure-PyTorch reference layer; with
``--device cuda`` also ``mamba_ssm.Mamba`` when that package is importable) inside a pre-norm
residual block, loss ``mean(y**2)``, AdamW:

1. the time of a training step (forward, backward, optimizer step) for ``d_state`` in
   {128, 64, 32, 16, 12} at a fixed ``(batch, length, d_model)``, and the ratio to ``d_state``
   128 (the speed-up that a reduction from 128 buys);
2. the cost of the statistics that a reduction needs: one :class:`SelectiveRecorder` update
   (the projections recomputed from the layer's input and the streaming Gramian sums, with the
   method that ``update_selective_statistics`` picks by default: the loop over time on a CPU,
   chunks on a GPU), as a share of a training step
   and of a forward pass, for the whole batch and for its first sequence only
   (``SelectiveRecorder(max_sequences=1)``, the controller's ``calibration_sequences``); the
   controller records them only during ``calibration_steps`` (default 8) steps before each
   reduction;
3. the Gramian sums alone (``update_selective_statistics`` on the recorded signals) by the
   in-place loop over time (``method="sequential"``) and by chunks in log space
   (``method="chunked"``): time and number of tensor operations per update (counted by a
   ``TorchDispatchMode``, views and allocations excluded: a proxy for GPU kernel launches),
   also at a GPU layer's shape (``d_inner`` 1536, ``L`` 1024, ``d_state`` 16, one sequence);
4. one reduction event 128 -> 16 by the controller (importance scores, slicing, optimizer
   surgery).

Times are medians over several steps after warm-up steps, with the CPU load of other processes
recorded (runs disturbed by others are marked). Usage::

    python benchmarks/torch_mamba.py              # CPU, about 5 minutes on 2 cores
    python benchmarks/torch_mamba.py --quick      # smoke test
    python benchmarks/torch_mamba.py --device cuda --length 1024 --d-model 768 --batch 8

Writes ``torch_mamba.json`` and ``torch_mamba.md`` (``torch_mamba_cuda.*`` on a GPU) under
``--out`` (default ``benchmarks/results``, ``benchmarks/results/quick`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _cpu import BUSY_THRESHOLD, cpu_model, cpu_sample, others_share
from compressm_core import init_selective_statistics, update_selective_statistics
from compressm_torch import CompreSSM, Mamba, SelectiveRecorder, get_adapter

D_STATES = (128, 64, 32, 16, 12)
IMPLS = {"ours": "`compressm_torch.Mamba` (pure PyTorch)", "mamba_ssm": "`mamba_ssm.Mamba`"}
METHODS = ("sequential", "chunked")
# a GPU layer's statistics (Mamba d_model 768): d_inner, length, d_state, one sequence
GPU_SHAPE = {"channels": 1536, "length": 1024, "d_state": 16, "batch": 1}
ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "lift_fresh"}


class OpCounter(TorchDispatchMode):
    """Counts the tensor operations that compute something (views and allocations excluded):
    on a GPU each is at least one kernel launch."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        if not func.is_view and name not in ALLOCATIONS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], Any]) -> int:
    with torch.no_grad(), OpCounter() as counter:
        fn()
    return counter.count


def statistics_kernel(
    signals: Sequence[torch.Tensor], method: str, time_block: int | None = 32
) -> Callable[[], Any]:
    """One ``update_selective_statistics`` call on fixed signals ``(dt, A, B, C)``."""
    dt, a, b, c = signals

    def run() -> Any:
        stats = init_selective_statistics(a)
        return update_selective_statistics(
            stats, dt, a, b, c, time_block=time_block, method=method
        )

    return run


def gpu_shape_ops() -> dict[str, Any]:
    """Operations per update at :data:`GPU_SHAPE` (counted on the CPU: the count does not
    depend on the device), for the default ``time_block`` 32 and for 256."""
    torch.manual_seed(0)
    shape = GPU_SHAPE
    batch, length, channels = shape["batch"], shape["length"], shape["channels"]
    dt = torch.nn.functional.softplus(torch.randn(batch, length, channels) - 3)
    a = -torch.arange(1, shape["d_state"] + 1, dtype=torch.float32).repeat(channels, 1)
    b, c = torch.randn(2, batch, length, shape["d_state"])
    counts: dict[str, dict[str, int]] = {}
    for block in (32, 256):
        counts[str(block)] = {
            method: count_ops(statistics_kernel((dt, a, b, c), method, block))
            for method in (*METHODS, "doubling")
        }
    return {"shape": shape, "ops": counts}


class Block(torch.nn.Module):
    """``x + mixer(norm(x))``, the residual block of Mamba language models."""

    def __init__(self, mixer: torch.nn.Module, d_model: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(d_model)
        self.mixer = mixer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.mixer(self.norm(x))
        return out


def make_mixer(impl: str, d_model: int, d_state: int, device: torch.device) -> torch.nn.Module:
    if impl == "mamba_ssm":
        from mamba_ssm import Mamba as CudaMamba  # type: ignore[import-not-found]

        mixer: torch.nn.Module = CudaMamba(d_model=d_model, d_state=d_state).to(device)
        return mixer
    return Mamba(d_model, d_state, device=device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(
    fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int
) -> dict[str, Any]:
    for _ in range(warmup):
        fn()
    sync(device)
    times, shares = [], []
    for _ in range(repeats):
        before = cpu_sample()
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
        shares.append(others_share(before, cpu_sample()))
    known = [s for s in shares if s is not None]
    busy = max(known) if known else None
    return {
        "seconds": statistics.median(times),
        "all_seconds": times,
        "others_cpu": busy,
        "disturbed": busy is not None and busy > BUSY_THRESHOLD,
    }


def step_time(impl: str, cfg: dict[str, Any], d_state: int) -> dict[str, Any]:
    device = torch.device(cfg["device"])
    torch.manual_seed(0)
    model = Block(make_mixer(impl, cfg["d_model"], d_state, device), cfg["d_model"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(cfg["batch"], cfg["length"], cfg["d_model"], device=device)

    def step() -> None:
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def forward() -> None:
        with torch.no_grad():
            model(x)

    out = {"step": timed(step, device, cfg["warmup"], cfg["repeats"])}
    out["forward"] = timed(forward, device, cfg["warmup"], cfg["repeats"])
    if impl == "ours" or d_state == max(cfg["d_states"]):
        recorder = SelectiveRecorder(model)
        hidden = model.norm(x).detach()
        out["statistics_update"] = timed(
            lambda: recorder.record("mixer", hidden), device, 1, cfg["repeats"]
        )
        recorder.max_sequences = 1
        out["statistics_update_one_sequence"] = timed(
            lambda: recorder.record("mixer", hidden), device, 1, cfg["repeats"]
        )
        recorder.remove()
    if impl == "ours":
        with torch.no_grad():
            signals = [t.float() for t in get_adapter(model.mixer).signals(model.mixer, hidden)]
        out["statistics_kernel"] = {}
        for method in METHODS:
            run = statistics_kernel(signals, method)
            out["statistics_kernel"][method] = {
                **timed(run, device, 1, cfg["repeats"]),
                "ops": count_ops(run),
            }
    return out


def event_time(cfg: dict[str, Any]) -> dict[str, Any]:
    """One controller event 128 -> 16 on a block trained for a few steps."""
    device = torch.device(cfg["device"])
    big, small = max(cfg["d_states"]), min(cfg["d_states"], key=lambda n: abs(n - 16))
    runs = []
    for _ in range(cfg["event_repeats"]):
        torch.manual_seed(0)
        model = Block(Mamba(cfg["d_model"], big, device=device), cfg["d_model"]).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ctl = CompreSSM(
            model,
            opt,
            total_steps=100,
            mode="fixed",
            fraction=1 - small / big,
            reduction_steps=[3],
            calibration_steps=2,
        )
        x = torch.randn(cfg["batch"], cfg["length"], cfg["d_model"], device=device)
        events: list[Any] = []
        for _ in range(3):
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sync(device)
            start = time.perf_counter()
            events = ctl.step()
            sync(device)
            seconds = time.perf_counter() - start
        runs.append({"seconds": seconds, "new_rank": events[0].new_rank})
    return {
        "from": big,
        "to": runs[0]["new_rank"],
        "seconds": statistics.median(r["seconds"] for r in runs),
        "runs": runs,
    }


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        "# Mamba: training step against the state size",
        "",
        f"Device: {result['device']}; torch {result['torch']}, {cfg['threads']} threads. "
        f"One Mamba layer in a pre-norm residual block, batch {cfg['batch']}, length "
        f"{cfg['length']}, d_model {cfg['d_model']} (d_inner {2 * cfg['d_model']}); loss "
        f"mean(y^2), AdamW. Median of {cfg['repeats']} steps after {cfg['warmup']} warm-up "
        "steps.",
        "",
    ]
    for impl, rows in result["sweep"].items():
        base = rows[str(max(cfg["d_states"]))]["step"]["seconds"]
        lines += [
            f"### {IMPLS[impl]}",
            "",
            "| d_state | train step [s] | forward [s] | step(128) / step(N) | statistics "
            "update [s] | update / step | update / forward | update, 1 sequence of the batch "
            "[s] | update (1 sequence) / forward |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for n in cfg["d_states"]:
            row = rows[str(n)]
            step, fwd = row["step"]["seconds"], row["forward"]["seconds"]
            mark = " (disturbed)" if row["step"]["disturbed"] else ""
            upd = row.get("statistics_update")
            one = row.get("statistics_update_one_sequence")
            cells = ["–"] * 5
            if upd is not None:
                u = upd["seconds"]
                cells[:3] = [f"{u:.3g}", f"{u / step:.1%}", f"{u / fwd:.1%}"]
            if one is not None:
                cells[3:] = [f"{one['seconds']:.3g}", f"{one['seconds'] / fwd:.1%}"]
            lines.append(
                f"| {n} | {step:.3g}{mark} | {fwd:.3g} | {base / step:.2f}x | "
                + " | ".join(cells)
                + " |"
            )
        lines.append("")
    lines += kernel_markdown(result)
    ev = result.get("event")
    if ev is not None:
        step_big = result["sweep"]["ours"][str(ev["from"])]["step"]["seconds"]
        lines += [
            "### One reduction event",
            "",
            f"Controller event {ev['from']} -> {ev['to']} (importance scores, slicing, optimizer "
            f"surgery): {ev['seconds'] * 1e3:.1f} ms = {ev['seconds'] / step_big:.3f} training "
            f"steps at d_state {ev['from']}.",
            "",
        ]
    lines += [
        "The statistics update runs only during the `calibration_steps` (default 8) training "
        "steps before each scheduled reduction; amortised over training it costs "
        "`calibration_steps * reductions / total_steps` times the per-step share above.",
        "",
    ]
    return "\n".join(lines)


def kernel_markdown(result: dict[str, Any]) -> list[str]:
    """The Gramian sums alone, by method, and the operation counts at a GPU layer's shape."""
    cfg = result["config"]
    rows = result["sweep"]["ours"]
    lines = [
        "### The Gramian sums alone, by method",
        "",
        "`update_selective_statistics` on the recorded signals of the whole batch (the "
        "recorder's update without the projections), `time_block` 32; operations = tensor "
        "operations per update that compute something (views and allocations excluded), a "
        "proxy for GPU kernel launches.",
        "",
        "| d_state | sequential [s] | sequential / step | chunked [s] | chunked / step | "
        "operations, sequential | operations, chunked |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in cfg["d_states"]:
        row = rows[str(n)]
        kernel = row.get("statistics_kernel")
        if kernel is None:
            continue
        step = row["step"]["seconds"]
        seq, chunk = kernel["sequential"], kernel["chunked"]
        lines.append(
            f"| {n} | {seq['seconds']:.3g} | {seq['seconds'] / step:.1%} | "
            f"{chunk['seconds']:.3g} | {chunk['seconds'] / step:.1%} | {seq['ops']} | "
            f"{chunk['ops']} |"
        )
    gpu = result.get("gpu_shape_ops")
    if gpu is not None:
        shape = gpu["shape"]
        lines += [
            "",
            f"Operations per update at a GPU layer's shape (d_inner {shape['channels']}, "
            f"L {shape['length']}, d_state {shape['d_state']}, {shape['batch']} sequence; "
            "counted on the CPU, the count does not depend on the device):",
            "",
            "| time_block | sequential | chunked | doubling |",
            "|---|---|---|---|",
        ]
        for block, ops in gpu["ops"].items():
            lines.append(
                f"| {block} | {ops['sequential']} | {ops['chunked']} | {ops['doubling']} |"
            )
    lines.append("")
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke test")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--d-states", type=int, nargs="+", default=list(D_STATES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = {
        "device": args.device,
        "batch": args.batch,
        "length": 64 if args.quick else args.length,
        "d_model": 16 if args.quick else args.d_model,
        "d_states": list(args.d_states),
        "warmup": 1 if args.quick else 2,
        "repeats": 2 if args.quick else args.repeats,
        "event_repeats": 1 if args.quick else 3,
        "threads": torch.get_num_threads(),
    }
    impls = ["ours"]
    if args.device == "cuda":
        try:
            import mamba_ssm  # type: ignore[import-not-found]  # noqa: F401

            impls.append("mamba_ssm")
        except ImportError:
            pass
    sweep = {}
    for impl in impls:
        sweep[impl] = {}
        for n in cfg["d_states"]:
            sweep[impl][str(n)] = step_time(impl, cfg, n)
            print(impl, n, f"{sweep[impl][str(n)]['step']['seconds']:.4f} s", flush=True)
    device = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"CPU {cpu_model()}"
    ) + f" ({platform.machine()})"
    result = {
        "config": cfg,
        "device": device,
        "torch": torch.__version__,
        "sweep": sweep,
        "event": event_time(cfg),
        "gpu_shape_ops": gpu_shape_ops(),
    }
    out = args.out or Path(__file__).resolve().parent / "results" / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    stem = "torch_mamba" + ("_cuda" if args.device == "cuda" else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
