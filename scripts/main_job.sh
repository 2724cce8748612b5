#!/usr/bin/env bash
# The main job: pretrain dsv3-tiny on the built-in corpus (the Python standard library's sources), then
# evaluate it (bits per byte against the corpus's unigram byte entropy), map experts by domain, print a few
# samples, measure MTP speculative decoding (acceptance, tokens/s vs plain), fine-tune one LoRA adapter per
# tenant task (three stdlib packages) to show that each adapter lowers its own task's loss the most and loads in
# peft with the same logits, then serve the base and the three adapters at once (`nanoseek serve`) and query
# them with the official openai client. 22 minutes from a fresh clone on a 2-core machine, up to 32 when it is
# busy (the measurements and their conditions: BENCHMARKS.md "Main job").
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
# --compile: 1.24x the eager steps, same bits/byte; the first run compiles for ~2 minutes, later runs reuse
# Inductor's on-disk cache in seconds (BENCHMARKS.md, "Fast by default, third session")
$NS pretrain --preset dsv3-tiny --out-dir "$OUT" --max-steps 600 --seq-len 256 --batch-size 16 --lr 3e-3 \
    --warmup-steps 30 --eval-every 150 --eval-batches 40 --save-every 150 --log-every 25 --compile "$@"
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
echo "== MTP speculative decoding: acceptance and tokens/s vs plain decoding (held-out files, 3 drafts per step)"
$PYTHON benchmarks/speculative.py --checkpoint "$CKPT" --ks 3 --temperatures 0,1 --repeats 1 --new-tokens 32 | grep -v '^{'
echo "== LoRA adapters, one per tenant task (email, encodings, tkinter): loss of each adapter on each task"
$PYTHON benchmarks/adapter_specificity.py --base "$CKPT" --steps 150 --eval-batches 16 --out-dir "$OUT/adapters" \
    --plot "$OUT/adapter_specificity.png" --check-peft | grep -v '^step\|^nanoseek finetune'
# serve stage begin: base + the three adapters behind one server, a mixed batch through the openai client
echo "== serving the checkpoint and its three adapters (nanoseek serve; openai client)"
PORT=$($PYTHON -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
$NS serve --checkpoint "$CKPT" --served-model-name base --port "$PORT" \
    --adapter email="$OUT/adapters/email/adapter" --adapter encodings="$OUT/adapters/encodings/adapter" \
    --adapter tkinter="$OUT/adapters/tkinter/adapter" >"$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
if ! $PYTHON scripts/serve_demo.py --url "http://127.0.0.1:$PORT" --wait 300; then
    echo "serve stage failed; server log:"; tail -n 30 "$OUT/serve.log"; exit 1
fi
kill -TERM $SERVER
wait $SERVER
trap - EXIT
echo "server stopped (exit 0); log in $OUT/serve.log: $(grep -c ' status=200 ' "$OUT/serve.log" || true) requests answered 200"
# serve stage end
echo "== main job done in $(( $(date +%s) - start )) s; checkpoint $CKPT, plots and metrics.jsonl in $OUT"
