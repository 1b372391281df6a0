"""The arguments of the ``compressm`` command: the parser, its value types and the presets."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .baselines import BASELINES, HNN_WEIGHT

__all__ = [
    "DEFAULT_TAUS",
    "MAX_SEED",
    "QUICK_D_STATE",
    "QUICK_EVAL_EVERY",
    "QUICK_NOTE",
    "QUICK_STEPS",
    "UsageError",
    "parser",
    "version",
]

QUICK_NOTE = (
    "--quick is a smoke test: its runs are too short to compare the methods (the ordering of "
    "the rows can differ from that of a full run)."
)

# The --quick preset (replaces the defaults it names; explicit options win).
QUICK_STEPS, QUICK_D_STATE, QUICK_EVAL_EVERY = 300, 32, 50
DEFAULT_TAUS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3)
MAX_SEED = 2**32 - 1  # what every seeded generator of both backends takes


class UsageError(Exception):
    """Bad input found after parsing (an option's value, a file): :func:`main` exits with status
    2 and the message on one line. The message starts with ``argument NAME:``."""


def version() -> str:
    """The installed version of compressm (that of the source tree when not installed)."""
    from importlib import metadata

    try:
        return metadata.version("compressm")
    except metadata.PackageNotFoundError:
        from compressm_core import __version__

        return __version__


def _horizon(text: str) -> int | str | None:
    if text in ("none", "inf", "infinite"):
        return None
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        msg = f"expected 'none', 'auto' or a positive int; received {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _number(kind: type, accept: Callable[[Any], bool], expected: str) -> Any:
    """An argparse type: ``kind(text)`` if it is finite and ``accept`` holds, else a message with
    ``expected`` (``nan`` and ``inf`` are refused)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not accept(value):
            msg = f"expected {expected}; received {text!r}"
            raise argparse.ArgumentTypeError(msg)
        return value

    return parse


def _positive(kind: type) -> Any:
    return _number(kind, lambda v: v > 0, f"a finite positive {kind.__name__}")


_nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_cut_fraction = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
_fraction = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
_warmup_fraction = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
_seed = _number(int, lambda v: 0 <= v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]")


def _baselines(text: str) -> tuple[str, ...]:
    """``kd,hnn,post`` (any subset, in any order) as a tuple without repeats."""
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",")))
    if not names or any(name not in BASELINES for name in names):
        msg = f"expected a comma-separated subset of {', '.join(BASELINES)}; received {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return names


def _add_baseline_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("baselines")
    g.add_argument(
        "--baselines",
        type=_baselines,
        default=(),
        metavar="NAMES",
        help="also train, comma-separated: kd (knowledge distillation from the full model), "
        "hnn (Hankel nuclear-norm regularisation, cut after training), post (cut after "
        "training, then fine-tuned); none by default. torch backend only",
    )
    g.add_argument(
        "--hnn-weight",
        type=_positive(float),
        default=HNN_WEIGHT,
        help=f"weight of the Hankel nuclear-norm penalty of hnn ({HNN_WEIGHT:g})",
    )
    g.add_argument(
        "--finetune-fraction",
        type=_cut_fraction,
        default=0.1,
        help="fine-tuning steps of post after its cut, as a fraction of --steps (0.1)",
    )


def _add_choice(group: Any, flag: str, choices: tuple[str, ...], text: str) -> None:
    """Add to ``group`` the option ``flag`` taking one of ``choices``, the first by default,
    with the help ``text``."""
    group.add_argument(flag, choices=choices, default=choices[0], help=text)


def _add_training_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task and model")
    _add_choice(
        g,
        "--backend",
        ("torch", "jax"),
        "training framework: torch (default) or jax (Flax NNX + optax; lru, s5 and s4d)",
    )
    g.add_argument(
        "--task",
        default="mnist1d",
        help="mnist1d (default), digits, sysid, or a .npz file with x_train/y_train/x_test/y_test",
    )
    _add_choice(g, "--model", ("lru", "s5", "s4d", "mamba"), "SSM layer (lru)")
    g.add_argument("--d-model", type=_positive(int), default=16, help="model width (16)")
    g.add_argument("--d-state", type=_positive(int), default=128, help="initial state (128)")
    g.add_argument("--layers", type=_positive(int), default=1, help="SSM blocks (1)")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=_positive(int), default=3000, help="optimizer steps (3000)")
    g.add_argument("--batch-size", type=_positive(int), default=64, help="batch size (64)")
    g.add_argument("--lr", type=_positive(float), default=1e-2, help="peak AdamW lr (1e-2)")
    g.add_argument("--eval-every", type=_positive(int), default=100, help="validation period")
    g.add_argument(
        "--device",
        default="cpu",
        help="torch device, or with --backend jax a JAX platform[:index] such as gpu (cpu)",
    )
    g.add_argument(
        "--threads", type=_positive(int), default=None, help="torch CPU threads (torch only)"
    )
    g = p.add_argument_group("reduction")
    g.add_argument("--tau", type=_fraction, default=0.1, help="HSV energy discarded (0.1)")
    _add_choice(g, "--mode", ("tolerance", "fixed", "pragmatic"), "mode")
    g.add_argument(
        "--horizon",
        type=_horizon,
        default=None,
        help="Gramian horizon: none (infinite, default), auto (training length) or steps",
    )
    g.add_argument(
        "--warmup-fraction",
        type=_warmup_fraction,
        default=0.1,
        help="fraction of training the reductions happen in (0.1)",
    )
    g.add_argument("--num-reductions", type=_positive(int), default=4, help="events (4)")
    _add_choice(
        g,
        "--schedule",
        ("steps", "certified"),
        "fixed reduction steps, or cuts certified stable after learning starts (steps)",
    )
    g.add_argument(
        "--max-cut",
        type=_cut_fraction,
        default=0.5,
        help="largest fraction of a layer's states one event removes; 1: no floor (0.5)",
    )
    g.add_argument(
        "--max-bound",
        type=_positive(float),
        default=None,
        help="floor each cut where its error bound 2*sum(cut HSVs) exceeds this many sigma_1"
        " (LTI layers; default: none)",
    )
    g.add_argument(
        "--rewarmup-steps",
        type=_nonnegative_int,
        default=0,
        help="learning-rate re-warm-up steps after each cut (0)",
    )
    p.add_argument("--out", type=Path, default=None, help="run folder (default: runs/...)")
    p.add_argument("--json", type=Path, default=None, help="also write the report JSON here")
    p.add_argument("--quick", action="store_true", help="tiny preset (< 1 minute on 2 cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``compressm``."""
    top = argparse.ArgumentParser(
        prog="compressm",
        description="Train state-space models that shrink while they train (CompreSSM).",
    )
    top.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "compare",
        help="full size vs CompreSSM vs small from scratch, with a report",
        description="Train the full-size model, the same model with CompreSSM, and a model "
        "trained from scratch at the sizes CompreSSM reached (and, with --baselines, the "
        "baselines at those sizes); print a table and write a report.",
    )
    _add_training_options(p)
    p.add_argument("--seeds", type=_seed, nargs="+", default=[0, 1, 2], help="seeds (0 1 2)")
    p.add_argument(
        "--sweep",
        action="store_true",
        help="also train small models at 2, 4, 8, ... states (first seed): the cost of "
        "finding the size by a sweep",
    )
    _add_baseline_options(p)
    p = sub.add_parser(
        "train", help="one run with CompreSSM (or --no-reduce), saving a checkpoint"
    )
    _add_training_options(p)
    p.add_argument("--seed", type=_seed, default=0, help="seed (0)")
    p.add_argument("--no-reduce", action="store_true", help="train without reduction")
    p = sub.add_parser("analyze", help="HSV spectrum, ranks and error bounds of a checkpoint")
    p.add_argument("checkpoint", type=Path, help="a checkpoint written by `compressm train`")
    p.add_argument(
        "--taus", type=_fraction, nargs="+", default=list(DEFAULT_TAUS), help="tau values"
    )
    p.add_argument("--out", type=Path, default=None, help="folder for the table and plot")
    p.add_argument("--json", type=Path, default=None, help="also write the analysis JSON here")
    for command in sub.choices.values():
        command.set_defaults(command_parser=command)  # usage errors print the command's usage
    return top
