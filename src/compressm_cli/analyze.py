"""``compressm analyze``: Hankel spectrum, ranks and error bounds of a checkpoint."""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path
from typing import Any

from .app import UsageError, writable_file, writable_folder

__all__ = ["analyze", "analyze_checkpoint", "run_analyze"]


def analyze_checkpoint(path: Path, taus: list[float]) -> dict[str, Any]:
    """Per-layer HSVs, and for each ``tau`` the rank :func:`select_rank` picks and its bound.

    Reads checkpoints of both backends: ``checkpoint.pt`` (torch) and ``checkpoint.npz``
    (``--backend jax``).

    Raises
    ------
    ValueError
        If ``path`` is not a checkpoint written by ``compressm train``.
    """
    from compressm_core import hankel_error_bound, select_rank

    if _is_jax_checkpoint(path):
        spectra, task = _jax_spectra(path)
    else:
        spectra, task = _torch_spectra(path)
    layers = {}
    for name, (spectrum, selective) in spectra.items():
        ranks = []
        for tau in taus:
            rank = select_rank(spectrum, tau=tau)
            bound = None if selective else float(hankel_error_bound(spectrum, rank))
            ranks.append({"tau": tau, "rank": rank, "error_bound": bound})
        layers[name] = {
            "state_size": int(spectrum.shape[0]),
            "kind": "selective" if selective else "lti",
            "hsv": spectrum.tolist(),
            "ranks": ranks,
        }
    return {"checkpoint": str(path), "task": task, "layers": layers}


def _is_jax_checkpoint(path: Path) -> bool:
    """An ``.npz`` with the metadata entry of :func:`compressm_cli.training_jax.save_checkpoint`
    (a torch checkpoint is a zip file too, without it)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return "compressm.npy" in archive.namelist()


def _jax_spectra(path: Path) -> tuple[dict[str, tuple[Any, bool]], Any]:
    """``{layer: (HSVs, False)}`` of a JAX checkpoint (float64, on the host; for S4D the
    per-index maxima over its channels, which share one rank), and its task."""
    from compressm_core import hankel_singular_values
    from compressm_core.rank import shared_rank_hsv
    from compressm_jax import find_layers, get_adapter

    from .training_jax import load_checkpoint

    model, extra = load_checkpoint(path)
    spectra = {
        name: (
            shared_rank_hsv(hankel_singular_values(get_adapter(layer).to_state_space(layer))),
            False,
        )
        for name, layer in find_layers(model).items()
    }
    return spectra, extra.get("task")


def _torch_spectra(path: Path) -> tuple[dict[str, tuple[Any, bool]], Any]:
    """``{layer: (spectrum, selective)}`` of a torch checkpoint, and its task: HSVs, or the
    state-importance scores of selective layers (no error bound)."""
    import torch

    from compressm_core import CheckpointError, hankel_singular_values
    from compressm_core.files import READ_ERRORS, unreadable
    from compressm_core.rank import shared_rank_hsv
    from compressm_torch import (
        SelectiveAdapter,
        SequenceModel,
        find_layers,
        get_adapter,
        load_checkpoint,
        selective_importance,
        to_state_space,
    )

    from .runs import RunConfig

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except READ_ERRORS as err:
        raise unreadable(str(path), err, "checkpoint of torch.save") from err
    extra = ckpt.get("extra", {}) if isinstance(ckpt, dict) else {}
    if not isinstance(extra, dict) or "config" not in extra or "model" not in extra:
        return _stored_layer_spectra(path, ckpt), None
    try:
        config = RunConfig.from_dict(extra["config"])
        dims = extra["model"]
        _check_stored_shapes(path, ckpt.get("model"), dims, config)
        # Built at the smallest state size: load_checkpoint resizes every layer to the recorded
        # sizes once it has checked them against the stored tensors (a crafted N0 allocates
        # nothing).
        model = SequenceModel(
            dims["d_input"],
            dims["d_output"],
            d_model=config.d_model,
            d_state=2,
            n_layers=config.n_layers,
            layer=config.layer,
            pool="mean" if dims["kind"] == "classification" else None,
        )
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        msg = f"{path}: the stored config does not make a model ({type(err).__name__}: {err})."
        raise CheckpointError(msg) from err
    load_checkpoint(path, model)
    found = find_layers(model)
    stats = (
        _selective_statistics(model, extra.get("task"), config)
        if any(isinstance(get_adapter(layer), SelectiveAdapter) for layer in found.values())
        else {}
    )
    spectra: dict[str, tuple[Any, bool]] = {}
    for name, layer in found.items():
        if name in stats:
            # scores from the task's training data (see selective_importance); no error bound
            scores = selective_importance(layer, stats[name])
            total = scores.reshape(-1, scores.shape[-1]).sum(0)
            spectra[name] = (torch.sort(total, descending=True).values, True)
        else:
            hsv = hankel_singular_values(to_state_space(layer))
            spectra[name] = (shared_rank_hsv(hsv), False)  # S4D: one rank for its channels
    return spectra, extra.get("task")


# The tensors of each LTI layer family, and its (d_model, d_state) from their shapes.
_FAMILIES: dict[str, tuple[frozenset[str], Any]] = {
    "LRU": (
        frozenset({"nu_log", "theta_log", "gamma_log", "B_re", "B_im", "C_re", "C_im", "D"}),
        lambda t: (t["B_re"].shape[1], t["B_re"].shape[0]),
    ),
    "S5": (
        frozenset({"Lambda_re", "Lambda_im", "B", "C", "D", "log_step"}),
        lambda t: (t["B"].shape[1], t["B"].shape[0]),
    ),
    "S4D": (
        frozenset({"log_dt", "log_A_real", "A_imag", "C", "D"}),
        lambda t: (t["log_A_real"].shape[0], 2 * t["log_A_real"].shape[1]),
    ),
}


def _stored_layer_spectra(path: Path, ckpt: Any) -> dict[str, tuple[Any, bool]]:
    """HSVs of the LRU, S5 and S4D layers found by their tensor names in a checkpoint without
    a ``compressm train`` config: ``compressm_torch.save_checkpoint`` (``"model"``) or
    Lightning (``"state_dict"``). Each layer is built at its stored sizes with the default
    constructor options and loaded with its tensors."""
    import torch

    import compressm_torch
    from compressm_core import CheckpointError, hankel_singular_values
    from compressm_core.rank import shared_rank_hsv

    state = None
    if isinstance(ckpt, dict):
        state = ckpt.get("model", ckpt.get("state_dict"))
    if not isinstance(state, dict):
        msg = (
            f"{path} is not a checkpoint written by `compressm train`, "
            "compressm_torch.save_checkpoint or Lightning (no model state)."
        )
        raise CheckpointError(msg)
    groups: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        if isinstance(key, str) and torch.is_tensor(tensor):
            prefix, _, leaf = key.rpartition(".")
            groups.setdefault(prefix, {})[leaf] = tensor
    spectra: dict[str, tuple[Any, bool]] = {}
    for prefix, tensors in sorted(groups.items()):
        for family, (names, sizes) in _FAMILIES.items():
            if set(tensors) != names:
                continue
            try:
                d_model, d_state = (int(n) for n in sizes(tensors))
                layer = getattr(compressm_torch, family)(d_model, d_state)
                layer.load_state_dict(tensors)
            except (RuntimeError, ValueError, TypeError, IndexError) as err:
                msg = f"{path}: the tensors of {prefix!r} do not make a {family} layer ({err})."
                raise CheckpointError(msg) from err
            with torch.no_grad():
                hsv = hankel_singular_values(compressm_torch.to_state_space(layer))
            spectra[prefix] = (shared_rank_hsv(hsv), False)
    if not spectra:
        msg = (
            f"{path}: no LRU, S5 or S4D layer among the stored tensors (selective layers need "
            "a checkpoint of `compressm train`, whose task gives their statistics)."
        )
        raise CheckpointError(msg)
    return spectra


def _check_stored_shapes(path: Path, state: Any, dims: Any, config: Any) -> None:
    """Refuse a stored config that does not fit the stored tensors before anything is built at
    its sizes: the encoder's and decoder's weights give ``d_input``, ``d_model`` and
    ``d_output``, the ``blocks.<i>.`` names the number of layers."""
    from compressm_core import CheckpointError

    weights = {}
    if isinstance(state, dict):
        for key, tensor in state.items():
            for name in ("encoder.weight", "decoder.weight"):
                if isinstance(key, str) and key.endswith(name):
                    weights[name] = tuple(tensor.shape)
    layers = {
        key.split("blocks.", 1)[1].split(".", 1)[0]
        for key in (state if isinstance(state, dict) else ())
        if isinstance(key, str) and "blocks." in key
    }
    expected = {
        "encoder.weight": (config.d_model, dims["d_input"]),
        "decoder.weight": (dims["d_output"], config.d_model),
    }
    for name, shape in expected.items():
        if weights.get(name) != shape:
            msg = (
                f"{path}: the stored config does not fit the stored tensors: `{name}` should "
                f"have the shape {shape} of d_model, d_input and d_output; found "
                f"{weights.get(name, 'no such tensor')}."
            )
            raise CheckpointError(msg)
    if len(layers) != config.n_layers:
        msg = (
            f"{path}: the stored config does not fit the stored tensors: n_layers is "
            f"{config.n_layers}, but the tensors hold {len(layers)} blocks."
        )
        raise CheckpointError(msg)


def _selective_statistics(model: Any, task_name: Any, config: Any) -> dict[str, Any]:
    """Statistics of the selective layers over (at most) 16 batches of the task's training set."""
    import torch

    from compressm_torch import SelectiveRecorder

    from .data import load_task

    if not isinstance(task_name, str):
        msg = "the checkpoint records no task, needed to score selective layers"
        raise ValueError(msg)
    task = load_task(task_name, seed=config.seed)
    x = torch.from_numpy(task.x_train)
    model.eval()
    with SelectiveRecorder(model, training_only=False) as recorder, torch.no_grad():
        for start in range(0, min(len(x), 16 * config.batch_size), config.batch_size):
            model(x[start : start + config.batch_size])
    return dict(recorder.statistics)


def _table(result: dict[str, Any]) -> str:
    lines = [
        "| layer | N | tau | rank | error bound (2 sum of the tail + round-off) |",
        "|---|---|---|---|---|",
    ]
    for name, layer in result["layers"].items():
        for row in layer["ranks"]:
            bound = row["error_bound"]
            shown = "none (selective layer)" if bound is None else f"{bound:.4g}"
            lines.append(
                f"| {name} | {layer['state_size']} | {row['tau']:g} | {row['rank']} | {shown} |"
            )
    return "\n".join(lines)


def _plot(result: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from .report import save_figure

    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.subplots()
    for name, layer in result["layers"].items():
        hsv = layer["hsv"]
        ax.semilogy(range(1, len(hsv) + 1), hsv, marker=".", label=name)
    ax.set_xlabel("index")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # states are counted
    ax.set_ylabel("Hankel singular value")
    ax.set_title("HSV spectrum per layer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def _first_sentence(err: BaseException) -> str:
    """``"Type: first sentence of the message"`` on one line (torch's run to a paragraph)."""
    text = " ".join(str(err).split())
    text = text.split(". ", 1)[0].rstrip(".")
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def run_analyze(args: argparse.Namespace) -> int:
    """Run ``compressm analyze``.

    Raises
    ------
    UsageError
        Naming the checkpoint, ``--out`` or ``--json``, if the checkpoint cannot be read as one
        written by ``compressm train`` or the outputs cannot be written.
    """
    from compressm_core.files import READ_ERRORS

    from .report import to_json, write_text

    checkpoint: Path = args.checkpoint
    if checkpoint.is_dir():
        msg = f"argument checkpoint: {str(checkpoint)!r} is a folder; expected a checkpoint file"
        raise UsageError(msg)
    if not checkpoint.is_file():
        msg = f"argument checkpoint: no such file: {str(checkpoint)!r}"
        raise UsageError(msg)
    folder = args.out if args.out is not None else checkpoint.parent
    writable_folder(folder, "--out")
    if args.json is not None:
        writable_file(args.json, "--json")
    try:
        result = analyze_checkpoint(checkpoint, list(args.taus))
    except READ_ERRORS as err:
        msg = (
            f"argument checkpoint: cannot read {str(checkpoint)!r} as a checkpoint of "
            f"`compressm train` ({_first_sentence(err)})"
        )
        raise UsageError(msg) from None
    table = _table(result)
    write_text(folder / "analysis.json", to_json(result))
    write_text(
        folder / "analysis.md",
        f"# compressm analyze: {checkpoint}\n\n{table}\n\n![HSV spectrum](hsv.png)\n",
    )
    _plot(result, folder / "hsv.png")
    if args.json is not None:
        write_text(args.json, to_json(result))
    print(table)
    print(f"\nanalysis: {folder / 'analysis.md'}")
    return 0


def analyze(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``compressm analyze``; bad input exits through ``parser.error`` (status 2)."""
    try:
        return run_analyze(args)
    except UsageError as err:
        parser.error(str(err))
