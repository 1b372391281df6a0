"""The GPU check suite (``benchmarks/gpu_suite.py``) cannot rot while no GPU is at hand.

One ``--smoke`` run (toy sizes, CPU) must record every part as ``ok`` or ``skipped`` with a
reason, fill each part's required keys, and produce figures that agree with what the
measurements define (HSVs equal to SciPy's, the ranks the reductions were asked for, the
time ratio of the two training arms). The orchestration is checked on small stand-in parts:
a part that hangs, crashes, skips or leaves keys out is recorded as such and keeps what it
measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
_spec = importlib.util.spec_from_file_location("gpu_suite", BENCHMARKS / "gpu_suite.py")
assert _spec is not None
assert _spec.loader is not None
gpu_suite = importlib.util.module_from_spec(_spec)
sys.modules["gpu_suite"] = gpu_suite  # dataclasses look their module up
_spec.loader.exec_module(gpu_suite)


def _env(*extra: Path) -> dict[str, str]:
    paths = [str(p) for p in (*extra, ROOT / "src")]
    old = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths + ([old] if old else []))}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("gpu_suite")
    cmd = [sys.executable, str(BENCHMARKS / "gpu_suite.py"), "--smoke", "--jobs", "2"]
    cmd += ["--device", "cpu", "--out", str(out)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=400, env=_env(), check=False
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "gpu_suite.json").read_text())
    return report, (out / "gpu_suite.md").read_text()


def test_every_part_reports_ok_or_skipped_with_its_keys(smoke: tuple[dict[str, Any], str]):
    report, text = smoke
    assert report["schema"] == gpu_suite.SCHEMA
    assert report["smoke"] is True
    assert list(report["parts"]) == [p.name for p in gpu_suite.PARTS]
    for part in gpu_suite.PARTS:
        r = report["parts"][part.name]
        assert r["status"] in ("ok", "skipped"), (part.name, r.get("error"), r["log_tail"])
        assert 0 < r["seconds"] <= r["limit_s"] + 15
        if r["status"] == "skipped":
            assert r["reason"]
        if r["status"] == "ok" or r["result"].get("implementation", {}).get("stand_in"):
            for key in part.required:
                gpu_suite.lookup(r["result"], key)  # KeyError if missing
        assert f"| {part.name} | {r['status']} |" in text
        assert f"## {part.name}" in text  # every part's figures, stand-ins' too
        assert "not formatted" not in text


def test_smoke_figures_agree_with_their_definitions(smoke: tuple[dict[str, Any], str]):
    parts = smoke[0]["parts"]
    core = parts["core"]["result"]
    assert core["channels"]["hsv_torch_vs_scipy"]["max_abs_over_s1"] < 1e-10
    assert core["channels"]["hsv_numpy_vs_scipy"]["max_abs_over_s1"] < 1e-10
    assert core["lru_layer"]["hsv_torch_vs_numpy"]["max_abs_over_s1"] < 1e-10
    ratio = core["channels"]["scipy_over_torch"]
    assert ratio == pytest.approx(core["channels"]["scipy_loop_ms"] / core["channels"]["torch_ms"])

    lru = parts["lru"]["result"]
    big, small = lru["config"]["big"], lru["config"]["small"]
    for run in lru["event"]["runs"]:
        assert run["ranks"] == [[big, small]]
        assert run["status"] == ["reduced"]
        assert len(run["layers"]) == lru["config"]["layers"]
    fp32 = lru["steps"]["fp32"]
    assert fp32["ratio"] == pytest.approx(
        fp32[str(big)]["median_ms"] / fp32[str(small)]["median_ms"]
    )

    e2e = parts["e2e"]["result"]
    full, cut = e2e["arms"]["full"], e2e["arms"]["compressm"]
    assert set(full["state_sizes"].values()) == {big}
    assert set(cut["state_sizes"].values()) == {big // 4}  # two cuts of half
    assert {(e["old"], e["new"]) for e in cut["events"]} == {(big, big // 2), (big // 2, big // 4)}
    assert e2e["ratio"] == pytest.approx(cut["seconds"] / full["seconds"])
    assert full["finite"]
    assert cut["finite"]
    assert math.isfinite(cut["final_loss"])

    for kind in ("mamba2", "mamba1"):
        r = parts[kind]
        assert r["status"] == "skipped"
        assert "mamba_ssm" in r["reason"]
        res = r["result"]
        assert res["implementation"]["stand_in"] is True
        ctl, cfg = res["controller"], res["config"]
        assert {e["new"] for e in ctl["events"]} == {cfg["reduce_to"]}
        assert {e["step"] for e in ctl["events"]} == {cfg["reduce_at"]}
        assert set(ctl["state_sizes"].values()) == {cfg["reduce_to"]}
        assert ctl["loss_finite_after"] is True

    event = parts["jax_event"]
    if event["status"] == "ok":
        phases = event["result"]["phases"]
        cfg = event["result"]["config"]
        assert phases["ranks"] == [[cfg["from"], cfg["to"]]]
        assert phases["traces"] == 2  # one at the start, one after the event


# --- the orchestration, on stand-in parts ----------------------------------------------------

FAKE_PARTS = """
import time
from _gpu_common import Skip

def hangs(cfg, rec):
    rec["before"] = 1.5
    print("measuring the slow thing", flush=True)
    time.sleep(60)

def crashes(cfg, rec):
    rec["before"] = 2.5
    raise ValueError("boom at step 3")

def skips(cfg, rec):
    raise Skip("no frobnicator here")

def incomplete(cfg, rec):
    rec["a"] = {"b": 1}
"""


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, function: str, limit: float) -> dict:
    (tmp_path / "fake_parts.py").write_text(FAKE_PARTS)
    for key, value in _env(tmp_path).items():
        monkeypatch.setenv(key, value)
    part = gpu_suite.Part(function, "fake_parts", function, "unused", limit, ("a.b", "a.c"))
    args = argparse.Namespace(device="cpu", smoke=True)
    record: dict[str, Any] = gpu_suite.run_part(part, limit, args, tmp_path, io.StringIO())
    return record


def test_a_part_that_hangs_is_stopped_and_keeps_what_it_measured(tmp_path, monkeypatch):
    r = _run(tmp_path, monkeypatch, "hangs", 3.0)
    assert r["status"] == "timeout"
    assert "timed out after 3 s" in r["error"]
    assert "measuring the slow thing" in r["error"]
    assert r["result"] == {"before": 1.5}
    assert 3.0 <= r["seconds"] < 30


def test_a_part_that_crashes_is_recorded_with_its_error_line(tmp_path, monkeypatch):
    r = _run(tmp_path, monkeypatch, "crashes", 30.0)
    assert r["status"] == "failed"
    assert r["error"] == "ValueError: boom at step 3"
    assert r["returncode"] != 0
    assert r["result"] == {"before": 2.5}


def test_a_part_that_skips_gives_its_reason(tmp_path, monkeypatch):
    r = _run(tmp_path, monkeypatch, "skips", 30.0)
    assert r["status"] == "skipped"
    assert r["reason"] == "no frobnicator here"


def test_a_part_that_leaves_out_required_keys_fails(tmp_path, monkeypatch):
    r = _run(tmp_path, monkeypatch, "incomplete", 30.0)
    assert r["status"] == "failed"
    assert r["missing"] == ["a.c"]
    assert r["error"] == "result lacks a.c"


def test_jobs_above_one_only_with_smoke():
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_suite.py"), "--jobs", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
        check=False,
    )
    assert proc.returncode != 0
    assert "`--jobs` must be 1, or more only with --smoke; got 2." in proc.stderr
