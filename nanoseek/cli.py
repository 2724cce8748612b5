"""`nanoseek <command>`: the command line. Each room of the house registers its own subcommands.

    nanoseek info --preset dsv3-tiny --json      parameter, FLOP and KV-cache accounting
    (training, evaluation, generation: see nanoseek/train/commands.py)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

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
    if importlib.util.find_spec("nanoseek.train.commands") is not None:
        from .train.commands import add_commands

        add_commands(sub)
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
