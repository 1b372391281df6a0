#!/usr/bin/env bash
# Make the ignored folders that benchmarks/gpu_run.sh uses on a GPU machine (docs/gpu.md), here,
# on a machine with pip (and git), from the repository root:
#
#     bash benchmarks/gpu_prepare.sh [MAMBA_SOURCE]
#
# .whl/    wheels, for CPython 3.12 on x86-64 Linux, of the pure-Python runtime dependencies
#          that the GPU image lacks: array-api-compat (the image has numpy, scipy, torch, jax,
#          flax, optax, einops and triton). WHEELS="name==version ..." replaces the list; the
#          default pins the version installed here.
# .mamba/  mamba_ssm/ and csrc/ of github.com/state-spaces/mamba, from MAMBA_SOURCE: a checkout,
#          or a bare git directory (its HEAD). Without it, .mamba/ is left as it is (the suite
#          then skips the mamba_ssm parts with the reason).
set -eu
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if [ -z "${WHEELS:-}" ]; then
    WHEELS="array-api-compat==$("$py" -c 'import importlib.metadata as m; print(m.version("array-api-compat"))')"
fi
rm -rf .whl && mkdir -p .whl
# shellcheck disable=SC2086  # WHEELS holds several requirements
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl $WHEELS
ls .whl
if [ $# -ge 1 ]; then
    rm -rf .mamba && mkdir -p .mamba
    if [ -d "$1/mamba_ssm" ]; then
        cp -r "$1/mamba_ssm" "$1/csrc" .mamba/
    else
        git --git-dir="$1" archive HEAD mamba_ssm csrc | tar -x -C .mamba
    fi
    du -sh .mamba
fi
