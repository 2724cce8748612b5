#!/usr/bin/env bash
# The main job: pretrain dsv3-tiny on the built-in corpus (the Python standard library's sources), then
# evaluate it (bits per byte against the corpus's unigram byte entropy), map experts by domain, print a few
# samples, and fine-tune one LoRA adapter per tenant task (three stdlib packages) to show that each adapter
# lowers its own task's loss the most, and that each adapter loads in peft with the same logits. About 11 minutes
# on 2 CPU cores.
# Usage: scripts/main_job.sh [OUT_DIR] [extra pretrain flags]
set -euo pipefail
OUT=${1:-runs/main}
shift || true
if [ -z "${NANOSEEK:-}" ]; then
    if [ -x .venv/bin/nanoseek ]; then NANOSEEK=.venv/bin/nanoseek; else NANOSEEK=nanoseek; fi
fi
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
NS=$NANOSEEK
start=$(date +%s)
$NS pretrain --preset dsv3-tiny --out-dir "$OUT" --max-steps 600 --seq-len 256 --batch-size 16 --lr 3e-3 \
    --warmup-steps 30 --eval-every 150 --eval-batches 40 --save-every 150 --log-every 25 "$@"
CKPT=$(ls -d "$OUT"/checkpoints/step-* | sort | tail -n 1)
echo "== evaluation of $CKPT (full validation split)"
$NS eval --checkpoint "$CKPT"
echo "== expert load by domain"
$NS experts --checkpoint "$CKPT" --out "$OUT/experts" | tail -n 3
echo "== samples (temperature 0.8, top-p 0.95)"
for prompt in "import os" "def main(" "class Config:"; do
    echo "---- prompt: $prompt"
    $NS generate --checkpoint "$CKPT" --prompt "$prompt" --max-new-tokens 80 --temperature 0.8 --top-p 0.95 --seed 0
done
echo "== LoRA adapters, one per tenant task (email, encodings, tkinter): loss of each adapter on each task"
$PYTHON benchmarks/adapter_specificity.py --base "$CKPT" --steps 150 --eval-batches 16 --out-dir "$OUT/adapters" \
    --plot "$OUT/adapter_specificity.png" --check-peft | grep -v '^step\|^nanoseek finetune'
echo "== main job done in $(( $(date +%s) - start )) s; checkpoint $CKPT, plots and metrics.jsonl in $OUT"
