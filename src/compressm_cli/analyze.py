"""``compressm analyze``: Hankel spectrum, ranks and error bounds of a checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["analyze", "analyze_checkpoint"]


def analyze_checkpoint(path: Path, taus: list[float]) -> dict[str, Any]:
    """Per-layer HSVs, and for each ``tau`` the rank :func:`select_rank` picks and its bound.

    Raises
    ------
    ValueError
        If ``path`` is not a checkpoint written by ``compressm train``.
    """
    import torch

    from compressm_core import hankel_error_bound, hankel_singular_values, select_rank
    from compressm_torch import SequenceModel, find_layers, load_checkpoint, to_state_space

    from .training import RunConfig

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    extra = ckpt.get("extra", {}) if isinstance(ckpt, dict) else {}
    if "config" not in extra or "model" not in extra:
        msg = f"{path} is not a checkpoint written by `compressm train` (no model config)."
        raise ValueError(msg)
    config = RunConfig.from_dict(extra["config"])
    dims = extra["model"]
    model = SequenceModel(
        dims["d_input"],
        dims["d_output"],
        d_model=config.d_model,
        d_state=config.d_state,
        n_layers=config.n_layers,
        layer=config.layer,
        pool="mean" if dims["kind"] == "classification" else None,
    )
    load_checkpoint(path, model)
    layers = {}
    for name, layer in find_layers(model).items():
        hsv = hankel_singular_values(to_state_space(layer))
        ranks = []
        for tau in taus:
            rank = select_rank(hsv, tau=tau)
            bound = float(hankel_error_bound(hsv, rank))
            ranks.append({"tau": tau, "rank": rank, "error_bound": bound})
        layers[name] = {"state_size": int(hsv.shape[0]), "hsv": hsv.tolist(), "ranks": ranks}
    return {"checkpoint": str(path), "task": extra.get("task"), "layers": layers}


def _table(result: dict[str, Any]) -> str:
    lines = [
        "| layer | N | tau | rank | error bound (2 sum of the tail) |",
        "|---|---|---|---|---|",
    ]
    for name, layer in result["layers"].items():
        for row in layer["ranks"]:
            lines.append(
                f"| {name} | {layer['state_size']} | {row['tau']:g} | {row['rank']} "
                f"| {row['error_bound']:.4g} |"
            )
    return "\n".join(lines)


def _plot(result: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.subplots()
    for name, layer in result["layers"].items():
        hsv = layer["hsv"]
        ax.semilogy(range(1, len(hsv) + 1), hsv, marker=".", label=name)
    ax.set_xlabel("index")
    ax.set_ylabel("Hankel singular value")
    ax.set_title("HSV spectrum per layer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def analyze(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``compressm analyze``; bad input exits through ``parser.error`` (status 2)."""
    if not args.checkpoint.is_file():
        parser.error(f"argument checkpoint: no such file: {str(args.checkpoint)!r}")
    try:
        result = analyze_checkpoint(args.checkpoint, list(args.taus))
    except (ValueError, KeyError, RuntimeError) as err:
        parser.error(f"argument checkpoint: {err}")
    folder = args.out if args.out is not None else args.checkpoint.parent
    folder.mkdir(parents=True, exist_ok=True)
    table = _table(result)
    (folder / "analysis.json").write_text(json.dumps(result, indent=1) + "\n")
    (folder / "analysis.md").write_text(
        f"# compressm analyze: {args.checkpoint}\n\n{table}\n\n![HSV spectrum](hsv.png)\n"
    )
    _plot(result, folder / "hsv.png")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(table)
    print(f"\nanalysis: {folder / 'analysis.md'}")
    return 0
