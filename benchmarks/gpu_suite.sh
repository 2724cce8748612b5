#!/usr/bin/env bash
# The GPU measurements of issue 16 in one script: under 10 minutes on one H100/H200 (not run yet: no GPU was lent).
#
#   1. train_throughput.py: gpt2-124m (B=12 x 1024) and dsv3-small (B=8 x 1024), bf16 autocast, eager and
#      torch.compile, tokens/s and MFU against the GPU's dense bf16 peak (targets: gpt2-124m >= 50 %, dsv3-small
#      >= 45 %).
#   2. peers.py: the same two models against transformers (same weights, interleaved), bf16 autocast, training
#      and prefill at those shapes, greedy decode at batch 1 and 32 with nanoseek's compiled decode step
#      (target: dsv3-small decode at batch 1 >= 2,000 tokens/s, the same greedy tokens as transformers).
#   3. fp8.py (issue 12): blockwise FP8 vs bf16 GEMM TFLOP/s at 1024^3..8192^3 for both scale kinds (the probe of
#      torch._scaled_mm's blockwise scales runs here for the first time: the table says whether it passed) and
#      one training step at hidden 2048, bf16 vs FP8; its CPU loss and memory parts kept short.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]        # default OUT_DIR=runs/gpu_suite; each step's log and JSON line
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_suite}
mkdir -p "$out"
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_suite.sh needs a CUDA GPU')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"

run() {  # run NAME SECONDS CMD...: a step with its own time limit (the four add up to 9.5 minutes), its log and
         # its last (JSON) line kept
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" || echo "== $name stopped (exit ${PIPESTATUS[0]}): the next step runs"
  tail -n 1 "$out/$name.log" > "$out/$name.json"
}

run train_throughput 210 python3 benchmarks/train_throughput.py --cases gpt2-124m:12:1024,dsv3-small:8:1024 \
    --steps 10 --warmup 3
run peers_gpt2 130 python3 benchmarks/peers.py --device cuda --dtype bfloat16 --only gpt2 --gpt2-preset gpt2-124m \
    --batch 12 --seq 1024 --new-tokens 128 --reps 3 --warmup 2 --compile
run peers_dsv3 130 python3 benchmarks/peers.py --device cuda --dtype bfloat16 --only dsv3 --dsv3-preset dsv3-small \
    --batch 8 --seq 1024 --new-tokens 128 --reps 3 --warmup 2 --compile
run fp8 100 python3 benchmarks/fp8.py --steps 20 --widths 128 --memory-widths 128 --batch 4 --gemm-reps 5 \
    --gpu-steps 5
echo "results in $out"
