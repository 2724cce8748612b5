"""nanoseek's muP vs Microsoft's `mup` end to end on the same GPT-2, data, steps and learning rates (issue 15).

A small standalone GPT-2 (pre-LN, learned positions, gelu_new, tied embeddings; the shapes of gpt2-tiny at
each width: head dim fixed, heads grow) built from `mup`'s own pieces: MuSharedReadout for the tied head,
set_base_shapes against the base-width model, mup.init.normal_ for the init, MuAdamW. It trains on the batches
nanoseek's trainer uses (same corpus, tokenizer, PackedLoader seed, cosine schedule, clip, weight decay) and
is evaluated on the same validation windows. Arms:
  ours        nanoseek's muP (sweep.run, the real trainer), default multipliers
  mup         the package with nanoseek's constants (init 0.02, 1/sqrt(d_head) attention): the rules compared
  mup_rec     the package with its recommended init: zero query, attention 1/d_head (readout zero init has no
              effect on a tied head: MuSharedReadout reuses the embedding table)
If `ours` and `mup` agree, the rules agree and any gap to SP is the regime; `mup_rec` tells whether the
package's recommended constants close it. `mup` is an optional import: without it only `ours` runs.

    python3 benchmarks/mup_package.py                                  # CPU: widths 32 and 256, 400 steps
    python3 benchmarks/mup_package.py --widths 128,1024 --base-width 128 --steps 2000 --seq-len 256 \
        --batch-size 32 --lrs 2^-6,2^-5 --out out/mup_gpu                 # GPU scale
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mup_vs_sp import floats  # noqa: E402  (benchmarks/mup_vs_sp.py: "2^k" or plain floats)

from nanoseek import sweep  # noqa: E402
from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.data.loader import PackedLoader  # noqa: E402
from nanoseek.train.config import TrainConfig  # noqa: E402
from nanoseek.train.distributed import Dist  # noqa: E402
from nanoseek.train.evaluate import evaluate  # noqa: E402
from nanoseek.train.optim import lr_at  # noqa: E402
from nanoseek.train.trainer import _prepare_data  # noqa: E402

try:
    import mup
except ImportError:  # optional
    mup = None


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_scale: float):
        super().__init__()
        h = cfg.hidden_size
        self.ln_1, self.ln_2 = nn.LayerNorm(h, eps=1e-5), nn.LayerNorm(h, eps=1e-5)
        self.c_attn, self.c_proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.c_fc, self.mlp_proj = nn.Linear(h, cfg.intermediate_size), nn.Linear(cfg.intermediate_size, h)
        self.n_head, self.scale = cfg.num_attention_heads, attn_scale

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)  # (B, H, T, D)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class MupGPT2(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_scale: float):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = nn.ModuleList(Block(cfg, attn_scale) for _ in range(cfg.num_hidden_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=1e-5)
        self.lm_head = mup.MuSharedReadout(self.wte.weight, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, V); MuSharedReadout divides its input by the width mult


def build(cfg: ModelConfig, base: ModelConfig, recommended: bool) -> MupGPT2:
    d_head = cfg.head_dim
    scale = 1.0 / d_head if recommended else d_head ** -0.5
    model = MupGPT2(cfg, scale)
    mup.set_base_shapes(model, MupGPT2(base, scale), rescale_params=False)
    std, resid = cfg.initializer_range, cfg.initializer_range / math.sqrt(2 * cfg.num_hidden_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln_" in name or name.startswith("ln_"):
                p.fill_(1.0)
            else:
                mup.init.normal_(p, std=resid if name.endswith(("c_proj.weight", "mlp_proj.weight")) else std)
        if recommended:
            for block in model.h:
                block.c_attn.weight[: cfg.hidden_size].zero_()  # zero query
    return model


def train_mup(tc: TrainConfig, width: int, base_width: int, recommended: bool, device: torch.device) -> float:
    """The package's model through the trainer's recipe (bf16 autocast on CUDA, as the trainer's default)."""
    torch.manual_seed(tc.seed)
    mcfg = dataclasses.replace(tc, hidden_size=width).model_config_obj()
    base = dataclasses.replace(tc, hidden_size=base_width).model_config_obj()
    corpus, tok, train_tokens, val_tokens = _prepare_data(tc, Dist(), mcfg.vocab_size)
    model = build(mcfg, base, recommended).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = mup.MuAdamW([{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0}],
                      lr=tc.lr, betas=(0.9, 0.95), eps=1e-8)
    for g in opt.param_groups:
        g["lr_scale"] = g["lr"] / tc.lr  # MuAdamW's per-group factor
    loader = PackedLoader(train_tokens, tc.seq_len, tc.batch_size, seed=tc.seed, device=device)
    model.train()
    for step in range(tc.max_steps):
        lr = lr_at(step, tc.lr, tc.max_steps, tc.warmup_steps, tc.min_lr_ratio, tc.schedule, tc.decay_frac)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        x, y = loader.next_batch()
        with autocast:
            logits = model(x)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        if not math.isfinite(loss.item()):
            return math.inf
    ev = evaluate(model, val_tokens, tc.seq_len, tc.batch_size, tc.eval_batches, device, corpus.num_bytes("val"),
                  torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None)
    return ev["val_loss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="32,256")
    ap.add_argument("--base-width", type=int, default=32)
    ap.add_argument("--lrs", default="2^-5", help="learning rates for every arm at every width")
    ap.add_argument("--proxy-lrs", default="2^-6,2^-5,2^-4", help="extra lrs for mup_rec at the narrowest width")
    ap.add_argument("--arms", default="ours,mup,mup_rec")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--eval-batches", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/mup_vs_sp")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    widths = [int(w) for w in args.widths.split(",")]
    lrs, proxy_lrs = floats(args.lrs), floats(args.proxy_lrs)
    arms = [a for a in args.arms.split(",") if a == "ours" or mup is not None]
    base = TrainConfig(preset="gpt2-tiny", seq_len=args.seq_len, batch_size=args.batch_size, max_steps=args.steps,
                       warmup_steps=max(1, args.steps // 10), eval_batches=args.eval_batches,
                       vocab_size=args.vocab_size, device=device.type, log_every=max(1, args.steps // 4),
                       seed=args.seed)
    out = Path(args.out)
    cache = out / "mup_package.jsonl"
    done = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            r = json.loads(line)
            done[(r["arm"], r["width"], r["lr"])] = r
    jobs = [(a, w, lr) for w in widths for a in arms for lr in lrs]
    jobs += [("mup_rec", widths[0], lr) for lr in proxy_lrs if "mup_rec" in arms and lr not in lrs]
    for arm, width, lr in jobs:
        if (arm, width, lr) in done:
            continue
        t = time.time()
        if arm == "ours":
            loss = sweep.run(dataclasses.replace(base, lr=lr), "mup", width, args.seed, lr, {}, out / "gpt2",
                             args.base_width)["val_loss"]
        else:
            loss = train_mup(dataclasses.replace(base, lr=lr), width, args.base_width, arm == "mup_rec", device)
        r = {"arm": arm, "width": width, "lr": lr, "val_loss": loss, "seconds": round(time.time() - t, 1)}
        done[(arm, width, lr)] = r
        with cache.open("a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"  {arm:8s} width {width:4d} lr {lr:.3g}: val_loss {loss:.4f} ({r['seconds']:.0f} s)", flush=True)
    print(f"\nnanoseek muP vs Microsoft mup, GPT-2, base width {args.base_width}, {args.steps} steps, "
          f"batch {args.batch_size}x{args.seq_len}")
    print(f"{'arm':8s} {'width':>5s} {'lr':>8s} {'val loss':>9s}")
    for (arm, width, lr), r in sorted(done.items()):
        print(f"{arm:8s} {width:5d} {lr:8.3g} {r['val_loss']:9.4f}")
    print(json.dumps({"benchmark": "mup_package", "steps": args.steps, "runs": list(done.values())}))


if __name__ == "__main__":
    main()
