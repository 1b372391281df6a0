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

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ._callbacks import ControllerHolder
from ._options import split_options
from ._pretrained import (
    CONTROLLER_FILE,
    align_state_sizes,
    load_reduced_pretrained,
    prepare_resume,
    read_controller_file,
    record,
    record_state_sizes,
    write_controller_file,
)
from .controller import CompreSSM

__all__ = [
    "CompreSSMTrainerCallback",
    "align_state_sizes",
    "load_reduced_pretrained",
    "prepare_resume",
    "record_state_sizes",
]


def _checkpoint_folder(args: TrainingArguments, state: TrainerState) -> str:
    """The folder of the Trainer's checkpoint at the current step."""
    return os.path.join(str(args.output_dir), f"checkpoint-{state.global_step}")


class CompreSSMTrainerCallback(ControllerHolder, TrainerCallback):
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
        self._built_at = ("on_train_begin", "Trainer.train")
        self._controller: CompreSSM | None = None
        self._resume_dir: str | None = None
        self._loss: float | None = None
        self._metric: float | None = None
        self._load_hooks: list[RemovableHandle] = []

    # -- public ----------------------------------------------------------------------------

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
        self._remove_load_hooks()
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
        self._install_load_hooks(model, self.options.get("layers"))

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
        record(model)

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
            record(self.controller.model)

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
        write_controller_file(
            os.path.join(folder, CONTROLLER_FILE),
            {
                "controller": self._controller.state_dict(),
                "state_sizes": self._controller.state_sizes,
                "metric": self._metric,
            },
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
        record(self._controller.model)

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
        saved = read_controller_file(path)
        self.controller.load_state_dict(saved["controller"])
        self._metric = saved.get("metric")
