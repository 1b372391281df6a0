"""Parts of ``gpu_suite.py``: Mamba layers against their state size, and CompreSSM on them.

- :func:`mamba`: :class:`compressm_torch.Mamba` (pure PyTorch) in a pre-norm residual block:
  training step and forward against ``d_state``, and one :class:`SelectiveRecorder` statistics
  update as a share of a step (``torch_mamba.step_time``).
- :func:`mamba2` / :func:`mamba1`: ``mamba_ssm``'s ``Mamba2`` (Triton SSD kernels) and
  ``Mamba`` (Mamba-1, the compiled ``selective_scan_cuda``): training step against ``d_state``
  and the controller cutting every layer in the middle of a short training run (loss finite
  after). Without ``mamba_ssm`` the part is skipped with the import error as its reason; with
  ``--smoke`` it then still runs its code path on CPU stand-ins (``_mamba_stand_in``) and
  records those results beside the reason.
"""

from __future__ import annotations

import importlib
import importlib.util
import statistics
from typing import Any

from _gpu_common import (
    Record,
    Skip,
    autocast,
    finite,
    progress,
    time_calls,
    time_once,
    torch_device,
    torch_env,
    torch_precision,
)

__all__ = ["mamba", "mamba1", "mamba2", "mamba_markdown", "mamba_ssm_markdown"]

OURS: dict[str, dict[str, Any]] = {
    "full": {"d_model": 768, "batch": 8, "length": 1024, "d_states": [128, 64, 32, 16]},
    "smoke": {"d_model": 8, "batch": 2, "length": 16, "d_states": [8, 4]},
}
OURS_TIMING: dict[str, dict[str, Any]] = {
    "full": {"warmup": 2, "repeats": 5},
    "smoke": {"warmup": 1, "repeats": 2},
}
MAMBA_SSM: dict[str, dict[str, dict[str, Any]]] = {
    "mamba2": {
        "full": {
            "layers": 2, "d_model": 768, "batch": 8, "length": 2048, "headdim": 64,
            "d_states": [128, 16], "precision": "bf16", "warmup": 3, "repeats": 10,
            "train_steps": 20, "reduce_at": 10, "reduce_to": 16,
        },
        "smoke": {
            "layers": 2, "d_model": 16, "batch": 2, "length": 8, "headdim": 8,
            "d_states": [8, 4], "precision": "bf16", "warmup": 1, "repeats": 2,
            "train_steps": 6, "reduce_at": 3, "reduce_to": 4,
        },
    },
    "mamba1": {
        "full": {
            "layers": 1, "d_model": 768, "batch": 8, "length": 1024, "headdim": 0,
            "d_states": [128, 16], "precision": "fp32", "warmup": 2, "repeats": 5,
            "train_steps": 20, "reduce_at": 10, "reduce_to": 16,
        },
        "smoke": {
            "layers": 1, "d_model": 8, "batch": 2, "length": 16, "headdim": 0,
            "d_states": [8, 4], "precision": "fp32", "warmup": 1, "repeats": 2,
            "train_steps": 6, "reduce_at": 3, "reduce_to": 4,
        },
    },
}  # fmt: skip


def _key(cfg: dict[str, Any]) -> str:
    return "smoke" if cfg["smoke"] else "full"


# --------------------------------------------------------------------------------------------
# compressm_torch.Mamba


def mamba(cfg: dict[str, Any], rec: Record) -> None:
    """Training step and statistics update of ``compressm_torch.Mamba`` against ``d_state``."""
    from torch_mamba import step_time

    device = torch_device(cfg)
    shape, timing = OURS[_key(cfg)], OURS_TIMING[_key(cfg)]
    spec: dict[str, Any] = {"device": device.type, **shape, **timing}
    rec["env"] = torch_env(device)
    rec["config"] = spec
    rows: dict[str, Any] = {}
    with torch_precision("fp32"):
        for n in shape["d_states"]:
            got = step_time("ours", spec, n)
            step, fwd = got["step"]["seconds"], got["forward"]["seconds"]
            update = got["statistics_update"]["seconds"]
            one = got["statistics_update_one_sequence"]["seconds"]
            rows[str(n)] = {
                "step_ms": 1e3 * step,
                "forward_ms": 1e3 * fwd,
                "statistics_update_ms": 1e3 * update,
                "statistics_share_of_step": update / step,
                "statistics_one_sequence_ms": 1e3 * one,
                "all_step_ms": [1e3 * x for x in got["step"]["all_seconds"]],
            }
            progress(f"mamba: N = {n}: step {1e3 * step:.4g} ms, update {1e3 * update:.4g} ms")
            rec["d_states"] = rows
    big, small = (str(n) for n in (max(shape["d_states"]), min(shape["d_states"])))
    rec["speedup"] = rows[big]["step_ms"] / rows[small]["step_ms"]


def mamba_markdown(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    out = [
        f"`compressm_torch.Mamba` in a pre-norm residual block, d_model {c['d_model']}, batch "
        f"{c['batch']}, length {c['length']}, fp32 ({r['env']['device']}):",
        "",
        "| d_state | step [ms] | forward [ms] | statistics update [ms] | update / step | "
        "update, 1 sequence [ms] |",
        "|---|---|---|---|---|---|",
    ]
    for n, row in r.get("d_states", {}).items():
        out.append(
            f"| {n} | {row['step_ms']:.4g} | {row['forward_ms']:.4g} | "
            f"{row['statistics_update_ms']:.4g} | {row['statistics_share_of_step']:.1%} | "
            f"{row['statistics_one_sequence_ms']:.4g} |"
        )
    if "speedup" in r:
        out += ["", f"Step at the largest over the smallest d_state: {r['speedup']:.2f}x."]
    return out


# --------------------------------------------------------------------------------------------
# mamba_ssm


def _load(kind: str) -> tuple[type, dict[str, Any]]:
    """The real layer class of ``kind`` and what was loaded; ImportError when unavailable."""
    if kind == "mamba2":
        module = importlib.import_module("mamba_ssm.modules.mamba2")
        info: dict[str, Any] = {
            "causal_conv1d": importlib.util.find_spec("causal_conv1d") is not None
        }
        cls: type = module.Mamba2
    else:
        try:
            importlib.import_module("selective_scan_cuda")
        except ImportError as exc:
            msg = (
                f"selective_scan_cuda (Mamba-1's CUDA kernels) is not built ({exc}); build it "
                "with MAMBA_KEEP_CUDA_BUILD=TRUE (benchmarks/gpu_run.sh)"
            )
            raise ImportError(msg) from exc
        cls = importlib.import_module("mamba_ssm.modules.mamba_simple").Mamba
        info = {}
    package = importlib.import_module("mamba_ssm")
    info["version"] = str(getattr(package, "__version__", "unknown"))
    info["path"] = str(getattr(package, "__file__", ""))
    return cls, info


def _model(kind: str, cls: type, s: dict[str, Any], d_state: int, device: Any) -> Any:
    import torch

    from torch_mamba import Block

    torch.manual_seed(0)
    blocks = []
    for _ in range(s["layers"]):
        if kind == "mamba2":
            mixer = cls(
                d_model=s["d_model"],
                d_state=d_state,
                headdim=s["headdim"],
                use_mem_eff_path=s["mem_eff_path"],
                device=device,
            )
        else:
            mixer = cls(d_model=s["d_model"], d_state=d_state, device=device)
        blocks.append(Block(mixer, s["d_model"]))
    return torch.nn.Sequential(*blocks).to(device)


def _mamba_ssm(kind: str, cfg: dict[str, Any], rec: Record) -> None:
    import torch

    from compressm_torch import CompreSSM, state_sizes

    device = torch_device(cfg)
    s = dict(MAMBA_SSM[kind][_key(cfg)])
    rec["env"] = torch_env(device)
    reason = None
    try:
        cls, info = _load(kind)
    except Exception as exc:  # ImportError, or a kernel module failing at import
        reason = f"mamba_ssm {kind} not importable: {type(exc).__name__}: {exc}"
        if not cfg["smoke"]:
            raise Skip(reason) from exc
        stand_in = importlib.import_module("_mamba_stand_in")
        cls = stand_in.Mamba2 if kind == "mamba2" else stand_in.Mamba
        info = {"stand_in": True}
        progress(f"{kind}: {reason}; smoke run on the stand-in")
    s["mem_eff_path"] = bool(info.get("causal_conv1d", False))
    rec["implementation"] = {"class": f"{cls.__module__}.{cls.__qualname__}", **info}
    rec["config"] = s
    x = torch.randn(s["batch"], s["length"], s["d_model"], device=device)

    def make_step(model: Any, opt: Any) -> Any:
        def step() -> Any:
            opt.zero_grad(set_to_none=True)
            with autocast(s["precision"], device):
                loss = model(x).float().pow(2).mean()
            loss.backward()
            opt.step()
            return loss.detach()

        return step

    rows: dict[str, Any] = {}
    with torch_precision(s["precision"]):
        for n in s["d_states"]:
            model = _model(kind, cls, s, n, device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            rows[str(n)] = time_calls(make_step(model, opt), device, s["warmup"], s["repeats"])
            progress(f"{kind}: N = {n}: {rows[str(n)]['median_ms']:.4g} ms")
            rec["d_states"] = rows
            del model, opt
        big = max(s["d_states"])
        model = _model(kind, cls, s, big, device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ctl = CompreSSM(
            model,
            opt,
            total_steps=s["train_steps"],
            mode="fixed",
            fraction=1 - s["reduce_to"] / big,
            reduction_steps=[s["reduce_at"]],
            calibration_steps=2,
        )
        losses, step_ms, events = [], [], []
        step = make_step(model, opt)
        for _ in range(s["train_steps"]):
            ms, loss = time_once(step, device)
            step_ms.append(ms)
            losses.append(float(loss))
            events += ctl.step()
    after = step_ms[s["reduce_at"] + 1 :]  # the first step after the cut is left out
    rec["controller"] = {
        "events": [
            {
                "step": e.step,
                "layer": e.layer,
                "old": e.old_rank,
                "new": e.new_rank,
                "status": e.status,
                "seconds": e.seconds,
            }
            for e in events
        ],
        "state_sizes": state_sizes(model),
        "losses": losses,
        "loss_finite_after": all(finite(v) for v in losses[s["reduce_at"] :]),
        "step_ms": step_ms,
        "step_after_ms": statistics.median(after) if after else None,
    }
    progress(f"{kind}: controller events {len(events)}, sizes {state_sizes(model)}")
    if reason is not None:
        raise Skip(reason)


def mamba2(cfg: dict[str, Any], rec: Record) -> None:
    """mamba_ssm ``Mamba2``: step against ``d_state`` and a controller cut mid-training."""
    _mamba_ssm("mamba2", cfg, rec)


def mamba1(cfg: dict[str, Any], rec: Record) -> None:
    """mamba_ssm ``Mamba`` (Mamba-1): step against ``d_state`` and a controller cut."""
    _mamba_ssm("mamba1", cfg, rec)


def mamba_ssm_markdown(r: dict[str, Any]) -> list[str]:
    c, impl = r["config"], r["implementation"]
    label = (
        "stand-in (not mamba_ssm; times mean nothing)"
        if impl.get("stand_in")
        else (f"mamba_ssm {impl.get('version')}")
    )
    cells = ", ".join(
        f"{n}: {row['median_ms']:.4g} ms" for n, row in r.get("d_states", {}).items()
    )
    out = [
        f"`{impl['class']}` ({label}), {c['layers']} layer(s) in pre-norm residual blocks, "
        f"d_model {c['d_model']}, batch {c['batch']}, length {c['length']}, {c['precision']} "
        f"({r['env']['device']}); training step by d_state: {cells}."
    ]
    ctl = r.get("controller")
    if ctl is not None:
        cuts = sorted({(e["old"], e["new"], e["status"]) for e in ctl["events"]})
        after = ctl["step_after_ms"]
        out.append(
            f"Controller cut at step {c['reduce_at']} of {c['train_steps']}: {cuts}; loss "
            f"finite after: {ctl['loss_finite_after']}"
            + ("" if after is None else f"; step after the cut {after:.4g} ms")
            + "."
        )
    return out
