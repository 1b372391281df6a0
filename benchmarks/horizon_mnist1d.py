"""Infinite- vs finite-horizon Gramians for in-training reduction, on MNIST-1D.

Trains the same small LRU classifier with CompreSSM under ``horizon=None`` (the paper's
infinite-horizon Gramians) and ``horizon="auto"`` (Gramians over the training sequence length,
L = 40), and a third time with infinite-horizon Gramians held (``min_rank``) at the size the
finite-horizon run reached, over several seeds, and writes accuracy and final state sizes:
``results/horizon_mnist1d.{json,md}``. MNIST-1D is regenerated locally by the ``mnist1d``
package with its published arguments (no download).

Recipe: one LRU block (pre-LayerNorm, GELU + GLU), linear encoder, mean pool; AdamW lr 1e-2,
cosine with 5 % warm-up, batch 64, H = 16, N0 = 128, four reductions at 5/10/15/20 % of training,
tau = 0.2.

Run: ``python benchmarks/horizon_mnist1d.py [--steps 3000] [--seeds 0 1 2] [--quick]``. The
committed results used ``OMP_NUM_THREADS=1`` (the thread count changes the order of floating-point
sums, hence the trajectories; it is recorded).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from _cpu import cpu_model
from compressm_torch import CompreSSM, SequenceModel

RESULTS = Path(__file__).parent / "results"


def mnist1d_splits(seed: int = 42) -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    data = make_dataset(args)
    return {
        "x_train": data["x"].astype(np.float32),
        "y_train": data["y"].astype(np.int64),
        "x_test": data["x_test"].astype(np.float32),
        "y_test": data["y_test"].astype(np.int64),
    }


def run(
    data: dict[str, np.ndarray], *, horizon: object, seed: int, steps: int, min_rank: int = 1
) -> dict:
    torch.manual_seed(seed)
    x = torch.from_numpy(data["x_train"])[..., None]
    y = torch.from_numpy(data["y_train"])
    xt = torch.from_numpy(data["x_test"])[..., None]
    yt = torch.from_numpy(data["y_test"])
    model = SequenceModel(1, 10, d_model=16, d_state=128, n_layers=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    warm = max(1, int(0.05 * steps))

    def schedule(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    ctl = CompreSSM(
        model,
        opt,
        total_steps=steps,
        tau=0.2,
        warmup_fraction=0.2,
        num_reductions=4,
        horizon=horizon,  # type: ignore[arg-type]
        min_rank=min_rank,
        lr_scheduler=sched,
    )
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(len(x), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ctl.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        acc = float((model(xt).argmax(-1) == yt).float().mean())
    return {
        "horizon": ("infinite" if horizon is None else str(horizon))
        + (" (N matched)" if min_rank > 1 else ""),
        "seed": seed,
        "test_accuracy": acc,
        "final_state": next(iter(ctl.state_sizes.values())),
        "seconds": seconds,
        "events": [(e.step, e.old_rank, e.new_rank, e.status) for e in ctl.history],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="300 steps, one seed, no files")
    args = parser.parse_args()
    steps, seeds = (300, [0]) if args.quick else (args.steps, args.seeds)
    data = mnist1d_splits()
    runs = []
    for seed in seeds:
        # Third arm: infinite-horizon Gramians kept (by min_rank) at the size the finite-horizon
        # run reached, so the two rankings are compared at equal state size.
        arms: list[tuple[object, int | None]] = [(None, 1), ("auto", 1), (None, None)]
        for horizon, min_rank in arms:
            matched = runs[-1]["final_state"] if min_rank is None else min_rank
            result = run(data, horizon=horizon, seed=seed, steps=steps, min_rank=matched)
            print(
                f"horizon={result['horizon']:>21}  seed={seed}  "
                f"acc={result['test_accuracy']:.4f}  N={result['final_state']}  "
                f"{result['seconds']:.1f}s",
                flush=True,
            )
            runs.append(result)
    rows = []
    for name in ("infinite", "auto", "infinite (N matched)"):
        sel = [r for r in runs if r["horizon"] == name]
        accs = [r["test_accuracy"] for r in sel]
        sizes = [r["final_state"] for r in sel]
        rows.append(
            {
                "horizon": name,
                "accuracy_mean": statistics.mean(accs),
                "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "state_mean": statistics.mean(sizes),
                "states": sizes,
                "accuracies": accs,
            }
        )
    report = {
        "task": "MNIST-1D (mnist1d.make_dataset, published arguments, seed 42), L = 40",
        "steps": steps,
        "seeds": seeds,
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "summary": rows,
        "runs": runs,
    }
    if args.quick:
        print(json.dumps(rows, indent=1))
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "horizon_mnist1d.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [
        f"MNIST-1D, one LRU block (H = 16, N0 = 128), {steps} steps, tau = 0.2, "
        f"seeds {seeds}; {cpu_model()}, {torch.get_num_threads()} torch thread(s)",
        "",
        "| Gramians | test accuracy (mean ± std) | final N (mean) | final N per seed |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['horizon']} | {100 * row['accuracy_mean']:.2f} ± "
            f"{100 * row['accuracy_std']:.2f} % | {row['state_mean']:.1f} | {row['states']} |"
        )
    (RESULTS / "horizon_mnist1d.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
