"""Importing and using the core on NumPy arrays imports neither torch nor JAX; a JAX run of the
CLI imports no torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def test_core_imports_no_framework() -> None:
    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        import compressm_core as cc
        sys_ = cc.DiagonalStateSpace(np.array([0.5, 0.2j]), np.ones((2, 1)), np.ones((1, 2)))
        res = cc.balanced_truncation(sys_, 1)
        cc.rediagonalize(res.system)
        cc.solve_discrete_lyapunov(np.eye(2) * 3.0, np.eye(2))
        cc.h_infinity_norm(sys_, res.system)
        from compressm_core import parameterizations as cp
        cp.lru_to_poles(*cp.lru_from_poles(sys_.poles))
        cp.inverse_zoh(*cp.zoh(np.array([-0.5 + 1j]), np.ones((1, 1)), 0.1), 0.1)
        cp.hippo_n_eigenpairs(4)
        bad = [m for m in ("torch", "jax", "flax", "cupy") if m in sys.modules]
        assert not bad, bad
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_jax_backend_run_imports_no_torch(tmp_path) -> None:
    """``compressm train --backend jax`` trains, reduces and writes its files without torch."""
    for name in ("jax", "flax", "optax", "sklearn"):
        pytest.importorskip(name)
    code = textwrap.dedent(
        f"""
        import sys
        from compressm_cli.app import main
        argv = ["train", "--backend", "jax", "--task", "digits", "--steps", "4"]
        argv += ["--eval-every", "2", "--d-state", "4", "--num-reductions", "1"]
        argv += ["--no-progress", "--out", {str(tmp_path / "run")!r}]
        assert main(argv) == 0
        assert "compressm_cli.training_jax" in sys.modules
        bad = [m for m in ("torch", "compressm_torch") if m in sys.modules]
        assert not bad, bad
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
