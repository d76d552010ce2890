#!/bin/bash
# The speed doc's figures: every benchmark, one after another, JSON and
# console output into DIR (about 45 minutes on 2 CPU cores; run it on an
# otherwise idle machine). Then: python benchmarks/summarize.py DIR
#
#   bash benchmarks/run_all.sh DIR [TORCH_PYTHON]
#
# RUNS (default 3) is how many times the main step comparison and the other
# experiments' steps are repeated.
# TORCH_PYTHON (else $CAPSJAX_TORCH_PYTHON, else `python`) is the interpreter
# with torch installed; without one the PyTorch comparison is left out. The
# same script runs on a GPU: every JSON names the device and the CPU flags,
# and bfloat16 is left out on a CPU without bfloat16 instructions.
set -euo pipefail
out=${1:?usage: bash benchmarks/run_all.sh DIR [TORCH_PYTHON]}
torch_python=${2:-${CAPSJAX_TORCH_PYTHON:-python}}
mkdir -p "$out"
cd "$(dirname "$0")/.."
threads=$(python -c 'import os; print(len(os.sched_getaffinity(0)))')
run() {
  local name=$1; shift
  echo "$(date -Is) $name: $*" | tee -a "$out/commands.log"
  "$@" > "$out/$name.txt" 2>&1
}
torch=()
if "$torch_python" -c 'import torch' 2>/dev/null; then
  torch=(--torch --torch-python "$torch_python" --threads "$threads")
else
  echo "no torch in $torch_python: the PyTorch comparison is left out" \
    | tee -a "$out/commands.log"
fi
for run_index in $(seq "${RUNS:-3}"); do
  run "train_step_$run_index" python benchmarks/train_step.py \
    --precision float32,bfloat16 --steps 10 --warmup 2 --evaluation \
    "${torch[@]}" --out "$out/train_step_$run_index.json"
done
run train_step_breakdown python benchmarks/train_step.py \
  --precision float32,bfloat16 --steps 10 --warmup 2 --breakdown \
  --out "$out/train_step_breakdown.json"
for run_index in $(seq "${RUNS:-3}"); do
  run "train_step_experiments_$run_index" python benchmarks/train_step.py \
    --precision float32 --steps 10 --warmup 2 \
    --experiments multimnist,affnist,baseline_cnn,lenet5 \
    --out "$out/train_step_experiments_$run_index.json"
done
run train_step_float32_patches python benchmarks/train_step.py \
  --precision float32 --steps 10 --warmup 2 --conv-method patches \
  --out "$out/train_step_float32_patches.json"
run xla_options python benchmarks/train_step.py \
  --precision float32,bfloat16 --steps 2 --warmup 1 \
  --compiler-option xla_cpu_experimental_ynn_fusion_type= \
  --compiler-option \
  xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT \
  --out "$out/xla_options.json"
run profile python benchmarks/train_step.py \
  --precision float32,bfloat16 --steps 2 --warmup 1 --profile "$out/profile" \
  --out "$out/profile.json"
run conv_methods python benchmarks/conv_methods.py \
  --steps lenet5,efficient_capsnet,capsnet --step-repeats 10 \
  --out "$out/conv_methods.json"
run routing_iterations python benchmarks/routing_iterations.py \
  --out "$out/routing_iterations.json" --plot "$out/routing_iterations.png"
run routing_algorithms python benchmarks/routing_algorithms.py \
  --out "$out/routing_algorithms.json" --plot "$out/routing_algorithms.png"
run epoch python benchmarks/epoch.py --out "$out/epoch.json"
python benchmarks/summarize.py "$out" | tee "$out/summary.md"
