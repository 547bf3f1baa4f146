#!/usr/bin/env bash
# The one command a lent GPU ran to make monuseg-adm64 (README.md beside this file): measure the
# loop against the bare forward+backward, then train for the time box and export shards.
#   OUT=/some/folder bash models/teacher/train-adm64.sh
set -euo pipefail
OUT=${OUT:-/tmp/adm64}
PARAMS=$(realpath "${PARAMS:-models/teacher/monuseg-adm64.params.yaml}")
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20  # a progress line every 20 s in the log
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/bench.txt" || true
python3 benchmarks/pretrain.py --config gpu64 --batch 32 --steps 30 --repeats 2 --device ${DEVICE:-cuda} ${BENCH_ARGS:-} | tee -a "$OUT/bench.txt"
python3 benchmarks/pretrain.py --config gpu64 --batch 64 --steps 20 --repeats 2 --device ${DEVICE:-cuda} ${BENCH_ARGS:-} | tee -a "$OUT/bench.txt"
python3 -m stages.cli pretrain -p "$PARAMS" 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | tee "$OUT/pretrain.log"
cd models/pretrain
cp "$PARAMS" params.yaml
ls -la
cp teacher-0000*-of-*.safetensors "$OUT"/ 2>/dev/null || cp teacher.safetensors "$OUT"/
tar cf "$OUT/records.tar" $(ls teacher.json teacher.safetensors.index.json samples.png loss.tsv summary.json state.json params.yaml 2>/dev/null)
ls -la "$OUT"
