"""Fidelity study: does CompreSSM beat a small model trained from scratch, task by task?

For every task and seed, with the same steps and the same seeds (paired), it trains

- ``full``: the model at the initial state size, never reduced;
- ``compressm``: CompreSSM with the ``compressm compare`` defaults (fixed steps);
- ``compressm_certified``: CompreSSM with ``schedule="certified"``;
- ``compressm_rewarmup``: CompreSSM with a learning-rate re-warm-up over 1 % of the steps after
  each cut (``rewarmup_steps``);
- ``small``: a model trained from scratch at the per-layer sizes the ``compressm`` run of the
  same seed reached;
- ``random`` and ``smallest``: CompreSSM keeping random modal states or the weakest balanced
  states (the paper's selection ablations), with the defaults otherwise. Like the paper's
  ablation (256 -> 32 in four steps for each selection), every event cuts to the rank the
  ``compressm`` run of the same seed chose at that step, so the three selections are compared
  at equal sizes (the rank rule reads the HSVs of the model in hand, so without this a worse
  selection ends at another size and the comparison mixes selection with size).
- the baselines of ``compressm compare --baselines`` (``compressm_cli.baselines``), at the
  per-layer sizes the ``compressm`` run of the same seed reached: ``kd`` (a student distilled
  from the ``full`` model of the same seed), ``hnn`` (the full-size model trained with the Hankel
  nuclear-norm penalty, cut once after training) and ``post`` (the ``full`` model of the same
  seed cut once after training, then fine-tuned for 10 % of the steps). Their ``seconds`` count
  every stage (the teacher's or the full model's training included) and their ``stages`` hold
  the metrics at each stage. With ``--model mamba`` there is no ``hnn`` (no Hankel singular
  values to penalise).

Every run is ``compressm_cli.training.train`` with a ``RunConfig`` (AdamW, warm-up + cosine,
batch 64, 3000 steps, ``d_model`` 16, ``N0`` 128 unless changed). Runs go to a pool of
``--workers`` processes with one torch thread each, so wall times of runs in the same study
compare with each other (not with runs on an idle machine).

Writes ``results/fidelity.json`` (per task: ``metric``, ``higher_is_better``, ``arms: {name:
{"test": [...], "sizes": [...], "seconds": [...]}}`` with one entry per seed, and for the
baselines ``"stages": [{stage: {"val", "test", "seconds"}}, ...]``) and
``results/fidelity.md`` (mean ± std, paired differences ``compressm - small`` per seed, their
mean and a sign count).

Run: ``python benchmarks/fidelity.py [--tasks mnist1d digits sysid] [--seeds 0 1 2 3 4]
[--workers 2] [--steps 3000] [--arms ...] [--set warmup_fraction=0.1 ...]``; ``--set`` changes a
``RunConfig`` field in every arm (a variant of the recipe, recorded in the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from _results import mean_std, write_results

RESULTS = Path(__file__).parent / "results"
ARMS = (
    "full",
    "compressm",
    "compressm_certified",
    "compressm_rewarmup",
    "small",
    "random",
    "smallest",
    "kd",
    "hnn",
    "post",
)
BASELINES = ("kd", "hnn", "post")
NEEDS_FULL = ("kd", "post")  # the trained full model of the same seed
OVERRIDES: dict[str, dict[str, Any]] = {
    "full": {"reduce": False},
    "compressm": {},
    "compressm_certified": {"schedule": "certified"},
    "compressm_rewarmup": {"rewarmup": 0.01},
    "random": {"selection": "random"},
    "smallest": {"selection": "smallest"},
    "kd": {"reduce": False},
    "hnn": {"reduce": False},
    "post": {"reduce": False},
}
# Selective (Mamba) layers keep states by an importance score, not by a balanced selection:
# their random ablation is ``importance="random"``; they have no ``smallest``.
SELECTIVE_OVERRIDES: dict[str, dict[str, Any]] = {"random": {"importance": "random"}}


ABLATIONS = ("random", "smallest")


@contextlib.contextmanager
def _ranks_of(plan: dict[str, list[int]] | None) -> Iterator[None]:
    """Within the block, every event cuts to ``plan[step]`` (one rank per layer, in order).

    ``plan`` holds the new ranks of the reference run's events by step; a step without an
    event keeps every state (the gate then skips it).
    """
    if plan is None:
        yield
        return
    from compressm_core.training import ControllerBase

    queue = {int(step): list(ranks) for step, ranks in plan.items()}
    original = ControllerBase._floor

    def floor(self: Any, rank: int, total: int) -> int:  # every rank rule ends here
        ranks = queue.get(self.num_steps)
        return int(ranks.pop(0)) if ranks else total

    ControllerBase._floor = floor  # type: ignore[method-assign]
    try:
        yield
    finally:
        ControllerBase._floor = original  # type: ignore[method-assign]


def _baseline(job: dict[str, Any], task: Any, config: Any) -> Any:
    """The result of the baseline ``job["arm"]``, with the full model saved by the ``full`` job
    of the same task and seed (``kd``, ``post``)."""
    import torch

    from compressm_cli.baselines import run_baseline
    from compressm_cli.training import RunResult, build_model

    full = None
    if job["arm"] in NEEDS_FULL:
        saved = torch.load(job["full"], weights_only=False)
        model = build_model(task, config)
        model.load_state_dict(saved["model"])
        full = (RunResult(**saved["result"]), model)
    return run_baseline(job["arm"], task, config, full=full, sizes=job["sizes"], progress=False)


def _run(job: dict[str, Any]) -> dict[str, Any]:
    import dataclasses

    import torch

    torch.set_num_threads(1)
    from compressm_cli.data import load_task
    from compressm_cli.training import RunConfig, train

    task = load_task(job["task"], seed=job["seed"])
    options = dict(job["config"])
    if "rewarmup" in options:  # a fraction of the run
        options["rewarmup_steps"] = max(1, round(options.pop("rewarmup") * options["steps"]))
    config = RunConfig(label=job["arm"], seed=job["seed"], **options)
    if job["arm"] in BASELINES:
        result = _baseline(job, task, config)
    else:
        with _ranks_of(job.get("ranks")):
            result, model, _ = train(task, config, progress=False)
        if job.get("save"):  # the teacher of kd, the model post cuts
            torch.save(
                {"model": model.state_dict(), "result": dataclasses.asdict(result)}, job["save"]
            )
    plan: dict[str, list[int]] = {}
    for event in result.events:
        plan.setdefault(str(event["step"]), []).append(int(event["new_rank"]))
    return {
        "task": job["task"],
        "arm": job["arm"],
        "seed": job["seed"],
        "test": result.test_metric,
        "sizes": list(result.final_sizes.values()),
        "sizes_by_layer": dict(result.final_sizes),
        "seconds": result.train_seconds,
        "metric": result.metric_name,
        "triggers": sorted(
            {e.get("trigger", "") for e in result.events if e["status"] == "reduced"}
        ),
        "ranks": plan,
        "stages": result.stages,
    }


def _overrides(args: argparse.Namespace, arm: str) -> dict[str, Any]:
    if args.model == "mamba":
        return SELECTIVE_OVERRIDES.get(arm, OVERRIDES[arm])
    return OVERRIDES[arm]


def _setting(text: str) -> tuple[str, Any]:
    """``key=value`` of ``--set``: a ``RunConfig`` field and a JSON value (``none`` -> None)."""
    from compressm_cli.training import RunConfig

    key, sep, value = text.partition("=")
    if not sep or key not in RunConfig.__dataclass_fields__:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE with a RunConfig field: {text!r}")
    return key, None if value.lower() == "none" else json.loads(value)


def _base(args: argparse.Namespace) -> dict[str, Any]:
    return {"steps": args.steps, "d_state": args.d_state, "layer": args.model, **dict(args.set)}


def _saved(args: argparse.Namespace, task: str, seed: int) -> str:
    """Where the ``full`` job of ``task`` and ``seed`` saves its model for the baselines."""
    return str(Path(args.scratch) / f"full-{task}-{seed}.pt")


def _needed(arms: list[str]) -> list[str]:
    """``arms`` and the arms they depend on: ``full`` for ``kd`` and ``post``, ``compressm``
    for ``small`` and the baselines (at its sizes). A dependency not asked for is run, not
    reported."""
    needed = list(arms)
    if "full" not in needed and any(a in NEEDS_FULL for a in arms):
        needed.append("full")
    if "compressm" not in needed and any(a in (*BASELINES, "small") for a in arms):
        needed.append("compressm")
    return needed


def _jobs(args: argparse.Namespace, arms: list[str]) -> list[dict[str, Any]]:
    """The jobs that depend on no other run (``full`` also when only a baseline needs it,
    and ``compressm`` when a follower needs its sizes)."""
    base = _base(args)
    needed = _needed(arms)
    jobs = []
    for t in args.tasks:
        for s in args.seeds:
            for a in needed:
                if a == "small" or a in BASELINES or (a in ABLATIONS and "compressm" in needed):
                    continue
                job = {"task": t, "arm": a, "seed": s, "config": {**base, **_overrides(args, a)}}
                if a == "full" and any(b in NEEDS_FULL for b in arms):
                    job["save"] = _saved(args, t, s)
                jobs.append(job)
    return jobs


def _followers(args: argparse.Namespace, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Jobs that depend on the ``compressm`` runs: ``small`` at their final sizes, and the
    selection ablations at their per-event ranks."""
    base = _base(args)
    jobs = []
    for row in rows:
        if row["arm"] != "compressm":
            continue
        key = {"task": row["task"], "seed": row["seed"]}
        if "small" in args.arms:
            config = {**base, "reduce": False, "d_state": tuple(row["sizes"])}
            jobs.append({**key, "arm": "small", "config": config})
        for arm in ABLATIONS:
            if arm in args.arms:
                config = {**base, **_overrides(args, arm)}
                jobs.append({**key, "arm": arm, "config": config, "ranks": row["ranks"]})
        for arm in BASELINES:
            if arm in args.arms:
                config = {**base, **_overrides(args, arm)}
                job = {**key, "arm": arm, "config": config, "sizes": row["sizes_by_layer"]}
                jobs.append({**job, "full": _saved(args, row["task"], row["seed"])})
    return jobs


def _collect(results: Any) -> list[dict[str, Any]]:
    """The runs as they finish, one progress line each."""
    rows = []
    for row in results:
        rows.append(row)
        line = f"{row['test']:.4f} {row['sizes']} {row['seconds']:.1f}s"
        print(row["task"], row["arm"], row["seed"], line, flush=True)
    return rows


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Fidelity study",
        "",
        f"{report['machine']}; torch {report['torch']}; {report['workers']} worker(s), one "
        f"thread each; seeds {report['seeds']}; {report['elapsed_s']:.0f} s in all.",
        "",
    ]
    for task, entry in report["tasks"].items():
        arms = entry["arms"]
        sign = 1 if entry["higher_is_better"] else -1
        scale = 100.0 if entry["metric"] == "accuracy" else 1.0
        unit = " (%)" if scale == 100 else ""
        better = "higher" if sign > 0 else "lower"
        steps = entry.get("steps", report.get("steps"))
        settings = "".join(f"; {k} = {v}" for k, v in entry.get("settings", {}).items())
        lines += [
            f"## {task} ({entry['metric']}{unit}, {better} is better; {steps} steps{settings})",
            "",
            "| arm | test | final size | seconds |",
            "|---|---|---|---|",
        ]
        for name, arm in arms.items():
            sizes = [statistics.fmean(s) for s in arm["sizes"]]
            test = [scale * v for v in arm["test"]]
            lines.append(
                f"| {name} | {mean_std(test)} | {mean_std(sizes)} | {mean_std(arm['seconds'])} |"
            )
        lines.append("")
        for other in ("small", "full", *BASELINES):
            if "compressm" in arms and other in arms:
                diffs = [
                    scale * (a - b)
                    for a, b in zip(arms["compressm"]["test"], arms[other]["test"], strict=True)
                ]
                if scale != 100:  # errors: differences relative to the other arm, in %
                    diffs = [100 * d / b for d, b in zip(diffs, arms[other]["test"], strict=True)]
                better = sum(1 for d in diffs if sign * d > 0)
                per_seed = ", ".join(f"{d:+.2f}" for d in diffs)
                how = "" if scale == 100 else " (relative, %)"
                lines.append(
                    f"- compressm − {other}{how}, per seed: {per_seed}; mean "
                    f"{statistics.fmean(diffs):+.2f}; compressm better on {better} of "
                    f"{len(diffs)} seeds."
                )
        for name in BASELINES:
            if name in arms and arms[name].get("stages"):
                stages = arms[name]["stages"]
                means = {
                    stage: scale * statistics.fmean(s[stage]["test"] for s in stages)
                    for stage in stages[0]
                }
                parts = ", ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in means.items())
                lines.append(f"- {name}, mean test by stage: {parts}.")
        order = [a for a in ("compressm", *ABLATIONS) if a in arms]
        if len(order) > 1 and order[0] == "compressm":
            means = [sign * scale * statistics.fmean(arms[a]["test"]) for a in order]
            holds = all(a > b for a, b in itertools.pairwise(means))
            matched = entry.get("ablations_matched", False)
            names = " > ".join(["largest", *order[1:]])
            lines.append(
                f"- selection ablation{' (same per-event ranks as compressm)' if matched else ''}:"
                f" {names} {'holds' if holds else 'does not hold'}."
            )
        if "compressm_rewarmup" in arms and "compressm" in arms:
            diffs = [
                scale * (a - b)
                for a, b in zip(
                    arms["compressm_rewarmup"]["test"], arms["compressm"]["test"], strict=True
                )
            ]
            better = sum(1 for d in diffs if sign * d > 0)
            lines.append(
                f"- compressm_rewarmup − compressm (re-warm-up over 1 % of the steps after each "
                f"cut): mean {statistics.fmean(diffs):+.3g}; better on {better} of {len(diffs)} "
                "seeds."
            )
        if "compressm_certified" in arms and "small" in arms:
            diffs = [
                scale * (a - b)
                for a, b in zip(
                    arms["compressm_certified"]["test"], arms["small"]["test"], strict=True
                )
            ]
            lines.append(
                f"- compressm_certified − small (at compressm's sizes): mean "
                f"{statistics.fmean(diffs):+.2f}."
            )
        lines.append("")
    return "\n".join(lines)


def _join_seeds(earlier: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """``later`` with the runs of ``earlier`` (the same task, settings and arms, other seeds)
    added, every list in seed order."""
    seeds = list(earlier["seeds"]) + list(later["seeds"])
    order = sorted(range(len(seeds)), key=seeds.__getitem__)
    arms = {}
    for arm in later["arms"]:
        joined = {}
        for field, values in later["arms"][arm].items():
            both = list(earlier["arms"][arm][field]) + list(values)
            joined[field] = [both[i] for i in order]
        arms[arm] = joined
    return {**later, "seeds": sorted(seeds), "arms": arms}


def _merge(paths: list[Path], out: Path) -> None:
    """One report from several runs of the study. A task that comes again: on other seeds with
    the same settings and arms, its runs are joined seed by seed; otherwise the later file's
    arms win."""
    reports = [json.loads(p.read_text()) for p in paths]
    merged = {k: v for k, v in reports[0].items() if k != "tasks"}
    merged["tasks"] = {}
    for report in reports:
        for task, entry in report["tasks"].items():
            entry = {"steps": report["steps"], "seeds": report["seeds"], **entry}
            earlier = merged["tasks"].get(task)
            if (
                earlier is not None
                and not set(earlier["seeds"]) & set(entry["seeds"])
                and earlier.get("settings") == entry.get("settings")
                and set(earlier["arms"]) == set(entry["arms"])
            ):
                entry = _join_seeds(earlier, entry)
            elif earlier is not None:  # same task: arms of the later file win
                entry["arms"] = {**earlier["arms"], **entry["arms"]}
                matched = earlier.get("ablations_matched", False)
                entry["ablations_matched"] = matched or entry.get("ablations_matched", False)
            merged["tasks"][task] = entry
    merged["elapsed_s"] = sum(r["elapsed_s"] for r in reports)
    merged["workers"] = "-".join(sorted({str(r["workers"]) for r in reports}))
    merged["steps"] = sorted({e["steps"] for e in merged["tasks"].values()})
    merged["seeds"] = sorted({s for e in merged["tasks"].values() for s in e["seeds"]})
    write_results(out, merged, _markdown(merged))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["mnist1d", "digits", "sysid"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--arms", nargs="+", default=None, choices=ARMS)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--d-state", type=int, default=128)
    parser.add_argument("--model", default="lru", choices=("lru", "s5", "mamba"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--set", type=_setting, nargs="+", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--out", type=Path, default=RESULTS / "fidelity")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="combine the tasks of these result JSON files into --out (no training)",
    )
    args = parser.parse_args()
    if args.merge:
        _merge(args.merge, args.out)
        return
    if args.arms is None:  # every arm that applies to the model
        args.arms = [a for a in ARMS if not (args.model == "mamba" and a == "hnn")]
    elif args.model == "mamba" and "hnn" in args.arms:
        parser.error("argument --arms: hnn needs Hankel singular values; Mamba has none")
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch, ProcessPoolExecutor(args.workers) as pool:
        args.scratch = scratch
        rows += _collect(pool.map(_run, _jobs(args, args.arms)))
        rows += _collect(pool.map(_run, _followers(args, rows)))
    import torch

    tasks: dict[str, Any] = {}
    for task in args.tasks:
        mine = [r for r in rows if r["task"] == task]
        metric = mine[0]["metric"]
        arms = {}
        for arm in args.arms:
            runs = sorted((r for r in mine if r["arm"] == arm), key=lambda r: r["seed"])
            arms[arm] = {
                "test": [r["test"] for r in runs],
                "sizes": [r["sizes"] for r in runs],
                "seconds": [r["seconds"] for r in runs],
                "triggers": [r["triggers"] for r in runs],
            }
            if arm in BASELINES:
                arms[arm]["stages"] = [r["stages"] for r in runs]
        tasks[task] = {
            "metric": metric,
            "higher_is_better": metric == "accuracy",
            "steps": args.steps,
            "seeds": args.seeds,
            "ablations_matched": "compressm" in _needed(args.arms),
            "settings": dict(args.set),
            "elapsed_s": time.perf_counter() - start,
            "arms": arms,
        }
    report = {
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "workers": args.workers,
        "steps": args.steps,
        "d_state": args.d_state,
        "model": args.model,
        "seeds": args.seeds,
        "elapsed_s": time.perf_counter() - start,
        "tasks": tasks,
    }
    write_results(args.out, report, _markdown(report))
    print(_markdown(report))


if __name__ == "__main__":
    main()
