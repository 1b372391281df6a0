"""Cost of the certified schedule's checks, as a share of training time.

Trains the ``compressm compare`` model (one LRU block, ``d_model`` 16, ``N0`` 128, 3000 steps,
MNIST-1D) with ``schedule="certified"`` and times every check (HSVs of each layer, the Weyl
bound against the previous check, the tracker update) separately from the training steps, and
the same for a wider model (``d_model`` 64, ``N0`` 384, 600 steps). Checks run every
``check_every`` = 1 % of the steps until the deadline (the first 20 %); the goal is a cost
under 1 % of the training time.

Writes ``results/certified_checks.{json,md}``. Run: ``python benchmarks/certified_checks.py``.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from _cpu import cpu_model
from compressm_core.training import ControllerBase

RESULTS = Path(__file__).parent / "results"


def _measure(d_model: int, d_state: int, steps: int) -> dict[str, Any]:
    from compressm_cli.data import load_task
    from compressm_cli.training import RunConfig, train

    spent: list[float] = []
    original = ControllerBase._certified_check

    def timed(self: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(self)
        finally:
            spent.append(time.perf_counter() - start)

    ControllerBase._certified_check = timed  # type: ignore[method-assign]
    try:
        task = load_task("mnist1d")
        config = RunConfig(
            d_model=d_model, d_state=d_state, steps=steps, schedule="certified", eval_every=steps
        )
        result = train(task, config, progress=False)[0]
    finally:
        ControllerBase._certified_check = original  # type: ignore[method-assign]
    cuts = [e for e in result.events if e["status"] == "reduced"]
    # the check that cuts includes the reduction itself: count it separately
    cut_seconds = sum(e["seconds"] for e in cuts if e["trigger"] != "deadline")
    checks = sum(spent) - cut_seconds
    return {
        "d_model": d_model,
        "d_state": d_state,
        "steps": steps,
        "checks": len(spent),
        "check_seconds": checks,
        "seconds_per_check": checks / max(1, len(spent)),
        "train_seconds": result.train_seconds,
        "check_share": checks / result.train_seconds,
        "final_sizes": list(result.final_sizes.values()),
        "triggers": [e["trigger"] for e in cuts],
    }


def main() -> None:
    torch.set_num_threads(1)
    rows = [_measure(16, 128, 3000), _measure(64, 384, 600)]
    report = {
        "machine": cpu_model() or platform.processor(),
        "torch": torch.__version__,
        "threads": 1,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "certified_checks.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [
        "| d_model | N0 | steps | checks | s per check | checks / training time | final N | "
        "triggers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['d_model']} | {r['d_state']} | {r['steps']} | {r['checks']} | "
            f"{r['seconds_per_check']:.4f} | {100 * r['check_share']:.2f} % | "
            f"{', '.join(map(str, r['final_sizes']))} | {', '.join(r['triggers'])} |"
        )
    text = f"{report['machine']}, torch {report['torch']}, 1 thread\n\n" + "\n".join(lines)
    (RESULTS / "certified_checks.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
