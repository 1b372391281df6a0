"""One training run with the JAX backend (Flax NNX, optax), and its checkpoints.

The JAX twin of :mod:`compressm_cli.training`: the same model
(:class:`compressm_jax.SequenceModel`), optimizer (AdamW, linear warm-up then cosine decay, the
same weight decay), mini-batches drawn with replacement, controller options, measurements and
:class:`RunResult`. The training step is compiled with :func:`flax.nnx.jit`; a reduction changes
the parameter shapes, so the step is compiled again after every reduction event. Each run
compiles its own step, and the wall time includes these compilations.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from compressm_core import CheckpointError
from compressm_core.files import READ_ERRORS, atomic_write, unreadable
from compressm_core.schedule import ReductionEvent
from compressm_jax import (
    CompreSSM,
    SequenceModel,
    scale_by_rewarmup,
    state_sizes,
)

from . import runs
from .runs import RunConfig, RunResult, training_loop

if TYPE_CHECKING:
    from .data import Task

__all__ = [
    "CHECKPOINT_FORMAT",
    "build_model",
    "evaluate",
    "load_checkpoint",
    "resolve_device",
    "save_checkpoint",
    "train",
]

CHECKPOINT_FORMAT = "compressm.jax-cli/1"
"""The ``format`` recorded in the metadata of :func:`save_checkpoint`."""

_METADATA = "compressm"  # the .npz entry holding the JSON metadata (see analyze.py)
_EVAL_BATCH = 512


def resolve_device(name: str) -> Any:
    """The :class:`jax.Device` named ``"platform"`` or ``"platform:index"`` (``"cpu"``,
    ``"gpu"``, ``"cuda:1"``, ...).

    Raises
    ------
    ValueError
        If JAX has no such platform or device.
    """
    platform, _, index = name.partition(":")
    try:
        devices = jax.devices(platform)
    except RuntimeError as err:
        msg = f"not a JAX device: {name!r} ({err})"
        raise ValueError(msg) from None
    if not index:
        return devices[0]
    if not index.isdigit() or int(index) >= len(devices):
        msg = f"not a JAX device: {name!r} ({len(devices)} {platform} device(s))"
        raise ValueError(msg)
    return devices[int(index)]


def _model(d_input: int, d_output: int, kind: str, config: RunConfig) -> SequenceModel:
    if config.layer == "mamba":
        msg = "the JAX backend has no Mamba layer; use `lru`, `s5` or `s4d`."
        raise ValueError(msg)
    options = runs.model_options(kind, config)
    return SequenceModel(d_input, d_output, rngs=nnx.Rngs(config.seed), **options)


def build_model(task: Task, config: RunConfig) -> SequenceModel:
    """The :class:`compressm_jax.SequenceModel` of ``config`` for ``task`` (mean pooling for
    classification), initialised from ``nnx.Rngs(config.seed)``."""
    return _model(task.d_input, task.d_output, task.kind, config)


@nnx.jit
def _forward(model: SequenceModel, x: Any) -> jax.Array:
    return model(x)


def evaluate(task: Task, model: SequenceModel, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy (classification) or mean squared error (regression) over ``(x, y)``, in
    evaluation mode (dropout off, BatchNorm running statistics); ``model`` is not changed.

    Batches of 512 sequences, the last one padded, so that one compiled forward pass serves
    every split.
    """
    view = nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)
    total, count = 0.0, 0
    for start in range(0, len(x), _EVAL_BATCH):
        xb, yb = x[start : start + _EVAL_BATCH], y[start : start + _EVAL_BATCH]
        padded = np.zeros((_EVAL_BATCH, *xb.shape[1:]), xb.dtype)
        padded[: len(xb)] = xb
        out = np.asarray(_forward(view, padded))[: len(xb)]
        if task.kind == "classification":
            total += float((out.argmax(-1) == yb).sum())
        else:
            total += float(((out - yb) ** 2).sum()) / yb[0].size
        count += len(xb)
    return total / count


class _CompiledStep:
    """``update(model, optimizer, x, y)`` with the graph traversal of ``model`` and
    ``optimizer`` cached (:func:`flax.nnx.cached_partial`: a few ms less per step), their arrays
    committed to ``device``. :meth:`refresh` after anything that changed them outside ``update``.
    """

    def __init__(self, update: Any, model: SequenceModel, optimizer: Any, device: Any) -> None:
        self.update, self.model, self.optimizer, self.device = update, model, optimizer, device
        self.refresh()

    def refresh(self) -> None:
        """Commit every array to the device (the optimizer surgery of a reduction leaves new
        moments uncommitted, which would cost a second compilation) and cache the graph again."""
        for node in (self.model, self.optimizer):
            nnx.update(node, jax.device_put(nnx.state(node), self.device))
        self.call = nnx.cached_partial(self.update, self.model, self.optimizer)

    def __call__(self, x: np.ndarray, y: np.ndarray) -> jax.Array:
        loss: jax.Array = self.call(x, y)
        loss.block_until_ready()
        return loss


class _Refreshing:
    """``controller``, refreshing the compiled step after an event that changed the model."""

    def __init__(self, controller: CompreSSM, compiled: _CompiledStep) -> None:
        self.controller, self.compiled = controller, compiled

    @property
    def history(self) -> list[ReductionEvent]:
        return self.controller.history

    def step(self, *, loss: Any = None) -> list[ReductionEvent]:
        return self._refreshed(self.controller.step(loss=loss))

    def report_metric(self, value: float) -> list[ReductionEvent]:
        return self._refreshed(self.controller.report_metric(value))

    def _refreshed(self, events: list[ReductionEvent]) -> list[ReductionEvent]:
        if any(e.status in ("reduced", "rolled_back") for e in events):
            self.compiled.refresh()
        return events


def _loss(task: Task, out: jax.Array, target: jax.Array) -> jax.Array:
    if task.kind == "classification":
        loss: jax.Array = optax.softmax_cross_entropy_with_integer_labels(out, target).mean()
        return loss
    return jnp.mean((out - target) ** 2)


def _optimizer(model: SequenceModel, config: RunConfig) -> nnx.Optimizer[SequenceModel]:
    """AdamW with the torch path's schedule: ``lr * lr_factors(steps, lr_warmup)(count)``,
    followed by :func:`compressm_jax.scale_by_rewarmup` when ``config.rewarmup_steps`` > 0 (the
    controller marks each cut in its state)."""
    factor = runs.lr_factors(config.steps, config.lr_warmup)
    table = jnp.asarray([config.lr * factor(k) for k in range(config.steps)], jnp.float32)

    def schedule(count: jax.Array) -> jax.Array:
        return table[jnp.minimum(count, config.steps - 1)]  # count: updates so far

    tx = optax.adamw(schedule, weight_decay=config.weight_decay)
    if config.rewarmup_steps:
        tx = optax.chain(tx, scale_by_rewarmup(config.rewarmup_steps))
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def train(
    task: Task,
    config: RunConfig,
    *,
    progress: bool = True,
    on_event: Callable[[str], None] | None = None,
) -> tuple[RunResult, SequenceModel, CompreSSM | None]:
    """Train one model on ``task`` with JAX; reduce it during training if ``config.reduce``.

    As :func:`compressm_cli.training.train`: AdamW (optax) with linear warm-up and cosine decay,
    mini-batches drawn with replacement from the training split (NumPy generator seeded with
    ``config.seed``), validation every ``eval_every`` steps, the :class:`compressm_jax.CompreSSM`
    controller (``horizon="auto"`` is the task's sequence length). Runs on
    ``config.device`` (see :func:`resolve_device`). Wall time counts the training steps (waiting
    for their results, compilations included) and reduction events, not evaluation.

    Returns
    -------
    RunResult, compressm_jax.SequenceModel, compressm_jax.CompreSSM or None
        The measurements, the trained model and its controller.

    Raises
    ------
    ValueError
        If ``config.layer`` is ``"mamba"`` (no JAX layer) or ``config.device`` is not a JAX
        device.
    KeyboardInterrupt
        Re-raised after the partial result, the model and the controller are stored on the
        exception as ``partial_result``, ``partial_model`` and ``partial_controller``.
    """
    device = resolve_device(config.device)
    with jax.default_device(device):
        model = build_model(task, config)
        opt = _optimizer(model, config)
        ctl = None
        if config.reduce:
            horizon = config.horizon
            ctl = CompreSSM(
                model,
                opt,
                horizon=task.x_train.shape[1] if horizon == "auto" else horizon,
                **runs.controller_options(task, config),
            )

        @nnx.jit  # one compiled step per run, so that every run's wall time includes it
        def update(
            model: SequenceModel, opt: nnx.Optimizer[SequenceModel], x: Any, y: Any
        ) -> jax.Array:
            loss: jax.Array
            loss, grads = nnx.value_and_grad(lambda m: _loss(task, m(x), y))(model)
            opt.update(model, grads)
            return loss

        compiled = _CompiledStep(update, model, opt, device)
        rng = np.random.default_rng(config.seed)

        def step() -> jax.Array:
            idx = rng.integers(len(task.x_train), size=config.batch_size)
            return compiled(task.x_train[idx], task.y_train[idx])

        with runs.partial_on_interrupt(model, ctl):
            result = training_loop(
                task,
                config,
                step=step,
                evaluate=lambda xs, ys: evaluate(task, model, xs, ys),
                sizes=lambda: state_sizes(model),
                controller=None if ctl is None else _Refreshing(ctl, compiled),
                progress=progress,
                on_event=on_event,
            )
    return result, model, ctl


def save_checkpoint(
    path: str | os.PathLike[str],
    model: SequenceModel,
    *,
    controller: CompreSSM | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``model`` to one ``.npz`` file with its per-layer state sizes.

    Every parameter and batch statistic is an array named by its dotted path
    (``"blocks.0.ssm.nu_log"``, ``"encoder.kernel"``); the entry ``"compressm"`` holds JSON
    metadata: ``format`` (:data:`CHECKPOINT_FORMAT`), ``state_sizes``, the controller's
    ``state_dict()`` and ``extra``. The file is written atomically: it goes to a temporary file
    in the same folder, which replaces ``path`` once complete, so a crash or kill during the save
    leaves the previous file at ``path`` intact.
    """
    arrays = {
        ".".join(map(str, key)): np.asarray(var[...])
        for key, var in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.RngState)))
    }
    meta = {
        "format": CHECKPOINT_FORMAT,
        "state_sizes": state_sizes(model),
        "controller": None if controller is None else controller.state_dict(),
        "extra": extra or {},
    }
    arrays[_METADATA] = np.array(json.dumps(meta))
    with atomic_write(path) as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[SequenceModel, dict[str, Any]]:
    """Rebuild the model of a ``compressm train --backend jax`` checkpoint (:func:`save_checkpoint`
    with the run's ``config`` and ``model`` dimensions in ``extra``) at its stored sizes.

    The file is checked before the model is built: every recorded state size must be a
    positive int no larger than the configured ``d_state`` of its layer, and every array must
    have the shape of the model at those sizes (worked out without allocating it), so the model
    never takes more memory than the arrays in the file.

    Returns
    -------
    SequenceModel, dict
        The model and the ``extra`` metadata.

    Raises
    ------
    compressm_core.CheckpointError
        (a ``ValueError``) If ``path`` cannot be read (truncated, corrupt), is not such a
        checkpoint, or its sizes or arrays do not fit the model. The message names ``path``.
    """
    name = os.fspath(path)
    arrays, meta = _read_npz(name)
    extra = meta.get("extra")
    if meta.get("format") != CHECKPOINT_FORMAT or not isinstance(extra, dict):
        msg = f"{name} is not a checkpoint written by `compressm train` (no model config)."
        raise CheckpointError(msg)
    config, dims = _stored_config(name, extra, len(arrays))
    sizes = _stored_sizes(name, meta.get("state_sizes"), config)

    def build() -> SequenceModel:
        reduced = dataclasses.replace(config, d_state=tuple(sizes))
        return _model(dims["d_input"], dims["d_output"], dims["kind"], reduced)

    try:
        abstract = nnx.eval_shape(build)
    except (ValueError, TypeError) as err:
        msg = f"{name}: the stored config does not make a model ({err})."
        raise CheckpointError(msg) from err
    expected = {
        ".".join(map(str, key)): var
        for key, var in nnx.to_flat_state(nnx.state(abstract, nnx.Not(nnx.RngState)))
    }
    missing = sorted(set(expected) - set(arrays))
    wrong = [k for k, var in expected.items() if k in arrays and arrays[k].shape != var.shape]
    if missing or wrong:
        details = [f"{k!r} missing" for k in missing[:4]] + [
            f"{k!r}: expected {tuple(expected[k].shape)}, found {arrays[k].shape}"
            for k in wrong[:4]
        ]
        msg = f"{name}: the arrays do not fit the model ({'; '.join(details)})."
        raise CheckpointError(msg)
    model = build()
    flat = nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.RngState)))
    for key, var in flat:
        var.set_value(jnp.asarray(arrays[".".join(map(str, key))], dtype=var[...].dtype))
    nnx.update(model, nnx.from_flat_state(flat))
    return model, dict(extra)


def _read_npz(name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Every array of the ``.npz`` file ``name`` and its parsed metadata entry."""
    try:
        with open(name, "rb") as f:  # closed here even when np.load fails
            data = np.load(f, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile) or _METADATA not in data.files:
                msg = f"{name} is not a JAX checkpoint written by `compressm train`."
                raise CheckpointError(msg)
            with data:
                arrays = {key: data[key] for key in data.files}
    except (FileNotFoundError, CheckpointError):
        raise
    except READ_ERRORS as err:
        raise unreadable(name, err, ".npz checkpoint") from err
    try:
        meta = json.loads(str(arrays.pop(_METADATA)))
    except ValueError as err:
        msg = f"{name}: the metadata entry {_METADATA!r} is not JSON ({err})."
        raise CheckpointError(msg) from err
    return arrays, meta if isinstance(meta, dict) else {}


def _stored_config(
    name: str, extra: dict[str, Any], n_arrays: int
) -> tuple[RunConfig, dict[str, Any]]:
    """The run's config and model dimensions from ``extra``, checked enough to build a model
    abstractly (at most one layer per stored array)."""
    try:
        config = RunConfig.from_dict(extra["config"])
        dims = {key: extra["model"][key] for key in ("d_input", "d_output", "kind")}
    except (KeyError, TypeError, ValueError) as err:
        msg = f"{name} is not a checkpoint written by `compressm train` (no model config: {err})."
        raise CheckpointError(msg) from err
    ints = {"n_layers": config.n_layers, "d_input": dims["d_input"], "d_output": dims["d_output"]}
    for key, value in ints.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            msg = f"{name}: the stored `{key}` must be a positive int; found {value!r}."
            raise CheckpointError(msg)
    if config.n_layers > n_arrays:
        msg = (
            f"{name}: the stored config has {config.n_layers} layers, more than the "
            f"{n_arrays} arrays in the file."
        )
        raise CheckpointError(msg)
    return config, dims


def _stored_sizes(name: str, recorded: Any, config: RunConfig) -> list[int]:
    """The recorded state size of every layer in order, each a positive int no larger than
    the layer's configured ``d_state``."""
    initial = config.d_state
    limits = [initial] * config.n_layers if isinstance(initial, int) else list(initial)
    layers = [f"blocks.{i}.ssm" for i in range(config.n_layers)]
    if not isinstance(recorded, dict) or sorted(recorded) != sorted(layers):
        msg = f"{name}: the stored `state_sizes` must name the layers {layers}; found {recorded}."
        raise CheckpointError(msg)
    if len(limits) != len(layers):
        msg = f"{name}: the stored `d_state` {initial!r} does not give {len(layers)} layers."
        raise CheckpointError(msg)
    sizes = []
    for layer, limit in zip(layers, limits, strict=True):
        size = recorded[layer]
        ok = not isinstance(size, bool) and isinstance(size, int) and isinstance(limit, int)
        if not ok or not 1 <= size <= limit:
            msg = (
                f"{name}: `state_sizes[{layer!r}]` must be an int in [1, d_state = {limit!r}]; "
                f"found {size!r}."
            )
            raise CheckpointError(msg)
        sizes.append(size)
    return sizes
