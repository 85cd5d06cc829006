#!/usr/bin/env bash
# Download the wheels the GPU machine lacks into .whl/ (git-ignored), for bench/gpu_run.sh to install.
# The GPU image has torch, triton, transformers 5.17, accelerate and psutil, but no trl or liger-kernel.
#   bench/fetch_wheels.sh            # trl, datasets (+ dill, multiprocess, fsspec), peft, liger-kernel: ~4 MB
#   bench/fetch_wheels.sh --qlora    # + bitsandbytes (43 MB) for the QLoRA row
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=(trl==1.15.0 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.2.0 peft==0.21.2
        liger-kernel==0.8.5)
[[ "${1:-}" == "--qlora" ]] && wheels+=(bitsandbytes==0.50.2)
mkdir -p .whl
# The GPU machine runs Python 3.12 on x86-64.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${wheels[@]}"
ls -l .whl
