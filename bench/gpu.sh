#!/usr/bin/env bash
# The CUDA benchmarks in one call, for a session with one GPU (planned ~5 min on an H100, hard cap 7.5 min).
#
#   bash bench/gpu.sh            # from the repository root; sets PYTHONPATH=src itself
#
# Runs inputs, adapter, step (1B with an eager-attention baseline, and 7B Llama shapes), then, while time is left, step 7B with gradient
# checkpointing and step 1B with --compile. Writes to $OUT (or bench/out): <name>.json (the JSON object),
# <name>.log (stderr), RESULTS.md (the sections to paste into bench/RESULTS.md), nvidia-smi.txt, summary.txt.
# Each run has its own timeout, and a failed run does not stop the others.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/out}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"
START=$(date +%s)
DEADLINE=$((START + 450))
NOTE="bench/gpu.sh"

nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'gpu', torch.cuda.get_device_name(0))" \
    > "$OUT_DIR/versions.txt" 2>&1

run() {  # run NAME LIMIT_S ARGS... : one benchmark under `timeout`, skipped when too little time is left
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - $(date +%s)))
    if ((left < 40)); then
        echo "$name: skipped (${left}s left)" | tee -a "$OUT_DIR/summary.txt"
        return
    fi
    ((limit > left)) && limit=$left
    timeout "$limit" "$PY" -m ilora.cli.main bench "$@" --device cuda --json --note "$NOTE" \
        --results "$OUT_DIR/RESULTS.md" > "$OUT_DIR/$name.json" 2> "$OUT_DIR/$name.log"
    local rc=$?
    echo "$name: rc=$rc after $(($(date +%s) - START))s (limit ${limit}s)" | tee -a "$OUT_DIR/summary.txt"
}

run inputs 120 inputs
run adapter 60 adapter
run step-1b 100 step --shape 1b --eager-baseline
run step-7b 120 step --shape 7b
run step-7b-ckpt 90 step --shape 7b --gradient-checkpointing
run step-1b-compile 120 step --shape 1b --compile
echo "total $(($(date +%s) - START))s" | tee -a "$OUT_DIR/summary.txt"
