#!/usr/bin/env bash
# The CUDA benchmarks in one call, for a session with one GPU. The whole list takes about 19 min; nothing
# starts after the cap (default 300 s), so a plain call runs the first few and skips the rest (each skip
# says how to rerun it by name). Session 8 (H200 and H100): 153 s for the four 7B step runs of batch 32/16.
#
#   bash bench/gpu.sh                       # from the repository root; sets PYTHONPATH=src itself
#   bash bench/gpu.sh step-7b step-7b-ckpt  # only the named runs (a partial rerun)
#
# Runs, in this order: inputs, adapter, step-7b-b32 (the 7B shape, one length-grouped batch of 32 in one
# micro-batch, compiled decoder layers, no device syncs between the step's parts; ours only: its reference
# does not fit; 57 GiB on an H100), step-7b-b32-nodrop (the same with LoRA dropout 0: what dropout costs),
# step-7b-b32-shared and step-7b-b32-nodrop-shared (the same two, each with an ours_shared variant beside
# ours: q/k/v and gate/up adapters grouped, one dropout mask and one A product per input (share_adapter_inputs);
# each needs 200 s of the cap left to start; 57 s and 45 s on an H100), step-7b-b32-vs-research (101 s; the 7B
# step as each trains: ours and ours_shared as step-7b-b32-shared, the reference eager in micro-batches of 8, as
# iLoRA's LastFM script trains (45 GiB at 8; 16 would need ~77 of the H100's 79 GiB), on the same 32 samples: the ratio is one of samples/s; needs
# 200 s), step-7b-b32-shared-profiled (the
# first of those again, with a profile of ours_shared's step in profiles.txt; 76 s), step-7b-b128-m32-shared (the 7B
# config's whole optimizer step: 128 samples in 4 micro-batches of 32, then one AdamW step), step-7b-b40-shared (step-7b-b32-shared at
# batch 40: 68 GiB for ours; 62 s), step-7b-b32-cycled (batch 32, cycling through 4 length-grouped batches
# of different lengths in a shuffled order, as training meets them: shape changes, recompilation in the
# warm-up, dynamic-shape kernels; 90 s on an H100), step-7b-b32-cycled-shared (the same with ours_shared; 117 s),
# step-7b-b16-pipelined (the same at batch 16 with the reference, about 100 GiB: an H200; profiled),
# step-7b-b16-ours and step-7b-b16-nodrop (batch 16 without the reference, fits an H100; dropout 0.1 and 0),
# step-7b-b32-autotune (batch 32 with torch.compile's max-autotune-no-cudagraphs mode; about 130 s),
# eval-7b (score vs generation-based evaluation of 32 samples with the 7B shape), step-7b-b16
# (random samples, eager, with a plain-LoRA baseline, profiled), step-7b-b16-compile (the same compiled;
# needs >= 120 s left), step-7b (batch 8), step-1b (with eager-attention and float32 baselines); then,
# while time is left, step-7b-ckpt (gradient checkpointing) and step-1b-compile (only with >= 150 s left).
# The 7B runs at batch 16 with the reference variant (step-7b-b16-pipelined, step-7b-b16, step-7b-b16-compile)
# need an H200's memory (about 100 GiB); on an H100 name the others (all ours-only runs fit in 80 GiB).
# Each run has its own `timeout -k 10`; a failed run does not stop the others; nothing starts after the cap
# (ILORA_GPU_CAP_S, default 300 s); each section's note is ILORA_GPU_NOTE (default "bench/gpu.sh"). Titles: <repo>/shared/datasets/lastfm/id2name.txt when present (the
# session copies it there: ../shared does not travel to the device), else $ILORA_SHARED or ../shared as
# `ilora bench` finds them, else synthetic titles, with a WARNING in summary.txt (the runs still go on).
#
# Writes at most 6 files to $OUT (or bench/out), each appended to run by run:
#   summary.txt     one line per run (rc, seconds, headline ratio), the titles used, warnings
#   env.txt         nvidia-smi, python / torch / CUDA / transformers versions, GPU, titles source
#   results.jsonl   one JSON object per successful run
#   RESULTS.md      the sections to paste into bench/RESULTS.md; "### <name>: failed, rc=N" for a failed run
#   logs.txt        per run: a header and the last 100 lines of its stderr
#   profiles.txt    the profiled runs' operator tables (`ilora bench step --profile`)
# Per-run scratch files live in a temporary directory outside $OUT.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/out}"
mkdir -p "$OUT_DIR"
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/ilora-gpu.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
SUMMARY="$OUT_DIR/summary.txt" ENV_TXT="$OUT_DIR/env.txt" JSONL="$OUT_DIR/results.jsonl"
RESULTS="$OUT_DIR/RESULTS.md" LOGS="$OUT_DIR/logs.txt" PROFILES="$OUT_DIR/profiles.txt"

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export PYTHONUNBUFFERED=1
if [[ -f shared/datasets/lastfm/id2name.txt ]]; then
    export ILORA_SHARED="$PWD/shared"
fi
PY="${PYTHON:-python3}"
START=$(date +%s)
CAP="${ILORA_GPU_CAP_S:-300}"
DEADLINE=$((START + CAP))
NOTE="${ILORA_GPU_NOTE:-bench/gpu.sh}"
SELECTED=" $* "

RUNS=" inputs adapter step-7b-b32 step-7b-b32-nodrop step-7b-b32-shared step-7b-b32-nodrop-shared step-7b-b32-vs-research step-7b-b32-shared-profiled step-7b-b128-m32-shared step-7b-b40-shared step-7b-b32-cycled step-7b-b32-cycled-shared step-7b-b16-pipelined step-7b-b16-ours step-7b-b16-nodrop step-7b-b32-autotune eval-7b step-7b-b16 step-7b-b16-compile step-7b step-1b step-7b-ckpt step-1b-compile "

say() { echo "$*" | tee -a "$SUMMARY"; }

for name in "$@"; do
    if [[ "$RUNS" != *" $name "* ]]; then
        say "unknown run '$name'; expected some of:$RUNS"
        exit 2
    fi
done

say "bench/gpu.sh $(date -u '+%Y-%m-%d %H:%M UTC'): cap ${CAP}s; runs: ${*:-all}"
{
    echo "== nvidia-smi"
    nvidia-smi 2>&1
    echo "== python"
    timeout -k 5 60 "$PY" -c "
import platform, torch, transformers
from ilora.bench.common import load_titles
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)
print('gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NONE (torch.cuda.is_available() is False)')
print('titles:', load_titles()[1])
" 2>&1
    echo "== env"
    echo "ILORA_SHARED=${ILORA_SHARED:-} PYTORCH_CUDA_ALLOC_CONF=$PYTORCH_CUDA_ALLOC_CONF"
} > "$ENV_TXT" 2>&1
say "$(grep -m1 '^gpu ' "$ENV_TXT" || echo 'gpu: unknown (the version check failed, see env.txt)')"
TITLES=$(grep -m1 '^titles: ' "$ENV_TXT" | cut -c9-)
say "titles: ${TITLES:-unknown (the version check failed, see env.txt)}"
if [[ "$TITLES" != LastFM* ]]; then
    say "WARNING: benchmarks will NOT use the LastFM titles (prompt lengths differ from the real data)."
    say "WARNING: before the run, in the checkout: mkdir -p shared/datasets/lastfm && cp ../shared/datasets/lastfm/id2name.txt shared/datasets/lastfm/"
fi

run() {  # run NAME LIMIT_S NEED_S ARGS... : one benchmark under `timeout`; skipped with < NEED_S s left or not selected
    local name=$1 limit=$2 need=$3
    shift 3
    if [[ "$SELECTED" != "  " && "$SELECTED" != *" $name "* ]]; then
        return
    fi
    local left=$((DEADLINE - $(date +%s)))
    if ((left < need)); then
        say "$name: skipped (${left}s left of the ${CAP}s cap, needs ${need}s; rerun: bash bench/gpu.sh $name)"
        return
    fi
    ((limit > left)) && limit=$left
    local t0
    t0=$(date +%s)
    timeout -k 10 "$limit" "$PY" -m ilora.cli.main bench "$@" --device cuda --json --note "$NOTE" \
        --results "$SCRATCH/$name.md" > "$SCRATCH/$name.json" 2> "$SCRATCH/$name.log"
    local rc=$?
    local secs=$(($(date +%s) - t0))
    if [[ -f "$SCRATCH/$name.prof" ]]; then
        { echo "===== $name"; cat "$SCRATCH/$name.prof"; echo; } >> "$PROFILES"
    fi
    local ratio
    ratio=$(grep -o '"ratio": [0-9.e+-]*' "$SCRATCH/$name.json" 2>/dev/null | tail -1 | cut -d' ' -f2)
    [[ -f "$SCRATCH/$name.md" ]] && cat "$SCRATCH/$name.md" >> "$RESULTS"
    if ((rc == 0)) && [[ -s "$SCRATCH/$name.json" ]]; then
        cat "$SCRATCH/$name.json" >> "$JSONL"
    else
        ((rc == 0)) && rc=1  # exit 0 without a JSON object is a failure too
        printf '\n### %s: failed, rc=%s, see logs.txt\n' "$name" "$rc" >> "$RESULTS"
    fi
    {
        echo "===== $name: rc=$rc after ${secs}s (limit ${limit}s): bench $*"
        tail -n 100 "$SCRATCH/$name.log"
        echo
    } >> "$LOGS"
    local what="ok, ratio ?" mfu
    [[ -n "$ratio" ]] && what=$(printf 'ok, ratio %.2f' "$ratio")
    grep -q '"ratio": null' "$SCRATCH/$name.json" 2>/dev/null && what="ok, no reference"
    mfu=$("$PY" -c "
import json, sys
variants = json.load(open(sys.argv[1])).get('variants', {})
print('; '.join(
    f\"MFU of {name} {100 * v['mfu']:.1f} % ({100 * v['mfu_all_params']:.1f} % counting all parameters), {1e3 * v.get('step_s', v['median_s']):.1f} ms\"
    for name, v in variants.items() if name in ('ours', 'ours_shared') and v.get('mfu') is not None
))
" "$SCRATCH/$name.json" 2>/dev/null)
    [[ -n "$mfu" ]] && what="$what, $mfu"
    ((rc != 0)) && what="FAILED"
    ((rc == 124 || rc == 137)) && what="TIMED OUT"
    say "$name: $what (rc=$rc, ${secs}s, limit ${limit}s, at $(($(date +%s) - START))s)"
}

#   name                 limit need  arguments
run inputs               60    30    inputs --budget-s 10
run adapter              45    30    adapter --budget-s 10
run step-7b-b32          170   120   step --shape 7b --batch-size 32 --compile --no-part-syncs --group-by-length --no-reference --budget-s 20
run step-7b-b32-nodrop   170   120   step --shape 7b --batch-size 32 --compile --no-part-syncs --group-by-length --no-reference --lora-dropout 0 --budget-s 15
run step-7b-b32-shared   260   200   step --shape 7b --batch-size 32 --compile --no-part-syncs --group-by-length --no-reference --shared-inputs --budget-s 25
run step-7b-b32-nodrop-shared 260 200 step --shape 7b --batch-size 32 --compile --no-part-syncs --group-by-length --no-reference --shared-inputs --lora-dropout 0 --budget-s 25
run step-7b-b32-vs-research 300 200 step --shape 7b --batch-size 32 --compile --no-part-syncs --group-by-length --shared-inputs --reference-micro-batch-size 8 --reference-eager --budget-s 30
run step-7b-b32-shared-profiled 260 200 step --shape 7b --batch-size 32 --compile --no-part-syncs --group-by-length --no-reference --shared-inputs --budget-s 20 --profile "$SCRATCH/step-7b-b32-shared-profiled.prof"
run step-7b-b128-m32-shared 260 200 step --shape 7b --batch-size 128 --micro-batch-size 32 --compile --no-part-syncs --group-by-length --no-reference --shared-inputs --repeats 3 --budget-s 15
run step-7b-b40-shared   260   200   step --shape 7b --batch-size 40 --compile --no-part-syncs --group-by-length --no-reference --shared-inputs --budget-s 25
run step-7b-b32-cycled   200   150   step --shape 7b --batch-size 32 --compile --no-part-syncs --group-by-length --no-reference --batches 4 --repeats 8 --budget-s 20
run step-7b-b32-cycled-shared 300 240 step --shape 7b --batch-size 32 --compile --no-part-syncs --group-by-length --no-reference --shared-inputs --batches 4 --repeats 8 --budget-s 25
run step-7b-b16-pipelined 170  120   step --shape 7b --batch-size 16 --compile --no-part-syncs --group-by-length --budget-s 20 --profile "$SCRATCH/step-7b-b16-pipelined.prof"
run step-7b-b16-ours      170   90    step --shape 7b --batch-size 16 --compile --no-part-syncs --group-by-length --no-reference --budget-s 15
run step-7b-b16-nodrop    170   90    step --shape 7b --batch-size 16 --compile --no-part-syncs --group-by-length --no-reference --lora-dropout 0 --budget-s 15
run step-7b-b32-autotune 330   200   step --shape 7b --batch-size 32 --compile --compile-mode max-autotune-no-cudagraphs --no-part-syncs --group-by-length --no-reference --budget-s 15
run eval-7b              120   90    eval --shape 7b --samples 32 --budget-s 20
run step-7b-b16          100   60    step --shape 7b --batch-size 16 --lora-baseline --budget-s 25 --profile "$SCRATCH/step-7b-b16.prof"
run step-7b-b16-compile  170   120   step --shape 7b --batch-size 16 --compile --lora-baseline --budget-s 25 --profile "$SCRATCH/step-7b-b16-compile.prof"
run step-7b              90    60    step --shape 7b --budget-s 20
run step-1b              90    50    step --shape 1b --eager-baseline --fp32-baseline --budget-s 20
run step-7b-ckpt         60    45    step --shape 7b --gradient-checkpointing --budget-s 15
run step-1b-compile      150   150   step --shape 1b --compile --budget-s 20
say "total $(($(date +%s) - START))s"
