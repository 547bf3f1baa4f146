#!/usr/bin/env bash
# The one-GPU extraction measurement (docs/scale-out.md, "One GPU, used well").
#   bash benchmarks/extract_gpu.sh [OUT_DIR]      # needs data/prepared (textdiff prepare) and a CUDA torch
# Three runs of the paper's 256 ADM (random weights), bf16 autocast, batch 16, 128 images (the train
# split's images again and again): all timesteps in one forward (the CUDA default), one forward per
# timestep, and torch.compile. Each prints stage / teacher alone / bare forward image-timesteps/s.
set -uo pipefail
out=${1:-.}
export PYTHONUNBUFFERED=1
images=${IMAGES:-128}
peak=${PEAK_TFLOPS:-989}  # H100 SXM dense bf16 (NVIDIA's data sheet); an H200 has the same chip
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$out/device.txt"
echo "cpus $(nproc); temp dir: $(df -h "${TMPDIR:-/tmp}" | tail -1)" | tee -a "$out/device.txt"
python3 -c "import torch, zarr; print('torch', torch.__version__, 'zarr', zarr.__version__)" | tee -a "$out/device.txt"
run() {  # name, extra args
    local name=$1; shift
    timeout "${RUN_TIMEOUT:-140}" python3 benchmarks/extract.py --config paper --device cuda --autocast bfloat16 \
        --batch-size 16 --images "$images" --no-resume --throughput --peak-tflops "$peak" "$@" 2>&1 \
        | grep -v -E "img/s\]|it/s\]" | tee "$out/extract-$name.txt"
}
run fused
run per-step --fuse-steps no
RUN_TIMEOUT=${COMPILE_TIMEOUT:-200} run compiled --compile
