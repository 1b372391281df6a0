"""torch.distributed (gloo, two CPU processes): every rank makes the same reduction decision."""

from __future__ import annotations

import copy
import pickle
from dataclasses import asdict
from datetime import timedelta

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
mp = pytest.importorskip("torch.multiprocessing")

from compressm_torch import (  # noqa: E402
    CompreSSM,
    Mamba,
    SelectiveRecorder,
    SequenceModel,
    reduce_selective_layer,
    state_sizes,
)
from tests.adapters_torch._tiny import Tiny  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")

WORLD = 2


def data(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(4, 12, 8, generator=g)


def kept_columns(before, after):
    return [
        j
        for i in range(after.shape[1])
        for j in range(before.shape[1])
        if torch.equal(after[:, i], before[:, j])
    ]


def worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        # 1. Statistics from different data on each rank: the decision uses all of them.
        torch.manual_seed(0)
        layer = Mamba(8, 12)
        a_log = layer.A_log.detach().clone()
        ctl = CompreSSM(
            layer, None, total_steps=10, mode="fixed", fraction=0.5, reduction_steps=[2]
        )
        for step in range(2):
            layer(data(rank, step))
            events = ctl.step()
        columns = kept_columns(a_log, layer.A_log.detach())
        # 2. A Mamba model trained under DistributedDataParallel with AdamW: the controller
        # manages the inner model; DDP is rebuilt after a reduction (its gradient buckets
        # hold the old shapes). Both ranks must stay bit-identical.
        torch.manual_seed(1)
        net = SequenceModel(8, 3, d_model=8, d_state=16, n_layers=1, layer="mamba")
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        ctl2 = CompreSSM(net, opt, total_steps=20, tau=0.3, reduction_steps=[3, 6])
        for step in range(8):
            loss = ddp(data(rank, 10 + step)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if any(e.status == "reduced" for e in ctl2.step()):
                ddp = torch.nn.parallel.DistributedDataParallel(net)
        result = {
            "events": [(e.status, e.old_rank, e.new_rank) for e in events],
            "columns": columns,
            "sizes": state_sizes(net),
            "state": {k: v.detach().clone() for k, v in net.state_dict().items()},
        }
        with open(f"{out_dir}/rank{rank}.pkl", "wb") as f:
            pickle.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_ranks_pool_statistics_and_agree(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = []
    for rank in range(WORLD):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as f:
            results.append(pickle.load(f))
    first, second = results
    assert first["events"] == [("reduced", 12, 6)]
    assert first["columns"] == second["columns"]
    # the same decision as one process that saw both ranks' batches
    torch.manual_seed(0)
    layer = Mamba(8, 12)
    a_log = layer.A_log.detach().clone()
    with SelectiveRecorder(layer) as recorder:
        for rank in range(WORLD):
            for step in range(2):
                layer(data(rank, step))
    single = copy.deepcopy(layer)
    reduce_selective_layer(single, recorder.statistics[""], rank=6)
    assert kept_columns(a_log, single.A_log.detach()) == first["columns"]
    # DDP run: the same sizes and bit-identical parameters on both ranks
    assert first["sizes"] == second["sizes"]
    assert first["sizes"]["blocks.0.ssm"] < 16
    for key, value in first["state"].items():
        assert torch.equal(value, second["state"][key]), key


# --- every data-dependent decision is agreed --------------------------------------------------
# Each scenario runs in two gloo processes with a short collective timeout, so that ranks issuing
# different collectives fail fast instead of hanging.

TIMEOUT = timedelta(seconds=20)


def train_step(ddp, opt, x):
    loss = ddp(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def batch(rank, step, length=12):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(4, length, 4, generator=g)


def summary(net, ctl):
    """What must be identical on every rank: sizes, parameters and the history."""
    history = [{k: v for k, v in asdict(e).items() if k != "seconds"} for e in ctl.history]
    return {
        "sizes": state_sizes(net),
        "state": {k: v.detach().clone() for k, v in net.state_dict().items()},
        "history": history,
    }


def pragmatic(rank):
    # The metric before the reduction is 1.0 on both ranks; after it, rank 0 measures 0.99
    # (within rollback_rtol) and rank 1 0.9: their mean, 0.945, asks for a rollback.
    torch.manual_seed(0)
    net = Tiny()
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    ctl = CompreSSM(net, opt, total_steps=10, mode="pragmatic", fraction=0.25, reduction_steps=[2])
    for step in range(2):
        train_step(ddp, opt, batch(rank, step))
        ctl.step(val_metric=1.0)
    reduced = state_sizes(net)
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    train_step(ddp, opt, batch(rank, 2))
    ctl.report_metric([0.99, 0.9][rank])
    return {"reduced": reduced, **summary(net, ctl)}


def auto_horizon(rank):
    # Rank 0 sees sequences of 6 steps, rank 1 of 200: the horizon is the longest of all.
    torch.manual_seed(0)
    net = Tiny()
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    ctl = CompreSSM(net, opt, total_steps=10, tau=0.05, horizon="auto", reduction_steps=[2])
    for step in range(2):
        train_step(ddp, opt, batch(rank, step, length=[6, 200][rank]))
        ctl.step()
    return {"seen": ctl.seen_length, "horizon": ctl._resolved_horizon(), **summary(net, ctl)}


def certified(rank):
    # The training loss falls by half on rank 0 and stays on rank 1: their mean falls by a
    # quarter, more than learning_drop, so learning has started and the checks begin.
    torch.manual_seed(0)
    net = Tiny()
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    ctl = CompreSSM(
        net,
        opt,
        total_steps=40,
        tau=0.05,
        schedule="certified",
        warmup_fraction=0.5,
        check_every=2,
        certify_window=2,
    )
    for step in range(22):
        train_step(ddp, opt, batch(rank, step))
        loss = 1.0 if rank == 1 or step < 2 else 0.5
        if any(e.status == "reduced" for e in ctl.step(loss=loss)):
            ddp = torch.nn.parallel.DistributedDataParallel(net)
    return {"recent_loss": ctl.certify.recent_loss, **summary(net, ctl)}


def mamba_without_statistics(rank):
    # Only rank 0 runs training forward passes before the reduction: rank 1 has no statistics.
    torch.manual_seed(0)
    layer = Mamba(8, 12)
    a_log = layer.A_log.detach().clone()
    ctl = CompreSSM(layer, None, total_steps=10, mode="fixed", fraction=0.5, reduction_steps=[2])
    for step in range(2):
        if rank == 0:
            layer(data(0, step))
        events = ctl.step()
    return {
        "events": [(e.status, e.old_rank, e.new_rank) for e in events],
        "columns": kept_columns(a_log, layer.A_log.detach()),
    }


SCENARIOS = {
    "pragmatic": pragmatic,
    "auto_horizon": auto_horizon,
    "certified": certified,
    "mamba_without_statistics": mamba_without_statistics,
}


def scenario_worker(rank, name, init_file, out_dir):
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=TIMEOUT,
    )
    try:
        result = SCENARIOS[name](rank)
        with open(f"{out_dir}/rank{rank}.pkl", "wb") as f:
            pickle.dump(result, f)
    finally:
        dist.destroy_process_group()


def run(name, tmp_path):
    mp.spawn(
        scenario_worker,
        args=(name, str(tmp_path / "init"), str(tmp_path)),
        nprocs=WORLD,
        join=True,
    )
    results = []
    for rank in range(WORLD):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as f:
            results.append(pickle.load(f))
    return results


def assert_identical(first, second):
    assert first["sizes"] == second["sizes"]
    assert first["history"] == second["history"]
    assert first["state"].keys() == second["state"].keys()
    for key, value in first["state"].items():
        assert torch.equal(value, second["state"][key]), key


def test_pragmatic_ranks_judge_the_mean_metric(tmp_path):
    first, second = run("pragmatic", tmp_path)
    assert first["reduced"] == second["reduced"] == {"lru": 12, "s5": 12}
    assert_identical(first, second)
    assert first["sizes"] == {"lru": 16, "s5": 16}  # the mean metric fell: rolled back
    assert [e["status"] for e in first["history"]][-2:] == ["rolled_back"] * 2


def test_auto_horizon_is_the_longest_sequence_of_all_ranks(tmp_path):
    first, second = run("auto_horizon", tmp_path)
    assert_identical(first, second)
    # rank 0 saw 6 steps only; both now hold the longest length of all ranks
    assert first["seen"] == second["seen"] == first["horizon"] == second["horizon"] == 200
    assert first["sizes"]["lru"] < 16


def test_certified_schedule_uses_the_mean_loss(tmp_path):
    first, second = run("certified", tmp_path)
    assert_identical(first, second)
    assert first["recent_loss"] == second["recent_loss"] == 0.75
    cuts = [e for e in first["history"] if e["status"] == "reduced"]
    assert cuts
    assert cuts[0]["trigger"] in ("certified", "stable")  # before the deadline at step 20
    assert cuts[0]["loss"] == 0.75


def test_mamba_rank_without_statistics_joins_the_collectives(tmp_path):
    first, second = run("mamba_without_statistics", tmp_path)
    assert first["events"] == second["events"] == [("reduced", 12, 6)]
    assert first["columns"] == second["columns"]
    # the same decision as one process that saw rank 0's batches only
    torch.manual_seed(0)
    layer = Mamba(8, 12)
    a_log = layer.A_log.detach().clone()
    with SelectiveRecorder(layer) as recorder:
        for step in range(2):
            layer(data(0, step))
    reduce_selective_layer(layer, recorder.statistics[""], rank=6)
    assert kept_columns(a_log, layer.A_log.detach()) == first["columns"]
