"""CompreSSM on a transformers ``MambaForCausalLM`` learning to copy: when does it cut?

A tiny Mamba language model (transformers' pure-torch path) learns to repeat a random string:
each sequence is ``LENGTH`` tokens drawn from ``SYMBOLS`` symbols, a separator, and the same
tokens again; the loss and the metric (copy accuracy: the share of the repeated tokens predicted
exactly) cover the repeated half only, so chance is ``1 / SYMBOLS`` and a loss of
``ln(SYMBOLS)``. Arms, same seeds and steps, paired:

``full``
    the model at its initial state size;
``compressm``
    the torch controller with its defaults (fixed steps, ``tau = 0.1``);
``compressm_certified``
    the same with ``schedule="certified"`` (the training loss passed to ``step``);
``compressm_late``
    the fixed steps spread over the first half of training (``warmup_fraction = 0.5``);
``compressm_chance``
    the certified schedule measuring learning against the chance-level loss
    (``chance_loss = ln(SYMBOLS)``), with its deadline at half of training
    (``warmup_fraction = 0.5``) so that it can wait for the end of the plateau;
``small``, ``small_certified``, ``small_late``, ``small_chance``
    trained from scratch at the per-layer sizes the matching CompreSSM seed reached.

Every CompreSSM run records the training loss at each cut, so the table says whether the cuts
came before the model had learned anything. Data are generated from the seed; nothing is
downloaded. Writes ``results/hf_copy.{json,md}``.

    python benchmarks/hf_copy.py [--seeds 0 1 2 3 4] [--steps 1500] [--workers 2]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import mean_std, write_results

RESULTS = Path(__file__).resolve().parent / "results"
SYMBOLS = 8
LENGTH = 16
SEPARATOR = SYMBOLS
VOCAB = SYMBOLS + 2
VARIANTS: dict[str, dict[str, Any]] = {
    "compressm": {},
    "compressm_certified": {"schedule": "certified"},
    "compressm_late": {"warmup_fraction": 0.5},
    "compressm_chance": {
        "schedule": "certified",
        "warmup_fraction": 0.5,
        "chance_loss": math.log(SYMBOLS),
    },
}
SMALL = {
    "compressm": "small",
    "compressm_certified": "small_certified",
    "compressm_late": "small_late",
    "compressm_chance": "small_chance",
}
ARMS = ("full", *VARIANTS, *SMALL.values())


def _batch(generator: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, labels)``: ``x, SEPARATOR, x`` with labels on the repeated half only."""
    x = torch.randint(0, SYMBOLS, (size, LENGTH), generator=generator)
    sep = torch.full((size, 1), SEPARATOR)
    ids = torch.cat([x, sep, x], dim=1)
    labels = ids.clone()
    labels[:, : LENGTH + 1] = -100
    return ids, labels


def _model(state_sizes: list[int], seed: int, d_model: int, layers: int) -> nn.Module:
    """A ``MambaForCausalLM`` whose layer ``i`` has ``state_sizes[i]`` states (each mixer
    initialised by transformers at its size)."""
    from transformers import MambaConfig, MambaForCausalLM

    def build(size: int) -> Any:
        torch.manual_seed(seed)
        config = MambaConfig(
            vocab_size=VOCAB,
            hidden_size=d_model,
            state_size=size,
            num_hidden_layers=layers,
            expand=2,
            conv_kernel=4,
            use_mambapy=False,
        )
        return MambaForCausalLM(config)

    model = build(state_sizes[0])
    for i, size in enumerate(state_sizes):
        if size != state_sizes[0]:
            model.backbone.layers[i].mixer = build(size).backbone.layers[i].mixer
    return model


@torch.no_grad()
def _copy_accuracy(model: nn.Module, seed: int) -> float:
    model.eval()
    ids, labels = _batch(torch.Generator().manual_seed(10_000 + seed), 1000)
    logits = model(ids).logits[:, :-1]
    target = labels[:, 1:]
    mask = target != -100
    model.train()
    return float((logits.argmax(-1)[mask] == target[mask]).float().mean())


def _run(job: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    from compressm_torch import CompreSSM, state_sizes

    arm, seed, steps = job["arm"], job["seed"], job["steps"]
    n_layers, d_state = job["layers"], job["d_state"]
    sizes = job.get("sizes") or [d_state] * n_layers
    model = _model(sizes, seed, job["d_model"], n_layers)
    opt = torch.optim.AdamW(model.parameters(), lr=job["lr"], weight_decay=0.01)
    ctl = None
    if arm in VARIANTS:
        ctl = CompreSSM(model, opt, total_steps=steps, tau=job["tau"], **VARIANTS[arm])
    data = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start = time.perf_counter()
    for _ in range(steps):
        ids, labels = _batch(data, job["batch_size"])
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if ctl is not None:
            ctl.step(loss=loss.detach())
    seconds = time.perf_counter() - start
    events = [] if ctl is None else [e for e in ctl.history if e.status == "reduced"]
    return {
        "arm": arm,
        "seed": seed,
        "test": _copy_accuracy(model, seed),
        "sizes": list(state_sizes(model).values()),
        "seconds": seconds,
        "final_loss": statistics.fmean(losses[-50:]),
        "cuts": [
            {
                "step": e.step,
                "layer": e.layer,
                "old": e.old_rank,
                "new": e.new_rank,
                "trigger": e.trigger,
                "loss": e.loss,
            }
            for e in events
        ],
    }


def _pool(jobs: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    if workers == 1:
        return [_run(job) for job in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_run, jobs))


def _markdown(report: dict[str, Any]) -> str:
    arms = report["arms"]
    lines = [
        "# CompreSSM on a transformers Mamba copy task",
        "",
        f"{report['machine']}; torch {report['torch']}, transformers {report['transformers']}; "
        f"{report['layers']} layers, d_model {report['d_model']}, {report['d_state']} states, "
        f"{report['steps']} steps, tau {report['tau']}; seeds {report['seeds']}; chance "
        f"{1 / SYMBOLS:.3f}, chance loss ln {SYMBOLS} = {math.log(SYMBOLS):.2f}.",
        "",
        "| arm | copy accuracy | final sizes (mean per layer) | seconds |",
        "|---|---|---|---|",
    ]
    for arm, runs in arms.items():
        mean_size = statistics.fmean(statistics.fmean(s) for s in runs["sizes"])
        lines.append(
            f"| {arm} | {mean_std(runs['test'], '.3f', '.3f')} | {mean_size:.1f} | "
            f"{statistics.fmean(runs['seconds']):.0f} |"
        )
    lines.append("")
    for reduced, small in SMALL.items():
        if reduced in arms and small in arms:
            diffs = [
                a - b for a, b in zip(arms[reduced]["test"], arms[small]["test"], strict=True)
            ]
            per_seed = ", ".join(f"{d:+.3f}" for d in diffs)
            better = sum(d > 0 for d in diffs)
            lines.append(
                f"- {reduced} − {small}, per seed: {per_seed}; mean "
                f"{statistics.fmean(diffs):+.3f}; better on {better} of {len(diffs)} seeds."
            )
    for reduced in VARIANTS:
        if reduced in arms:
            cuts = [c for seed_cuts in arms[reduced]["cuts"] for c in seed_cuts]
            if cuts:
                steps = sorted({c["step"] for c in cuts})
                losses = [c["loss"] for c in cuts if c["loss"] is not None]
                triggers = sorted({str(c["trigger"]) for c in cuts})
                loss_text = (
                    f"training loss at the cuts {min(losses):.2f}-{max(losses):.2f}"
                    if losses
                    else "no loss recorded"
                )
                lines.append(
                    f"- {reduced}: cuts at steps {steps[0]}-{steps[-1]} ({', '.join(triggers)}); "
                    f"{loss_text}."
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--d-model", type=int, default=32)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", type=Path, default=RESULTS / "hf_copy")
    args = parser.parse_args()
    import transformers

    common = {
        "steps": args.steps,
        "d_model": args.d_model,
        "d_state": args.d_state,
        "layers": args.layers,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "tau": args.tau,
    }
    begin = time.perf_counter()
    first = [a for a in args.arms if not a.startswith("small")]
    runs = _pool(
        [{**common, "arm": a, "seed": s} for a in first for s in args.seeds], args.workers
    )
    reached = {(r["arm"], r["seed"]): r["sizes"] for r in runs}
    second = []
    for source, small in SMALL.items():
        if small in args.arms and source in first:
            for s in args.seeds:
                second.append({**common, "arm": small, "seed": s, "sizes": reached[(source, s)]})
    runs += _pool(second, args.workers)
    arms: dict[str, dict[str, list[Any]]] = {}
    for arm in args.arms:
        mine = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
        arms[arm] = {
            field: [r[field] for r in mine]
            for field in ("test", "sizes", "seconds", "final_loss", "cuts")
        }
    report = {
        "machine": platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "seeds": args.seeds,
        **common,
        "metric": "copy accuracy",
        "higher_is_better": True,
        "elapsed_s": time.perf_counter() - begin,
        "arms": arms,
    }
    write_results(args.out, report, _markdown(report))
    print(_markdown(report))


if __name__ == "__main__":
    main()
