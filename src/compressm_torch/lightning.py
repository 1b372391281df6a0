"""A PyTorch Lightning callback that runs :class:`~compressm_torch.CompreSSM` inside ``fit``.

This module imports :mod:`lightning`; ``import compressm_torch`` does not.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.utils.hooks import RemovableHandle

from compressm_core.checks import check_int
from compressm_core.training import ReductionOptions, relative_bound, signature_with

from ._callbacks import ControllerHolder
from ._options import CompreSSMKeywords, controller_parameters, split_options
from .adapters import _iter_layers, resize_layers, state_sizes
from .controller import CompreSSM, ReductionEvent

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["CompreSSMCallback", "ResizeOnLoad", "resize_to_checkpoint"]

logger = logging.getLogger("compressm")

#: Key of the top-level checkpoint entry holding the layers' state sizes.
STATE_SIZES_KEY = "compressm_state_sizes"


class CompreSSMCallback(ControllerHolder, Callback):
    """Reduce the SSM layers of a LightningModule while ``Trainer.fit`` trains it.

    At ``on_fit_start`` the callback builds a :class:`~compressm_torch.CompreSSM` controller on
    the LightningModule, the first optimizer of the trainer and the scheduler of its first
    ``lr_scheduler_configs`` entry, and calls :meth:`CompreSSM.step` once per optimizer step
    (gradient accumulation is respected: the callback follows ``trainer.global_step``). The
    Parameter objects survive a reduction, so the live optimizer and scheduler keep working.

    Checkpoints written by Lightning hold the controller state (``checkpoint["callbacks"]``) and
    the layers' state sizes (``checkpoint["compressm_state_sizes"]``). While the callback is
    attached (from its ``setup`` to its ``teardown`` hook), every managed layer resizes itself
    to the shapes of a state dict loaded into it, so ``Trainer.fit(model, ckpt_path=...)`` (and
    ``validate``, ``test``, ``predict``) resumes a reduced run into a freshly built full-size
    model. To load such a checkpoint without the callback, call
    ``resize_layers(model, ckpt["compressm_state_sizes"])`` before ``load_state_dict``.

    Parameters
    ----------
    total_steps : int, optional
        Length of training in optimizer steps; default ``trainer.estimated_stepping_batches``.
    monitor : str, optional
        Key of ``trainer.callback_metrics`` holding the validation metric; required by
        ``mode="pragmatic"``. A value logged during validation is handed to the controller at
        the next optimizer step, so a pragmatic reduction at step ``s`` is compared against the
        last validation before ``s`` and judged by the first validation after it. Validation
        must therefore run between scheduled reductions (``val_check_interval``). Under a
        distributed strategy the controller judges by the mean of the ranks' values (logged with
        or without ``sync_dist``), so every rank keeps or rolls back the same reduction.
    options : ReductionOptions, optional
        The framework-free options as one record, as for :class:`~compressm_torch.CompreSSM`.
    log_metrics : bool, optional
        Log through ``pl_module.log`` (so CSV, TensorBoard or W&B loggers get them), at every
        optimizer step (the trainer's ``log_every_n_steps`` applies): ``compressm/state_size``
        (all managed layers), ``compressm/state_size/<layer>``, ``compressm/parameters`` (the
        trainable scalars of the module) and, at each cut,
        ``compressm/relative_bound/<layer>`` (the error bound over :math:`\\sigma_1`, see
        :meth:`~compressm_torch.CompreSSM.summary`). Default ``True``.
    **keywords
        The keyword options of :class:`~compressm_torch.CompreSSM`, checked here: those of
        :class:`~compressm_core.training.ReductionOptions` (``tau``, ``mode``, ...; the schedule
        counts optimizer steps) and ``optimizer_state``, ``horizon``, ``layers``,
        ``importance``, ``aggregate``, ``calibration_steps``, ``calibration_batches``,
        ``calibration_sequences``. The training loss is read from what ``training_step``
        returns (a tensor, or a mapping with ``"loss"``).

    Attributes
    ----------
    options : ReductionOptions
        The framework-free options (:class:`compressm_core.training.ReductionOptions`).
    controller : CompreSSM
        The controller of the current ``fit`` (available from ``on_fit_start``).
    history : list of ReductionEvent
        ``controller.history`` (empty before ``fit``).

    Raises
    ------
    ValueError, TypeError
        On an invalid option (checked at construction; the message names the argument).

    Examples
    --------
    >>> import lightning.pytorch as pl
    >>> import torch
    >>> from compressm_torch import SequenceModel
    >>> from compressm_torch.lightning import CompreSSMCallback
    >>> class Module(pl.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = SequenceModel(1, 1, d_model=8, d_state=16)
    ...     def training_step(self, batch, batch_idx):
    ...         x, y = batch
    ...         return torch.nn.functional.mse_loss(self.net(x), y)
    ...     def configure_optimizers(self):
    ...         return torch.optim.AdamW(self.parameters(), lr=1e-2)
    >>> data = torch.utils.data.TensorDataset(torch.randn(32, 20, 1), torch.randn(32, 1))
    >>> callback = CompreSSMCallback(mode="fixed", fraction=0.25, reduction_steps=[4, 8])
    >>> trainer = pl.Trainer(
    ...     max_steps=10, callbacks=[callback], logger=False, enable_checkpointing=False,
    ...     enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    ... )
    >>> import warnings
    >>> from compressm_core import ReductionWarning
    >>> with warnings.catch_warnings():  # ten steps: the cuts come before the loss falls
    ...     warnings.simplefilter("ignore", ReductionWarning)
    ...     trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=8))
    >>> callback.controller.state_sizes
    {'net.blocks.0.ssm': 9}
    """

    @signature_with(controller_parameters())
    def __init__(
        self,
        *,
        total_steps: int | None = None,
        monitor: str | None = None,
        options: ReductionOptions | None = None,
        log_metrics: bool = True,
        **keywords: Unpack[CompreSSMKeywords],
    ) -> None:
        super().__init__()
        if not isinstance(log_metrics, bool):
            msg = f"`log_metrics` must be a bool; received {type(log_metrics).__name__}."
            raise TypeError(msg)
        self.log_metrics = log_metrics
        if monitor is not None and not isinstance(monitor, str):
            msg = f"`monitor` must be a str or None; received {type(monitor).__name__}."
            raise TypeError(msg)
        self.options, torch_options = split_options(options, keywords, owner="CompreSSMCallback")
        if self.options.mode == "pragmatic" and monitor is None:
            msg = (
                "`monitor` must name a logged validation metric when `mode='pragmatic'` "
                "(the controller judges each reduction by it)."
            )
            raise ValueError(msg)
        if total_steps is not None:
            check_int(total_steps, "total_steps", low=1)
        self.total_steps = total_steps
        self.monitor = monitor
        layers = torch_options.pop("layers")
        self.layers = None if layers is None else list(layers)
        self._torch_options = torch_options
        self._built_at = ("on_fit_start", "Trainer.fit")
        self._controller: CompreSSM | None = None
        self._restored: dict[str, Any] | None = None
        self._metric: float | None = None
        self._last_step = 0
        self._load_hooks: list[RemovableHandle] = []

    # -- public ----------------------------------------------------------------------------

    # -- Lightning hooks -------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Make the managed layers resize themselves to the state dicts loaded into them.

        Lightning restores ``ckpt_path`` after this hook (``trainer.ckpt_path`` is not set yet),
        by ``pl_module.load_state_dict``; a ``load_state_dict`` pre-hook on each managed layer
        gives the layer the state size of the incoming tensors first (Parameter objects are
        kept), so a full-size model accepts a reduced checkpoint.
        """
        if stage == "fit":
            self._controller = None
            self._restored = None
            self._metric = None
        self._remove_load_hooks()
        self._install_load_hooks(pl_module, self.layers)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the load hooks and the controller's forward hooks."""
        self._remove_load_hooks()
        if stage == "fit" and self._controller is not None:
            self._controller.remove_hooks()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the controller on the module, its first optimizer and first scheduler."""
        total = self.total_steps
        if total is None:
            estimate = trainer.estimated_stepping_batches
            if not (isinstance(estimate, (int, float)) and 1 <= estimate < float("inf")):
                msg = (
                    f"`total_steps` was not given and the trainer cannot estimate it "
                    f"(estimated_stepping_batches = {estimate!r}); pass `total_steps` or set "
                    "`max_steps`/`max_epochs`."
                )
                raise ValueError(msg)
            total = int(estimate)
        optimizers = trainer.optimizers
        schedulers = trainer.lr_scheduler_configs
        self._controller = CompreSSM(
            pl_module,
            optimizers[0] if optimizers else None,
            total_steps=total,
            lr_scheduler=schedulers[0].scheduler if schedulers else None,
            options=self.options,
            layers=self.layers,
            **self._torch_options,
        )
        if self._restored is not None:
            self._load(self._restored)
            self._restored = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start counting optimizer steps from ``trainer.global_step`` (restored on resume)."""
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Advance the controller once per optimizer step taken since the last call."""
        controller = self.controller
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor):
            loss = None
        events = []
        while self._last_step < trainer.global_step:
            self._last_step += 1
            metric, self._metric = self._metric, None
            loss_value = None if loss is None else loss.detach()
            events += controller.step(val_metric=metric, loss=loss_value)
        if self.log_metrics:
            _log_state(trainer, pl_module, controller, events)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep the ``monitor`` metric for the controller's next step."""
        if self.monitor is None or trainer.sanity_checking or self._controller is None:
            return
        if trainer.state.fn != TrainerFn.FITTING:
            return
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            msg = (
                f"`monitor={self.monitor!r}` is not among the logged metrics "
                f"{sorted(metrics)}; log it in `validation_step` or `on_validation_epoch_end`."
            )
            raise KeyError(msg)
        self._metric = float(metrics[self.monitor])

    def state_dict(self) -> dict[str, Any]:
        """The controller state, the layers' state sizes and an undelivered metric."""
        if self._controller is None:
            return {}
        return {
            "controller": self._controller.state_dict(),
            "state_sizes": self._controller.state_sizes,
            "metric": self._metric,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (kept until the controller exists)."""
        if "controller" not in state_dict:
            return
        if self._controller is None:
            self._restored = state_dict
        else:
            self._load(state_dict)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Record the state size of every supported layer at the top of the checkpoint."""
        checkpoint[STATE_SIZES_KEY] = state_sizes(pl_module)

    # -- internals -------------------------------------------------------------------------

    def _load(self, state: dict[str, Any]) -> None:
        controller = self.controller
        controller.load_state_dict(state["controller"])
        self._metric = state.get("metric")


def _log_state(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    controller: CompreSSM,
    events: list[ReductionEvent],
) -> None:
    """What ``log_metrics`` logs (see :class:`CompreSSMCallback`). The bounds go to the
    loggers directly: a value given to ``pl_module.log`` is logged again at every later step
    of the epoch, and a bound belongs to the step of its cut only."""

    def log(name: str, value: float) -> None:
        pl_module.log(name, float(value), on_step=True, on_epoch=False, batch_size=1)

    sizes = controller.state_sizes
    log("compressm/state_size", sum(sizes.values()))
    for name, size in sizes.items():
        log(f"compressm/state_size/{name}", size)
    log("compressm/parameters", sum(p.numel() for p in pl_module.parameters() if p.requires_grad))
    bounds = {
        f"compressm/relative_bound/{event.layer}": bound
        for event in events
        if event.status == "reduced" and (bound := relative_bound(event)) is not None
    }
    if bounds:
        # the step Lightning gives this batch's ``pl_module.log`` values (the optimizer steps
        # before this one)
        step = max(trainer.global_step - 1, 0)
        for logger in trainer.loggers:
            logger.log_metrics(bounds, step=step)


def resize_to_checkpoint(module: nn.Module, checkpoint: Mapping[str, Any]) -> dict[str, int]:
    """Give every supported layer of ``module`` the state size of its tensors in the Lightning
    ``checkpoint`` (``checkpoint["state_dict"]``), before ``load_state_dict``.

    Layers without tensors in the checkpoint keep their size. Parameter objects are kept.

    Returns
    -------
    dict
        The sizes read, by layer name.

    Raises
    ------
    ValueError
        ``checkpoint`` has no ``"state_dict"`` mapping.
    """
    state = checkpoint.get("state_dict") if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        msg = (
            "`checkpoint` must be a Lightning checkpoint (a dict with a 'state_dict' mapping); "
            f"received {type(checkpoint).__name__} without one."
        )
        raise ValueError(msg)
    sizes = {}
    for name, layer, adapter in _iter_layers(module):
        size = adapter.incoming_size(layer, state, f"{name}." if name else "")
        if size is not None and size >= 1:
            sizes[name] = size
    resize_layers(module, sizes)
    return sizes


class ResizeOnLoad:
    """Mixin for a LightningModule whose layers were reduced: ``load_from_checkpoint`` (which
    builds the module at its full size from its hyperparameters) resizes the layers to the
    checkpoint's tensors before loading them.

    Put it before ``LightningModule`` in the bases; its ``on_load_checkpoint`` calls
    :func:`resize_to_checkpoint`, then the next class's ``on_load_checkpoint``.

    Examples
    --------
    >>> import lightning.pytorch as pl
    >>> from compressm_torch.lightning import ResizeOnLoad
    >>> class Module(ResizeOnLoad, pl.LightningModule):
    ...     pass
    """

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resize the layers to ``checkpoint`` (:func:`resize_to_checkpoint`)."""
        assert isinstance(self, nn.Module)
        resize_to_checkpoint(self, checkpoint)
        parent = getattr(super(), "on_load_checkpoint", None)
        if parent is not None:
            parent(checkpoint)
