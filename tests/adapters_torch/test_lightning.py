"""The Lightning callback: reductions inside ``Trainer.fit``, checkpoints, pragmatic rollbacks."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("lightning")

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch.utils.data import DataLoader, TensorDataset

from compressm_torch import CompreSSM, SequenceModel, state_sizes
from compressm_torch.lightning import CompreSSMCallback, ResizeOnLoad, resize_to_checkpoint

pytestmark = [
    # Lightning 2.6 calls a torch pytree API that torch deprecates.
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
    # "The dataloader does not have many workers": irrelevant for these tiny CPU runs.
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    # These runs are a few steps long: the controller says that their loss has not fallen yet
    # at the scheduled reductions (tested in test_certified_schedule.py).
    pytest.mark.filterwarnings("ignore:Reduction at step .* has not fallen:UserWarning"),
]

LAYER = "net.blocks.0.ssm"
BATCHES_PER_EPOCH = 10


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # The tiny models are dominated by per-op overhead; two threads on a shared machine are
    # several times slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Classifier(pl.LightningModule):
    """A small LRU classifier that records its training losses."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = SequenceModel(1, 3, d_model=8, d_state=16)
        self.losses: list[float] = []
        self.snapshots: dict[int, dict[str, Any]] = {}
        self.snapshot_at: set[int] = set()

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Runs after every callback's on_train_batch_end of the same batch.
        if self.trainer.global_step in self.snapshot_at:
            self.snapshots[self.trainer.global_step] = _clone(self)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Scripted(Classifier):
    """Logs ``val_acc`` from a script: the ``k``-th validation logs ``script[k]``."""

    def __init__(self, script: list[float]) -> None:
        super().__init__()
        self.script = script
        self.val_calls = 0

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_acc", self.script[min(self.val_calls, len(self.script) - 1)])

    def on_validation_epoch_end(self) -> None:
        self.val_calls += 1


class Probe(Callback):
    """Clone the module's state at given global steps, before later callbacks run."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps
        self.states: dict[int, dict[str, Any]] = {}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if trainer.global_step in self.steps:
            self.states[trainer.global_step] = _clone(pl_module)


def _clone(module: Any) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _loader(seed: int = 1, n: int = 4 * BATCHES_PER_EPOCH) -> DataLoader[Any]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, 1, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)


def _trainer(tmp_path: Path, max_steps: int, callbacks: list[Any], **kw: Any) -> Any:
    options: dict[str, Any] = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        "devices": 1,
        "default_root_dir": tmp_path,
        "num_sanity_val_steps": 0,
    }
    options.update(kw)
    return pl.Trainer(max_steps=max_steps, callbacks=callbacks, **options)


def _reductions(callback: CompreSSMCallback) -> list[tuple[int, str, int, int]]:
    return [(e.step, e.status, e.old_rank, e.new_rank) for e in callback.history]


# -- construction -------------------------------------------------------------------------


def test_options_mirror_the_controller() -> None:
    ours = inspect.signature(CompreSSMCallback).parameters
    theirs = inspect.signature(CompreSSM).parameters
    expected = {n: p.default for n, p in theirs.items() if n not in ("model", "optimizer")}
    del expected["lr_scheduler"]
    expected["total_steps"] = None
    expected["monitor"] = None
    expected["log_metrics"] = True
    assert {n: p.default for n, p in ours.items()} == expected
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours.values())


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"tau": 1.5}, ValueError, "`tau`"),
        ({"mode": "greedy"}, ValueError, "`mode`"),
        ({"total_steps": 0}, ValueError, "`total_steps`"),
        ({"reduction_steps": [0]}, ValueError, "`reduction_steps"),
        ({"mode": "pragmatic"}, ValueError, "`monitor`"),
        ({"monitor": 3}, TypeError, "`monitor`"),
    ],
)
def test_invalid_options_fail_at_construction(
    kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=name):
        CompreSSMCallback(**kwargs)


def test_validation_does_not_draw_from_the_global_rng() -> None:
    state = torch.random.get_rng_state()
    CompreSSMCallback(tau=0.2)
    assert torch.equal(state, torch.random.get_rng_state())


def test_compressm_torch_does_not_import_lightning() -> None:
    code = textwrap.dedent(
        """
        import sys
        import compressm_torch
        bad = [m for m in ("lightning", "pytorch_lightning") if m in sys.modules]
        assert not bad, bad
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


# -- training -----------------------------------------------------------------------------


def test_fit_reduces_and_every_parameter_keeps_training(tmp_path: Path) -> None:
    callback = CompreSSMCallback(tau=0.2, reduction_steps=[5, 10, 15], total_steps=40)
    model = Classifier()
    model.snapshot_at = {30}
    trainer = _trainer(tmp_path, 40, [callback])
    trainer.fit(model, _loader())

    assert trainer.global_step == 40
    assert callback.controller.num_steps == 40
    reduced = [e for e in callback.history if e.status == "reduced"]
    assert reduced, _reductions(callback)
    assert {e.step for e in callback.history} <= {5, 10, 15}
    size = state_sizes(model)[LAYER]
    assert size < 16
    assert callback.controller.state_sizes == {LAYER: size} == {LAYER: reduced[-1].new_rank}

    # The live optimizer is the controller's and still holds the model's Parameter objects;
    # its moments have the reduced shapes.
    optimizer = trainer.strategy.optimizers[0]
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in held} == {id(p) for p in model.parameters()}
    assert len(held) == len(list(model.parameters()))
    for param in model.parameters():
        assert optimizer.state[param]["exp_avg"].shape == param.shape
    assert callback.controller.optimizer is optimizer

    # Ten steps after the last reduction every parameter still moves.
    before = model.snapshots[30]
    after = dict(model.named_parameters())
    frozen = [name for name, p in after.items() if torch.equal(p.detach(), before[name])]
    assert not frozen
    assert all(torch.isfinite(torch.tensor(model.losses)))


def test_gradient_accumulation_steps_once_per_optimizer_step(tmp_path: Path) -> None:
    callback = CompreSSMCallback(mode="fixed", fraction=0.25, reduction_steps=[3, 7])
    model = Classifier()
    trainer = _trainer(tmp_path, 8, [callback], accumulate_grad_batches=2)
    trainer.fit(model, _loader())
    assert len(model.losses) == 16  # micro-batches
    assert callback.controller.num_steps == trainer.global_step == 8
    assert _reductions(callback) == [(3, "reduced", 16, 12), (7, "reduced", 12, 9)]
    # total_steps defaults to the trainer's estimate.
    assert callback.controller.total_steps == 8


# -- checkpoints --------------------------------------------------------------------------


class RestoreAfterSetup(SingleDeviceStrategy):
    """Restore the checkpoint after the optimizers were built (as FSDP/DeepSpeed do)."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


# The resumed run deliberately has no ModelCheckpoint, whose state the checkpoint holds.
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`:UserWarning")
@pytest.mark.parametrize("late_restore", [False, True], ids=["default", "restore_after_setup"])
def test_checkpoint_round_trip_resumes_exactly(tmp_path: Path, late_restore: bool) -> None:
    options: dict[str, Any] = {
        "mode": "fixed",
        "fraction": 0.25,
        "reduction_steps": [5, 10, 25],
        "total_steps": 40,
    }
    # Uninterrupted run of 40 steps, checkpointing at step 20 (an epoch boundary).
    callback = CompreSSMCallback(**options)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=20, save_top_k=-1)
    full = Classifier()
    _trainer(tmp_path, 40, [callback, saver], enable_checkpointing=True).fit(full, _loader())
    assert _reductions(callback) == [
        (5, "reduced", 16, 12),
        (10, "reduced", 12, 9),
        (25, "reduced", 9, 6),
    ]
    (path,) = (tmp_path / "ckpt").glob("*step=20.ckpt")

    # The checkpoint records the sizes and the controller state at step 20.
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["compressm_state_sizes"] == {LAYER: 9}
    saved = ckpt["callbacks"]["CompreSSMCallback"]
    assert saved["state_sizes"] == {LAYER: 9}
    assert saved["controller"]["num_steps"] == 20
    assert len(saved["controller"]["history"]) == 2

    # A freshly built full-size model and a fresh callback resume from it.
    resumed_callback = CompreSSMCallback(**options)
    resumed = Classifier()
    assert state_sizes(resumed) == {LAYER: 16}
    kw: dict[str, Any] = {}
    if late_restore:
        kw = {"strategy": RestoreAfterSetup(device=torch.device("cpu")), "devices": "auto"}
    trainer = _trainer(tmp_path, 40, [resumed_callback], **kw)
    trainer.fit(resumed, _loader(), ckpt_path=path)

    assert trainer.global_step == 40
    assert resumed_callback.controller.num_steps == 40
    assert _reductions(resumed_callback) == _reductions(callback)
    assert state_sizes(resumed) == state_sizes(full) == {LAYER: 6}
    # Resuming at an epoch boundary from a checkpoint written at on_train_batch_end replays
    # the same batches, optimizer moments and LR schedule, so the runs agree bit for bit.
    # (Lightning 2.6 replays one batch when it resumes from a checkpoint written at
    # on_train_epoch_end or by trainer.save_checkpoint after max_steps, and restarts a
    # non-resumable loader from the beginning mid-epoch; those runs then differ in data order.)
    assert resumed.losses == full.losses[20:]
    final, expected = resumed.state_dict(), full.state_dict()
    assert final.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(final[name], value), name


def test_validate_with_ckpt_path_resizes_a_fresh_model(tmp_path: Path) -> None:
    # A checkpoint of a reduced model loads into a full-size one through the callback's
    # load hooks even with `trainer.validate`, outside fit.
    callback = CompreSSMCallback(mode="fixed", fraction=0.5, reduction_steps=[2])
    model = Scripted([1.0])
    trainer = _trainer(tmp_path, 3, [callback], limit_val_batches=1)
    trainer.fit(model, _loader(), _loader(seed=2))
    path = tmp_path / "reduced.ckpt"
    trainer.save_checkpoint(path)

    fresh = Scripted([1.0])
    _trainer(tmp_path, 3, [CompreSSMCallback()]).validate(
        fresh, _loader(seed=2), ckpt_path=path, verbose=False
    )
    assert state_sizes(fresh) == state_sizes(model) == {LAYER: 8}
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


# -- pragmatic mode -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "rolled_back"),
    [([1.0, 1.0, 1.0, 1.0], False), ([1.0, 0.5, 0.5, 0.5], True)],
    ids=["holds", "falls"],
)
def test_pragmatic_mode_rolls_back_when_the_monitored_metric_falls(
    tmp_path: Path, script: list[float], rolled_back: bool
) -> None:
    # Validation after steps 5, 10, 15, 20; a metric reaches the controller at the next step.
    # The reduction at step 8 uses the metric of step 5 as baseline and is judged by the metric
    # of step 10 (handed over at step 11); the one at 13 would be judged at step 16.
    callback = CompreSSMCallback(
        mode="pragmatic", monitor="val_acc", fraction=0.25, reduction_steps=[8, 13]
    )
    probe = Probe({8})
    model = Scripted(script)
    model.snapshot_at = {11}
    trainer = _trainer(tmp_path, 20, [probe, callback], val_check_interval=5, limit_val_batches=1)
    trainer.fit(model, _loader(), _loader(seed=2))

    assert model.val_calls == 4
    assert trainer.global_step == callback.controller.num_steps == 20
    if rolled_back:
        assert _reductions(callback) == [(8, "reduced", 16, 12), (11, "rolled_back", 12, 16)]
        assert callback.controller.stopped
        assert state_sizes(model) == {LAYER: 16}
        # The rollback restored the model as it was just before the reduction.
        restored, before = model.snapshots[11], probe.states[8]
        assert restored.keys() == before.keys()
        for name, value in before.items():
            assert torch.equal(restored[name], value), name
    else:
        assert _reductions(callback) == [(8, "reduced", 16, 12), (13, "reduced", 12, 9)]
        assert not callback.controller.stopped
        assert state_sizes(model) == {LAYER: 9}
    # Training went on with a consistent optimizer either way.
    optimizer = trainer.strategy.optimizers[0]
    for param in model.parameters():
        assert optimizer.state[param]["exp_avg"].shape == param.shape
    assert all(torch.isfinite(torch.tensor(model.losses)))


def test_missing_monitor_key_names_the_argument(tmp_path: Path) -> None:
    callback = CompreSSMCallback(mode="pragmatic", monitor="val_loss", reduction_steps=[4])
    model = Scripted([1.0])
    trainer = _trainer(tmp_path, 6, [callback], val_check_interval=2, limit_val_batches=1)
    with pytest.raises(KeyError, match="monitor='val_loss'"):
        trainer.fit(model, _loader(), _loader(seed=2))


def test_sizes_parameters_and_bounds_reach_the_logger(tmp_path: Path) -> None:
    import csv

    from lightning.pytorch.loggers import CSVLogger

    callback = CompreSSMCallback(mode="fixed", fraction=0.5, reduction_steps=[5, 10])
    model = Classifier()
    start = sum(p.numel() for p in model.parameters())
    logger = CSVLogger(tmp_path, name="run")
    trainer = _trainer(tmp_path, 12, [callback], logger=logger, log_every_n_steps=1)
    trainer.fit(model, _loader())
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    by_step = {int(r["step"]): r for r in rows if r.get("compressm/state_size")}
    # Lightning's step column is the global step minus one at on_train_batch_end
    sizes = {s + 1: float(r[f"compressm/state_size/{LAYER}"]) for s, r in by_step.items()}
    assert sizes[4] == 16.0
    assert sizes[5] == 8.0
    assert sizes[12] == 4.0
    assert float(by_step[0]["compressm/parameters"]) == start
    assert float(by_step[11]["compressm/parameters"]) == sum(p.numel() for p in model.parameters())
    cuts = {e.step: e for e in callback.history if e.status == "reduced"}
    assert sorted(cuts) == [5, 10]
    column = f"compressm/relative_bound/{LAYER}"
    logged = {int(r["step"]) + 1: float(r[column]) for r in rows if r.get(column)}
    assert logged == pytest.approx({s: e.error_bound / e.hsv[0] for s, e in cuts.items()})


def test_log_metrics_false_logs_nothing(tmp_path: Path) -> None:
    callback = CompreSSMCallback(reduction_steps=[2], log_metrics=False)
    trainer = _trainer(tmp_path, 3, [callback])
    trainer.fit(Classifier(), _loader())
    assert not [k for k in trainer.logged_metrics if k.startswith("compressm/")]
    with pytest.raises(TypeError, match="`log_metrics` must be a bool"):
        CompreSSMCallback(log_metrics="yes")  # type: ignore[arg-type]


class Resizing(ResizeOnLoad, Classifier):
    """``load_from_checkpoint`` resizes the reduced layers first."""


def test_load_from_checkpoint_of_a_reduced_module(tmp_path: Path) -> None:
    callback = CompreSSMCallback(mode="fixed", fraction=0.5, reduction_steps=[3, 6])
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    model = Resizing()
    trainer = _trainer(tmp_path, 8, [callback, checkpoint], enable_checkpointing=True)
    trainer.fit(model, _loader())
    path = tmp_path / "ckpt" / "last.ckpt"
    assert state_sizes(model)[LAYER] == 4
    with pytest.raises(RuntimeError, match="size mismatch"):
        Classifier.load_from_checkpoint(path)  # built at 16 states: the plain module fails
    loaded = Resizing.load_from_checkpoint(path)
    assert state_sizes(loaded) == {LAYER: 4}
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    x = torch.randn(2, 20, 1)
    torch.testing.assert_close(loaded.net(x), model.net(x))

    # `compressm analyze` reads the Lightning checkpoint too (layers found by their tensors)
    import json

    from compressm_cli.app import main
    from compressm_core import hankel_singular_values
    from compressm_torch import to_state_space

    assert main(["analyze", str(path), "--out", str(tmp_path / "an")]) == 0
    result = json.loads((tmp_path / "an" / "analysis.json").read_text())
    (name,) = result["layers"]
    assert name == LAYER
    with torch.no_grad():
        hsv = hankel_singular_values(to_state_space(model.get_submodule(LAYER)))
    stored = torch.tensor(result["layers"][name]["hsv"], dtype=torch.float64)
    torch.testing.assert_close(stored, hsv.double())


def test_resize_to_checkpoint_names_the_argument() -> None:
    with pytest.raises(ValueError, match="`checkpoint` must be a Lightning checkpoint"):
        resize_to_checkpoint(Classifier(), {"model": {}})
