#!/usr/bin/env bash
# The Llama-3-8B training-speed benchmark on one GPU, in one command of about 8 minutes:
# install the carried wheels (bench/fetch_wheels.sh), then baseline and every fast-path row in one
# process. Results go to $OUT (default bench/out): 8b.json, 8b.md (the table for RESULTS.md), log, gpu.txt.
# Rehearse it on a CPU with: SKIP_WHEELS=1 SHAPE=tiny OUT=/tmp/out bench/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
if [[ -z "${SKIP_WHEELS:-}" ]] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
fi
python3 -c "import torch, transformers, trl, peft; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
# No new row after 6 minutes; the run is stopped at 9 (the JSON keeps every finished row).
timeout 540 python3 bench/train_speed.py --shape "${SHAPE:-llama3-8b}" --steps "${STEPS:-6}" --warmup 2 \
  --time-budget "${TIME_BUDGET:-360}" --workdir /tmp --json "$OUT/8b.json" --markdown "$OUT/8b.md" \
  ${ROWS:+--rows "$ROWS"} 2>&1 | tee "$OUT/log"
status=${PIPESTATUS[0]}
cat "$OUT/8b.md" 2>/dev/null
exit "$status"
