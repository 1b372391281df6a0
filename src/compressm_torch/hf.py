"""Hugging Face transformers: reduced models that round-trip through ``save_pretrained``, and
a ``Trainer`` callback that runs :class:`~compressm_torch.CompreSSM` inside ``Trainer.train``.

A reduced model's config records the state size of every layer (:func:`record_state_sizes`),
so ``save_pretrained`` writes them to ``config.json`` and :func:`load_reduced_pretrained`
rebuilds the model at those sizes before it loads the weights. When every layer has the same
size the config's own ``state_size`` says so too, and a plain ``from_pretrained`` works
(:func:`align_state_sizes` pads the layers of a model to one size, exactly).

This module imports :mod:`transformers`; ``import compressm_torch`` does not.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any, TypeVar, cast

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import (
    PreTrainedModel,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from ._options import split_options
from ._params import assign
from .adapters import SelectiveAdapter, find_layers, get_adapter, resize_layers, state_sizes
from .controller import CompreSSM, ReductionEvent

__all__ = [
    "CompreSSMTrainerCallback",
    "align_state_sizes",
    "load_reduced_pretrained",
    "prepare_resume",
    "record_state_sizes",
]

logger = logging.getLogger("compressm")

#: Config attribute holding ``{layer name: state size}`` (written to ``config.json``).
STATE_SIZES_KEY = "compressm_state_sizes"
#: File the Trainer callback writes into every checkpoint folder (the controller's state).
CONTROLLER_FILE = "compressm.pt"
_FORMAT = "compressm.hf/1"

ModelT = TypeVar("ModelT", bound=PreTrainedModel)


def _config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        msg = (
            "`model` must have a transformers config (a `config` attribute, as a "
            f"PreTrainedModel has); received {type(model).__name__} without one."
        )
        raise TypeError(msg)
    return config


def record_state_sizes(model: nn.Module) -> dict[str, int]:
    """Write the state size of every supported layer of ``model`` into ``model.config``.

    Sets ``config.compressm_state_sizes = {layer name: size}`` (JSON, so ``save_pretrained``
    writes it to ``config.json``) and, when every layer has the same size, ``config.state_size``
    too, so that even a plain ``from_pretrained`` rebuilds the reduced model. Sizes are per
    group for Mamba-2 layers, as ``state_size`` is. Call it after every reduction event
    (:class:`CompreSSMTrainerCallback` does), or at least before ``save_pretrained``.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model with a ``config`` (for example ``MambaForCausalLM``).

    Returns
    -------
    dict
        ``{layer name: state size}``, as recorded.

    Raises
    ------
    TypeError
        If ``model`` has no transformers config.

    Examples
    --------
    >>> import torch
    >>> from transformers import MambaConfig, MambaForCausalLM
    >>> from compressm_torch import resize_layers
    >>> from compressm_torch.hf import record_state_sizes
    >>> model = MambaForCausalLM(MambaConfig(vocab_size=32, hidden_size=16, state_size=8,
    ...                                      num_hidden_layers=2))
    >>> resize_layers(model, {"backbone.layers.0.mixer": 4, "backbone.layers.1.mixer": 4})
    >>> record_state_sizes(model)
    {'backbone.layers.0.mixer': 4, 'backbone.layers.1.mixer': 4}
    >>> model.config.state_size
    4
    """
    config = _config(model)
    sizes = state_sizes(model)
    setattr(config, STATE_SIZES_KEY, dict(sizes))
    distinct = set(sizes.values())
    if len(distinct) == 1 and hasattr(config, "state_size"):
        config.state_size = distinct.pop()
    return sizes


def _record(model: nn.Module) -> None:
    """:func:`record_state_sizes` if ``model`` has a transformers config (the Trainer also
    trains plain modules)."""
    if hasattr(getattr(model, "config", None), "to_dict"):
        record_state_sizes(model)


def _match_names(model: nn.Module, sizes: Mapping[str, int]) -> dict[str, int]:
    """``sizes`` renamed to ``model``'s layer names: recorded on a model with a head (say
    ``backbone.layers.0.mixer``) and loaded into its base model (``layers.0.mixer``), or the
    other way round."""
    own = set(find_layers(model))
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    matched = {}
    for name, size in sizes.items():
        if name not in own and prefix:
            if name.startswith(prefix + ".") and name[len(prefix) + 1 :] in own:
                name = name[len(prefix) + 1 :]
            elif f"{prefix}.{name}" in own:
                name = f"{prefix}.{name}"
        matched[name] = int(size)
    return matched


def _recorded_sizes(config: Any) -> dict[str, int] | None:
    sizes = getattr(config, STATE_SIZES_KEY, None)
    return None if sizes is None else {str(k): int(v) for k, v in dict(sizes).items()}


def load_reduced_pretrained(
    cls: type[ModelT],
    path: str | os.PathLike[str],
    *,
    state_sizes: Mapping[str, int] | None = None,
    **kwargs: Any,
) -> ModelT:
    """``cls.from_pretrained(path, **kwargs)`` for a model whose layers were reduced.

    The model is built from its config as usual, then its layers are resized to the state sizes
    recorded in the config (:func:`record_state_sizes`) or given as ``state_sizes``, and only
    then are the weights loaded, by transformers' own loader (safetensors or ``.bin``, sharded
    or not, local or from the Hub, with ``dtype``, ``device_map`` and the other options of
    ``from_pretrained``). So ``save_pretrained`` followed by this function gives back the same
    model: the same sizes and the same outputs.

    Parameters
    ----------
    cls : type
        The model class, a subclass of ``transformers.PreTrainedModel`` (``MambaForCausalLM``,
        ``Mamba2ForCausalLM``, ...).
    path : str or os.PathLike
        What ``from_pretrained`` accepts: a folder written by ``save_pretrained`` or a model id.
    state_sizes : mapping, optional
        ``{layer name: state size}``; overrides what the config records (for weights saved
        without :func:`record_state_sizes`).
    **kwargs
        Passed to ``cls.from_pretrained``.

    Returns
    -------
    PreTrainedModel
        An instance of ``cls`` with the recorded state sizes (also recorded in its config).

    Raises
    ------
    ValueError
        If the config records no state sizes (and ``state_sizes`` is not given) but the
        weights at ``path`` have other sizes than the config describes.
    KeyError
        If the recorded sizes name layers that the model does not have.

    Examples
    --------
    >>> import tempfile, torch
    >>> from transformers import MambaConfig, MambaForCausalLM
    >>> from compressm_torch import resize_layers
    >>> from compressm_torch.hf import load_reduced_pretrained, record_state_sizes
    >>> model = MambaForCausalLM(MambaConfig(vocab_size=32, hidden_size=16, state_size=8,
    ...                                      num_hidden_layers=2))
    >>> resize_layers(model, {"backbone.layers.0.mixer": 3})  # layers of different sizes
    >>> _ = record_state_sizes(model)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     model.save_pretrained(folder)
    ...     again = load_reduced_pretrained(MambaForCausalLM, folder)
    >>> again.config.compressm_state_sizes
    {'backbone.layers.0.mixer': 3, 'backbone.layers.1.mixer': 8}
    """
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        msg = f"`cls` must be a transformers PreTrainedModel subclass; received {cls!r}."
        raise TypeError(msg)
    given = None if state_sizes is None else {str(k): int(v) for k, v in state_sizes.items()}
    seen: dict[str, Any] = {}

    def __init__(self: ModelT, config: Any, *args: Any, **kw: Any) -> None:
        cls.__init__(self, config, *args, **kw)
        sizes = given if given is not None else _recorded_sizes(config)
        seen["sizes"], seen["config"] = sizes, config
        if sizes:
            resize_layers(self, _match_names(self, sizes))

    # A subclass whose constructor resizes the layers: from_pretrained builds it (on the meta
    # device), then loads the weights into tensors of the right shapes.
    resized = cast(
        "type[ModelT]",
        type(
            cls.__name__,
            (cls,),
            {"__init__": __init__, "__module__": cls.__module__, "__qualname__": cls.__qualname__},
        ),
    )
    try:
        model = resized.from_pretrained(path, **kwargs)
    except RuntimeError as err:
        if seen.get("sizes") or "mismatch" not in str(err):
            raise
        config = seen.get("config")
        size = getattr(config, "state_size", None)
        msg = (
            f"The weights at `path`={os.fspath(path)!r} do not have the sizes of its config "
            f"(state_size={size!r}), and the config records no per-layer state sizes "
            f"(`{STATE_SIZES_KEY}`): the model was probably reduced and saved without "
            "compressm_torch.hf.record_state_sizes. Pass `state_sizes={layer name: size}` "
            "(compressm_torch.state_sizes of the reduced model), or record them before "
            "save_pretrained."
        )
        raise ValueError(msg) from err
    model.__class__ = cls
    record_state_sizes(model)
    return model


@torch.no_grad()
def align_state_sizes(model: nn.Module) -> dict[str, int]:
    """Pad the selective layers of ``model`` to one state size (their largest), exactly.

    A transformers config holds one ``state_size``; after a reduction that left the layers at
    different sizes, a plain ``from_pretrained`` (without :func:`load_reduced_pretrained`) can
    only rebuild the model once they agree. The added states have zero input and output
    weights (zero ``B`` and ``C`` rows, zero convolution channels for Mamba-2), so they stay
    zero and the model computes exactly what it computed before; the cost is that of the
    larger size. The config is updated (:func:`record_state_sizes`) when ``model`` has one.

    Use it after training, to export: the moments an optimizer holds for the padded tensors are
    not padded. (To train with one shared size instead, reduce with ``mode="fixed"``: every
    layer then loses the same fraction at each event.)

    Parameters
    ----------
    model : torch.nn.Module
        A model with selective (Mamba, Mamba-2) layers.

    Returns
    -------
    dict
        ``{layer name: state size}`` after padding.

    Raises
    ------
    TypeError
        If ``model`` has a supported layer that is not selective (LRU, S5: pad those by
        hand, or keep :func:`load_reduced_pretrained`).
    """
    layers = find_layers(model)
    adapters = {}
    for name, layer in layers.items():
        adapter = get_adapter(layer)
        if not isinstance(adapter, SelectiveAdapter):
            msg = (
                f"`model` layer {name!r} of type {type(layer).__name__} is not selective; "
                "align_state_sizes pads selective (Mamba, Mamba-2) layers only."
            )
            raise TypeError(msg)
        adapters[name] = adapter
    sizes = {name: adapters[name].state_size(layer) for name, layer in layers.items()}
    target = max(sizes.values(), default=0)
    for name, layer in layers.items():
        adapter, old = adapters[name], sizes[name]
        if old == target:
            continue
        groups = adapter.groups(layer) or 1
        kept = adapter.positions(layer, torch.arange(old).expand(groups, old))
        values = {p: layer.get_parameter(p).detach().clone() for p in kept}
        adapter.resize(layer, target)  # zeros everywhere
        # Where states 0 .. old-1 live in the padded layout: the old values go there.
        new = adapter.positions(layer, torch.arange(old).expand(groups, old))
        for pname, (axis, pos) in new.items():
            param = layer.get_parameter(pname)
            assign(param, param.detach().index_copy(axis, pos.to(param.device), values[pname]))
    _record(model)
    return state_sizes(model)


def _sizes_in(checkpoint_dir: str | os.PathLike[str]) -> dict[str, int]:
    """The state sizes recorded in a checkpoint folder: its ``config.json``, else the
    controller file of :class:`CompreSSMTrainerCallback`."""
    folder = os.fspath(checkpoint_dir)
    config_file = os.path.join(folder, "config.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            sizes = json.load(f).get(STATE_SIZES_KEY)
        if sizes is not None:
            return {str(k): int(v) for k, v in sizes.items()}
    controller_file = os.path.join(folder, CONTROLLER_FILE)
    if os.path.isfile(controller_file):
        return dict(_read_controller_file(controller_file)["state_sizes"])
    msg = (
        f"`checkpoint_dir`={folder!r} records no state sizes: expected `{STATE_SIZES_KEY}` in "
        f"its config.json or a {CONTROLLER_FILE} file (written by CompreSSMTrainerCallback)."
    )
    raise FileNotFoundError(msg)


def prepare_resume(model: nn.Module, checkpoint_dir: str | os.PathLike[str]) -> dict[str, int]:
    """Resize a freshly built model to the state sizes of a checkpoint before loading it.

    Call it before ``trainer.train(resume_from_checkpoint=checkpoint_dir)`` when the Trainer
    does not resize the model itself (a :class:`CompreSSMTrainerCallback` passed to the
    ``Trainer`` constructor does), or before loading a checkpoint's weights by hand. The
    Parameter objects are kept, so an optimizer already built on ``model`` stays valid.

    Parameters
    ----------
    model : torch.nn.Module
        The freshly built (full-size) model.
    checkpoint_dir : str or os.PathLike
        A checkpoint folder of the Trainer (or any folder written by ``save_pretrained`` after
        :func:`record_state_sizes`).

    Returns
    -------
    dict
        ``{layer name: state size}`` of the checkpoint, now the model's.

    Raises
    ------
    FileNotFoundError
        If the folder records no state sizes.
    """
    sizes = _match_names(model, _sizes_in(checkpoint_dir))
    resize_layers(model, sizes)
    _record(model)
    return sizes


def _read_controller_file(path: str) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        msg = f"{path!r} is not a compressm controller file (expected format {_FORMAT!r})."
        raise ValueError(msg)
    return state


def _resize_to_incoming_state(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    """``load_state_dict`` pre-hook: resize ``module`` to the state size in ``state_dict``."""
    adapter = get_adapter(module)
    size = adapter.incoming_size(module, state_dict, prefix)
    if size is not None and size >= 1 and size != adapter.state_size(module):
        logger.info("compressm: resizing %s to %d states to load a state dict", prefix, size)
        resize_layers(module, {"": size})


def _checkpoint_folder(args: TrainingArguments, state: TrainerState) -> str:
    """The folder of the Trainer's checkpoint at the current step."""
    return os.path.join(str(args.output_dir), f"checkpoint-{state.global_step}")


class CompreSSMTrainerCallback(TrainerCallback):
    """Reduce the SSM layers of a model while ``transformers.Trainer`` trains it.

    At ``on_train_begin`` the callback builds a :class:`~compressm_torch.CompreSSM` controller
    on the Trainer's model, optimizer and LR scheduler with ``total_steps = state.max_steps``,
    and calls :meth:`CompreSSM.step` at every ``on_step_end`` (once per optimizer step, so
    gradient accumulation is respected). After every event the model's config records the
    layers' state sizes (:func:`record_state_sizes`), so checkpoints and ``save_pretrained``
    write them to ``config.json``; :func:`load_reduced_pretrained` reloads such a model.

    Checkpoints: at ``on_save`` the controller's state is written as ``compressm.pt`` into the
    checkpoint folder (``args.output_dir/checkpoint-{step}``). From the Trainer's construction
    on, every managed layer resizes itself to the state size of a state dict loaded into it,
    so ``trainer.train(resume_from_checkpoint=...)`` loads a reduced checkpoint into a freshly
    built full-size model; the optimizer, built afterwards, gets the reduced shapes and its
    saved state. The controller state is read from the checkpoint folder at
    ``args.output_dir/checkpoint-{step}``; for a checkpoint elsewhere, or when the callback was
    added after the Trainer was built (``trainer.add_callback``), call
    :meth:`prepare_resume` first.

    The training loss reaches the controller when the Trainer logs it (every
    ``logging_steps``), one step later; the certified schedule and the warning about cuts
    before learning started need it, so log at least every ``check_every`` steps for them.

    Parameters
    ----------
    total_steps : int, optional
        Length of training in optimizer steps; default ``state.max_steps``.
    monitor : str, optional
        Key of the evaluation metrics (``"eval_loss"``, ``"eval_accuracy"``, ...) handed to the
        controller at the next step; required by ``mode="pragmatic"`` (set ``metric="min"``
        for a loss). Evaluation must run between scheduled reductions (``eval_steps``).
    resize_on_load : bool, optional
        Install the ``load_state_dict`` pre-hooks that resize the managed layers to incoming
        weights (see above).
    **options
        Keyword arguments of :class:`~compressm_torch.CompreSSM` (``options``, the options of
        :class:`~compressm_core.training.ReductionOptions` such as ``tau``, ``mode``,
        ``fraction``, ``reduction_steps``, and ``calibration_steps``, ``layers``, ...), checked
        here.

    Attributes
    ----------
    options : dict
        The controller options.
    controller : CompreSSM
        The controller of the current ``train`` (from ``on_train_begin``).
    history : list of ReductionEvent
        ``controller.history`` (empty before ``train``).

    Raises
    ------
    TypeError, ValueError
        On an unknown or invalid option (the message names it).

    Notes
    -----
    Usage::

        from compressm_torch.hf import CompreSSMTrainerCallback, load_reduced_pretrained

        callback = CompreSSMTrainerCallback(tau=0.05, warmup_fraction=0.2)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
        trainer.train()                      # or train(resume_from_checkpoint=True)
        trainer.save_model("reduced")        # config.json records the state sizes
        model = load_reduced_pretrained(MambaForCausalLM, "reduced")
    """

    def __init__(
        self,
        *,
        total_steps: int | None = None,
        monitor: str | None = None,
        resize_on_load: bool = True,
        **options: Any,
    ) -> None:
        super().__init__()
        if total_steps is not None and (
            isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
        ):
            msg = f"`total_steps` must be an int >= 1 or None; received {total_steps!r}."
            raise ValueError(msg)
        if monitor is not None and not isinstance(monitor, str):
            msg = f"`monitor` must be a str or None; received {type(monitor).__name__}."
            raise TypeError(msg)
        record, _ = split_options(
            options.get("options"),
            {k: v for k, v in options.items() if k != "options"},
            owner="CompreSSMTrainerCallback",
        )
        if record.mode == "pragmatic" and monitor is None:
            msg = (
                "`monitor` must name an evaluation metric (such as 'eval_loss') when "
                "`mode='pragmatic'` (the controller judges each reduction by it)."
            )
            raise ValueError(msg)
        self.total_steps = total_steps
        self.monitor = monitor
        self.resize_on_load = resize_on_load
        self.options: dict[str, Any] = dict(options)
        self._controller: CompreSSM | None = None
        self._resume_dir: str | None = None
        self._loss: float | None = None
        self._metric: float | None = None
        self._load_hooks: list[RemovableHandle] = []

    # -- public ----------------------------------------------------------------------------

    @property
    def controller(self) -> CompreSSM:
        """The controller of the current ``train``.

        Raises
        ------
        RuntimeError
            Before ``on_train_begin``.
        """
        if self._controller is None:
            msg = "The controller is built at `on_train_begin`; call `Trainer.train` first."
            raise RuntimeError(msg)
        return self._controller

    @property
    def history(self) -> list[ReductionEvent]:
        """Events of the controller (``[]`` before ``train``)."""
        return [] if self._controller is None else self._controller.history

    def prepare_resume(
        self, model: nn.Module, checkpoint_dir: str | os.PathLike[str]
    ) -> dict[str, int]:
        """Resize ``model`` to a checkpoint's state sizes and resume the controller from it.

        :func:`prepare_resume` of ``model``, and the controller state of ``checkpoint_dir`` is
        loaded at the next ``on_train_begin``. Then call
        ``trainer.train(resume_from_checkpoint=checkpoint_dir)``.
        """
        sizes = prepare_resume(model, checkpoint_dir)
        self._resume_dir = os.fspath(checkpoint_dir)
        return sizes

    def remove_hooks(self) -> None:
        """Remove the ``load_state_dict`` pre-hooks and the controller's hooks."""
        for handle in self._load_hooks:
            handle.remove()
        self._load_hooks = []
        if self._controller is not None:
            self._controller.remove_hooks()

    # -- Trainer events --------------------------------------------------------------------

    def on_init_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Make the managed layers resize themselves to the state dicts loaded into them."""
        model = kwargs.get("model")
        if not self.resize_on_load or model is None or self._load_hooks:
            return
        for layer in self._managed_layers(model).values():
            hook = layer.register_load_state_dict_pre_hook  # untyped in torch
            self._load_hooks.append(hook(_resize_to_incoming_state))  # type: ignore[no-untyped-call]

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Build the controller; on resume, load its state from the checkpoint."""
        model = kwargs["model"]
        optimizer = kwargs.get("optimizer")
        inner = getattr(optimizer, "optimizer", None)  # accelerate's AcceleratedOptimizer
        if isinstance(inner, torch.optim.Optimizer):
            optimizer = inner  # its step hooks fire (rewarmup_steps); state is shared
        total = self.total_steps if self.total_steps is not None else int(state.max_steps)
        if self._controller is not None:
            self._controller.remove_hooks()
        self._loss = self._metric = None
        self._controller = CompreSSM(
            model,
            optimizer,
            total_steps=total,
            lr_scheduler=kwargs.get("lr_scheduler"),
            **self.options,
        )
        if state.global_step > 0:
            self._resume(args, state)
        _record(model)

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Advance the controller by one optimizer step; record the sizes after an event."""
        loss, self._loss = self._loss, None
        metric, self._metric = self._metric, None
        events = self.controller.step(val_metric=metric, loss=loss)
        if events:
            _record(self.controller.model)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Keep the logged training loss for the controller's next step."""
        if logs and "loss" in logs and self._controller is not None:
            self._loss = float(logs["loss"])

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Keep the ``monitor`` metric for the controller's next step."""
        if self.monitor is None or self._controller is None or metrics is None:
            return
        if self.monitor not in metrics:
            msg = (
                f"`monitor={self.monitor!r}` is not among the evaluation metrics "
                f"{sorted(metrics)}."
            )
            raise KeyError(msg)
        self._metric = float(metrics[self.monitor])

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Write the controller state into the checkpoint folder (``compressm.pt``)."""
        if self._controller is None or not args.should_save:
            return
        folder = _checkpoint_folder(args, state)
        os.makedirs(folder, exist_ok=True)
        torch.save(
            {
                "format": _FORMAT,
                "controller": self._controller.state_dict(),
                "state_sizes": self._controller.state_sizes,
                "metric": self._metric,
            },
            os.path.join(folder, CONTROLLER_FILE),
        )

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Record the final sizes and remove the controller's forward hooks."""
        if self._controller is None:
            return
        self._controller.remove_hooks()
        _record(self._controller.model)

    # -- internals -------------------------------------------------------------------------

    def _resume(self, args: TrainingArguments, state: TrainerState) -> None:
        folder = self._resume_dir or _checkpoint_folder(args, state)
        self._resume_dir = None
        path = os.path.join(folder, CONTROLLER_FILE)
        if not os.path.isfile(path):
            msg = (
                f"Resuming at step {state.global_step}, but {path!r} does not exist. For a "
                "checkpoint outside `args.output_dir`, call "
                "callback.prepare_resume(model, checkpoint_dir) before trainer.train."
            )
            raise FileNotFoundError(msg)
        saved = _read_controller_file(path)
        self.controller.load_state_dict(saved["controller"])
        self._metric = saved.get("metric")

    def _managed_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        found = find_layers(model)
        wanted = self.options.get("layers")
        if wanted is None:
            return found
        names = set(wanted)
        return {name: layer for name, layer in found.items() if name in names}
