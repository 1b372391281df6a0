"""The cost of one reduction event, batched against one layer at a time, in training steps.

A :class:`compressm_torch.SequenceModel` of LRU blocks is trained for a few AdamW steps; then
one event ``CompreSSM(model, opt, mode="fixed", fraction=0.75).reduce()`` cuts every layer
``N -> N/4`` the way training does (HSVs, rank, gate, balanced truncation, re-diagonalisation,
write-back, optimizer surgery), on fresh copies of the same trained model and optimizer:

- **batched** (the controller): the layers of one shape measured in one batched core call
  (:func:`compressm_core.layer_batches.measure_layers`: Gramian factors, one SVD, the HSVs to the
  host in one transfer) and truncated together (:func:`~compressm_core.layer_batches.plan_layers`);
- **per layer** (the path before batching, still the fallback): every layer measured and
  planned alone (``hankel_singular_values`` then ``plan_reduction``, which computes the
  Gramians and an SVD again).

Both run alternately in one process, so machine noise hits both alike; wall-clock and process
CPU seconds are recorded (on a shared CPU the CPU seconds are the steadier figure). The
training step of the model before the event is timed too, and each event is given in steps.

Usage::

    python benchmarks/event_batches.py                        # CPU: 6 blocks, d_model 128, 384
    python benchmarks/event_batches.py --quick                # smoke test
    python benchmarks/event_batches.py --device cuda --shape scifar   # the GPU goal

Writes ``event_batches[_<device>].json`` and ``.md`` under ``--out`` (default
``benchmarks/results``; ``benchmarks/results/quick`` with ``--quick``). The goal is
an event at the sCIFAR shape (6 blocks, d_model 512, d_state 384, batch 50, length 1024) of at
most two training steps at 384 on a GPU: run ``--device cuda --shape scifar`` there.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from _cpu import cpu_model
from _results import write_results
from compressm_torch import CompreSSM, SequenceModel

ROOT = Path(__file__).resolve().parents[1]
GOAL_EVENT_STEPS = 2.0

SHAPES: dict[str, dict[str, int]] = {
    # small enough for two shared CPU cores; the event's cost is set by d_state and layers
    "small": {"layers": 6, "d_model": 128, "d_state": 384, "batch": 8, "length": 256},
    "scifar": {"layers": 6, "d_model": 512, "d_state": 384, "batch": 50, "length": 1024},
    "quick": {"layers": 3, "d_model": 32, "d_state": 64, "batch": 4, "length": 64},
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(work: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of ``work()``."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def per_layer(ctl: CompreSSM) -> CompreSSM:
    """``ctl`` measuring and planning every layer alone (the path before batching)."""
    ctl._read_system = lambda name, layer: None  # type: ignore[method-assign]
    return ctl


def trained(shape: dict[str, int], device: torch.device, steps: int) -> tuple[Any, Any, Any]:
    torch.manual_seed(0)
    model = SequenceModel(
        3, 10, d_model=shape["d_model"], d_state=shape["d_state"], n_layers=shape["layers"]
    ).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape["batch"], shape["length"], 3, generator=g).to(device)
    y = torch.randint(0, 10, (shape["batch"],), generator=g).to(device)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(steps):
        step()
    return model, opt, step


def run(shape: dict[str, int], device: torch.device, repeats: int) -> dict[str, Any]:
    model, opt, step = trained(shape, device, steps=2)
    steps = [timed(step, device) for _ in range(max(3, repeats))]
    results: dict[str, Any] = {"batched": [], "per_layer": []}
    ranks: set[tuple[str, int, int]] = set()
    for i in range(repeats + 1):  # the first round warms up both paths
        for path in ("batched", "per_layer") if i % 2 else ("per_layer", "batched"):
            m, o = copy.deepcopy((model, opt))
            ctl = CompreSSM(m, o, total_steps=100, mode="fixed", fraction=0.75)
            if path == "per_layer":
                per_layer(ctl)
            events: list[Any] = []
            wall, cpu = timed(lambda c=ctl, e=events: e.extend(c.reduce()), device)
            ranks |= {(e.status, e.old_rank, e.new_rank) for e in events}
            if i:
                results[path].append({"wall": wall, "cpu": cpu})
    step_wall = statistics.median(s[0] for s in steps)
    step_cpu = statistics.median(s[1] for s in steps)
    out: dict[str, Any] = {
        "shape": shape,
        "step": {"wall": step_wall, "cpu": step_cpu, "all": steps},
        "events": sorted(ranks),
    }
    for path, runs in results.items():
        wall = statistics.median(r["wall"] for r in runs)
        cpu = statistics.median(r["cpu"] for r in runs)
        out[path] = {
            "wall": wall,
            "cpu": cpu,
            "steps_wall": wall / step_wall,
            "steps_cpu": cpu / step_cpu,
            "all": runs,
        }
    out["speedup_wall"] = out["per_layer"]["wall"] / out["batched"]["wall"]
    out["speedup_cpu"] = out["per_layer"]["cpu"] / out["batched"]["cpu"]
    return out


def markdown(report: dict[str, Any]) -> str:
    res, machine = report["result"], report["machine"]
    s = res["shape"]
    lines = [
        "# compressm_torch: one reduction event, batched against one layer at a time",
        "",
        f"{machine['device']}; torch {machine['torch']}, {machine['threads']} torch "
        f"thread(s). {s['layers']} LRU blocks, d_model {s['d_model']}, d_state "
        f"{s['d_state']} -> {s['d_state'] // 4} (fixed fraction 0.75), batch {s['batch']}, "
        f"length {s['length']}; medians of {report['repeats']} events per path, run "
        "alternately on fresh copies of one trained model and optimizer.",
        "",
        "| | wall [s] | CPU [s] | in training steps (wall) | in training steps (CPU) |",
        "|---|---|---|---|---|",
        f"| training step at {s['d_state']} | {res['step']['wall']:.3g} | "
        f"{res['step']['cpu']:.3g} | 1 | 1 |",
    ]
    for path, label in (
        ("per_layer", "event, one layer at a time"),
        ("batched", "event, batched"),
    ):
        r = res[path]
        lines.append(
            f"| {label} | {r['wall']:.3g} | {r['cpu']:.3g} | {r['steps_wall']:.2f} | "
            f"{r['steps_cpu']:.2f} |"
        )
    lines += [
        "",
        f"Batched / per layer: {res['speedup_wall']:.2f}x faster (wall), "
        f"{res['speedup_cpu']:.2f}x (CPU). Events: {res['events']} "
        "(status, old rank, new rank).",
        "",
        f"Goal (on a GPU at the sCIFAR shape): an event of at most "
        f"{GOAL_EVENT_STEPS:g} training steps at 384. "
        + (
            f"Here: {res['batched']['steps_wall']:.2f} steps (wall)."
            if machine["device"].startswith("cuda") and s["d_model"] == 512
            else "Not measured here (this run is not the sCIFAR shape on a GPU)."
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape or ("quick" if args.quick else "small")]
    repeats = 1 if args.quick else args.repeats
    start = time.perf_counter()
    result = run(shape, device, repeats)
    name = "" if device.type == "cpu" else torch.cuda.get_device_name(device)
    report = {
        "machine": {
            "device": f"cuda ({name})" if device.type == "cuda" else f"CPU {cpu_model()}",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "repeats": repeats,
        "seconds": time.perf_counter() - start,
        "result": result,
    }
    out = args.out or ROOT / "benchmarks" / "results" / ("quick" if args.quick else "")
    suffix = "" if device.type == "cpu" else f"_{device.type}"
    write_results(out / f"event_batches{suffix}", report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
