#!/usr/bin/env bash
# Run the GPU check suite on a lent GPU machine (docs/gpu.md), from the repository root there:
#
#     bash benchmarks/gpu_run.sh              # writes $OUT/gpu_suite.{json,md,log}
#
# It expects two ignored folders made beforehand by benchmarks/gpu_prepare.sh and carried with
# the working tree (both optional):
#   .whl/    wheels of pure-Python runtime dependencies the machine lacks (array-api-compat);
#            installed into /tmp/site, as the device notes say;
#   .mamba/  mamba_ssm's sources (mamba_ssm/ and csrc/ of github.com/state-spaces/mamba). A copy
#            in /tmp/mamba_src gets a minimal __init__.py (the package's own imports every
#            module, Mamba-3's too, eagerly), so that Mamba-2 runs on its Triton kernels without
#            the CUDA build. Mamba-1 needs the compiled selective_scan_cuda: with
#            MAMBA_KEEP_CUDA_BUILD=TRUE it is built with nvcc for this GPU's architecture only
#            into .mamba-build/ (minutes; kept there while the machine stays warm), else the
#            suite skips Mamba-1 with the reason.
#
# Environment: OUT (output folder; default benchmarks/results), PYTHON (default python3),
# GPU_SUITE_ARGS (more arguments for gpu_suite.py, e.g. "--parts core lru"),
# MAMBA_KEEP_CUDA_BUILD=TRUE, MAMBA_BUILD_TIMEOUT (seconds, default 420).
set -u
cd "$(dirname "$0")/.." || exit 1
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
paths="$PWD/src"

if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    paths="$paths:/tmp/site"
fi

if [ -d .mamba/mamba_ssm ]; then
    rm -rf /tmp/mamba_src && mkdir -p /tmp/mamba_src
    cp -r .mamba/mamba_ssm /tmp/mamba_src/
    version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' .mamba/mamba_ssm/__init__.py)
    cat >/tmp/mamba_src/mamba_ssm/__init__.py <<EOF
"""mamba_ssm ${version} from its sources: the layers are imported on first use only."""

__version__ = "${version}"


def __getattr__(name):
    if name == "Mamba2":
        from mamba_ssm.modules.mamba2 import Mamba2

        return Mamba2
    if name == "Mamba":
        from mamba_ssm.modules.mamba_simple import Mamba

        return Mamba
    raise AttributeError(name)
EOF
    paths="$paths:/tmp/mamba_src"
    if [ "${MAMBA_KEEP_CUDA_BUILD:-FALSE}" = TRUE ] && [ -d .mamba/csrc/selective_scan ]; then
        mkdir -p .mamba-build
        echo "building selective_scan_cuda (Mamba-1) into .mamba-build"
        timeout "${MAMBA_BUILD_TIMEOUT:-420}" "$py" - <<'EOF' || echo "selective_scan_cuda build failed or timed out"
import glob

import torch
from torch.utils.cpp_extension import load

src = ".mamba/csrc/selective_scan"
major, minor = torch.cuda.get_device_capability()
arch = f"{major}{minor}"
flags = [
    "-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math", "--threads", "4",
    "-gencode", f"arch=compute_{arch},code=sm_{arch}",
]
load(
    name="selective_scan_cuda",
    sources=[f"{src}/selective_scan.cpp", *sorted(glob.glob(f"{src}/selective_scan_*.cu"))],
    extra_cflags=["-O3", "-std=c++17"],
    extra_cuda_cflags=flags,
    extra_include_paths=[src],
    build_directory=".mamba-build",
    verbose=False,
)
print("selective_scan_cuda built")
EOF
    fi
    if compgen -G ".mamba-build/selective_scan_cuda*.so" >/dev/null; then
        paths="$paths:$PWD/.mamba-build"
    fi
fi

export PYTHONPATH="$paths${PYTHONPATH:+:$PYTHONPATH}"
# shellcheck disable=SC2086  # GPU_SUITE_ARGS holds several arguments
exec "$py" benchmarks/gpu_suite.py --out "${OUT:-benchmarks/results}" ${GPU_SUITE_ARGS:-}
