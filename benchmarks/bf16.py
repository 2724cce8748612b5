"""bf16 autocast vs fp32 training (issue 16): validation loss at equal steps, and tokens/s, side by side.

What. Two copies of one dsv3-tiny model (same init) train on the same batches, steps interleaved in one process
(who runs first alternates): one in fp32, one under `torch.autocast(bfloat16)` with fp32 master weights and an
fp32 loss (train/autocast.py, what `--dtype bfloat16`, and `--dtype auto` on a CPU with native bf16 GEMMs or a
GPU, run). Reported: the validation loss of each at the end (bits per byte scale with it, so its relative
difference is the bits/byte difference) against the 1 % bound, and each side's tokens/s. On a CPU without native
bf16 (AVX512-BF16 / AMX), oneDNN emulates bf16 GEMMs and the bf16 side is slower: that is why `auto` picks fp32
there; the script prints whether this CPU has native bf16.

    python3 benchmarks/bf16.py                      # dsv3-tiny, 60 steps of 8 x 128, lr 3e-3
    python3 benchmarks/bf16.py --steps 20 --width 64  # quick look
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from side_by_side import train_step  # noqa: E402  (benchmarks/side_by_side.py)

from nanoseek import Model, ModelConfig  # noqa: E402
from nanoseek.data import PackedLoader, eval_batches, get_or_train_tokenizer, load_corpus, tokenize_corpus  # noqa: E402
from nanoseek.train.autocast import autocast_context, cpu_has_native_bf16  # noqa: E402
from nanoseek.train.optim import configure_optimizer, lr_at  # noqa: E402

BOUND = 0.01  # issue 16: validation bits/byte at equal steps within 1 % of fp32


def val_loss(model: Model, val, dtype: str, args) -> float:
    model.eval()
    with torch.no_grad(), autocast_context(dtype, "cpu"):
        losses = [model(x, targets=y, return_output=True).main_loss.item()
                  for x, y in eval_batches(val, args.seq_len, args.batch, max_batches=args.eval_batches)]
    model.train()
    return sum(losses) / len(losses)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per side (default 60)")
    p.add_argument("--width", type=int, default=128, help="dsv3-tiny at this hidden size (default 128)")
    p.add_argument("--batch", type=int, default=8, help="batch (default 8)")
    p.add_argument("--seq-len", type=int, default=128, help="sequence length (default 128)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate, cosine (default 3e-3)")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches (default 8)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of init and data order (default 0)")
    args = p.parse_args()
    if args.steps < 1:
        p.error(f"--steps {args.steps} must be >= 1")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    corpus = load_corpus(None)
    cfg = ModelConfig.from_preset("dsv3-tiny").with_width(args.width)
    tok = get_or_train_tokenizer(corpus, cfg.vocab_size)
    loader = PackedLoader(tokenize_corpus(corpus, tok, "train"), args.seq_len, args.batch, seed=args.seed)
    val = tokenize_corpus(corpus, tok, "val")
    torch.manual_seed(args.seed)
    models = {"float32": Model(cfg)}
    models["bfloat16"] = copy.deepcopy(models["float32"])
    opts = {k: configure_optimizer(m, args.lr, 0.1) for k, m in models.items()}
    secs = dict.fromkeys(models, 0.0)
    last = {}
    for step in range(args.steps):
        x, y = loader.next_batch()
        lr = lr_at(step, args.lr, args.steps, warmup_steps=args.steps // 10)
        for k in (("float32", "bfloat16") if step % 2 == 0 else ("bfloat16", "float32")):
            last[k], sec = train_step(models[k], opts[k], x, y, lr, autocast_context(k, "cpu"))
            secs[k] += sec
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  fp32 {last['float32']:.4f}  bf16 {last['bfloat16']:.4f}", flush=True)
    vals = {k: val_loss(m, val, k, args) for k, m in models.items()}
    tps = {k: args.steps * args.batch * args.seq_len / s for k, s in secs.items()}
    rel = abs(vals["bfloat16"] - vals["float32"]) / vals["float32"]
    native = cpu_has_native_bf16()
    dev = f"CPU ({platform.processor() or platform.machine()}, {args.threads} threads, native bf16: {native})"
    print(f"device: {dev}, dsv3-tiny width {args.width}, {args.steps} steps of {args.batch} x {args.seq_len}")
    print(f"{'dtype':<9} {'val loss':>9} {'tokens/s':>9}")
    for k in models:
        print(f"{k:<9} {vals[k]:>9.4f} {tps[k]:>9,.0f}")
    verdict = "within" if rel <= BOUND else "OUTSIDE"
    print(f"val loss relative difference {100 * rel:.2f}% (bound {100 * BOUND:.0f}%: {verdict}); "
          f"bf16 / fp32 tokens/s {tps['bfloat16'] / tps['float32']:.2f}x")
    print(json.dumps({"benchmark": "bf16", "device": dev, "native_bf16": native, "args": vars(args),
                      "val_loss": vals, "val_rel_diff": rel, "within_bound": rel <= BOUND, "tokens_per_s": tps,
                      "bf16_speedup": tps["bfloat16"] / tps["float32"]}))


if __name__ == "__main__":
    main()
