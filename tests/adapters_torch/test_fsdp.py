"""FSDP2 (``fully_shard``, gloo, two CPU processes): reductions of sharded models.

One pair of processes runs every scenario (spawning costs seconds); the tests check what they
returned against each other and against the same reduction of an unsharded copy of the model.
"""

from __future__ import annotations

import contextlib
import pickle
from dataclasses import asdict
from datetime import timedelta

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
mp = pytest.importorskip("torch.multiprocessing")

if not dist.is_available():
    pytest.skip("torch.distributed missing", allow_module_level=True)
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip(
        "torch.distributed.fsdp.fully_shard missing (torch < 2.6)", allow_module_level=True
    )

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor, Shard  # noqa: E402

from compressm_torch import CompreSSM, SequenceModel, state_sizes  # noqa: E402
from tests.adapters_torch._tiny import Tiny  # noqa: E402

WORLD = 2
TIMEOUT = timedelta(seconds=60)
LR = 1e-2


def options(selection):
    return {
        "total_steps": 10,
        "mode": "fixed",
        "fraction": 0.25,
        "selection": selection,
        "reduction_steps": [3],
    }


def batch(rank, step, features=4):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(4, 12, features, generator=g)


def train(net, opt, x):
    loss = net(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def full(net, opt):
    """Full parameters and optimizer state by parameter name (collectives, on every rank)."""
    params = {n: p.full_tensor() for n, p in net.named_parameters()}
    state = {
        n: {
            k: v.full_tensor() if isinstance(v, DTensor) else v.clone()
            for k, v in sorted(opt.state[p].items())
        }
        for n, p in net.named_parameters()
        if p in opt.state
    }
    return {"params": params, "state": state}


def layout_errors(net, opt, rank):
    """Parameters and moments that are not this rank's Shard(0) slice of the full tensor."""
    errors = []
    for name, p in net.named_parameters():
        tensors = {"param": p, **{k: v for k, v in opt.state[p].items() if v.ndim}}
        for key, value in tensors.items():
            whole = value.full_tensor()
            chunks = torch.chunk(whole, WORLD)  # fewer than WORLD for short tensors
            expected = chunks[rank] if rank < len(chunks) else whole[:0]
            if (
                not isinstance(value, DTensor)
                or value.placements != (Shard(0),)
                or not torch.equal(value.to_local(), expected)
            ):
                errors.append((name, key))
    return errors


def history(ctl):
    return [{k: v for k, v in asdict(e).items() if k != "seconds"} for e in ctl.history]


def shard(net, mesh, blocks, **keywords):
    for block in blocks:
        fsdp.fully_shard(block, mesh=mesh, **keywords)
    fsdp.fully_shard(net, mesh=mesh)


def lti(rank, mesh, selection):
    # A reduction at step 3 of AdamW training, then three more steps (one after a reload).
    torch.manual_seed(0)
    net = Tiny()
    shard(net, mesh, [net.lru, net.s5])
    opt = torch.optim.AdamW(net.parameters(), lr=LR)
    ctl = CompreSSM(net, opt, **options(selection))
    objects = [id(p) for p in net.parameters()]
    for step in range(3):
        train(net, opt, batch(rank, step))
        if step == 2:
            before = full(net, opt)
        events = ctl.step()
    after = full(net, opt)
    layout = layout_errors(net, opt, rank)
    losses = []
    for step in range(3, 5):
        losses.append(train(net, opt, batch(rank, step)))
        ctl.step()
    final = full(net, opt)
    # FSDP2's load_state_dict hooks follow the new parameters
    net.load_state_dict(net.state_dict())
    reloaded = full(net, opt)
    losses.append(train(net, opt, batch(rank, 5)))
    return {
        "events": [(e.status, e.old_rank, e.new_rank) for e in events],
        "before": before,
        "after": after,
        "final": final,
        "reloaded": reloaded,
        "layout": layout,
        "same_objects": objects == [id(p) for p in net.parameters()],
        "losses": losses,
        "sizes": state_sizes(net),
        "history": history(ctl),
    }


def mamba(rank, mesh):
    # A selective layer: index selection of the states, statistics of both ranks. Its block
    # keeps its parameters unsharded after forward: an evaluation pass before the event leaves
    # them so, and the event reshards them first.
    torch.manual_seed(1)
    net = SequenceModel(8, 3, d_model=8, d_state=16, n_layers=1, layer="mamba")
    shard(net, mesh, [net.blocks[0]], reshard_after_forward=False)
    opt = torch.optim.AdamW(net.parameters(), lr=LR)
    ctl = CompreSSM(net, opt, total_steps=20, mode="fixed", fraction=0.5, reduction_steps=[3])
    for step in range(3):
        train(net, opt, batch(rank, step, features=8))
        if step == 2:
            before = full(net, opt)
            net.eval()
            with torch.no_grad():
                net(batch(rank, 100, features=8))
            net.train()
        events = ctl.step()
    after = full(net, opt)
    layout = layout_errors(net, opt, rank)
    loss = train(net, opt, batch(rank, 3, features=8))
    return {
        "events": [(e.status, e.old_rank, e.new_rank) for e in events],
        "before": before,
        "after": after,
        "layout": layout,
        "loss": loss,
        "final": full(net, opt),
    }


def certified(rank, mesh):
    # The certified schedule reads the layers at its checks too (outside events).
    torch.manual_seed(0)
    net = Tiny()
    shard(net, mesh, [net.lru, net.s5])
    opt = torch.optim.AdamW(net.parameters(), lr=LR)
    ctl = CompreSSM(
        net,
        opt,
        total_steps=10,
        tau=0.05,
        schedule="certified",
        warmup_fraction=0.5,
        check_every=1,
        certify_window=1,
    )
    for step in range(6):
        train(net, opt, batch(rank, step))
        ctl.step(loss=1.0 if step == 0 else 0.5)
    return {
        "history": history(ctl),
        "final": full(net, opt),
        "layout": layout_errors(net, opt, rank),
    }


class Boom(RuntimeError):
    pass


def failures(rank, mesh):
    # An event that raises after the re-sharding, and one that raises before it: the model and
    # the optimizer are as they were; training and a later reduction still work.
    torch.manual_seed(0)
    net = Tiny()
    shard(net, mesh, [net.lru, net.s5])
    opt = torch.optim.AdamW(net.parameters(), lr=LR)
    ctl = CompreSSM(net, opt, **options("random"))
    for step in range(2):
        train(net, opt, batch(rank, step))
    snapshot = full(net, opt)
    locals_before = {n: p.to_local().clone() for n, p in net.named_parameters()}

    def failing(method):
        original = getattr(ctl, method)

        def run(*args):
            original(*args)
            raise Boom(method)

        return run

    restored = []
    for method in ("_end_event", "_resize_optimizer"):
        setattr(ctl, method, failing(method))
        with contextlib.suppress(Boom):
            ctl.reduce()
        delattr(ctl, method)
        state = full(net, opt)
        restored.append(
            {
                "sizes": state_sizes(net),
                "state": state,
                "locals": all(
                    torch.equal(p.to_local(), locals_before[n]) for n, p in net.named_parameters()
                ),
                "history": len(ctl.history),
            }
        )
    loss = train(net, opt, batch(rank, 2))
    events = ctl.reduce()
    layout = layout_errors(net, opt, rank)
    loss_after = train(net, opt, batch(rank, 3))
    refused = None
    try:
        CompreSSM(net, opt, total_steps=10, mode="pragmatic", reduction_steps=[2])
    except NotImplementedError as err:
        refused = str(err)
    return {
        "snapshot": snapshot,
        "restored": restored,
        "losses": [loss, loss_after],
        "events": [(e.status, e.old_rank, e.new_rank) for e in events],
        "layout": layout,
        "refused": refused,
    }


def worker(rank, init_file, out_dir):
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=TIMEOUT
    )
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        result = {
            "largest": lti(rank, mesh, "largest"),
            "random": lti(rank, mesh, "random"),
            "mamba": mamba(rank, mesh),
            "certified": certified(rank, mesh),
            "failures": failures(rank, mesh),
        }
        with open(f"{out_dir}/rank{rank}.pkl", "wb") as f:
            pickle.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    mp.spawn(worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    results = []
    for rank in range(WORLD):
        with open(tmp / f"rank{rank}.pkl", "rb") as f:
            results.append(pickle.load(f))
    return results


def assert_same(first, second, exact=True):
    """Nested dicts of tensors: the same keys, and equal tensors (bitwise if ``exact``)."""
    assert first.keys() == second.keys()
    for key, value in first.items():
        if isinstance(value, dict):
            assert_same(value, second[key], exact)
        elif exact:
            assert torch.equal(value, second[key]), key
        else:
            torch.testing.assert_close(value, second[key], rtol=1e-5, atol=1e-6, msg=key)


def reference(before, selection):
    """The same reduction of an unsharded model holding the same full parameters and state."""
    net = Tiny()
    net.load_state_dict(before["params"])
    opt = torch.optim.AdamW(net.parameters(), lr=LR)
    named = dict(net.named_parameters())
    for name, state in before["state"].items():
        opt.state[named[name]] = {k: v.clone() for k, v in state.items()}
    CompreSSM(net, opt, **options(selection)).reduce()
    params = {n: p.detach() for n, p in net.named_parameters()}
    state = {n: dict(opt.state[p]) for n, p in net.named_parameters() if p in opt.state}
    return {"params": params, "state": state}


@pytest.mark.parametrize("selection", ["largest", "random"])
def test_sharded_reduction_matches_the_unsharded_one(ranks, selection):
    first, second = (r[selection] for r in ranks)
    assert first["events"] == [("reduced", 16, 12)] * 2
    assert first["sizes"] == {"lru": 12, "s5": 12}
    # every rank holds the same full model, optimizer and history, before and after training on
    for key in ("before", "after", "final"):
        assert_same(first[key], second[key])
    assert first["history"] == second["history"]
    # parameters and moments are re-sharded (Shard(0) slices), in the same Parameter objects
    assert first["layout"] == second["layout"] == []
    assert first["same_objects"]
    assert second["same_objects"]
    # the reduced full parameters and optimizer state are those of the unsharded reduction
    assert_same(first["after"], reference(first["before"], selection), exact=False)
    assert_same(first["reloaded"], first["final"])
    # training went on with the reduced parameters
    assert all(map(torch.isfinite, map(torch.tensor, first["losses"])))
    assert not torch.equal(
        first["final"]["params"]["lru.B_re"], first["after"]["params"]["lru.B_re"]
    )


def test_moments_follow_the_kind_of_reduction(ranks):
    largest, random = ranks[0]["largest"], ranks[0]["random"]
    # a change of basis (balanced truncation): the moments of the state tensors restart
    moments = largest["after"]["state"]["lru.B_re"]
    assert moments["exp_avg"].shape == (12, 4)
    assert torch.count_nonzero(moments["exp_avg"]) == 0
    assert float(moments["step"]) == 0.0
    # an index selection: the moments at the kept states are the old ones
    before, after = random["before"], random["after"]
    nu_before, nu_after = before["params"]["lru.nu_log"], after["params"]["lru.nu_log"]
    kept = [int(torch.nonzero(nu_before == v)[0]) for v in nu_after]
    assert len(set(kept)) == 12
    for name in ("lru.nu_log", "lru.B_re"):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                after["state"][name][key], before["state"][name][key][kept], rtol=0, atol=0
            )
    # tensors without a state axis keep their moments
    assert_same(after["state"]["head.weight"], before["state"]["head.weight"])


def test_sharded_mamba_keeps_moments_at_the_kept_states(ranks):
    first, second = (r["mamba"] for r in ranks)
    assert first["events"] == second["events"] == [("reduced", 16, 8)]
    assert_same(first["after"], second["after"])
    assert_same(first["final"], second["final"])
    assert first["layout"] == second["layout"] == []
    assert torch.isfinite(torch.tensor(first["loss"]))
    (name,) = [n for n in first["after"]["params"] if n.endswith("A_log")]
    a_before, a_after = first["before"]["params"][name], first["after"]["params"][name]
    kept = [j for i in range(8) for j in range(16) if torch.equal(a_after[:, i], a_before[:, j])]
    assert len(kept) == 8
    for key in ("exp_avg", "exp_avg_sq"):
        moment = first["before"]["state"][name][key][:, kept]
        assert torch.equal(first["after"]["state"][name][key], moment)


def test_certified_checks_read_the_full_layers(ranks):
    first, second = (r["certified"] for r in ranks)
    assert first["history"] == second["history"]
    assert_same(first["final"], second["final"])
    assert first["layout"] == second["layout"] == []
    cuts = [e for e in first["history"] if e["status"] == "reduced"]
    assert {e["layer"] for e in cuts} == {"lru", "s5"}
    assert all(e["new_rank"] < e["old_rank"] for e in cuts)


def test_a_failed_event_leaves_the_sharded_model_as_it_was(ranks):
    first, second = (r["failures"] for r in ranks)
    for result in (first, second):
        for restored in result["restored"]:  # a failure after, then before, the re-sharding
            assert restored["sizes"] == {"lru": 16, "s5": 16}
            assert restored["locals"]
            assert restored["history"] == 0
            assert_same(restored["state"], result["snapshot"])
    # training goes on, and a later event reduces and re-shards as usual
    assert first["events"] == second["events"] == [("reduced", 16, 12)] * 2
    assert first["layout"] == second["layout"] == []
    assert all(map(torch.isfinite, map(torch.tensor, first["losses"])))
    assert "mode='pragmatic'" in first["refused"]
    assert "fully_shard" in first["refused"]
