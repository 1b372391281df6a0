"""JAX / Flax NNX: LRU training step against the state size, and the cost of a reduction event.

1. **State-size sweep.** One :class:`compressm_jax.LRU` layer between a linear encoder and
   decoder, loss ``mean(y**2)``, ``optax.adamw``, the training step compiled with ``nnx.jit``:
   the time of a step (after compilation) and of its first call (tracing + XLA compilation) for
   ``d_state`` in {8, ..., 512} at a fixed ``(batch, length, d_model)``.
2. **A reduction event** 256 -> 64 by :class:`compressm_jax.CompreSSM` (``mode="fixed"``) on a
   model trained for a few steps: the event itself (HSVs, balanced truncation,
   re-diagonalisation, write-back, optax-state surgery) and the first training step after it,
   which retraces and recompiles because the shapes changed. Their sum is the cost of one event;
   the number of traces is counted (one per event is the minimum). The official CompreSSM code
   reports about 5 s of recompilation per reduction.

Times are medians after warm-up; ``jax.block_until_ready`` ends every timed call. Usage::

    python benchmarks/jax_lru.py            # CPU, about 2 minutes on 2 cores
    python benchmarks/jax_lru.py --quick    # smoke test

Writes ``jax_lru.json`` and ``jax_lru.md`` (``jax_lru_gpu.*`` on a GPU) under ``--out``
(default ``benchmarks/results``, ``benchmarks/results/quick`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from _cpu import cpu_model
from compressm_jax import LRU, CompreSSM

D_STATES = (8, 32, 64, 128, 256, 512)


class Net(nnx.Module):
    """Linear encoder, one LRU, linear decoder."""

    def __init__(self, d_model: int, d_state: int, seed: int = 0) -> None:
        rngs = nnx.Rngs(seed)
        self.enc = nnx.Linear(d_model, d_model, rngs=rngs)
        self.ssm = LRU(d_model, d_state, rngs=rngs)
        self.dec = nnx.Linear(d_model, d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        out: jax.Array = self.dec(jax.nn.gelu(self.ssm(self.enc(x))))
        return out


def make_step(traces: list[int]) -> Any:
    @nnx.jit
    def train_step(model: Net, opt: nnx.Optimizer[Net], x: jax.Array) -> jax.Array:
        traces.append(1)  # runs once per trace

        def loss_fn(model: Net) -> jax.Array:
            return jnp.mean(model(x) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    return train_step


def timed(step: Any, model: Net, opt: nnx.Optimizer[Net], x: jax.Array) -> float:
    """Seconds of one training step, until its result is ready."""
    start = time.perf_counter()
    jax.block_until_ready(step(model, opt, x))
    return time.perf_counter() - start


def sweep_point(cfg: dict[str, Any], d_state: int) -> dict[str, Any]:
    model = Net(cfg["d_model"], d_state)
    opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    x = jax.random.normal(jax.random.PRNGKey(0), (cfg["batch"], cfg["length"], cfg["d_model"]))
    traces: list[int] = []
    step = make_step(traces)
    first = timed(step, model, opt, x)
    for _ in range(cfg["warmup"]):
        timed(step, model, opt, x)
    times = [timed(step, model, opt, x) for _ in range(cfg["repeats"])]
    return {"first_call": first, "step": statistics.median(times), "all_steps": times}


def event(cfg: dict[str, Any]) -> dict[str, Any]:
    big, small = cfg["event"]
    runs = []
    for repeat in range(cfg["event_repeats"]):
        model = Net(cfg["d_model"], big, seed=repeat)
        opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
        ctl = CompreSSM(
            model,
            opt,
            total_steps=100,
            mode="fixed",
            fraction=1 - small / big,
            reduction_steps=[1],
        )
        x = jax.random.normal(jax.random.PRNGKey(1), (cfg["batch"], cfg["length"], cfg["d_model"]))
        traces: list[int] = []
        step = make_step(traces)
        for _ in range(3):
            timed(step, model, opt, x)
        before = statistics.median(timed(step, model, opt, x) for _ in range(3))
        start = time.perf_counter()
        (ev,) = ctl.step()
        reduction = time.perf_counter() - start
        first_after = timed(step, model, opt, x)
        after = statistics.median(timed(step, model, opt, x) for _ in range(3))
        runs.append(
            {
                "new_rank": ev.new_rank,
                "reduction_s": reduction,
                "first_step_after_s": first_after,
                "recompile_s": first_after - after,
                "step_before_s": before,
                "step_after_s": after,
                "traces": len(traces),
            }
        )
    keys = ("reduction_s", "first_step_after_s", "recompile_s", "step_before_s", "step_after_s")
    return {
        "from": big,
        "to": runs[0]["new_rank"],
        **{k: statistics.median(r[k] for r in runs) for k in keys},
        "traces": runs[0]["traces"],
        "runs": runs,
    }


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    base = result["sweep"][str(cfg["d_states"][0])]["step"]
    lines = [
        f"Device: {result['device']}; jax {result['jax']}, flax {result['flax']}. One LRU between "
        f"linear layers, batch {cfg['batch']}, length {cfg['length']}, d_model "
        f"{cfg['d_model']}, AdamW, `nnx.jit` training step; median of {cfg['repeats']} steps.",
        "",
        "| d_state | train step [s] | / step at the smallest size | first call "
        "(trace + compile) [s] |",
        "|---|---|---|---|",
    ]
    for n in cfg["d_states"]:
        row = result["sweep"][str(n)]
        lines.append(
            f"| {n} | {row['step']:.4g} | {row['step'] / base:.2f}x | {row['first_call']:.3g} |"
        )
    ev = result["event"]
    lines += [
        "",
        f"One reduction event {ev['from']} -> {ev['to']} (median of {len(ev['runs'])}): the "
        f"event itself {ev['reduction_s']:.3f} s (HSVs, truncation, write-back, optax surgery); "
        f"the first training step after it {ev['first_step_after_s']:.3f} s, of which "
        f"{ev['recompile_s']:.3f} s retracing and recompiling; steps before / after "
        f"{ev['step_before_s']:.4f} / {ev['step_after_s']:.4f} s. Traces of the training step "
        f"over the run: {ev['traces']} (one at the start, one per event).",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke test")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cfg: dict[str, Any] = {
        "batch": 4 if args.quick else args.batch,
        "length": 64 if args.quick else args.length,
        "d_model": 16 if args.quick else args.d_model,
        "d_states": [8, 32] if args.quick else list(D_STATES),
        "warmup": 1 if args.quick else 2,
        "repeats": 2 if args.quick else args.repeats,
        "event": (32, 8) if args.quick else (256, 64),
        "event_repeats": 1 if args.quick else 3,
    }
    sweep = {}
    for n in cfg["d_states"]:
        sweep[str(n)] = sweep_point(cfg, n)
        print(n, f"{sweep[str(n)]['step']:.4f} s", flush=True)
    backend = jax.default_backend()
    device = (
        f"CPU {cpu_model()} ({platform.machine()})"
        if backend == "cpu"
        else jax.devices()[0].device_kind
    )
    result = {
        "config": cfg,
        "device": device,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "sweep": sweep,
        "event": event(cfg),
    }
    out = args.out or Path(__file__).parent / "results" / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    stem = "jax_lru" + ("" if backend == "cpu" else "_gpu")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
