"""The weight lambda of the ``hnn`` baseline, chosen on the validation split.

For one task and seed it trains CompreSSM with the ``compressm compare`` defaults (for the
per-layer sizes it reaches), then, for every lambda of the grid, the full-size model with the
penalty ``lambda * sum_layers sum_i sigma_i`` at every step, truncated once after training to
those sizes (``compressm_cli.baselines.regularise``). The chosen lambda is the one with the best
validation metric after the cut; the test split is not looked at. ``lambda = 0`` is the
unregularised model (the penalty is not computed: its time per step is that of plain training)
cut after training, without fine-tuning.

Writes ``results/hnn_weight.json`` (per lambda: validation and test metric before and after the
cut, the final sum of HSVs, seconds) and ``results/hnn_weight.md``.

Run: ``python benchmarks/hnn_weight.py [--task mnist1d] [--seed 0] [--steps 3000]
[--weights 0 1e-5 1e-4 1e-3 1e-2 1e-1]``.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any

from _results import write_results

RESULTS = Path(__file__).parent / "results"


def _markdown(report: dict[str, Any]) -> str:
    scale = 100.0 if report["metric"] == "accuracy" else 1.0
    better = "higher" if report["metric"] == "accuracy" else "lower"
    lines = [
        "# Weight of the Hankel nuclear-norm penalty (`hnn`)",
        "",
        f"{report['task']}, seed {report['seed']}, {report['steps']} steps, {report['model']} "
        f"N0 = {report['d_state']}, cut to the CompreSSM sizes {report['sizes']}; "
        f"{report['machine']}; torch {report['torch']}, one thread; "
        f"{report['elapsed_s']:.0f} s in all. {report['metric']}, {better} is better.",
        "",
        "| lambda | val before cut | val after cut | test after cut | sum of HSVs | s/step |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['weight']:g} | {scale * row['val_before']:.2f} | "
            f"{scale * row['val_after']:.2f} | {scale * row['test_after']:.2f} | "
            f"{row['hsv_sum']:.3g} | {row['seconds'] / report['steps']:.4f} |"
        )
    lines += [
        "",
        f"Chosen by the validation metric after the cut: lambda = {report['chosen']:g}. "
        f"CompreSSM, same seed: val {scale * report['compressm_val']:.2f}, test "
        f"{scale * report['compressm_test']:.2f}, "
        f"{report['compressm_seconds'] / report['steps']:.4f} s/step.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist1d")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--d-state", type=int, default=128)
    parser.add_argument("--model", default="lru", choices=("lru", "s5", "s4d"))
    parser.add_argument(
        "--weights", type=float, nargs="+", default=[0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "hnn_weight")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from compressm_cli.baselines import BaselineOptions, regularise
    from compressm_cli.data import load_task
    from compressm_cli.training import RunConfig, train

    start = time.perf_counter()
    task = load_task(args.task, seed=args.seed)
    base = RunConfig(steps=args.steps, d_state=args.d_state, layer=args.model, seed=args.seed)
    reduced = train(task, base, progress=False)[0]
    sizes = reduced.final_sizes
    print("compressm", reduced.val_metric, sizes, flush=True)
    rows = []
    for weight in args.weights:
        options = BaselineOptions(hnn_weight=weight)
        config = RunConfig(
            label=f"hnn {weight:g}",
            steps=args.steps,
            d_state=args.d_state,
            layer=args.model,
            seed=args.seed,
            reduce=False,
        )
        run = regularise(task, config, sizes, options=options, progress=False)
        before, after = run.stages["before_cut"], run.stages["after_cut"]
        rows.append(
            {
                "weight": weight,
                "val_before": before["val"],
                "test_before": before["test"],
                "val_after": after["val"],
                "test_after": after["test"],
                "hsv_sum": before["hsv_sum"],
                "seconds": before["seconds"],
                "cut_seconds": after["seconds"],
            }
        )
        print(rows[-1], flush=True)
    higher = reduced.metric_name == "accuracy"
    best = (max if higher else min)(rows, key=lambda r: r["val_after"])
    report = {
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "torch": torch.__version__,
        "task": args.task,
        "seed": args.seed,
        "steps": args.steps,
        "d_state": args.d_state,
        "model": args.model,
        "metric": reduced.metric_name,
        "sizes": list(sizes.values()),
        "compressm_val": reduced.val_metric,
        "compressm_test": reduced.test_metric,
        "compressm_seconds": reduced.train_seconds,
        "rows": rows,
        "chosen": best["weight"],
        "elapsed_s": time.perf_counter() - start,
    }
    write_results(args.out, report, _markdown(report))
    print(_markdown(report))


if __name__ == "__main__":
    main()
