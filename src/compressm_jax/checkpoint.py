"""Orbax checkpoints of reduced Flax NNX models: the state sizes travel with the arrays.

A checkpoint is a folder::

    <directory>/model/       Orbax StandardCheckpointer of nnx.state(model)
    <directory>/optimizer/   the same for nnx.state(optimizer), if given
    <directory>/compressm.json  {"state_sizes": {...}, "controller": ctl.state_dict() or null}

:func:`load_checkpoint` reads the sizes, restores the arrays into a copy of the model resized to
them, and only then writes into the live model, optimizer and controller.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from compressm_core.errors import CheckpointError
from compressm_core.files import atomic_write

from .adapters import find_layers, state_sizes
from .controller import CompreSSM, resize_layers

__all__ = ["load_checkpoint", "save_checkpoint"]

META = "compressm.json"


def _checkpointer() -> Any:
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def save_checkpoint(
    directory: str | os.PathLike[str],
    model: nnx.Module,
    optimizer: nnx.Optimizer[Any] | None = None,
    *,
    controller: CompreSSM | None = None,
    overwrite: bool = False,
) -> None:
    """Save ``model`` (and ``optimizer``) with Orbax, and the layers' state sizes and the
    controller's state beside them, as the folder ``directory``.

    The folder is written under a temporary name next to it and renamed when complete: a crash
    leaves the previous checkpoint (or none), never half of one.

    Raises
    ------
    FileExistsError
        ``directory`` exists and ``overwrite`` is false.
    """
    target = Path(directory).absolute()
    if target.exists() and not overwrite:
        msg = f"`directory` {str(target)!r} exists; pass overwrite=True to replace it."
        raise FileExistsError(msg)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with _checkpointer() as ckpt:
            ckpt.save(staging / "model", nnx.state(model), force=True)
            if optimizer is not None:
                ckpt.save(staging / "optimizer", nnx.state(optimizer), force=True)
            ckpt.wait_until_finished()
        meta = {
            "state_sizes": state_sizes(model),
            "controller": None if controller is None else controller.state_dict(),
            "optimizer": optimizer is not None,
        }
        with atomic_write(staging / META) as f:
            f.write(json.dumps(meta).encode())
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_meta(target: Path) -> dict[str, Any]:
    path = target / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        msg = f"{target}: not a checkpoint of compressm_jax.save_checkpoint (no {META})."
        raise CheckpointError(msg) from None
    except (OSError, ValueError) as err:
        msg = f"{path}: not readable JSON ({type(err).__name__}: {err})."
        raise CheckpointError(msg) from err
    sizes = meta.get("state_sizes") if isinstance(meta, Mapping) else None
    if not isinstance(sizes, Mapping) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sizes.values()
    ):
        msg = f"{path}: `state_sizes` must map layer names to positive ints; found {sizes!r}."
        raise CheckpointError(msg)
    return dict(meta)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of a pytree's array leaves, the path reduced to its names (Orbax's
    metadata and NNX states spell the same path differently)."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shape = getattr(leaf, "shape", None)
        if shape is not None:
            key = "/".join(re.findall(r"\w+", jax.tree_util.keystr(path)))
            out[key] = tuple(int(n) for n in shape)
    return out


def _check_fits(ckpt: Any, target: Path, part: str, wanted: Any) -> None:
    """Raise :class:`CheckpointError` unless the arrays stored in ``target / part`` have the
    paths and shapes of ``wanted``."""
    try:
        meta = ckpt.metadata(target / part)
    except (ValueError, KeyError, FileNotFoundError, OSError) as err:
        msg = f"{target}: no readable {part} state ({type(err).__name__}: {err})."
        raise CheckpointError(msg) from err
    stored = _shapes(getattr(meta, "item_metadata", meta))
    expected = _shapes(wanted)
    if stored != expected:
        diff = sorted(set(stored.items()) ^ set(expected.items()))[:4]
        msg = (
            f"{target}: the checkpoint does not fit `{part}` at the recorded state sizes; "
            f"differing (path, shape) entries: {diff}."
        )
        raise CheckpointError(msg)


def load_checkpoint(
    directory: str | os.PathLike[str],
    model: nnx.Module,
    optimizer: nnx.Optimizer[Any] | None = None,
    *,
    controller: CompreSSM | None = None,
) -> dict[str, int]:
    """Restore a :func:`save_checkpoint` folder into ``model`` (built at any size, e.g. the
    full one), ``optimizer`` (built on ``model``) and ``controller``.

    The layers are resized to the recorded sizes and the arrays restored into a copy of the
    model (and a fresh optimizer on it) first; the live objects are written only when
    everything was read, so a failure leaves them as they were.

    Returns
    -------
    dict
        The recorded state sizes.

    Raises
    ------
    CheckpointError
        Not such a folder, unreadable metadata, layers the model does not have, or arrays that
        do not fit the model (the message names the folder).
    """
    target = Path(directory).absolute()
    meta = _read_meta(target)
    sizes = {str(k): int(v) for k, v in meta["state_sizes"].items()}
    unknown = sorted(set(sizes) - set(find_layers(model)))
    if unknown:
        msg = (
            f"{target}: the checkpoint records layers that `model` does not have: {unknown}; "
            f"the model's are {sorted(find_layers(model))}."
        )
        raise CheckpointError(msg)
    if optimizer is not None and not meta.get("optimizer"):
        msg = f"{target}: the checkpoint holds no optimizer state (saved without `optimizer`)."
        raise CheckpointError(msg)
    twin = nnx.clone(model)  # a copy: resizing it leaves `model` alone
    resize_layers(twin, sizes)
    with _checkpointer() as ckpt:
        # check every stored shape first: a restore that fails midway leaves Orbax's
        # background work in a bad state
        _check_fits(ckpt, target, "model", nnx.state(twin))
        restored = ckpt.restore(target / "model", nnx.state(twin))
        restored_opt = None
        if optimizer is not None:
            fresh = nnx.Optimizer(twin, optimizer.tx, wrt=optimizer.wrt)
            _check_fits(ckpt, target, "optimizer", nnx.state(fresh))
            restored_opt = ckpt.restore(target / "optimizer", nnx.state(fresh))
    if controller is not None and meta.get("controller") is not None:
        controller_state = meta["controller"]
    else:
        controller_state = None
    resize_layers(model, sizes)
    nnx.update(model, restored)
    if optimizer is not None:
        nnx.update(optimizer, restored_opt)
    if controller_state is not None:
        assert controller is not None
        controller.load_state_dict(controller_state)
    return sizes
