#!/bin/bash
# The README's speed figures: every benchmark, one after another, JSON and
# console output into DIR (about 25 minutes on 2 CPU cores; run it on an
# otherwise idle machine). Then: python benchmarks/summarize.py DIR
#
#   bash benchmarks/run_all.sh DIR [TORCH_PYTHON]
set -euo pipefail
out=${1:?usage: bash benchmarks/run_all.sh DIR [TORCH_PYTHON]}
torch_python=${2:-/work/venv-torch/bin/python}
mkdir -p "$out"
cd "$(dirname "$0")/.."
run() {
  local name=$1; shift
  echo "$(date -Is) $name: $*" | tee -a "$out/commands.log"
  "$@" > "$out/$name.txt" 2>&1
}
torch=()
[ -x "$torch_python" ] && torch=(--torch --torch-python "$torch_python")
for run_index in 1 2 3; do
  run "train_step_float32_$run_index" python benchmarks/train_step.py \
    --precision float32 --steps 10 --warmup 2 "${torch[@]}" \
    --out "$out/train_step_float32_$run_index.json"
done
run train_step_float32_breakdown python benchmarks/train_step.py \
  --precision float32 --steps 10 --warmup 2 --breakdown \
  --out "$out/train_step_float32_breakdown.json"
run train_step_bfloat16 python benchmarks/train_step.py \
  --precision bfloat16 --steps 10 --warmup 2 --out "$out/train_step_bfloat16.json"
run train_step_float32_patches python benchmarks/train_step.py \
  --precision float32 --steps 10 --warmup 2 --conv-method patches \
  --out "$out/train_step_float32_patches.json"
run train_step_float32_patches_system_malloc python benchmarks/train_step.py \
  --precision float32 --steps 10 --warmup 2 --conv-method patches \
  --system-malloc "${torch[@]}" \
  --out "$out/train_step_float32_patches_system_malloc.json"
run routing_iterations python benchmarks/routing_iterations.py \
  --out "$out/routing_iterations.json" --plot "$out/routing_iterations.png"
if [ -x "$torch_python" ]; then
  # PyTorch's bfloat16 autocast step takes about 30 s here: 3 steps only.
  run torch_bfloat16 env MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 \
    MALLOC_TRIM_THRESHOLD_=2147483647 "$torch_python" \
    benchmarks/torch_reference.py --precision bfloat16 --steps 3 --warmup 1 \
    --threads 2 --out "$out/torch_bfloat16.json"
fi
python benchmarks/summarize.py "$out" | tee "$out/summary.md"
