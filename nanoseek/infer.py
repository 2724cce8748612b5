"""`nanoseek generate | eval | experts | merge`: the commands that run a trained checkpoint (cli.py registers them).

`generate`, `eval` and `experts` take `--adapter DIR` (a PEFT LoRA directory): the adapter is loaded and merged
into the base weights (W + gamma B A, exact up to rounding), so every code path runs it unchanged. `merge`
writes that merged model as a plain checkpoint (what peft calls merge_and_unload). Each command function returns
an exit code; ValueError/FileNotFoundError become clean messages in cli.main.
Why here, not under train/: none of them trains; they read a checkpoint (moved out of train/commands.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from .data import Tokenizer, load_corpus, tokenize_corpus
from .data.sft import add_chat_template
from .modeling import Model
from .train.evaluate import evaluate, expert_routing_by_domain
from .train.flags import optional


def add_commands(subparsers) -> None:
    """Register generate, eval, experts and merge on cli.py's subparsers."""
    g = subparsers.add_parser("generate", help="sample text from a checkpoint (KV cache)")
    g.add_argument("--checkpoint", required=True, help="checkpoint directory (holds tokenizer.json)")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    g.add_argument("--seed", type=int, default=None, help="sampling seed")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda")
    g.add_argument("--adapter", default=None, help="a PEFT LoRA directory to run on top of the checkpoint")
    g.add_argument("--speculative", action="store_true",
                   help="MTP speculative decoding: the model's MTP modules draft, the model verifies (same output "
                        "distribution; identical text when greedy); prints the acceptance statistics")
    g.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help="drafts per step with --speculative (default: num_nextn_predict_layers; more reuses the "
                        "last MTP module)")
    g.set_defaults(func=_generate)

    e = subparsers.add_parser("eval", help="validation loss, perplexity and bits per byte of a checkpoint")
    _eval_args(e)
    e.add_argument("--eval-batches", type=optional(int), default=None, help="batches (default: whole val split)")
    e.add_argument("--batch-size", type=int, default=16, help="sequences per batch (default 16)")
    e.set_defaults(func=_eval)

    x = subparsers.add_parser("experts", help="plot which experts each data domain is routed to")
    _eval_args(x)
    x.add_argument("--out", default="experts-out", help="output directory for experts.png and experts.json")
    x.add_argument("--max-tokens-per-domain", type=int, default=8192, help="tokens fed per domain (default 8192)")
    x.add_argument("--max-domains", type=int, default=24, help="largest N domains (by val documents) to show")
    x.set_defaults(func=_experts)

    m = subparsers.add_parser("merge", help="fold a LoRA adapter into its base: a plain checkpoint out",
                              description="Load CHECKPOINT, load the PEFT LoRA directory ADAPTER, fold it into "
                                          "the weights (W + gamma B A) and write a full checkpoint (HF format, "
                                          "with the tokenizer) that needs no adapter.")
    m.add_argument("--checkpoint", required=True, help="the base checkpoint directory")
    m.add_argument("--adapter", required=True, help="a PEFT LoRA directory trained on that base")
    m.add_argument("--out", required=True, help="output directory (must not exist)")
    m.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype on disk (default: the base's)")
    m.set_defaults(func=_merge)


def _eval_args(p) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint directory")
    p.add_argument("--data", default=None, help="corpus (default: the one the checkpoint was trained on)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the training seq_len)")
    p.add_argument("--cache-dir", default=None, help="token cache directory")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--adapter", default=None, help="a PEFT LoRA directory to run on top of the checkpoint")


# ---------------------------------------------------------------------------------------------- inference
def _device(name: str):
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                        ("cpu" if name == "auto" else name))


def _load(checkpoint: str, device: str, adapter: str | None = None):
    """(model in eval mode, tokenizer, the saved TrainConfig dict); `adapter` is loaded and merged."""
    path = Path(checkpoint)
    model = Model.from_pretrained(path, device=_device(device))
    if adapter is not None:
        model.load_adapter(adapter, "adapter")
        model.merge_adapter("adapter")
    model.eval()
    return model, Tokenizer.load(path), _saved_train_config(path)


def _saved_train_config(path: Path) -> dict:
    f = path / "trainer_state" / "state.json"
    return json.loads(f.read_text()).get("train_config", {}) if f.is_file() else {}


def _generate(args: argparse.Namespace) -> int:
    if args.num_speculative_tokens is not None and not args.speculative:
        raise ValueError("--num-speculative-tokens needs --speculative")
    model, tok, _ = _load(args.checkpoint, args.device, args.adapter)
    ids = tok.encode(args.prompt)
    if not ids:
        raise ValueError("--prompt must not be empty")
    x = torch.tensor([ids], device=next(model.parameters()).device)
    out, stats = model.generate(x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed, eos_token_id=tok.eos_id,
                                speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens,
                                return_stats=True)
    print(args.prompt + tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True))
    if args.speculative:
        acc = ", ".join(f"{a:.1%}" for a in stats["acceptance_by_position"])
        print(f"[speculative] acceptance by draft position: {acc}; mean accepted length "
              f"{stats['mean_accepted_length']:.2f} tokens per verify forward; forwards: main "
              f"{stats['main_forwards']}, MTP {stats['mtp_forwards']}")
    return 0


def _eval_data(args, tok, saved: dict):
    data = args.data or saved.get("data", "stdlib")
    corpus = load_corpus(None if data == "stdlib" else data)
    seq_len = args.seq_len or saved.get("seq_len", 256)
    return data, corpus, tokenize_corpus(corpus, tok, "val", args.cache_dir), seq_len


def _eval(args: argparse.Namespace) -> int:
    model, tok, saved = _load(args.checkpoint, args.device, args.adapter)
    data, corpus, val, seq_len = _eval_data(args, tok, saved)
    res = evaluate(model, val, seq_len, args.batch_size, args.eval_batches, next(model.parameters()).device,
                   corpus.num_bytes("val"))
    res = {"checkpoint": str(args.checkpoint), **({"adapter": args.adapter} if args.adapter else {}),
           "data": data, "seq_len": seq_len, **res,
           "val_unigram_byte_entropy": corpus.unigram_byte_entropy("val")}
    width = max(map(len, res))
    for k, v in res.items():
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    print(json.dumps(res))
    return 0


def _experts(args: argparse.Namespace) -> int:

    model, tok, saved = _load(args.checkpoint, args.device, args.adapter)
    data, corpus, _, seq_len = _eval_data(args, tok, saved)
    frac = expert_routing_by_domain(model, corpus, tok, seq_len, args.max_tokens_per_domain,
                                    next(model.parameters()).device)
    if not frac:
        raise ValueError(f"no validation domain of {data} has a full window of {seq_len} tokens")
    counts: dict[str, int] = {}
    for doc in corpus.docs("val"):
        counts[doc.domain] = counts.get(doc.domain, 0) + 1
    domains = sorted(frac, key=lambda k: -counts[k])[: args.max_domains]
    domains.sort()
    arr = np.stack([frac[k].numpy() for k in domains])  # (D, n_moe_layers, E)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "experts.json").write_text(json.dumps({"checkpoint": str(args.checkpoint), "domains": domains,
                                                  "fraction": arr.transpose(1, 0, 2).tolist()}) + "\n")
    _plot_experts(arr, domains, out / "experts.png")
    print(json.dumps({"domains": len(domains), "moe_layers": arr.shape[1], "experts": arr.shape[2],
                      "png": str(out / "experts.png"), "json": str(out / "experts.json")}))
    return 0


def _merge(args: argparse.Namespace) -> int:

    out = Path(args.out)
    if out.exists():
        raise ValueError(f"--out {out} already exists")
    model, tok, _ = _load(args.checkpoint, "cpu")
    model.load_adapter(args.adapter, "adapter")
    model.merge_and_unload("adapter")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model.save_pretrained(out, dtype=dtype, tokenizer=tok, extra=add_chat_template)
    print(json.dumps({"merged": str(args.adapter), "base": str(args.checkpoint), "out": str(out)}))
    return 0


def _plot_experts(arr, domains: list[str], path: Path) -> None:
    """One heatmap panel per MoE layer: rows = domains, columns = experts, colour = fraction of tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    D, L, E = arr.shape
    fig, axes = plt.subplots(1, L, figsize=(1.5 + 0.35 * E * L + 1.5, 1.2 + 0.28 * D), squeeze=False)
    for i in range(L):
        ax = axes[0, i]
        im = ax.imshow(arr[:, i], aspect="auto", cmap="magma", vmin=0)
        ax.set_title(f"MoE layer {i}")
        ax.set_xlabel("expert")
        ax.set_yticks(range(D), domains if i == 0 else [""] * D, fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.suptitle("fraction of routed tokens per expert, by domain")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
