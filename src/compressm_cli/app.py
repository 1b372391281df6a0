"""The ``compressm`` command line: ``compare``, ``train`` and ``analyze``."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .arguments import (
    QUICK_D_STATE,
    QUICK_EVAL_EVERY,
    QUICK_NOTE,
    QUICK_STEPS,
    UsageError,
    parser,
    version,
)

__all__ = ["UsageError", "main", "parser", "version"]


def _reduction_options(args: argparse.Namespace) -> dict[str, Any]:
    """The controller options given on the command line (``--max-cut 1``: no cap)."""
    return {
        "tau": args.tau,
        "mode": args.mode,
        "warmup_fraction": args.warmup_fraction,
        "num_reductions": args.num_reductions,
        "schedule": args.schedule,
        "rewarmup_steps": args.rewarmup_steps,
        "max_cut": None if args.max_cut == 1 else args.max_cut,
        "max_bound": args.max_bound,
    }


def _config(args: argparse.Namespace, *, label: str, seed: int, reduce: bool) -> Any:
    from .runs import RunConfig

    quick = args.quick
    return RunConfig(
        label=label,
        layer=args.model,
        d_model=args.d_model,
        d_state=QUICK_D_STATE if quick and args.d_state == 128 else args.d_state,
        n_layers=args.layers,
        steps=QUICK_STEPS if quick and args.steps == 3000 else args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        reduce=reduce,
        horizon=args.horizon,
        eval_every=QUICK_EVAL_EVERY if quick and args.eval_every == 100 else args.eval_every,
        seed=seed,
        device=args.device,
        backend=args.backend,
        **_reduction_options(args),
    )


def _header(command: str, args: argparse.Namespace, task: Any) -> dict[str, Any]:
    header = {
        "command": command,
        "task": task.name,
        "task_info": {k: v for k, v in task.info.items() if k not in ("a", "b", "c", "d")},
        "argv": sys.argv[1:],
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "backend": args.backend,
    }
    if args.backend == "jax":
        import flax
        import jax

        from .training_jax import resolve_device

        header["jax"] = jax.__version__
        header["flax"] = flax.__version__
        header["jax_device"] = str(resolve_device(args.device))
    else:
        import torch

        header["torch"] = torch.__version__
        header["torch_threads"] = torch.get_num_threads()
    header["device"] = args.device
    header["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return header


def _trainer(args: argparse.Namespace) -> Any:
    """The ``train`` function of the chosen backend."""
    if args.backend == "jax":
        from . import training_jax

        return training_jax.train
    from . import training

    return training.train


def _out(args: argparse.Namespace, command: str, task: str) -> Path:
    if args.out is not None:
        return Path(args.out)
    stem = Path(task).stem if task.endswith(".npz") else task
    return Path("runs") / f"{command}-{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _log(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def _below_true_order(order: int | None, model: str) -> int | None:
    """State size one below what a system of ``order`` real states needs, for ``model``.

    A complex LRU/S5 state with output ``Re(C x)`` carries a conjugate pair (two real states);
    a Mamba state is real.
    """
    if order is None:
        return None
    needed = order if model == "mamba" else math.ceil(order / 2)
    return needed - 1 if needed > 1 else None


def _sweep(
    args: argparse.Namespace, task: Any, train: Any, results: dict[str, Any], progress: bool
) -> list[Any]:
    """Small models at 2, 4, 8, ... states below the full size (first seed); the full model
    of that seed closes the sweep."""
    seed = args.seeds[0]
    full = results["full"][0]
    top = max(full.initial_sizes.values())
    runs = []
    size = 2
    while size < top:
        cfg = _config(args, label=f"sweep N={size} (seed {seed})", seed=seed, reduce=False)
        cfg = dataclasses.replace(cfg, d_state=size)
        runs.append(train(task, cfg, progress=progress, on_event=_log)[0])
        size *= 2
    return [*runs, full]


def _baseline_runs(
    args: argparse.Namespace,
    task: Any,
    seed: int,
    full: tuple[Any, Any],
    sizes: dict[str, int],
    progress: bool,
) -> Iterator[tuple[str, Any]]:
    """``(name, result)`` of each baseline of ``args.baselines`` for ``seed``, as it ends."""
    from .baselines import BaselineOptions, run_baseline

    options = BaselineOptions(hnn_weight=args.hnn_weight, finetune_fraction=args.finetune_fraction)
    for name in args.baselines:
        cfg = _config(args, label=f"{name} (seed {seed})", seed=seed, reduce=False)
        common: dict[str, Any] = {"options": options, "progress": progress, "on_event": _log}
        yield name, run_baseline(name, task, cfg, full=full, sizes=sizes, **common)


def _compare(args: argparse.Namespace, task: Any, folder: Path) -> int:
    from .report import format_paired, format_stages, format_sweep, format_table, write_report
    from .runs import RunResult

    train = _trainer(args)
    seeds: list[int] = args.seeds
    results: dict[str, list[RunResult]] = {"full": [], "compressm": [], "small": []}
    header = _header("compare", args, task)
    if args.quick:
        header["note"] = QUICK_NOTE
    truth = task.info.get("true_hsv")
    below = _below_true_order(task.info.get("true_order"), args.model)
    if below is not None:
        results["below"] = []
    for name in args.baselines:
        results[name] = []
    progress = not args.no_progress
    sweep: list[RunResult] = []
    current = "full"  # the run type in progress, for a partial result on Ctrl-C
    try:
        for seed in seeds:
            current = "full"
            full = _config(args, label=f"full (seed {seed})", seed=seed, reduce=False)
            full_run = train(task, full, progress=progress, on_event=_log)
            results["full"].append(full_run[0])
            current = "compressm"
            cfg = _config(args, label=f"CompreSSM (seed {seed})", seed=seed, reduce=True)
            reduced = train(task, cfg, progress=progress, on_event=_log)[0]
            results["compressm"].append(reduced)
            current = "small"
            small = dataclasses.replace(
                full,
                label=f"small (seed {seed})",
                d_state=tuple(reduced.final_sizes.values()),
            )
            results["small"].append(train(task, small, progress=progress, on_event=_log)[0])
            if below is not None:  # a task with a known order: one state fewer than it needs
                current = "below"
                under = dataclasses.replace(
                    full,
                    label=f"below true order (seed {seed})",
                    d_state=tuple(below for _ in reduced.final_sizes),
                )
                results["below"].append(train(task, under, progress=progress, on_event=_log)[0])
            current = "baselines"
            sizes = dict(reduced.final_sizes)
            for name, run in _baseline_runs(args, task, seed, full_run[:2], sizes, progress):
                results[name].append(run)
        if args.sweep:
            current = "sweep"
            sweep = _sweep(args, task, train, results, progress)
    except KeyboardInterrupt as err:
        partial = getattr(err, "partial_result", None)
        if partial is not None and current in results:  # not a sweep's or a baseline's
            results[current].append(partial)
        header["status"] = "interrupted"
        report = write_report(folder, header=header, results=results, truth=truth)
        _finish_json(args, report)
        print(format_table(report["summary"]))
        print(f"interrupted; partial report in {folder}", file=sys.stderr)
        return 130
    header["status"] = "complete"
    report = write_report(folder, header=header, results=results, truth=truth, sweep=sweep)
    _finish_json(args, report)
    print(format_table(report["summary"]))
    stages = format_stages(report["summary"])
    if stages:
        print(stages)
    if report.get("sweep"):
        print(format_sweep(report["sweep"]))
    for paired in report["paired"]:
        print(format_paired(paired))
    if args.quick:
        print(QUICK_NOTE)
    print(f"\nreport: {folder / 'report.md'}")
    return 0


def _finish_json(args: argparse.Namespace, report: dict[str, Any]) -> None:
    if args.json is not None:
        from .report import to_json, write_text

        write_text(Path(args.json), to_json(report))


def _one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (library messages can span several)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def writable_folder(folder: Path, option: str) -> None:
    """Create ``folder`` (and its parents) and check that a file can be written in it.

    Raises
    ------
    UsageError
        Naming ``option``, if the folder cannot be created or written into.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        reason = err.strerror or _one_line(err)
        msg = f"argument {option}: cannot write into the folder {str(folder)!r} ({reason})"
        raise UsageError(msg) from None


def writable_file(path: Path, option: str) -> None:
    """Check, before any work, that ``path`` can be written: not a folder, its folder writable.

    Raises
    ------
    UsageError
        Naming ``option``.
    """
    if path.is_dir():
        msg = f"argument {option}: expected a file path; received the folder {str(path)!r}"
        raise UsageError(msg)
    writable_folder(path.parent, option)


def _checkpoint_extra(args: argparse.Namespace, cfg: Any, task: Any, result: Any) -> Any:
    return {
        "config": cfg.to_dict(),
        "task": args.task,
        "model": {"d_input": task.d_input, "d_output": task.d_output, "kind": task.kind},
        "test_metric": None if result is None else result.test_metric,
    }


def _save(args: argparse.Namespace, folder: Path, model: Any, ctl: Any, extra: Any) -> Path:
    """Write the checkpoint of the backend's format into ``folder``; return its path."""
    if args.backend == "jax":
        from .training_jax import save_checkpoint as save_jax

        path = folder / "checkpoint.npz"
        save_jax(path, model, controller=ctl, extra=extra)
    else:
        from compressm_torch import save_checkpoint

        path = folder / "checkpoint.pt"
        save_checkpoint(path, model, controller=ctl, extra=extra)
    return path


def _interrupted_checkpoint(
    args: argparse.Namespace, folder: Path, cfg: Any, task: Any, err: KeyboardInterrupt
) -> str:
    """Save the model an interrupted run reached (stored on ``err`` by ``train``); say where."""
    model = getattr(err, "partial_model", None)
    if model is None:
        return "no checkpoint (interrupted before the model was built)"
    partial = getattr(err, "partial_result", None)
    extra = _checkpoint_extra(args, cfg, task, partial)
    try:
        path = _save(args, folder, model, getattr(err, "partial_controller", None), extra)
    except (OSError, RuntimeError, ValueError, TypeError) as save_err:
        return f"no checkpoint ({type(save_err).__name__}: {_one_line(save_err)})"
    return f"checkpoint: {path}"


def _train(args: argparse.Namespace, task: Any, folder: Path) -> int:
    from .report import format_table, write_report

    train = _trainer(args)
    cfg = _config(
        args,
        label="full" if args.no_reduce else "CompreSSM",
        seed=args.seed,
        reduce=not args.no_reduce,
    )
    header = _header("train", args, task)
    try:
        result, model, ctl = train(task, cfg, progress=not args.no_progress, on_event=_log)
    except KeyboardInterrupt as err:
        partial = getattr(err, "partial_result", None)
        header["status"] = "interrupted"
        runs = {"full" if args.no_reduce else "compressm": [partial] if partial else []}
        write_report(folder, header=header, results=runs)
        saved = _interrupted_checkpoint(args, folder, cfg, task, err)
        status = partial.status if partial is not None else "interrupted"
        print(f"{status}; {saved}; partial report in {folder}", file=sys.stderr)
        return 130
    header["status"] = "complete"
    report = write_report(
        folder,
        header=header,
        results={"full" if args.no_reduce else "compressm": [result]},
        truth=task.info.get("true_hsv"),
    )
    path = _save(args, folder, model, ctl, _checkpoint_extra(args, cfg, task, result))
    _finish_json(args, report)
    print(format_table(report["summary"]))
    print(f"\ncheckpoint: {path}\nreport: {folder / 'report.md'}")
    return 0


def _check_jax(args: argparse.Namespace) -> None:
    """Options the JAX backend does not support."""
    baselines = getattr(args, "baselines", ())
    if baselines:
        msg = (
            f"argument --baselines: the JAX backend has no baselines ({', '.join(baselines)}); "
            "use --backend torch"
        )
        raise UsageError(msg)
    if args.model == "mamba":
        msg = "argument --model: the JAX backend has no Mamba layer; use --backend torch"
        raise UsageError(msg)
    if args.threads is not None:
        msg = "argument --threads: torch only (JAX's CPU threads are set by XLA)"
        raise UsageError(msg)
    try:
        import flax  # noqa: F401
        import optax  # noqa: F401

        from .training_jax import resolve_device
    except ImportError as err:
        msg = f"argument --backend: jax needs `pip install compressm[jax]` ({err})"
        raise UsageError(msg) from None
    try:
        resolve_device(args.device)
    except ValueError as err:
        msg = f"argument --device: {err}"
        raise UsageError(msg) from None


def _check_torch_device(name: str) -> None:
    """``name`` parses as a torch device and a tensor can be made on it."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        msg = f"argument --device: not a torch device: {name!r}"
        raise UsageError(msg) from None
    if device.type == "meta":
        msg = "argument --device: 'meta' holds no data; expected cpu, cuda[:index], mps, ..."
        raise UsageError(msg)
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as err:  # AssertionError: torch built without CUDA
        msg = f"argument --device: {name!r} is not available here ({_one_line(err)})"
        raise UsageError(msg) from None


def _check_reduction_options(args: argparse.Namespace) -> None:
    """The controller's own checks of the reduction options (combinations included), so that a
    run is refused before training rather than when its controller is built."""
    import re

    from compressm_core.training import ReductionOptions

    try:
        ReductionOptions(**_reduction_options(args))
    except (ValueError, TypeError) as err:
        named = re.match(r"`(\w+)", str(err))
        option = "--" + named.group(1).replace("_", "-") if named else "--mode"
        msg = f"argument {option}: {_one_line(err)}"
        raise UsageError(msg) from None


def _check_baselines(args: argparse.Namespace, task: Any) -> None:
    """The baselines can run on this model and task."""
    from .baselines import check_baselines

    try:
        check_baselines(args.baselines, layer=args.model, task=task)
    except ValueError as err:
        msg = f"argument --baselines: {_one_line(err)}"
        raise UsageError(msg) from None


def _run(args: argparse.Namespace) -> int:
    """Run the parsed command; bad input raises :class:`UsageError`."""
    if args.command == "analyze":
        from .analyze import run_analyze

        return run_analyze(args)
    from .data import load_task

    if args.backend == "jax":
        _check_jax(args)
    else:
        _check_torch_device(args.device)
    _check_reduction_options(args)
    try:
        task = load_task(args.task)
    except (ValueError, OSError, ImportError) as err:
        msg = f"argument --task: {_one_line(err)}"
        raise UsageError(msg) from None
    if getattr(args, "baselines", ()):
        _check_baselines(args, task)
    folder = _out(args, args.command, args.task)
    writable_folder(folder, "--out")
    if args.json is not None:
        writable_file(args.json, "--json")
    if args.backend == "torch" and args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.command == "compare":
        return _compare(args, task, folder)
    return _train(args, task, folder)


def _usage_error(p: argparse.ArgumentParser, err: UsageError) -> NoReturn:
    p.error(_one_line(err))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``compressm`` command; returns the exit status.

    Bad options and input files exit with status 2 and one line naming the option or file
    (argparse's convention); an interrupted run exits with 130 after writing what it has.
    """
    p = parser()
    args = p.parse_args(argv)
    try:
        return _run(args)
    except UsageError as err:
        _usage_error(getattr(args, "command_parser", p), err)


if __name__ == "__main__":
    raise SystemExit(main())
