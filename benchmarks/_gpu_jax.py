"""Parts of ``gpu_suite.py``: the JAX / Flax NNX LRU (``compressm_jax``).

- :func:`jax_sweep`: one :class:`compressm_jax.LRU` between linear layers, ``nnx.jit`` training
  step (AdamW): step time and first call (trace + compile) against ``d_state``
  (``jax_lru.sweep_point``).
- :func:`jax_event`: one reduction event by :class:`compressm_jax.CompreSSM` on a model trained
  for a few steps, in phases (the event; each step after it: the first retraces and
  recompiles, and on the CPU the second compiled again; the steady steps), each recorded as
  soon as it ends, so that a phase that does not finish within the part's time limit is
  visible as the last one recorded, and every compilation in the log
  (``jax_log_compiles``). ``recompile_s`` is the time of the first three steps after the
  event above three steady steps.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from _gpu_common import Record, Skip, progress

__all__ = ["jax_event", "jax_markdown", "jax_sweep"]

SHAPE: dict[str, dict[str, Any]] = {
    "full": {"batch": 16, "length": 1024, "d_model": 128, "d_states": [8, 64, 256, 512]},
    "smoke": {"batch": 2, "length": 16, "d_model": 8, "d_states": [8]},
}
TIMING: dict[str, dict[str, Any]] = {
    "full": {"warmup": 2, "repeats": 5},
    "smoke": {"warmup": 1, "repeats": 2},
}
EVENT = {"full": (256, 64), "smoke": (8, 2)}
AFTER = 3  # steps after an event counted as its recompilation (a second compile was seen)


def _jax(cfg: dict[str, Any]) -> Any:
    """Import JAX and ``compressm_jax``; skip without them, or without a GPU unless smoke."""
    try:
        import jax

        import compressm_jax  # noqa: F401
        from jax_lru import Net  # noqa: F401  (flax, optax)
    except ImportError as exc:
        msg = f"JAX part not importable: {type(exc).__name__}: {exc}"
        raise Skip(msg) from exc
    if cfg["device"] == "cpu":
        jax.config.update("jax_platforms", "cpu")
    backend = jax.default_backend()
    if backend == "cpu" and not cfg["smoke"]:
        msg = "JAX has no GPU backend here: the full sizes need a GPU (use --smoke on the CPU)"
        raise Skip(msg)
    if cfg["device"] == "cuda" and backend == "cpu":
        msg = "`--device cuda` was asked for but JAX has no GPU backend"
        raise Skip(msg)
    return jax


def _env(jax: Any) -> dict[str, Any]:
    import flax

    from _cpu import cpu_model

    device = jax.devices()[0]
    kind = device.device_kind if jax.default_backend() != "cpu" else cpu_model()
    return {
        "jax": jax.__version__,
        "flax": flax.__version__,
        "backend": jax.default_backend(),
        "device": kind,
    }


def _key(cfg: dict[str, Any]) -> str:
    return "smoke" if cfg["smoke"] else "full"


def jax_sweep(cfg: dict[str, Any], rec: Record) -> None:
    """Jitted training step and first call against ``d_state``."""
    jax = _jax(cfg)
    from jax_lru import sweep_point

    spec = {**SHAPE[_key(cfg)], **TIMING[_key(cfg)]}
    rec["env"] = _env(jax)
    rec["config"] = spec
    rows: dict[str, Any] = {}
    for n in spec["d_states"]:
        got = sweep_point(spec, n)
        rows[str(n)] = {
            "step_ms": 1e3 * got["step"],
            "first_call_s": got["first_call"],
            "all_step_ms": [1e3 * t for t in got["all_steps"]],
        }
        progress(f"jax_sweep: N = {n}: {1e3 * got['step']:.4g} ms")
        rec["d_states"] = rows


def jax_event(cfg: dict[str, Any], rec: Record) -> None:
    """One reduction event and the retrace / recompile of the next training step."""
    jax = _jax(cfg)
    import optax
    from flax import nnx

    from compressm_jax import CompreSSM
    from jax_lru import Net, make_step, timed

    jax.config.update("jax_log_compiles", True)  # each compilation in the log, with its time
    spec = {**SHAPE[_key(cfg)], **TIMING[_key(cfg)]}
    big, small = EVENT[_key(cfg)]
    rec["env"] = _env(jax)
    rec["config"] = {**spec, "from": big, "to": small}
    model = Net(spec["d_model"], big)
    opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    ctl = CompreSSM(
        model, opt, total_steps=100, mode="fixed", fraction=1 - small / big, reduction_steps=[1]
    )
    x = jax.random.normal(jax.random.PRNGKey(1), (spec["batch"], spec["length"], spec["d_model"]))
    traces: list[int] = []
    step = make_step(traces)
    phases: dict[str, Any] = {}
    progress("jax_event: first call (trace + compile)")
    phases["first_call_s"] = timed(step, model, opt, x)
    rec["phases"] = phases
    for _ in range(spec["warmup"]):
        timed(step, model, opt, x)
    phases["step_before_ms"] = 1e3 * statistics.median(
        timed(step, model, opt, x) for _ in range(spec["repeats"])
    )
    rec["phases"] = phases
    progress("jax_event: reduction event (HSVs, truncation, write-back, optax surgery)")
    start = time.perf_counter()
    events = ctl.step()
    phases["event_s"] = time.perf_counter() - start
    phases["ranks"] = sorted({(e.old_rank, e.new_rank) for e in events})
    rec["phases"] = phases
    progress(f"jax_event: event {phases['event_s']:.3g} s; steps after it (retrace)")
    after: list[float] = []
    phases["steps_after_s"] = after
    for i in range(AFTER + spec["repeats"]):
        after.append(timed(step, model, opt, x))
        phases["traces"] = len(traces)
        rec["phases"] = phases
        progress(f"jax_event: step {i + 1} after the event {after[-1]:.3g} s")
    steady = statistics.median(after[AFTER:])
    phases["first_step_after_s"] = after[0]
    phases["step_after_ms"] = 1e3 * steady
    phases["recompile_s"] = sum(after[:AFTER]) - AFTER * steady
    rec["phases"] = phases
    progress(f"jax_event: recompile {phases['recompile_s']:.3g} s, traces {len(traces)}")


def jax_markdown(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    head = (
        f"One `compressm_jax.LRU` between linear layers, batch {c['batch']}, length "
        f"{c['length']}, d_model {c['d_model']}, `nnx.jit` AdamW step ({r['env']['device']}, "
        f"jax {r['env']['jax']})"
    )
    if "d_states" in r:
        cells = ", ".join(
            f"{n}: {row['step_ms']:.3g} ms (first call {row['first_call_s']:.3g} s)"
            for n, row in r["d_states"].items()
        )
        return [f"{head}; step by d_state: {cells}."]
    p = r.get("phases", {})
    parts = [f"{k} = {v:.4g}" for k, v in p.items() if isinstance(v, float)]
    after = ", ".join(f"{t:.3g}" for t in p.get("steps_after_s", []))
    return [
        f"{head}; reduction event {c['from']} -> {c['to']}: "
        + ", ".join(parts)
        + (f"; steps after the event [s]: {after}" if after else "")
        + (f"; traces {p['traces']}." if "traces" in p else " (unfinished phases missing).")
    ]
