"""Gramian vs random state selection in a trained Mamba classifier, on MNIST-1D, no fine-tuning.

Question: on a small trained Mamba model, does keeping the state indices with the largest
selective-Gramian scores (``importance="gramian"``) give a lower held-out loss than keeping
random ones? The mean-LTI surrogate scores (``importance="mean_lti"``) are reported alongside.

Protocol, per training seed: train a small Mamba classifier (linear encoder, blocks of
pre-LayerNorm -> :class:`compressm_torch.Mamba` -> residual, final LayerNorm, mean pool over
time, linear decoder) on the MNIST-1D training split with AdamW (cosine schedule, 5 % warm-up,
no weight decay on ``A_log`` and ``D``); record the selective statistics of every Mamba layer
with :class:`compressm_torch.SelectiveRecorder` on a few training batches (eval mode,
``training_only=False``, no gradient); then, for every target rank, reduce every Mamba layer of a
``copy.deepcopy`` of the trained model with :func:`compressm_torch.reduce_selective_layer`
(``"gramian"``, ``"mean_lti"``, and ``"random"`` with several seeds) from those statistics,
without fine-tuning, and measure cross-entropy and accuracy on the test split (1000 sequences).
All layers of one model are reduced from the statistics of the full model. Writes
``results/mamba_selection.{json,md}``.

MNIST-1D comes from :func:`compressm_cli.data.load_task` (regenerated locally by the ``mnist1d``
package with its published arguments, no download; 3600 train / 400 validation / 1000 test
sequences of length 40).

The Gramian selection is also repeated from statistics of only the first ``k`` sequences of
each calibration batch (``--subsample``, default 8 and 1 of 64; the recorder's
``max_sequences``), to show what cheaper statistics cost in selection quality.

Run: ``OMP_NUM_THREADS=1 python benchmarks/mamba_selection.py [--steps 500] [--seeds 0 1 2]
[--d-state 16] [--n-layers 1] [--ranks 8 4 2] [--random-draws 5] [--subsample 8 1]
[--quick]``. The committed
results used ``OMP_NUM_THREADS=1`` and one torch thread (the thread count changes the order of
floating-point sums, hence the trajectories; it is recorded). ``--quick`` (tiny settings, no
files) is a smoke test of about half a minute.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import compressm_core
from _cpu import cpu_model, cpu_sample, others_share
from compressm_cli.data import Task, load_task
from compressm_torch import Mamba, SelectiveRecorder, reduce_selective_layer, selective_importance

RESULTS = Path(__file__).parent / "results"
METHODS = ("gramian", "mean_lti", "random")


class MambaClassifier(nn.Module):
    """Linear encoder, ``n_layers`` x (LayerNorm -> Mamba -> residual), LayerNorm, mean pool,
    linear decoder."""

    def __init__(self, d_input: int, d_output: int, d_model: int, d_state: int, n_layers: int):
        super().__init__()
        self.encoder = nn.Linear(d_input, d_model)
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_layers))
        self.layers = nn.ModuleList(Mamba(d_model, d_state, layer_idx=i) for i in range(n_layers))
        self.final_norm = nn.LayerNorm(d_model)
        self.decoder = nn.Linear(d_model, d_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        for norm, layer in zip(self.norms, self.layers, strict=True):
            h = h + layer(norm(h))
        out: torch.Tensor = self.decoder(self.final_norm(h).mean(dim=1))
        return out


def mamba_layers(model: nn.Module) -> dict[str, Mamba]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Mamba)}


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 250
) -> dict[str, Any]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)`` (eval mode, no gradient)."""
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            logits = model(x[i : i + chunk])
            loss_sum += float(F.cross_entropy(logits, y[i : i + chunk], reduction="sum"))
            correct += int((logits.argmax(-1) == y[i : i + chunk]).sum())
    return {"loss": loss_sum / len(x), "accuracy": correct / len(x)}


def train(
    task: Task, args: argparse.Namespace, seed: int
) -> tuple[MambaClassifier, dict[str, Any]]:
    torch.manual_seed(seed)
    x = torch.from_numpy(task.x_train)
    y = torch.from_numpy(task.y_train)
    model = MambaClassifier(task.d_input, task.d_output, args.d_model, args.d_state, args.n_layers)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        (no_decay if getattr(p, "_no_weight_decay", False) else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
    )
    steps = args.steps
    warm = max(1, int(0.05 * steps))

    def schedule(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    g = torch.Generator().manual_seed(seed)
    model.train()
    before = cpu_sample()
    start = time.perf_counter()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(x), (args.batch,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        sched.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    tail = losses[-max(1, steps // 20) :]
    info = {
        "seconds": seconds,
        "others_cpu": others_share(before, cpu_sample()),
        "final_train_loss": statistics.mean(tail),
    }
    return model, info


def record(
    model: nn.Module,
    task: Task,
    batches: int,
    batch: int,
    seed: int,
    max_sequences: int | None = None,
) -> tuple[dict[str, Any], int]:
    """Selective statistics of every Mamba layer on ``batches`` random training batches (the
    same batches for a seed; only the first ``max_sequences`` of each when it is set)."""
    x = torch.from_numpy(task.x_train)
    g = torch.Generator().manual_seed(10_000 + seed)
    model.eval()
    recorder = SelectiveRecorder(model, training_only=False, max_sequences=max_sequences)
    with recorder, torch.no_grad():
        for _ in range(batches):
            model(x[torch.randint(len(x), (batch,), generator=g)])
    samples = min(recorder.samples(name) for name in recorder.layers)
    return recorder.statistics, samples


def reduce_copy(
    model: nn.Module, stats: dict[str, Any], rank: int, importance: str, seed: int
) -> tuple[nn.Module, dict[str, list[int]]]:
    reduced = copy.deepcopy(model)
    kept = {}
    for i, (name, layer) in enumerate(mamba_layers(reduced).items()):
        report = reduce_selective_layer(
            layer,
            stats[name],
            rank,
            importance=importance,  # type: ignore[arg-type]
            seed=seed * 1000 + i,  # distinct random draws per layer; ignored unless random
        )
        kept[name] = sorted(int(k) for k in torch.as_tensor(report.indices).reshape(-1))
    return reduced, kept


def run_seed(task: Task, args: argparse.Namespace, seed: int, ranks: list[int]) -> dict[str, Any]:
    xt = torch.from_numpy(task.x_test)
    yt = torch.from_numpy(task.y_test)
    model, info = train(task, args, seed)
    full = evaluate(model, xt, yt)
    stats, samples = record(model, task, args.calibration_batches, args.batch, seed)
    subsets = {
        k: record(model, task, args.calibration_batches, args.batch, seed, max_sequences=k)[0]
        for k in args.subsample
    }
    scores = {
        name: {
            m: [float(s) for s in selective_importance(layer, stats[name], importance=m)]
            for m in ("gramian", "mean_lti")
        }
        for name, layer in mamba_layers(model).items()
    }
    print(
        f"seed {seed}: trained {info['seconds']:.1f}s, full test loss {full['loss']:.4f} "
        f"acc {full['accuracy']:.4f}",
        flush=True,
    )
    start = time.perf_counter()
    per_rank = []
    for rank in ranks:
        entry: dict[str, Any] = {"rank": rank}
        for method in ("gramian", "mean_lti"):
            reduced, kept = reduce_copy(model, stats, rank, method, 0)
            entry[method] = {**evaluate(reduced, xt, yt), "kept": kept}
        subsampled = {}
        for k, sub in subsets.items():
            reduced, kept = reduce_copy(model, sub, rank, "gramian", 0)
            same = sum(len(set(kept[name]) & set(entry["gramian"]["kept"][name])) for name in kept)
            total = sum(len(v) for v in kept.values())
            subsampled[str(k)] = {
                **evaluate(reduced, xt, yt),
                "kept": kept,
                "overlap": same / total,
            }
        entry["gramian_subsampled"] = subsampled
        draws = []
        for draw in range(args.random_draws):
            reduced, kept = reduce_copy(model, stats, rank, "random", draw)
            draws.append({**evaluate(reduced, xt, yt), "seed": draw, "kept": kept})
        rl = [d["loss"] for d in draws]
        ra = [d["accuracy"] for d in draws]
        entry["random"] = {
            "draws": draws,
            "loss_mean": statistics.mean(rl),
            "loss_min": min(rl),
            "loss_max": max(rl),
            "accuracy_mean": statistics.mean(ra),
            "accuracy_min": min(ra),
            "accuracy_max": max(ra),
        }
        gl = entry["gramian"]["loss"]
        entry["gramian_below_random_mean"] = gl < entry["random"]["loss_mean"]
        entry["gramian_beats_draws"] = sum(gl < v for v in rl)
        entry["mean_lti_below_random_mean"] = (
            entry["mean_lti"]["loss"] < entry["random"]["loss_mean"]
        )
        per_rank.append(entry)
        print(
            f"  r={rank:>3}  gramian {gl:.4f}/{entry['gramian']['accuracy']:.3f}  "
            f"mean_lti {entry['mean_lti']['loss']:.4f}/{entry['mean_lti']['accuracy']:.3f}  "
            f"random {entry['random']['loss_mean']:.4f} [{min(rl):.4f}, {max(rl):.4f}]"
            f"/{entry['random']['accuracy_mean']:.3f}  "
            f"gramian beats {entry['gramian_beats_draws']}/{len(rl)} draws",
            flush=True,
        )
    return {
        "seed": seed,
        "train": info,
        "full": full,
        "calibration_samples": samples,
        "scores": scores,
        "ranks": per_rank,
        "reduce_eval_seconds": time.perf_counter() - start,
    }


def summarize(runs: list[dict[str, Any]], ranks: list[int]) -> list[dict[str, Any]]:
    rows = []
    for i, rank in enumerate(ranks):
        entries = [r["ranks"][i] for r in runs]

        def mean(key: str, sub: str, entries: list[dict[str, Any]] = entries) -> float:
            return statistics.mean(float(e[key][sub]) for e in entries)

        rows.append(
            {
                "rank": rank,
                "full_loss": statistics.mean(r["full"]["loss"] for r in runs),
                "full_accuracy": statistics.mean(r["full"]["accuracy"] for r in runs),
                "gramian_loss": mean("gramian", "loss"),
                "gramian_accuracy": mean("gramian", "accuracy"),
                "mean_lti_loss": mean("mean_lti", "loss"),
                "mean_lti_accuracy": mean("mean_lti", "accuracy"),
                "random_loss": mean("random", "loss_mean"),
                "random_accuracy": mean("random", "accuracy_mean"),
                "seeds_gramian_below_random_mean": sum(
                    e["gramian_below_random_mean"] for e in entries
                ),
                "seeds_mean_lti_below_random_mean": sum(
                    e["mean_lti_below_random_mean"] for e in entries
                ),
                "draws_beaten_by_gramian": sum(e["gramian_beats_draws"] for e in entries),
                "subsampled": {
                    k: {
                        "loss": statistics.mean(
                            e["gramian_subsampled"][k]["loss"] for e in entries
                        ),
                        "accuracy": statistics.mean(
                            e["gramian_subsampled"][k]["accuracy"] for e in entries
                        ),
                        "overlap": statistics.mean(
                            e["gramian_subsampled"][k]["overlap"] for e in entries
                        ),
                        "same_indices": sum(
                            e["gramian_subsampled"][k]["overlap"] == 1.0 for e in entries
                        ),
                    }
                    for k in entries[0]["gramian_subsampled"]
                },
                "draws": sum(len(e["random"]["draws"]) for e in entries),
                "seeds": len(entries),
            }
        )
    return rows


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    n = cfg["d_state"]
    lines = [
        "# Mamba state selection: Gramian vs random, no fine-tuning (MNIST-1D)",
        "",
        f"Machine: {report['cpu']}, {report['torch_threads']} torch thread(s); Python "
        f"{report['python']}, torch {report['torch']}, NumPy {report['numpy']}, "
        f"compressm {report['compressm']}. Total runtime {report['total_seconds']:.0f} s.",
        "",
        f"Model: encoder Linear(1, {cfg['d_model']}), {cfg['n_layers']} x (LayerNorm -> "
        f"Mamba(d_model={cfg['d_model']}, d_state={n}, expand 2, d_conv 4) -> residual), "
        f"LayerNorm, mean pool, Linear({cfg['d_model']}, 10). AdamW lr {cfg['lr']} (cosine, 5 % "
        f"warm-up), batch {cfg['batch']}, {cfg['steps']} steps, training seeds {cfg['seeds']}. "
        f"Statistics: {cfg['calibration_batches']} training batches of {cfg['batch']} "
        "(eval mode). Every Mamba layer reduced to rank r from those statistics, no fine-tuning; "
        f"random: {cfg['random_draws']} draws per rank. Test split: 1000 sequences.",
        "",
        "### Mean over training seeds (test cross-entropy / accuracy)",
        "",
        "| r | full | gramian | mean_lti | random (mean of draws) | seeds with gramian < "
        "random mean | random draws with higher loss than gramian |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["summary"]:
        lines.append(
            f"| {row['rank']} / {n} | {row['full_loss']:.4f} / "
            f"{100 * row['full_accuracy']:.1f} % | {row['gramian_loss']:.4f} / "
            f"{100 * row['gramian_accuracy']:.1f} % | {row['mean_lti_loss']:.4f} / "
            f"{100 * row['mean_lti_accuracy']:.1f} % | {row['random_loss']:.4f} / "
            f"{100 * row['random_accuracy']:.1f} % | "
            f"{row['seeds_gramian_below_random_mean']} / {row['seeds']} | "
            f"{row['draws_beaten_by_gramian']} / {row['draws']} |"
        )
    lines += [
        "",
        "### Per training seed (test cross-entropy / accuracy; random: mean [min, max])",
        "",
        "| seed | r | gramian | mean_lti | random loss | random accuracy | gramian < random "
        "mean | draws beaten |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        full = run["full"]
        lines.append(
            f"| {run['seed']} | {n} (full) | {full['loss']:.4f} / "
            f"{100 * full['accuracy']:.1f} % | | | | | |"
        )
        for e in run["ranks"]:
            rnd = e["random"]
            lines.append(
                f"| {run['seed']} | {e['rank']} | {e['gramian']['loss']:.4f} / "
                f"{100 * e['gramian']['accuracy']:.1f} % | {e['mean_lti']['loss']:.4f} / "
                f"{100 * e['mean_lti']['accuracy']:.1f} % | {rnd['loss_mean']:.4f} "
                f"[{rnd['loss_min']:.4f}, {rnd['loss_max']:.4f}] | "
                f"{100 * rnd['accuracy_mean']:.1f} % [{100 * rnd['accuracy_min']:.1f}, "
                f"{100 * rnd['accuracy_max']:.1f}] | "
                f"{'yes' if e['gramian_below_random_mean'] else 'no'} | "
                f"{e['gramian_beats_draws']} / {len(rnd['draws'])} |"
            )
    if cfg.get("subsample"):
        lines += [
            "",
            "### Gramian scores from a subset of each calibration batch (the recorder's "
            "`max_sequences`, the controller's `calibration_sequences`)",
            "",
            "The same calibration batches, recording only the first k of each batch's "
            f"{cfg['batch']} sequences: the recording cost falls by a factor of "
            f"{cfg['batch']} / k. Mean over training seeds; overlap = share of the kept indices "
            "that the full statistics also keep.",
            "",
            "| r | k of batch | gramian (all sequences) | gramian (k per batch) | overlap | "
            "seeds with identical kept indices |",
            "|---|---|---|---|---|---|",
        ]
        for row in report["summary"]:
            for k, sub in row["subsampled"].items():
                lines.append(
                    f"| {row['rank']} / {n} | {k} of {cfg['batch']} | "
                    f"{row['gramian_loss']:.4f} / {100 * row['gramian_accuracy']:.1f} % | "
                    f"{sub['loss']:.4f} / {100 * sub['accuracy']:.1f} % | "
                    f"{100 * sub['overlap']:.0f} % | {sub['same_indices']} / {row['seeds']} |"
                )
    cases = [e for run in report["runs"] for e in run["ranks"]]
    wins = sum(e["gramian_below_random_mean"] for e in cases)
    sweeps = sum(e["gramian_beats_draws"] == len(e["random"]["draws"]) for e in cases)
    same = sum(e["mean_lti"]["kept"] == e["gramian"]["kept"] for e in cases)
    train_s = [run["train"]["seconds"] for run in report["runs"]]
    others = [run["train"]["others_cpu"] for run in report["runs"]]
    lines += [
        "",
        f"- Gramian selection had a lower test loss than the mean of the random draws in "
        f"{wins} of {len(cases)} (seed, rank) cases, and lower than every random draw in "
        f"{sweeps} of {len(cases)}.",
        "- Kept indices, per-layer scores (gramian, mean_lti) and every random draw are in "
        "`mamba_selection.json`.",
        f"- Training took {', '.join(f'{s:.0f}' for s in train_s)} s per seed; share of the "
        "CPUs used by other processes meanwhile: "
        + ", ".join("?" if o is None else f"{100 * o:.0f} %" for o in others)
        + " (affects times only; the numbers are deterministic for a thread count).",
        f"- mean_lti kept the same indices as gramian in {same} of {len(cases)} cases.",
        "- One task and one model size; no fine-tuning after the cut, so the numbers measure "
        "the selection alone, not what further training recovers. No error bound applies "
        "(time-varying layer, modal truncation).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--d-model", type=int, default=32)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--n-layers", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ranks", type=int, nargs="+", help="default: N/2, N/4, N/8")
    parser.add_argument("--random-draws", type=int, default=5)
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument(
        "--subsample",
        type=int,
        nargs="*",
        default=[8, 1],
        help="also score from only the first k sequences of each calibration batch",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--quick", action="store_true", help="40 steps, N = 8, one seed, 2 draws, no files"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.steps, args.seeds, args.d_state, args.random_draws = 40, [0], 8, 2
        args.calibration_batches = 2
    n = args.d_state
    ranks = args.ranks or sorted({max(1, n // k) for k in (2, 4, 8)}, reverse=True)
    start = time.perf_counter()
    task = load_task("mnist1d")
    runs = [run_seed(task, args, seed, ranks) for seed in args.seeds]
    summary = summarize(runs, ranks)
    report = {
        "question": "Does Gramian state selection beat random selection in held-out loss "
        "on a small trained Mamba model (no fine-tuning)?",
        "task": "MNIST-1D (compressm_cli.data.load_task('mnist1d')): "
        f"{len(task.x_train)} train / {len(task.x_test)} test sequences, L = "
        f"{task.x_train.shape[1]}, {task.d_output} classes",
        "config": {
            "steps": args.steps,
            "seeds": args.seeds,
            "d_model": args.d_model,
            "d_state": n,
            "n_layers": args.n_layers,
            "lr": args.lr,
            "batch": args.batch,
            "weight_decay": 0.01,
            "schedule": "cosine, 5 % linear warm-up",
            "ranks": ranks,
            "random_draws": args.random_draws,
            "calibration_batches": args.calibration_batches,
            "subsample": args.subsample,
            "aggregate": "sum",
        },
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "compressm": compressm_core.__version__,
        "torch_threads": torch.get_num_threads(),
        "total_seconds": time.perf_counter() - start,
        "summary": summary,
        "runs": runs,
    }
    text = markdown(report)
    print(text)
    if args.quick:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mamba_selection.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "mamba_selection.md").write_text(text)


if __name__ == "__main__":
    main()
