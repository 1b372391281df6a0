"""The GPU check suite: every GPU measurement of the project in one command, in under 9 minutes.

Made for a GPU that is lent now and then for a few minutes: one command measures everything
and writes ``gpu_suite.json`` and ``gpu_suite.md`` (and ``gpu_suite.log``, the parts' output)
under ``--out``. Parts, in this order, each in its own child process under its own time limit
(and the suite's total budget), so that a part that is slow, hangs or crashes is recorded as
``timeout`` or ``failed`` with its last output line and the suite goes on:

========== =================================================================================
core       ``balanced_truncation`` of 1536 SISO channels (n = 16) batched on the GPU in float64
           against SciPy looped and NumPy batched, HSV agreement; HSVs of one LRU layer with
           512 real states (m = p = 256), GPU against NumPy (``_gpu_torch.core``)
lru        ``SequenceModel`` of 6 LRU blocks at the sCIFAR shape (d_model 512, batch 50, length
           1024): training step at N = 384 and 96 in fp32, TF32 and bf16 autocast; one
           reduction event 384 -> 96 of the 6 layers, in seconds and training steps
mamba      ``compressm_torch.Mamba`` (d_model 768, batch 8, length 1024): step against d_state
           and the ``SelectiveRecorder`` statistics update as a share of a step
mamba2     mamba_ssm ``Mamba2`` (Triton SSD kernels; 2 layers, d_model 768, batch 8, length
           2048, bf16): step against d_state, the controller cutting 128 -> 16 at step 10
e2e        full-size training against CompreSSM (cuts at 5 % and 10 % of 300 steps) at the
           sCIFAR LRU shape: wall-time ratio and final losses
jax_sweep  ``compressm_jax.LRU`` (batch 16, length 1024, d_model 128): jitted step against N
mamba1     mamba_ssm ``Mamba`` (Mamba-1, needs the compiled ``selective_scan_cuda``)
jax_event  one JAX reduction event 256 -> 64 and the retrace / recompile of the next step
========== =================================================================================

A part records ``ok``, ``skipped`` (with the reason: no GPU, mamba_ssm or JAX not importable,
no time left), ``failed`` (with the error line) or ``timeout``, and whatever it measured
before it stopped. GPU times are CUDA-event times of single steps, medians after warm-up.

``--smoke`` runs every part at toy sizes on whatever device there is (the CPU here), about
35 s of CPU time (``--jobs 2`` spreads it over two cores): the check that the suite still
runs (``tests/test_gpu_suite.py``). Without ``mamba_ssm`` its parts are then skipped with
the import error and run their code path on stand-ins (``_mamba_stand_in.py``), recorded
beside the reason.

Usage::

    python benchmarks/gpu_suite.py --out $OUT           # on the GPU machine (gpu_run.sh)
    python benchmarks/gpu_suite.py --smoke --jobs 2     # toy sizes, CPU
    python benchmarks/gpu_suite.py --parts core lru     # a selection

Writes to ``benchmarks/results`` by default (``benchmarks/results/quick`` with ``--smoke``).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PARTS", "STATUSES", "Part", "lookup", "main", "missing_keys", "run_part"]

HERE = Path(__file__).resolve().parent
SCHEMA = 1
STATUSES = ("ok", "skipped", "failed", "timeout")
PACKAGES = (
    "torch",
    "triton",
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "numpy",
    "scipy",
    "array-api-compat",
    "mamba-ssm",
    "causal-conv1d",
    "compressm",
)


@dataclass(frozen=True)
class Part:
    """One measurement: ``module.function(cfg, rec)``, its limit and the keys it must fill."""

    name: str
    module: str
    function: str
    markdown: str
    limit_s: float
    required: tuple[str, ...]


PARTS: tuple[Part, ...] = (
    Part("core", "_gpu_torch", "core", "core_markdown", 90,
         ("channels.torch_ms", "channels.scipy_loop_ms", "channels.numpy_batched_ms",
          "channels.hsv_torch_vs_scipy.max_abs_over_s1", "lru_layer.torch_ms",
          "lru_layer.numpy_ms", "lru_layer.hsv_torch_vs_numpy.max_abs_over_s1")),
    Part("lru", "_gpu_torch", "lru", "lru_markdown", 150,
         ("steps.fp32.ratio", "steps.tf32.ratio", "steps.bf16.ratio", "event.seconds",
          "event.training_steps")),
    Part("mamba", "_gpu_mamba", "mamba", "mamba_markdown", 100,
         ("d_states", "speedup")),
    Part("mamba2", "_gpu_mamba", "mamba2", "mamba_ssm_markdown", 150,
         ("d_states", "controller.events", "controller.loss_finite_after")),
    Part("e2e", "_gpu_torch", "e2e", "e2e_markdown", 150,
         ("arms.full.seconds", "arms.compressm.seconds", "arms.full.final_loss",
          "arms.compressm.final_loss", "ratio")),
    Part("jax_sweep", "_gpu_jax", "jax_sweep", "jax_markdown", 90, ("d_states",)),
    Part("mamba1", "_gpu_mamba", "mamba1", "mamba_ssm_markdown", 90,
         ("d_states", "controller.events", "controller.loss_finite_after")),
    Part("jax_event", "_gpu_jax", "jax_event", "jax_markdown", 120,
         ("phases.event_s", "phases.recompile_s")),
)  # fmt: skip
SMOKE_LIMIT_S = 60.0
MIN_START_S = 10.0  # a part is not started with less of the budget left


def lookup(data: dict[str, Any], dotted: str) -> Any:
    """``data["a"]["b"]`` for ``"a.b"``; KeyError when a level is missing."""
    for key in dotted.split("."):
        data = data[key]
    return data


def missing_keys(part: Part, result: dict[str, Any]) -> list[str]:
    """The required keys of ``part`` that ``result`` lacks."""
    out = []
    for key in part.required:
        try:
            lookup(result, key)
        except (KeyError, TypeError):
            out.append(key)
    return out


# --------------------------------------------------------------------------------------------
# child side


def run_child(target: str, result: Path, cfg: dict[str, Any]) -> int:
    """Run ``module:function`` (a part) in this process; its data go to ``result``, its status
    beside it (``<result>.status``)."""
    from _gpu_common import Record, Skip

    module, _, function = target.partition(":")
    fn: Callable[[dict[str, Any], Any], None] = getattr(importlib.import_module(module), function)
    rec = Record(result)
    status: dict[str, Any] = {"status": "ok"}
    try:
        fn(cfg, rec)
    except Skip as exc:
        status = {"status": "skipped", "reason": str(exc)}
        print(f"skipped: {exc}", flush=True)
    result.with_name(result.name + ".status").write_text(json.dumps(status) + "\n")
    return 0


# --------------------------------------------------------------------------------------------
# parent side


def _pump(stream: Any, name: str, log: Any, lines: list[str]) -> None:
    for line in stream:
        lines.append(line.rstrip("\n"))
        log.write(f"[{name}] {line}")
        log.flush()
        print(f"[{name}] {line}", end="", flush=True)


def run_part(
    part: Part, limit: float, args: argparse.Namespace, work: Path, log: Any
) -> dict[str, Any]:
    """Start ``part`` in a child process, wait up to ``limit`` seconds, collect its record."""
    result = work / f"{part.name}.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        f"{part.module}:{part.function}",
        "--result",
        str(result),
        "--device",
        args.device,
    ]
    cmd += ["--smoke"] if args.smoke else []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.smoke:  # toy sizes: one thread avoids spin-waiting threads on a shared CPU
        env.update(
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            OPENBLAS_NUM_THREADS="1",
            XLA_FLAGS="--xla_cpu_multi_thread_eigen=false",
        )
    log.write(f"==== {part.name} (limit {limit:.0f} s)\n")
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=_pump, args=(proc.stdout, part.name, log, lines))
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=grace)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
    reader.join(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()
    seconds = time.monotonic() - start
    data: dict[str, Any] = {}
    if result.exists():
        data = json.loads(result.read_text())
    status_file = result.with_name(result.name + ".status")
    last = next((ln.strip() for ln in reversed(lines) if ln.strip()), "no output")
    last = last if len(last) <= 400 else last[:400] + " ..."
    record: dict[str, Any] = {
        "name": part.name,
        "seconds": seconds,
        "limit_s": limit,
        "returncode": proc.returncode,
    }
    if timed_out:
        record.update(status="timeout", error=f"timed out after {limit:.0f} s; last: {last}")
    elif proc.returncode != 0 or not status_file.exists():
        record.update(status="failed", error=last)
    else:
        record.update(json.loads(status_file.read_text()))
    record["result"] = data
    record["missing"] = missing_keys(part, data) if data or record["status"] == "ok" else []
    if record["status"] == "ok" and record["missing"]:
        record.update(status="failed", error="result lacks " + ", ".join(record["missing"]))
    record["log_tail"] = [ln if len(ln) <= 400 else ln[:400] + " ..." for ln in lines[-30:]]
    return record


def package_versions() -> dict[str, str | None]:
    """Installed versions, without importing the packages (mamba_ssm may be a source folder)."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            spec = importlib.util.find_spec(name.replace("-", "_"))
            out[name] = None if spec is None else f"source at {spec.origin}"
    return out


def machine() -> dict[str, Any]:
    """Platform, Python, CPU, the GPU as ``nvidia-smi`` names it, package versions."""
    from _cpu import cpu_model

    gpu = None
    try:
        query = [
            "nvidia-smi",
            "--query-gpu=name,driver_version,memory.total",
            "--format=csv,noheader",
        ]
        gpu = subprocess.run(query, capture_output=True, text=True, timeout=20, check=True)
        gpu_name: str | None = gpu.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        gpu_name = None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu_name,
        "packages": package_versions(),
    }


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: one status table, then each part's figures."""
    m = report["machine"]
    lines = [
        "# GPU check suite"
        + (" (smoke run: toy sizes, times mean nothing)" if report["smoke"] else ""),
        "",
        f"{report['started_utc']}; GPU: {m['gpu'] or 'none'}; CPU: {m['cpu']} "
        f"({m['cpu_count']} cores); Python {m['python']}; "
        + ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v is not None)
        + ".",
        "",
        f"Total {report['total_seconds']:.0f} s of a budget of {report['budget_s']:.0f} s.",
        "",
        "| part | status | seconds | limit [s] | reason / error |",
        "|---|---|---|---|---|",
    ]
    for name, r in report["parts"].items():
        note = (r.get("reason") or r.get("error") or "").replace("|", "/")
        lines.append(
            f"| {name} | {r['status']} | {r['seconds']:.1f} | {r['limit_s']:.0f} | {note} |"
        )
    for part in PARTS:
        r = report["parts"].get(part.name)
        if r is None or "config" not in r["result"]:  # partial results are shown too
            continue
        module = importlib.import_module(part.module)
        try:
            body = getattr(module, part.markdown)(r["result"])
        except Exception as exc:  # a report must come out even if one formatter breaks
            body = [f"(not formatted: {type(exc).__name__}: {exc})"]
        lines += [
            "",
            f"## {part.name}" + (f" ({r['status']})" if r["status"] != "ok" else ""),
            "",
            *body,
        ]
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], out: Path) -> None:
    from _results import write_results

    write_results(out / "gpu_suite", report, markdown(report).rstrip("\n"))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes on any device, < 60 s")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/results)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    names = [p.name for p in PARTS]
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=names,
        default=names,
        metavar="PART",
        help=f"parts to run, of {', '.join(names)} (default: all)",
    )
    parser.add_argument("--budget", type=float, help="total seconds (530; 240 with --smoke)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="parts run side by side (only with --smoke; default 1)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.jobs < 1 or (args.jobs > 1 and not args.smoke):
        msg = f"`--jobs` must be 1, or more only with --smoke; got {args.jobs}."
        raise SystemExit(msg)
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    cfg = {"smoke": args.smoke, "device": args.device}
    if args.child:
        return run_child(args.child, args.result, cfg)
    budget = args.budget if args.budget is not None else (240.0 if args.smoke else 530.0)
    out = args.out or HERE / "results" / ("quick" if args.smoke else "")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_suite_"))  # the parts' files; not sent back
    report: dict[str, Any] = {
        "suite": "gpu_suite",
        "schema": SCHEMA,
        "smoke": args.smoke,
        "device": args.device,
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "budget_s": budget,
        "total_seconds": 0.0,
        "machine": machine(),
        "parts": {},
    }
    start = time.monotonic()
    lock = threading.Lock()
    order = [p.name for p in PARTS if p.name in args.parts]

    def one(part: Part, log: Any) -> None:
        left = budget - (time.monotonic() - start)
        limit = min(SMOKE_LIMIT_S if args.smoke else part.limit_s, left)
        if limit < MIN_START_S:
            record = {
                "name": part.name,
                "status": "skipped",
                "seconds": 0.0,
                "limit_s": 0.0,
                "reason": f"no time left in the suite's budget of {budget:.0f} s",
                "result": {},
                "missing": [],
                "log_tail": [],
            }
        else:
            record = run_part(part, limit, args, work, log)
        with lock:
            done = {**report["parts"], part.name: record}
            report["parts"] = {name: done[name] for name in order if name in done}
            report["total_seconds"] = time.monotonic() - start
            write(report, out)

    with (out / "gpu_suite.log").open("w") as log:
        if args.jobs == 1:
            for part in (p for p in PARTS if p.name in args.parts):
                one(part, log)
        else:  # toy sizes only: parts running side by side disturb each other's times
            chosen = [p for p in PARTS if p.name in args.parts]
            chosen.sort(key=lambda p: p.module != "_gpu_jax")  # compiling: the longest first
            with ThreadPoolExecutor(args.jobs) as pool:
                jobs = [pool.submit(one, p, log) for p in chosen]
                for job in jobs:
                    job.result()
    for name, r in report["parts"].items():
        note = r.get("reason") or r.get("error") or ""
        print(f"{name}: {r['status']} ({r['seconds']:.1f} s) {note}")
    print(f"wrote {out / 'gpu_suite.json'} and {out / 'gpu_suite.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
