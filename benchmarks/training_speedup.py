"""Training speed-up of CompreSSM on MNIST-1D: full size vs CompreSSM vs small from scratch.

Runs the comparison of ``compressm compare`` over several seeds and reports the ratios that
matter: CompreSSM wall time / full wall time, CompreSSM wall time / small-from-scratch wall
time (the physical limit is about 1 plus the warm-up at full size), the test accuracy of each,
and the share of wall time spent in reduction events. Writes
``results/training_speedup.{json,md}``.

Goals: CompreSSM >= 3x faster than full, <= 1.2x the time of small-from-scratch, reduction
events < 1 % of wall time.

Run: ``python benchmarks/training_speedup.py [--d-state 256] [--steps 3000] [--seeds 0 1 2]
[--device cpu] [--warmup-fraction 0.2] [--quick]``; a non-default warm-up writes
``results/training_speedup_warmup<f>.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
from pathlib import Path

import torch

from _cpu import cpu_model
from compressm_cli.data import load_task
from compressm_cli.report import comparison_rows, format_table
from compressm_cli.training import RunConfig, RunResult, train

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-state", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--warmup-fraction",
        type=float,
        default=0.2,
        help="share of training in which the four reductions happen (0.2, the CLI default)",
    )
    parser.add_argument("--quick", action="store_true", help="200 steps, one seed, no files")
    args = parser.parse_args()
    steps, seeds = (200, [0]) if args.quick else (args.steps, args.seeds)
    task = load_task("mnist1d")
    results: dict[str, list[RunResult]] = {"full": [], "compressm": [], "small": []}
    for seed in seeds:
        base = RunConfig(
            label=f"full (seed {seed})",
            d_model=args.d_model,
            d_state=args.d_state,
            steps=steps,
            reduce=False,
            seed=seed,
            device=args.device,
            warmup_fraction=args.warmup_fraction,
        )
        results["full"].append(train(task, base, progress=False)[0])
        cfg = dataclasses.replace(base, label=f"CompreSSM (seed {seed})", reduce=True)
        reduced = train(task, cfg, progress=False)[0]
        results["compressm"].append(reduced)
        small = dataclasses.replace(
            base, label=f"small (seed {seed})", d_state=tuple(reduced.final_sizes.values())
        )
        results["small"].append(train(task, small, progress=False)[0])
        print(f"seed {seed} done", flush=True)
    rows = comparison_rows(results)
    times = {k: [r.train_seconds for r in v] for k, v in results.items()}
    ratios = {
        "compressm_over_full": statistics.mean(
            c / f for c, f in zip(times["compressm"], times["full"], strict=True)
        ),
        "compressm_over_small": statistics.mean(
            c / s for c, s in zip(times["compressm"], times["small"], strict=True)
        ),
        "reduction_share": statistics.mean(
            r.reduction_seconds / r.train_seconds for r in results["compressm"]
        ),
    }
    table = format_table(rows)
    lines = [
        f"MNIST-1D, one LRU block, d_model {args.d_model}, N0 = {args.d_state}, {steps} steps, "
        f"tau = 0.2, reductions in the first {100 * args.warmup_fraction:g} % of training, "
        f"seeds {seeds}; {cpu_model()} ({args.device}), "
        f"{torch.get_num_threads()} torch threads",
        "",
        table,
        "",
        f"- CompreSSM time / full time: {ratios['compressm_over_full']:.3f} "
        f"(speed-up {1 / ratios['compressm_over_full']:.2f}x; goal >= 3x)",
        f"- CompreSSM time / small-from-scratch time: {ratios['compressm_over_small']:.3f} "
        "(goal <= 1.2)",
        f"- share of CompreSSM wall time in reduction events: "
        f"{100 * ratios['reduction_share']:.3f} % (goal < 1 %)",
    ]
    print("\n".join(lines))
    if args.quick:
        return
    RESULTS.mkdir(exist_ok=True)
    stem = "training_speedup" + ("" if args.device == "cpu" else f"_{args.device}")
    if args.warmup_fraction != 0.2:
        stem += f"_warmup{args.warmup_fraction:g}"
    report = {
        "setting": lines[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "summary": rows,
        "ratios": ratios,
        "runs": {k: [dataclasses.asdict(r) for r in v] for k, v in results.items()},
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
