"""nanoseek against its peers, side by side in one process: Hugging Face `transformers` (and nanoGPT, if given).

What. For a DeepSeek-V3 and a GPT-2 model of the same config and the same weights (nanoseek's model is saved as a
Hugging Face directory and loaded by `transformers.AutoModelForCausalLM`, so both run identical numbers):
  train    tokens/s of full optimizer steps (forward + loss + backward + AdamW), B x T random tokens
  prefill  tokens/s of one no-grad forward over B x T tokens (logits of every position)
  decode   tokens/s of greedy `generate` vs `generate` at batch 1 and batch 32 (prompt + new tokens, both sides
           build and use their own cache); the greedy tokens must be the same on both sides (printed);
           `--compile`: nanoseek's training model and one-token decode step are compiled (the peers run as their
           users run them, eager; nanoseek's compile time is reported as its warm-up, not timed)
Repetitions are interleaved (ours, theirs, ours, theirs, ...) so that a busy machine slows both alike; the table
gives the median of each side and the ratio nanoseek / peer. `--nanogpt DIR` adds Karpathy's nanoGPT (DIR/model.py,
`GPT`/`GPTConfig`) to the GPT-2 training and prefill races with the same weights. `transformers` is optional:
without it (or without nanoGPT) the script says what it skipped.

Why. The claim "fast by default" (issue 16) is only worth what a same-run comparison shows; absolute figures on a
shared machine are noise, ratios measured alternately are not.

    python3 benchmarks/peers.py                              # CPU defaults: dsv3 6 x 384 (8 experts), gpt2 6 x 384
    python3 benchmarks/peers.py --only dsv3 --skip train     # decode and prefill only
    python3 benchmarks/peers.py --device cuda --dtype bfloat16 --gpt2-preset gpt2-124m --batch 12 --seq 1024
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nanoseek import Model, ModelConfig  # noqa: E402
from nanoseek.train.autocast import DTYPES, autocast_context, resolve_dtype  # noqa: E402
from nanoseek.train.optim import configure_optimizer  # noqa: E402

try:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
except ImportError:  # optional: the script then races nanoGPT only (if given) and says so
    transformers = None

PHASES = ("train", "prefill", "decode")


def configs(width: int, layers: int, experts: int, vocab: int, seq: int, dsv3_preset: str | None = None,
            gpt2_preset: str | None = None) -> dict[str, ModelConfig]:
    """The two models raced (a preset as it is, else the tiny preset at this width/depth/vocab); MTP is off
    (transformers does not train MTP modules)."""
    n = max(seq, 1024)
    if dsv3_preset:
        dsv3 = ModelConfig.from_preset(dsv3_preset, num_nextn_predict_layers=0)
    else:
        dsv3 = ModelConfig.from_preset("dsv3-tiny", num_hidden_layers=layers, vocab_size=vocab,
                                       n_routed_experts=experts, num_nextn_predict_layers=0,
                                       max_position_embeddings=n).with_width(width)
    if gpt2_preset:
        gpt2 = ModelConfig.from_preset(gpt2_preset)
    else:
        gpt2 = ModelConfig.from_preset("gpt2-tiny", num_hidden_layers=layers, vocab_size=vocab,
                                       max_position_embeddings=n).with_width(width)
    return {"dsv3": dsv3, "gpt2": gpt2}


def load_hf(model: Model, attn: str | None):
    """The same weights as a transformers model (through nanoseek's own Hugging Face export)."""
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        kw = {"attn_implementation": attn} if attn else {}
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, **kw)
    hf.generation_config.eos_token_id = None  # decode exactly max_new_tokens, as nanoseek does without eos
    hf.generation_config.pad_token_id = 0
    return hf.to(next(model.parameters()).device)


def load_nanogpt(directory: str, model: Model):
    """nanoGPT's GPT with nanoseek's GPT-2 weights (its parameter names are HF's in-memory names)."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", Path(directory) / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = model.config
    ng = mod.GPT(mod.GPTConfig(block_size=c.max_position_embeddings, vocab_size=c.vocab_size,
                               n_layer=c.num_hidden_layers, n_head=c.num_attention_heads, n_embd=c.hidden_size,
                               dropout=0.0, bias=True))
    missing, unexpected = ng.load_state_dict(model.state_dict(), strict=False)
    if [k for k in missing if not k.endswith(".attn.bias")] or unexpected:
        raise ValueError(f"nanoGPT weights do not match: missing {missing}, unexpected {unexpected}")
    return ng.to(next(model.parameters()).device)


def interleave(runners: dict, reps: int, sync) -> dict[str, list[float]]:
    """Seconds per call of each runner, alternating runners within every repetition."""
    times = {k: [] for k in runners}
    for _ in range(reps):
        for name, fn in runners.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def train_runner(kind: str, model, x: torch.Tensor, ctx, compile: bool = False):
    """One optimizer step on x (B, T+1) for a nanoseek, transformers or nanoGPT model (nanoseek's compiled if
    asked, as `pretrain --compile` does)."""
    model.train()
    if compile and kind == "nanoseek":
        model.compile()
    opt = configure_optimizer(model, lr=1e-4) if kind == "nanoseek" else \
        torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))
    inp, tgt = x[:, :-1].contiguous(), x[:, 1:].contiguous()  # nanoGPT views its targets

    def step():
        with ctx():
            if kind == "nanoseek":
                loss = model(inp, targets=tgt).loss
            elif kind == "transformers":
                loss = model(inp, labels=inp).loss  # HF shifts the labels itself (T-1 targets)
            else:
                loss = model(inp, tgt)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def prefill_runner(kind: str, model, x: torch.Tensor, ctx):
    model.eval()

    @torch.no_grad()
    def run():
        with ctx():
            if kind == "nanoseek":
                return model(x)
            if kind == "transformers":
                return model(x).logits
            return model(x, x)[0]  # nanoGPT returns every position's logits only when given targets

    return run


def decode_runners(ours: Model, hf, prompt: torch.Tensor, new: int, ctx, out: dict, compile: bool):
    ours.eval()
    hf.eval()

    def run_ours():
        with ctx():
            out["nanoseek"] = ours.generate(prompt, new, compile=compile)

    def run_hf():
        with ctx(), torch.no_grad():
            out["transformers"] = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                              min_new_tokens=new, do_sample=False)

    return {"nanoseek": run_ours, "transformers": run_hf}


def race(rows: list, arch: str, phase: str, runners: dict, tokens: int, reps: int, warmup: int, sync,
         ours_warmup: int | None = None, **extra):
    t0 = time.perf_counter()
    for _ in range(warmup if ours_warmup is None else ours_warmup):  # nanoseek's first call compiles, if asked
        runners["nanoseek"]()
    extra["nanoseek_warmup_s"] = time.perf_counter() - t0
    for name, fn in runners.items():
        for _ in range(warmup if name != "nanoseek" else 0):
            fn()
    times = interleave(runners, reps, sync)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["nanoseek"]
    for name, sec in med.items():
        if name == "nanoseek":
            continue
        ratios = [p / o for o, p in zip(times["nanoseek"], times[name])]  # per repetition: theirs / ours time
        rows.append({"arch": arch, "phase": phase, "peer": name, "tokens": tokens, "nanoseek_tokens_per_s":
                     tokens / base, "peer_tokens_per_s": tokens / sec, "ratio": sec / base,
                     "ratio_min": min(ratios), "ratio_max": max(ratios), "reps": reps, **extra})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("dsv3", "gpt2"), default=None, help="race one architecture only")
    p.add_argument("--skip", action="append", choices=PHASES, default=[], help="skip a phase (repeatable)")
    p.add_argument("--width", type=int, default=384, help="hidden size of both models (default 384)")
    p.add_argument("--layers", type=int, default=6, help="blocks of both models (default 6)")
    p.add_argument("--experts", type=int, default=8, help="routed experts of the DeepSeek-V3 model (default 8)")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary size (default 4096)")
    p.add_argument("--dsv3-preset", default=None, help="race this DeepSeek-V3 preset as it is (e.g. dsv3-small)")
    p.add_argument("--gpt2-preset", default=None, help="race this GPT-2 preset as it is (e.g. gpt2-124m)")
    p.add_argument("--batch", type=int, default=8, help="training and prefill batch (default 8)")
    p.add_argument("--seq", type=int, default=256, help="training and prefill sequence length (default 256)")
    p.add_argument("--prompt", type=int, default=16, help="decode prompt length (default 16)")
    p.add_argument("--new-tokens", type=int, default=64, help="decode new tokens per row (default 64)")
    p.add_argument("--decode-batches", default="1,32", help="decode batch sizes, comma-separated (default 1,32)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per side (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per side first (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="compute dtype of every side, as pretrain's --dtype (default float32; auto: bf16 autocast "
                        "where the device multiplies bf16 natively)")
    p.add_argument("--compile", action="store_true",
                   help="nanoseek trains compiled and decodes with generate(compile=True) (compile time is in the "
                        "warm-up, reported)")
    p.add_argument("--attn", default=None, help="transformers attn_implementation (default: its own, sdpa)")
    p.add_argument("--nanogpt", default=None, metavar="DIR", help="a nanoGPT checkout: race DIR/model.py too")
    args = p.parse_args()
    if args.compile and args.warmup < 1:
        p.error("--compile needs --warmup >= 1 (the first call compiles; it must not be timed)")
    if args.new_tokens < 1 or args.reps < 1:
        p.error(f"--new-tokens ({args.new_tokens}) and --reps ({args.reps}) must be >= 1")
    try:
        decode_batches = [int(b) for b in args.decode_batches.split(",")]
    except ValueError:
        p.error(f"--decode-batches {args.decode_batches!r}: expected integers like 1,32")
    if args.nanogpt and not (Path(args.nanogpt) / "model.py").exists():
        p.error(f"--nanogpt {args.nanogpt!r}: no model.py there")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    precision = resolve_dtype(args.dtype, device)

    def ctx():
        return autocast_context(precision, device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    skipped = []
    if transformers is None:
        skipped.append("transformers (not installed)")
    if args.nanogpt is None:
        skipped.append("nanoGPT (no --nanogpt DIR)")
    rows, agree = [], {}
    try:
        models = configs(args.width, args.layers, args.experts, args.vocab, args.seq, args.dsv3_preset,
                         args.gpt2_preset)
    except ValueError as e:
        p.error(str(e))
    for arch, cfg in models.items():
        if args.only and arch != args.only:
            continue
        torch.manual_seed(0)
        ours = Model(cfg, device=device)
        n_params = sum(q.numel() for q in ours.parameters())
        peers = {}
        if transformers is not None:
            peers["transformers"] = load_hf(ours, args.attn)
        if arch == "gpt2" and args.nanogpt:
            peers["nanogpt"] = load_nanogpt(args.nanogpt, ours)
        g = torch.Generator().manual_seed(1)
        x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(device)
        print(f"[{arch}] {n_params / 1e6:.1f}M parameters; peers: {', '.join(peers) or 'none'}", flush=True)
        if not peers:
            continue
        if "train" not in args.skip:  # each side trains its own copy: the steps change the weights
            runners = {"nanoseek": train_runner("nanoseek", copy.deepcopy(ours), x, ctx, args.compile)}
            runners |= {k: train_runner(k, copy.deepcopy(m), x, ctx) for k, m in peers.items()}
            # compiled: the second step compiles once more (the expert-load accumulator exists from then on)
            race(rows, arch, "train", runners, args.batch * args.seq, args.reps, args.warmup, sync,
                 ours_warmup=args.warmup + args.compile, shape=f"{args.batch}x{args.seq}")
        if "prefill" not in args.skip:
            xp = x[:, :-1].contiguous()  # nanoGPT views its targets
            runners = {"nanoseek": prefill_runner("nanoseek", ours, xp, ctx)}
            runners |= {k: prefill_runner(k, m, xp, ctx) for k, m in peers.items()}
            race(rows, arch, "prefill", runners, args.batch * args.seq, args.reps, args.warmup, sync,
                 shape=f"{args.batch}x{args.seq}")
        if "decode" not in args.skip and "transformers" in peers:
            for b in decode_batches:
                prompt = torch.randint(0, cfg.vocab_size, (b, args.prompt), generator=g).to(device)
                out: dict = {}
                race(rows, arch, f"decode b{b}", decode_runners(ours, peers["transformers"], prompt,
                                                              args.new_tokens, ctx, out, args.compile),
                     b * args.new_tokens, args.reps, args.warmup, sync, shape=f"{b}x({args.prompt}+{args.new_tokens})")
                same = out["nanoseek"].shape == out["transformers"].shape and \
                    bool((out["nanoseek"] == out["transformers"]).all())
                rows[-1]["same_tokens"] = same
                agree[f"{arch} decode b{b}"] = same
        del ours, peers

    dev = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"device: {dev}, precision {precision}, torch {torch.__version__}, transformers "
          f"{getattr(transformers, '__version__', 'absent')}")
    for s in skipped:
        print(f"skipped: {s}")
    print(f"{'arch':<5} {'phase':<10} {'peer':<13} {'shape':<14} {'nanoseek tok/s':>15} {'peer tok/s':>11} "
          f"{'ratio':>6} {'(min-max)':>12} {'same tokens':>11}")
    for r in rows:
        same = {True: "yes", False: "NO", None: ""}[r.get("same_tokens")]
        print(f"{r['arch']:<5} {r['phase']:<10} {r['peer']:<13} {r['shape']:<14} {r['nanoseek_tokens_per_s']:>15,.1f} "
              f"{r['peer_tokens_per_s']:>11,.1f} {r['ratio']:>5.2f}x {r['ratio_min']:>5.2f}-{r['ratio_max']:<5.2f} "
              f"{same:>11}")
    print(json.dumps({"benchmark": "peers", "device": dev, "precision": precision, "torch": torch.__version__,
                      "transformers": getattr(transformers, "__version__", None), "skipped": skipped,
                      "same_greedy_tokens": agree, "args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
