"""Hankel singular values + balanced truncation: compressm_core against SciPy and SLICOT.

Float64 on the CPU. Each case times, side by side and on the same system,

* **ours (NumPy)** and **ours (torch)**: one ``compressm_core.balanced_truncation`` call, which
  returns the HSVs with the reduced system (like ``AB09AD``), on a
  :class:`~compressm_core.DiagonalStateSpace` (closed-form Gramians, Cholesky factors with an
  eigendecomposition fallback, one SVD, projections), batched where the case is a batch;
* **SciPy**: the textbook dense square-root method, ``scipy.linalg.solve_discrete_lyapunov``
  for ``P`` and ``Q``, Cholesky factors (eigendecomposition with clamping where Cholesky
  fails), ``scipy.linalg.svd`` of ``Lo^H Lc`` and the projections ``(T^-1 A T, T^-1 B, C T)``;
* **slycot**: SLICOT ``AB09AD`` (``dico='D'``, ``job='B'``, ``equil='N'``), real systems only;

and reports the ratios *reference time / our time*, the time of one bare complex ``n x n`` SVD
(``numpy.linalg.svd``, ``compute_uv=True``) as a physical floor, and the agreement of the
Hankel singular values (HSVs) with the reference.

Regime 1, one large LRU-like layer: ``n/2`` complex poles on the ring ``0.9 <= |l| <= 0.999``
with random phases, complex ``B``, ``C``, real output ``Re(C x)``. Its exact real realization
(``compressm_core.real_output_realization``) has ``n`` real states; ours works on the
``n/2``-state diagonal system with ``real_output=True``, SciPy and slycot on the dense real
``n``-state realization. The paper's complex mode (``real_output=False`` on ``n`` complex
states) is timed against SciPy on the dense complex system (slycot is real-only).

Regime 2, many systems at once: 1536 Mamba-like single-input single-output real diagonal
channels with ``n = 16`` (``poles = exp(dt * A)``, ``A = -(1..16)``, ``dt`` log-uniform in
``[1e-3, 1e-1]``), and a batch of several LRU layers; ours makes one batched call, the
references loop (over a subset, extrapolated and labelled so, where a loop would be too slow).

Usage::

    python benchmarks/core_hsv.py                 # full run, a few minutes on 2 cores
    python benchmarks/core_hsv.py --quick         # smoke test, seconds
    python benchmarks/core_hsv.py --out benchmarks/results

Runs disturbed by other processes (their CPU share, from ``/proc/stat``, above 15%) are
discarded or retried where possible and the rows concerned are marked. Writes
``core_hsv.json`` and ``core_hsv.md`` under ``--out`` and replaces the text between
``<!-- BENCHMARK-TABLE:START -->`` and ``<!-- BENCHMARK-TABLE:END -->`` in
``docs/benchmarks.md`` (skipped, with a message, if the file or the markers are missing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy
import scipy.linalg as sla
import torch

import compressm_core as cc
from _cpu import BUSY_THRESHOLD, cpu_busy, cpu_model, cpu_sample, others_share

try:
    import slycot
    from slycot import ab09ad
except ImportError:  # pragma: no cover - slycot is a test dependency
    slycot = None
    ab09ad = None

ROOT = Path(__file__).resolve().parents[1]
DOCS_PAGE = ROOT / "docs" / "benchmarks.md"
START_MARKER = "<!-- BENCHMARK-TABLE:START -->"
END_MARKER = "<!-- BENCHMARK-TABLE:END -->"
HSV_TOL = 1e-9  # accuracy goal: max |s_ours - s_ref| / s_1
SIGNIFICANT = 1e-6  # elementwise relative errors are reported for s_i > SIGNIFICANT * s_1


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class Config:
    """Sizes and time limits of one run."""

    sizes: tuple[int, ...]  # real states n of the large layer (n/2 complex poles)
    io_sizes: tuple[int, ...]  # m = p
    tau: float  # select_rank(hsv, tau=...) for the large layers
    channels: int  # Mamba-like SISO channels
    channel_states: int
    channel_rank: int
    layers: int  # layers in the batched large case
    layer_n: int  # real states of each batched layer
    layer_io: int
    loop_subset_channels: int | None  # None: loop over every channel
    loop_subset_layers: int | None
    budget_s: float  # time spent on repeats of one measurement
    max_repeats: int
    ref_limit_s: float  # skip a reference whose predicted single run exceeds this
    max_retries: int = 2  # extra runs when other processes disturbed every run ...
    retry_limit_s: float = 30.0  # ... of a measurement whose single run is shorter than this
    idle_wait_s: float = 0.0  # before each case, wait up to this long for idle CPUs ...
    idle_wait_total_s: float = 0.0  # ... and this long in all (retries included)
    seed: int = 0


FULL = Config(
    sizes=(64, 128, 256, 512, 1024),
    io_sizes=(8, 256),
    tau=0.05,
    channels=1536,
    channel_states=16,
    channel_rank=8,
    layers=6,
    layer_n=512,
    layer_io=256,
    loop_subset_channels=None,
    loop_subset_layers=2,
    budget_s=2.0,
    max_repeats=5,
    ref_limit_s=150.0,
    idle_wait_s=15.0,
    idle_wait_total_s=120.0,
)

QUICK = Config(
    sizes=(32, 64),
    io_sizes=(4,),
    tau=0.05,
    channels=64,
    channel_states=16,
    channel_rank=8,
    layers=2,
    layer_n=64,
    layer_io=4,
    loop_subset_channels=None,
    loop_subset_layers=None,
    budget_s=0.2,
    max_repeats=3,
    ref_limit_s=10.0,
)


# --------------------------------------------------------------------------------------------
# Systems


def lru_layer(
    rng: np.random.Generator, n_poles: int, io: int, batch: tuple[int, ...] = ()
) -> cc.DiagonalStateSpace:
    """LRU-like layer: complex poles on the ring 0.9..0.999 with random phases, complex B, C."""
    radius = rng.uniform(0.9, 0.999, (*batch, n_poles))
    phase = rng.uniform(0.0, 2.0 * np.pi, (*batch, n_poles))
    poles = radius * np.exp(1j * phase)
    b = rng.standard_normal((*batch, n_poles, io, 2)) @ np.array([1.0, 1j])
    c = rng.standard_normal((*batch, io, n_poles, 2)) @ np.array([1.0, 1j])
    return cc.DiagonalStateSpace(poles, b / np.sqrt(2 * io), c / np.sqrt(2 * n_poles))


def mamba_channels(rng: np.random.Generator, channels: int, n: int) -> cc.DiagonalStateSpace:
    """S4D-real / Mamba channels: poles exp(dt * A), A = -(1..n), dt log-uniform 1e-3..1e-1."""
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), channels))
    poles = np.exp(dt[:, None] * -np.arange(1.0, n + 1.0)[None, :])
    b = rng.standard_normal((channels, n, 1))
    c = rng.standard_normal((channels, 1, n))
    return cc.DiagonalStateSpace(poles, b, c)


def to_torch(sys: cc.DiagonalStateSpace) -> cc.DiagonalStateSpace:
    """The same system as CPU torch tensors (sharing memory)."""
    return cc.DiagonalStateSpace(*(None if f is None else torch.from_numpy(f) for f in sys))


def dense_members(sys: cc.DiagonalStateSpace, real_output: bool) -> list[cc.StateSpace]:
    """Dense (real realization or complex) systems, one per batch member, as NumPy arrays."""
    dense = cc.real_output_realization(sys) if real_output else cc.to_dense(sys)
    a, b, c = (np.asarray(x) for x in dense[:3])
    if a.ndim == 2:
        return [cc.StateSpace(a, b, c)]
    return [cc.StateSpace(a[i], b[i], c[i]) for i in range(a.shape[0])]


# --------------------------------------------------------------------------------------------
# The three implementations


def ours(sys: cc.DiagonalStateSpace, rank: int, real_output: bool) -> tuple[Any, Any]:
    """Our pipeline: one ``balanced_truncation`` call, which returns the HSVs with the reduced
    system, like ``AB09AD`` (batched over leading axes)."""
    reduced = cc.balanced_truncation(sys, rank, real_output=real_output)
    return reduced.hsv, reduced.system


def _sqrt_factor(x: np.ndarray) -> tuple[np.ndarray, str]:
    """Cholesky factor of a Gramian; clamped eigendecomposition where it is not definite."""
    x = (x + x.conj().T) / 2
    try:
        return sla.cholesky(x, lower=True, check_finite=False), "cholesky"
    except np.linalg.LinAlgError:
        w, v = sla.eigh(x, check_finite=False)
        return v * np.sqrt(np.clip(w, 0.0, None)), "eigh"


def scipy_path(sys: cc.StateSpace, rank: int) -> tuple[np.ndarray, cc.StateSpace, str]:
    """Dense square-root balanced truncation written with SciPy."""
    a, b, c = sys.a, sys.b, sys.c
    p = sla.solve_discrete_lyapunov(a, b @ b.conj().T)
    q = sla.solve_discrete_lyapunov(a.conj().T, c.conj().T @ c)
    lc, kind_c = _sqrt_factor(p)
    lo, kind_o = _sqrt_factor(q)
    u, s, vh = sla.svd(lo.conj().T @ lc, check_finite=False)
    scale = 1.0 / np.sqrt(s[:rank])
    t = (lc @ vh[:rank].conj().T) * scale
    t_inv = scale[:, None] * (u[:, :rank].conj().T @ lo.conj().T)
    reduced = cc.StateSpace(t_inv @ a @ t, t_inv @ b, c @ t)
    return s, reduced, f"{kind_c}/{kind_o}"


def slycot_path(sys: cc.StateSpace, rank: int) -> tuple[np.ndarray, cc.StateSpace, int]:
    """SLICOT AB09AD, square-root balance & truncate, discrete time, no scaling."""
    a, b, c = (np.array(x, dtype=np.float64, order="F") for x in sys[:3])  # overwritten
    n, m, p = a.shape[0], b.shape[1], c.shape[0]
    nr, ar, br, cr, hsv = ab09ad("D", "B", "N", n, m, p, a, b, c, nr=rank)
    return hsv[:n], cc.StateSpace(ar[:nr, :nr], br[:nr], cr[:, :nr]), int(nr)


# --------------------------------------------------------------------------------------------
# Timing


@dataclass
class Timing:
    """Best-of-k wall time of one measurement (seconds for the whole case)."""

    seconds: float
    repeats: int
    others_cpu: float | None = None  # CPU share of other processes during the kept run
    members_timed: int | None = None  # loops over a subset: extrapolated to all members
    members_total: int | None = None

    @property
    def extrapolated(self) -> bool:
        return self.members_timed is not None and self.members_timed < (self.members_total or 0)

    @property
    def disturbed(self) -> bool:
        return self.others_cpu is not None and self.others_cpu > BUSY_THRESHOLD

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "seconds": self.seconds,
            "repeats": self.repeats,
            "others_cpu": self.others_cpu,
            "disturbed": self.disturbed,
        }
        if self.members_total is not None:
            out["members_timed"] = self.members_timed
            out["members_total"] = self.members_total
            out["extrapolated"] = self.extrapolated
        return out


def _clock(fn: Callable[[], Any]) -> tuple[Timing, Any]:
    """One timed run, with the CPU share other processes took meanwhile."""
    before = cpu_sample()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return Timing(seconds, 1, others_share(before, cpu_sample())), result


def _keep(runs: list[Timing]) -> Timing:
    """The fastest undisturbed run (the fastest of all if every run was disturbed)."""
    clean = [t for t in runs if not t.disturbed] or runs
    best = min(clean, key=lambda t: t.seconds)
    return replace(best, repeats=len(runs))


def best_of(fn: Callable[[], Any], cfg: Config) -> tuple[Timing, Any]:
    """Warm up once, then best of up to ``max_repeats`` runs within ``budget_s``.

    A run slower than the budget is not repeated (its warm-up run is the measurement, k = 1)
    unless other processes took the CPUs meanwhile: then it is run again, up to
    ``max_retries`` times while a run takes under ``retry_limit_s``. Returns the timing and
    the result of the first run.
    """
    first, result = _clock(fn)
    runs = [first]
    if first.seconds > cfg.budget_s:
        while (
            runs[-1].disturbed
            and len(runs) <= cfg.max_retries
            and first.seconds < cfg.retry_limit_s
        ):
            GATE.wait()
            runs.append(_clock(fn)[0])
        return _keep(runs), result
    runs = []
    spent = first.seconds
    while len(runs) < cfg.max_repeats and (not runs or spent < cfg.budget_s):
        runs.append(_clock(fn)[0])
        spent += runs[-1].seconds
    retries = 0
    while all(t.disturbed for t in runs) and retries < cfg.max_retries:
        GATE.wait()
        runs.append(_clock(fn)[0])
        retries += 1
    return _keep(runs), result


def timed_loop(
    fn: Callable[[Any], Any], members: Sequence[Any], subset: int | None, cfg: Config
) -> tuple[Timing, list[Any]]:
    """Time a Python loop of ``fn`` over ``members`` (or its first ``subset``), extrapolated."""
    count = len(members) if subset is None else min(subset, len(members))
    chosen = members[:count]
    timing, results = best_of(lambda: [fn(x) for x in chosen], cfg)
    scaled = replace(timing, seconds=timing.seconds * len(members) / count)
    return replace(scaled, members_timed=count, members_total=len(members)), results


class IdleGate:
    """Wait for other processes to leave the CPUs, within a total waiting budget."""

    def __init__(self, per_case_s: float, total_s: float) -> None:
        self.per_case_s = per_case_s
        self.left_s = total_s

    def wait(self) -> float | None:
        """Wait until idle (or out of budget); returns the last share of others measured."""
        start = time.monotonic()
        deadline = start + min(self.per_case_s, self.left_s)
        busy = cpu_busy()
        while busy is not None and busy > BUSY_THRESHOLD and time.monotonic() < deadline:
            busy = cpu_busy(1.0)
        self.left_s = max(0.0, self.left_s - (time.monotonic() - start))
        return busy


GATE = IdleGate(0.0, 0.0)


class Predictor:
    """Skip a reference whose run, extrapolated as ``n^3`` from the last size, is too slow."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.last: dict[str, tuple[int, float]] = {}

    def predict(self, key: str, n: int) -> float | None:
        if key not in self.last:
            return None
        n0, t0 = self.last[key]
        return t0 * (n / n0) ** 3

    def allow(self, key: str, n: int) -> tuple[bool, float | None]:
        guess = self.predict(key, n)
        return guess is None or guess <= self.limit_s, guess

    def record(self, key: str, n: int, seconds: float) -> None:
        self.last[key] = (n, seconds)


# --------------------------------------------------------------------------------------------
# Accuracy


def hsv_errors(ours_hsv: np.ndarray, ref_hsv: np.ndarray) -> dict[str, float]:
    """``max |s - s_ref| / s_ref_1`` and the elementwise relative error of significant HSVs."""
    ours_hsv = np.atleast_2d(np.asarray(ours_hsv, dtype=np.float64))
    ref_hsv = np.atleast_2d(np.asarray(ref_hsv, dtype=np.float64))
    top = ref_hsv[:, :1]
    absolute = np.max(np.abs(ours_hsv - ref_hsv) / top)
    mask = ref_hsv > SIGNIFICANT * top
    elementwise = np.max(np.abs(ours_hsv - ref_hsv)[mask] / ref_hsv[mask])
    return {"max_abs_over_s1": float(absolute), "max_rel_significant": float(elementwise)}


def transfer_gap(red: cc.StateSpace, ref: cc.StateSpace, points: int = 8) -> float:
    """``max_z |H_red(z) - H_ref(z)| / max_z |H_ref(z)|`` on ``points`` of the unit circle."""
    z = np.exp(1j * np.linspace(0.05, np.pi - 0.05, points))

    def response(s: cc.StateSpace) -> np.ndarray:
        a, b, c = (np.asarray(x) for x in s[:3])
        eye = np.eye(a.shape[-1])
        return np.stack([c @ np.linalg.solve(zk * eye - a, b) for zk in z])

    h_red, h_ref = response(red), response(ref)
    return float(np.max(np.abs(h_red - h_ref)) / np.max(np.abs(h_ref)))


def host(x: Any) -> np.ndarray:
    """NumPy copy of a NumPy array or CPU torch tensor."""
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def host_system(s: cc.StateSpace, index: int | None = None) -> cc.StateSpace:
    """One (batch member of a) reduced system as NumPy arrays."""
    fields = [host(x) for x in s[:3]]
    if index is not None:
        fields = [x[index] for x in fields]
    return cc.StateSpace(*fields)


# --------------------------------------------------------------------------------------------
# Cases


def svd_floor(n: int, batch: tuple[int, ...], cfg: Config, rng: np.random.Generator) -> Timing:
    """One bare complex ``n x n`` SVD with vectors (batched like the case)."""
    x = rng.standard_normal((*batch, n, n)) + 1j * rng.standard_normal((*batch, n, n))
    return best_of(lambda: np.linalg.svd(x, compute_uv=True), cfg)[0]


def run_ours(
    sys: cc.DiagonalStateSpace, rank: int, real_output: bool, cfg: Config
) -> dict[str, tuple[Timing, Any]]:
    """Time our pipeline on NumPy arrays and on torch tensors."""
    tsys = to_torch(sys)
    return {
        "ours_numpy": best_of(lambda: ours(sys, rank, real_output), cfg),
        "ours_torch": best_of(lambda: ours(tsys, rank, real_output), cfg),
    }


def run_reference(
    name: str,
    members: list[cc.StateSpace],
    rank: int,
    subset: int | None,
    cfg: Config,
    predictor: Predictor,
    key: str,
    n: int,
) -> tuple[Timing | None, list[Any], str | None]:
    """Time a looped reference, unless predicted too slow; returns (timing, results, note)."""
    fn = {"scipy": scipy_path, "slycot": slycot_path}[name]
    ok, guess = predictor.allow(key, n)
    if not ok:
        note = f"skipped: predicted {guess:.0f} s > limit {cfg.ref_limit_s:.0f} s"
        return None, [], note
    timing, results = timed_loop(lambda s: fn(s, rank), members, subset, cfg)
    predictor.record(key, n, timing.seconds / len(members))
    return timing, results, None


def ratios(times: dict[str, Timing | None], floor: Timing | None) -> dict[str, float | None]:
    """Reference time / our time for both backends, and our time / the SVD floor."""
    out: dict[str, float | None] = {}
    for ref in ("scipy", "slycot"):
        for backend in ("numpy", "torch"):
            num, den = times.get(ref), times.get(f"ours_{backend}")
            out[f"{ref}_over_ours_{backend}"] = (
                None if num is None or den is None else num.seconds / den.seconds
            )
    for backend in ("numpy", "torch"):
        den = times.get(f"ours_{backend}")
        out[f"ours_{backend}_over_svd_floor"] = (
            None if floor is None or den is None else den.seconds / floor.seconds
        )
    return out


def accuracy(
    ours_runs: dict[str, tuple[Timing, Any]],
    ref_results: list[Any],
    ref_name: str,
    real_output: bool,
) -> dict[str, Any]:
    """HSV errors of both backends against the reference, and the reduced-model gap."""
    if not ref_results:
        return {"reference": None}
    count = len(ref_results)
    ref_hsv = np.stack([r[0] for r in ref_results])
    out: dict[str, Any] = {"reference": ref_name, "members_compared": count}
    for backend in ("numpy", "torch"):
        hsv, reduced = ours_runs[f"ours_{backend}"][1]
        hsv = host(hsv).reshape(-1, ref_hsv.shape[-1])[:count]
        out[backend] = hsv_errors(hsv, ref_hsv)
    _, reduced = ours_runs["ours_numpy"][1]
    batched = np.asarray(host(reduced.a)).ndim == 3
    gaps = [
        transfer_gap(host_system(reduced, i if batched else None), ref_results[i][1])
        for i in range(min(count, 4))
    ]
    out["reduced_transfer_gap"] = max(gaps)
    if ref_name == "slycot":
        out["slycot_orders"] = sorted({int(r[2]) for r in ref_results})
    else:
        out["scipy_factors"] = sorted({str(r[2]) for r in ref_results})
    out["hsv_goal_met"] = bool(out["numpy"]["max_abs_over_s1"] <= HSV_TOL)
    out["real_output"] = real_output
    return out


def measure_case(
    label: str,
    sys: cc.DiagonalStateSpace,
    rank: int,
    real_output: bool,
    cfg: Config,
    predictor: Predictor,
    rng: np.random.Generator,
    *,
    subset: int | None = None,
) -> dict[str, Any]:
    """Time ours and the references on one (batched) system and check the HSVs."""
    busy_before = GATE.wait()
    members = dense_members(sys, real_output)
    n = members[0].a.shape[-1]
    batch = tuple(int(s) for s in sys.poles.shape[:-1])
    io = int(sys.b.shape[-1])
    runs = run_ours(sys, rank, real_output, cfg)
    times: dict[str, Timing | None] = {k: v[0] for k, v in runs.items()}
    notes: dict[str, str] = {}
    results: dict[str, list[Any]] = {}
    refs = ("scipy", "slycot") if real_output and ab09ad is not None else ("scipy",)
    for ref in refs:
        key = f"{ref}/{real_output}/{io}/{len(members)}"
        timing, res, note = run_reference(ref, members, rank, subset, cfg, predictor, key, n)
        times[ref], results[ref] = timing, res
        if note:
            notes[ref] = note
    if not real_output:
        notes["slycot"] = "N/A: AB09AD is real-only"
    floor = svd_floor(n, batch, cfg, rng)
    ref_name = "slycot" if results.get("slycot") else "scipy"
    case = {
        "case": label,
        "n": n,
        "complex_poles_per_layer": int(sys.poles.shape[-1]),
        "io": io,
        "batch": batch,
        "rank": rank,
        "real_output": real_output,
        "times": {k: None if v is None else v.as_dict() for k, v in times.items()},
        "svd_floor": floor.as_dict(),
        "ratios": ratios(times, floor),
        "accuracy": accuracy(runs, results.get(ref_name, []), ref_name, real_output),
        "notes": notes,
        "others_cpu_before": busy_before,
    }
    if results.get("scipy") and ref_name == "slycot":
        case["accuracy_vs_scipy"] = accuracy(runs, results["scipy"], "scipy", real_output)
    report_progress(case)
    return case


def report_progress(case: dict[str, Any]) -> None:
    """One line per case on stderr."""
    t = case["times"]
    parts = [f"{k}={v['seconds']:.4g}s" for k, v in t.items() if v is not None]
    err = case["accuracy"].get("numpy", {}).get("max_abs_over_s1")
    print(
        f"[{case['case']}] n={case['n']} io={case['io']} r={case['rank']} "
        f"{' '.join(parts)} hsv_err={err}",
        file=sys.stderr,
        flush=True,
    )


def large_layer_cases(cfg: Config, predictor: Predictor) -> list[dict[str, Any]]:
    """Regime 1: one layer, real-output (vs SciPy and slycot) and complex (vs SciPy)."""
    cases = []
    for io in cfg.io_sizes:
        for n in cfg.sizes:
            rng = np.random.default_rng([cfg.seed, n, io])
            sys = lru_layer(rng, n // 2, io)
            rank = cc.select_rank(cc.hankel_singular_values(sys, real_output=True), tau=cfg.tau)
            cases.append(measure_case("LRU, real output", sys, rank, True, cfg, predictor, rng))
            csys = lru_layer(rng, n, io)
            crank = cc.select_rank(cc.hankel_singular_values(csys), tau=cfg.tau)
            cases.append(measure_case("LRU, complex", csys, crank, False, cfg, predictor, rng))
    return cases


def batched_cases(cfg: Config, predictor: Predictor) -> list[dict[str, Any]]:
    """Regime 2: Mamba-like SISO channels and a batch of large layers, batched vs looped."""
    rng = np.random.default_rng([cfg.seed, 2])
    channels = mamba_channels(rng, cfg.channels, cfg.channel_states)
    cases = [
        measure_case(
            "Mamba channels",
            channels,
            cfg.channel_rank,
            True,  # real system: real_output is a no-op, and slycot applies
            cfg,
            predictor,
            rng,
            subset=cfg.loop_subset_channels,
        )
    ]
    layers = lru_layer(rng, cfg.layer_n // 2, cfg.layer_io, (cfg.layers,))
    rank = max(
        cc.select_rank(h, tau=cfg.tau) for h in cc.hankel_singular_values(layers, real_output=True)
    )
    cases.append(
        measure_case(
            "LRU layers, real output",
            layers,
            rank,
            True,
            cfg,
            Predictor(float("inf")),
            rng,
            subset=cfg.loop_subset_layers,
        )
    )
    return cases


# --------------------------------------------------------------------------------------------
# Reporting


def machine_info() -> dict[str, Any]:
    """CPU, thread and library versions."""
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "processor": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "slycot": getattr(slycot, "__version__", None),
        "compressm_core": cc.__version__,
        "load_average_start": list(os.getloadavg()),
    }


def _fmt_time(t: dict[str, Any] | None, note: str | None = None) -> str:
    if t is None:
        return "N/A" if note and note.startswith("N/A") else "skipped"
    s = f"{t['seconds']:.3g}"
    if t.get("extrapolated"):
        s += f" (extrap. {t['members_timed']}/{t['members_total']})"
    return s


def _fmt_ratio(*values: float | None) -> str:
    return " / ".join("–" if v is None else f"{v:.2f}" for v in values)


def _fmt_err(acc: dict[str, Any]) -> tuple[str, str]:
    if acc.get("reference") is None:
        return "–", "–"
    e = acc["numpy"]
    ref = acc["reference"]
    return f"{e['max_abs_over_s1']:.1e} ({ref})", f"{e['max_rel_significant']:.1e}"


def _busy(c: dict[str, Any]) -> bool:
    timings = [*c["times"].values(), c["svd_floor"]]
    return any(t is not None and t.get("disturbed") for t in timings)


def _case_name(c: dict[str, Any], *, mark: bool = False) -> str:
    batch = f"{c['batch'][0]} × " if c["batch"] else ""
    flag = " †" if mark and _busy(c) else ""
    return f"{batch}{c['case']}{flag}"


def markdown_table(cases: list[dict[str, Any]]) -> str:
    """The results as one markdown table."""
    head = (
        "| case | n | m = p | r | ours NumPy [s] | ours torch [s] | SciPy [s] | slycot [s] "
        "| SciPy / ours (np / torch) | slycot / ours (np / torch) | SVD floor [s] "
        "| ours / floor (np / torch) | max abs HSV err / σ₁ | max rel HSV err (σ > 1e-6 σ₁) |"
    )
    lines = [head, "|" + "---|" * 14]
    for c in cases:
        t, r, notes = c["times"], c["ratios"], c["notes"]
        abs_err, rel_err = _fmt_err(c["accuracy"])
        row = [
            _case_name(c, mark=True),
            str(c["n"]),
            str(c["io"]),
            str(c["rank"]),
            _fmt_time(t["ours_numpy"]),
            _fmt_time(t["ours_torch"]),
            _fmt_time(t.get("scipy"), notes.get("scipy")),
            _fmt_time(t.get("slycot"), notes.get("slycot", "N/A")),
            _fmt_ratio(r["scipy_over_ours_numpy"], r["scipy_over_ours_torch"]),
            _fmt_ratio(r["slycot_over_ours_numpy"], r["slycot_over_ours_torch"]),
            f"{c['svd_floor']['seconds']:.3g}",
            _fmt_ratio(r["ours_numpy_over_svd_floor"], r["ours_torch_over_svd_floor"]),
            abs_err,
            rel_err,
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def goals(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check the stated goals against the measurements (no goal is assumed met)."""
    out = []
    key = [
        c
        for c in cases
        if c["case"] == "LRU, real output" and not c["batch"] and c["n"] == 512 and c["io"] == 256
    ]
    for c in key:
        r = c["ratios"]
        for backend in ("numpy", "torch"):
            for ref in ("scipy", "slycot"):
                v = r[f"{ref}_over_ours_{backend}"]
                out.append(_goal(f"n=512, m=p=256: {ref} / ours ({backend}) >= 4", v, 4.0, True))
            v = r[f"ours_{backend}_over_svd_floor"]
            out.append(_goal(f"n=512, m=p=256: ours ({backend}) / SVD floor <= 3", v, 3.0, False))
            secs = c["times"][f"ours_{backend}"]["seconds"]
            out.append(
                _goal(f"n=512, m=p=256: paper's ~3 s / ours ({backend}) >= 1", 3.0 / secs, 1, True)
            )
    for c in cases:
        if not c["batch"]:
            continue
        for backend in ("numpy", "torch"):
            for ref in ("scipy", "slycot"):
                v = c["ratios"][f"{ref}_over_ours_{backend}"]
                if v is not None:
                    label = f"{_case_name(c)}: looped {ref} / batched ours ({backend}) >= 50"
                    out.append(_goal(label, v, 50.0, True))
    for c in cases:
        acc = c["accuracy"]
        if acc.get("reference") == "slycot":
            v = acc["numpy"]["max_abs_over_s1"]
            label = f"{_case_name(c)} n={c['n']} m={c['io']}: HSV err vs slycot <= 1e-9"
            out.append(_goal(label, v, HSV_TOL, False))
    return out


def _goal(label: str, value: float | None, target: float, at_least: bool) -> dict[str, Any]:
    met = None if value is None else (value >= target if at_least else value <= target)
    return {"goal": label, "measured": value, "target": target, "met": met}


def markdown_report(result: dict[str, Any]) -> str:
    """Table, goals and notes as a markdown document body."""
    info = result["machine"]
    lines = [
        f"Float64, CPU: {info['processor']}, {info['usable_cpus']} cores, torch threads "
        f"{info['torch_threads']}; NumPy {info['numpy']}, SciPy {info['scipy']}, torch "
        f"{info['torch']}, slycot {info['slycot']}. Times are best of k wall-clock seconds "
        "for the whole case (HSVs + balanced truncation); ratios are reference time / our time.",
        "",
        markdown_table(result["cases"]),
        "",
        "Goals (measured; a miss is reported, not hidden):",
        "",
    ]
    for g in result["goals"]:
        mark = {True: "met", False: "MISSED", None: "not measured"}[g["met"]]
        value = "–" if g["measured"] is None else f"{g['measured']:.3g}"
        lines.append(f"- {g['goal']}: {value} ({mark})")
    lines += ["", *(f"- {note}" for note in result["notes"])]
    if any(_busy(c) for c in result["cases"]):
        lines.append(
            f"- †: other processes took more than {BUSY_THRESHOLD:.0%} of the CPUs during every "
            "run of at least one measurement of this row; its times are less reliable."
        )
    return "\n".join(lines) + "\n"


NOTES = [
    "LRU, real output: n real states = n/2 complex poles; ours on the diagonal n/2-state system "
    "with real_output=True, SciPy and slycot on the dense real n-state realization.",
    "LRU, complex: the paper's mode, ours real_output=False on n complex states; SciPy on the "
    "dense complex system; slycot is real-only.",
    "Mamba channels: SISO real diagonal channels, one batched call of ours vs loops over "
    "channels.",
    "Batched layers: one batched call of ours vs loops over layers; a loop over a subset is "
    "extrapolated linearly to all members and marked 'extrap. k/N'.",
    "SVD floor: numpy.linalg.svd (compute_uv=True) of a random complex n x n matrix (batched "
    "like the case).",
    "HSV errors: ours (NumPy) against slycot where it applies, else against the SciPy path; "
    "'reduced_transfer_gap' in the JSON compares the reduced models' frequency responses.",
]


def update_docs(table: str) -> None:
    """Replace the text between the markers in docs/benchmarks.md, if both exist."""
    if not DOCS_PAGE.exists():
        print(f"{DOCS_PAGE.relative_to(ROOT)} does not exist yet; skipped.", file=sys.stderr)
        return
    text = DOCS_PAGE.read_text()
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start < 0 or end < start:
        print(f"Markers not found in {DOCS_PAGE.relative_to(ROOT)}; skipped.", file=sys.stderr)
        return
    head = text[: start + len(START_MARKER)]
    DOCS_PAGE.write_text(head + "\n" + table.rstrip() + "\n" + text[end:])
    print(f"Updated {DOCS_PAGE.relative_to(ROOT)}.", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Main


def warm_up(cfg: Config) -> None:
    """Run every implementation once on a small system (library loading, thread pools)."""
    rng = np.random.default_rng(123)
    sys = lru_layer(rng, 8, 2)
    fast = replace(cfg, budget_s=0.0, max_repeats=1)
    run_ours(sys, 4, True, fast)
    run_ours(sys, 4, False, fast)
    member = dense_members(sys, True)[0]
    scipy_path(member, 4)
    if ab09ad is not None:
        slycot_path(member, 4)
    svd_floor(16, (), fast, rng)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke test")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default benchmarks/results, benchmarks/results/quick with --quick)",
    )
    parser.add_argument("--sizes", type=int, nargs="+", help="override the layer sizes n")
    parser.add_argument("--io", type=int, nargs="+", help="override m = p of the layers")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=None,
        metavar="SECONDS",
        help="before each case wait up to SECONDS for other processes to leave the CPUs "
        "(at most 6 x SECONDS in all; default 15 per case and 90 in all on a full run, 0 "
        "with --quick)",
    )
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.sizes:
        cfg = replace(cfg, sizes=tuple(args.sizes))
    if args.io:
        cfg = replace(cfg, io_sizes=tuple(args.io))
    if args.wait_idle is not None:
        cfg = replace(cfg, idle_wait_s=args.wait_idle, idle_wait_total_s=6 * args.wait_idle)
    GATE.per_case_s, GATE.left_s = cfg.idle_wait_s, cfg.idle_wait_total_s
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(cores or 1)
    info = machine_info()
    start = time.perf_counter()
    warm_up(cfg)
    predictor = Predictor(cfg.ref_limit_s)
    cases = large_layer_cases(cfg, predictor) + batched_cases(cfg, predictor)
    info["load_average_end"] = list(os.getloadavg())
    result = {
        "machine": info,
        "config": dict(vars(cfg)),
        "mode": "quick" if args.quick else "full",
        "wall_seconds": time.perf_counter() - start,
        "cases": cases,
        "notes": NOTES,
    }
    result["goals"] = goals(cases)
    out = args.out or ROOT / "benchmarks" / "results" / ("quick" if args.quick else "")
    write_outputs(result, out, update=not (args.no_docs or args.quick))
    return result


def write_outputs(result: dict[str, Any], out: Path, *, update: bool) -> None:
    """JSON and markdown under ``out``; the docs table on a full run."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "core_hsv.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    report = markdown_report(result)
    (out / "core_hsv.md").write_text("# compressm_core: HSVs + balanced truncation\n\n" + report)
    print(report)
    if update:
        update_docs(report)
    print(
        f"Wrote {out / 'core_hsv.json'} and {out / 'core_hsv.md'} "
        f"({result['wall_seconds']:.0f} s).",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
