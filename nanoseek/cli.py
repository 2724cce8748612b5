"""`nanoseek <command>`: the command line. Each room of the house registers its own subcommands.

    nanoseek info --preset dsv3-tiny --json      parameter, FLOP and KV-cache accounting
    (pretrain: nanoseek/train/commands.py; finetune: train/finetune.py; generate, eval, experts, merge:
    nanoseek/infer.py)
    nanoseek serve --checkpoint DIR --adapter NAME=DIR    OpenAI-compatible server (nanoseek/serve/server.py)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import PRESETS, ModelConfig


def _info(args: argparse.Namespace) -> int:
    from .accounting import model_stats

    if (args.preset is None) == (args.checkpoint is None):
        raise SystemExit("nanoseek info: give exactly one of --preset NAME or --checkpoint DIR")
    cfg = ModelConfig.from_preset(args.preset) if args.preset else ModelConfig.load(args.checkpoint)
    stats = model_stats(cfg, seq_len=args.seq_len)
    stats = {"name": args.preset or str(args.checkpoint), **stats}
    if args.json:
        print(json.dumps(stats))
        return 0
    width = max(len(k) for k in stats)
    for k, v in stats.items():
        print(f"{k:<{width}}  {v:,}" if isinstance(v, int) else f"{k:<{width}}  {v}")
    return 0


def _list_of(cast):
    """argparse type: comma-separated values parsed with `cast` (int or float)."""

    def parse(text: str) -> list:
        try:
            return [cast(v) for v in text.split(",") if v]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {cast.__name__}s, got {text!r}") from None

    return parse


def _batches(preset_cfg: ModelConfig, data: str, n: int, batch_size: int, seq_len: int, seed: int):
    """n (x, y) batches: random tokens, or packed windows of the built-in/user corpus."""
    import torch

    if data == "random":
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(n):
            x = torch.randint(0, preset_cfg.vocab_size, (batch_size, seq_len + 1), generator=g)
            out.append((x[:, :-1], x[:, 1:]))
        return out
    from .data import PackedLoader, get_or_train_tokenizer, load_corpus, tokenize_corpus

    corpus = load_corpus(None if data == "stdlib" else data)
    tok = get_or_train_tokenizer(corpus, preset_cfg.vocab_size)
    loader = PackedLoader(tokenize_corpus(corpus, tok, "train"), seq_len, batch_size, seed=seed)
    return [loader.next_batch() for _ in range(n)]


def _coord_check(args: argparse.Namespace) -> int:
    from . import coord_check

    base = ModelConfig.from_preset(args.preset)
    if args.seq_len > base.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} exceeds max_position_embeddings {base.max_position_embeddings}")
    batches = _batches(base, args.data, args.steps, args.batch_size, args.seq_len, args.seed)
    params = tuple(p for p in args.params.split(",") if p)
    if not set(params) <= {"sp", "mup"}:
        raise ValueError(f"--params takes sp and/or mup, got {args.params!r}")
    done = [0]

    def progress(param, width):
        done[0] += 1
        print(f"  [{done[0]}/{len(params) * len(args.widths)}] {param} width {width}", flush=True)

    print(f"coordinate check: {args.preset} at widths {args.widths} (muP base width {base.hidden_size}), "
          f"{args.steps} AdamW steps at lr {args.lr}")
    records = coord_check.coord_check(base, args.widths, batches, lr=args.lr, parametrizations=params,
                                      seed=args.seed, progress=progress)
    summary = coord_check.save(records, args.out)
    print(f"growth from width {min(args.widths)} to {max(args.widths)} (max over steps of wide/narrow):")
    for p, kinds in summary.items():
        print(f"  {p:4s} " + "  ".join(f"{k} {v:.2f}x" for k, v in kinds.items()))
    print(f"wrote {args.out}/coord_check.png and coord_check.json")
    print(json.dumps({"coord_check_growth": summary}))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from . import sweep
    from .train.config import TrainConfig

    base_width = args.base_width or ModelConfig.from_preset(args.preset).hidden_size
    params = [p for p in args.params.split(",") if p]
    if not params or not set(params) <= {"sp", "mup"}:
        raise ValueError(f"--params takes sp and/or mup, got {args.params!r}")
    base = TrainConfig(preset=args.preset, data=args.data, vocab_size=args.vocab_size, seq_len=args.seq_len,
                       batch_size=args.batch_size, max_steps=args.max_steps, warmup_steps=args.warmup_steps,
                       eval_batches=args.eval_batches, cache_dir=args.cache_dir, device=args.device,
                       out_dir=str(Path(args.out) / "transferred"))
    if args.search < 0 or args.search_eta < 2 or args.search_rungs < 1:
        raise ValueError(f"need --search >= 0, --search-eta >= 2 and --search-rungs >= 1, got {args.search}, "
                         f"{args.search_eta} and {args.search_rungs}")
    try:
        refine = sweep.REFINE_LR if args.search_refine_lr is None else tuple(
            float(f) for f in args.search_refine_lr.split(",") if f.strip())
    except ValueError:
        raise ValueError(f"--search-refine-lr takes comma-separated factors, got {args.search_refine_lr!r}") from None
    if any(f <= 0 for f in refine):
        raise ValueError(f"--search-refine-lr factors must be > 0, got {args.search_refine_lr!r}")
    out = Path(args.out)
    if args.search:
        width = min(args.widths)
        print(f"sweep --search: {args.search} random configurations of every muP hyperparameter at width {width}, "
              f"successive halving (eta {args.search_eta}, {args.search_rungs} rungs, last rung {args.max_steps} "
              f"steps; {args.preset}, muP base width {base_width}) -> {args.out}")
        records, chosen = sweep.search(base, width, args.out, base_width, n=args.search, eta=args.search_eta,
                                       rungs=args.search_rungs, seed=args.seeds[0], param=params[0],
                                       refine_lr=refine)
        summary = {"chosen": chosen, "runs": len(records), "width": width}
        (out / "sweep.json").write_text(json.dumps({"summary": summary, "runs": records}, indent=1) + "\n")
        print(f"chosen at width {width}: " + sweep.describe({"param": params[0], "width": width,
                                                             "seed": args.seeds[0], **chosen})
              + f"  val_loss {chosen['val_loss']:.4f}")
    else:
        grid = (len(params) * len(args.widths) * len(args.seeds) * len(args.lrs) * len(args.inits or [None])
                * len(args.emb_mults or [None]))
        print(f"sweep: {grid} runs of {args.max_steps} steps ({args.preset}, muP base width {base_width}) -> "
              f"{args.out}")
        records = sweep.sweep(base, args.widths, args.lrs, args.seeds, params, args.out, base_width,
                              inits=args.inits, emb_mults=args.emb_mults)
        summary = {p: {"best": {w: sweep.best(records, p, w) for w in args.widths},
                       "lr_shift_widest_over_narrowest": sweep.lr_shift(records, p)} for p in params}
        (out / "sweep.json").write_text(json.dumps({"summary": summary, "runs": records}, indent=1) + "\n")
        sweep.plot(records, out / "sweep.png")
        print("best learning rate per width (mean val loss over seeds):")
        for p in params:
            for w in args.widths:
                b = summary[p]["best"][w]
                print(f"  {p:4s} width {w:5d}: lr {b['lr']:.3g}"
                      + ("" if b["init"] is None else f" init {b['init']:.3g}")
                      + ("" if b["emb"] is None else f" emb {b['emb']:.3g}") + f"  val_loss {b['val_loss']:.4f}")
            print(f"  {p:4s} best-lr shift from width {min(args.widths)} to {max(args.widths)}: "
                  f"{summary[p]['lr_shift_widest_over_narrowest']:.3g}x")
        source = "mup" if "mup" in params else params[0]
        chosen = summary[source]["best"][max(args.widths)]
    if args.transfer_to:
        path = sweep.transfer(base, chosen, args.transfer_to, base_width, out / f"transfer-{args.transfer_to}.json")
        print(f"wrote {path}: run it with `nanoseek pretrain --config {path}`")
    print(json.dumps({"sweep": summary}))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .serve.server import serve

    return serve(args)


def _add_serve_command(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server: one base model and many LoRA adapters",
                       description="Serve a checkpoint and its LoRA adapters over HTTP with continuous batching: "
                                   "/v1/completions, /v1/chat/completions (streaming), /v1/models, runtime "
                                   "/v1/load_lora_adapter, /health, /metrics (Prometheus) and a chat page at /. "
                                   "SIGTERM stops taking requests, lets in-flight ones finish for --grace seconds, "
                                   "and exits 0.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (config, weights and tokenizer)")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR",
                   help="a PEFT LoRA adapter directory served as model NAME (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--served-model-name", default=None,
                   help="the base model's name in /v1/models and requests (default: the checkpoint directory's name)")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="token budget of one engine step: decodes plus prefill chunks (default: the engine's)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="most requests running at once (engine default)")
    p.add_argument("--max-loras", type=int, default=None,
                   help="adapters resident in the batched LoRA stacks at once; others wait in host memory (default 8)")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="size of the paged KV-cache pool in tokens (default: the engine's sizing)")
    p.add_argument("--block-size", type=int, default=None, help="tokens per KV-cache block (default 64)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights and cache dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: no key; / /health /metrics stay open)")
    p.add_argument("--adapter-root", default=None, metavar="DIR",
                   help="enable /v1/load_lora_adapter and /v1/unload_lora_adapter for adapters under DIR only")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for their first token above this are refused with 429 (default 256)")
    p.add_argument("--speculative", action="store_true",
                   help="MTP speculative decoding: the checkpoint's Multi-Token Prediction modules draft tokens and "
                        "one forward verifies them; the output is unchanged (needs a DeepSeek-V3 checkpoint with "
                        "MTP modules); acceptance is in /metrics")
    p.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help="drafts per decode step with --speculative (default: the checkpoint's number of MTP "
                        "modules; more reuses the last module)")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds in-flight requests may run after SIGTERM before they are aborted (default 10)")
    p.set_defaults(func=_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoseek", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="parameter, FLOP and KV-cache accounting of a preset or checkpoint",
                       description="Count parameters (total and active per token), training FLOPs per token and "
                                   "KV-cache bytes per token (bf16) against the MHA-equivalent cache.")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a built-in model preset")
    p.add_argument("--checkpoint", help="a checkpoint directory (reads its config.json only)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="context length for the attention FLOPs (default: min(max_position_embeddings, 4096))")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_info)

    p = sub.add_parser("coord-check", help="muP coordinate check: activation scale vs width, SP and muP",
                       description="Build the preset at several widths (its own width is the muP base), take a "
                                   "few AdamW steps, and plot the mean |activation| of each layer type against "
                                   "width for the standard parametrization and muP (PNG + JSON).")
    p.add_argument("--preset", choices=sorted(PRESETS), default="dsv3-tiny", help="base model (default dsv3-tiny)")
    p.add_argument("--widths", type=_list_of(int), default=[64, 128, 256, 512], help="comma-separated hidden sizes")
    p.add_argument("--steps", type=int, default=4, help="AdamW steps (one batch each)")
    p.add_argument("--lr", type=float, default=1e-2, help="learning rate (muP scales it per layer)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--data", default="stdlib", help="'stdlib' (built-in corpus), 'random' tokens, or a corpus path")
    p.add_argument("--params", default="sp,mup", help="parametrizations to compare: sp,mup")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/coord_check", help="output directory")
    p.set_defaults(func=_coord_check)

    p = sub.add_parser("sweep", help="learning-rate sweep over widths and seeds; --transfer-to writes the target",
                       description="Short pretraining runs over a grid of widths x learning rates x seeds (and "
                                   "init scales), for muP and/or SP, on the built-in corpus by default. Writes "
                                   "sweep.json, sweep.png (loss vs lr per width) and the chosen values.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="dsv3-tiny")
    p.add_argument("--widths", type=_list_of(int), default=[64, 128, 256], help="comma-separated hidden sizes")
    p.add_argument("--lrs", type=_list_of(float), default=[2.0**-k for k in range(12, 4, -1)],
                   help="comma-separated learning rates (default 2^-12 .. 2^-5)")
    p.add_argument("--seeds", type=_list_of(int), default=[0])
    p.add_argument("--inits", type=_list_of(float), default=None, help="optional init std values to sweep too")
    p.add_argument("--emb-mults", type=_list_of(float), default=None,
                   help="optional embedding multipliers (muP's alpha_emb) to sweep too")
    p.add_argument("--params", default="mup", help="parametrizations: mup, sp or mup,sp (--search: the first)")
    p.add_argument("--search", type=int, default=0, metavar="N",
                   help="instead of the grid: random search over lr, init std, alpha_emb, alpha_out, alpha_attn, "
                        "embedding lr factor and zero-init query/readout (ranges: sweep.SPACE) with N "
                        "configurations at the narrowest --widths, pruned by successive halving")
    p.add_argument("--search-eta", type=int, default=4, help="successive halving keeps the best 1/ETA per rung")
    p.add_argument("--search-rungs", type=int, default=2,
                   help="rungs; rung r runs max_steps / eta^(rungs-1-r) steps (default 2: 1/4 then full)")
    p.add_argument("--search-refine-lr", default=None, metavar="F,F,...",
                   help="after the search, re-run its winner at lr x each factor (other values fixed, full "
                        "max_steps) and keep the best; '' turns it off (default: sweep.REFINE_LR, "
                        "1/16,1/8,1/4,1/2,2)")
    p.add_argument("--base-width", type=int, default=None, help="muP base width (default: the preset's width)")
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--eval-batches", type=int, default=10)
    p.add_argument("--data", default="stdlib")
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--transfer-to", type=int, default=None, metavar="WIDTH",
                   help="write a pretrain --config file for this width with every tuned value (lr and, after "
                        "--search, all the multipliers and zero-init switches)")
    p.add_argument("--out", default="out/sweep", help="output directory (finished runs are reused)")
    p.set_defaults(func=_sweep)
    from . import infer
    from .train import commands
    from .train.finetune import add_finetune_command

    commands.add_commands(sub)
    infer.add_commands(sub)
    add_finetune_command(sub)
    _add_serve_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
