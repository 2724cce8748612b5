"""`nanoseek pretrain`: every TrainConfig field is a flag (cli.py registers the command).

`batch_size` -> `--batch-size` (train/flags.py); a `--config` JSON/YAML file supplies field values first and flags
given on the command line override it. ValueError/FileNotFoundError become clean messages in cli.main, and a
diverged run (NaN/inf) exits with code 3. The commands that run a trained checkpoint (generate, eval, experts,
merge) are in nanoseek/infer.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .config import TrainConfig, load_config_file
from .flags import add_flags
from .trainer import TrainingDiverged, train

DIVERGED_EXIT = 3


def add_commands(subparsers) -> None:
    """Register pretrain on cli.py's subparsers."""
    p = subparsers.add_parser("pretrain", help="pretrain a model (torchrun for several processes)",
                              description="Pretrain a GPT-2 or DeepSeek-V3-style model. Every flag is a "
                                          "TrainConfig field; --config FILE gives defaults, flags override it.",
                              argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="JSON or YAML file whose keys are the fields below")
    add_flags(p, TrainConfig, suppress_defaults=True)
    p.set_defaults(func=_pretrain)


# ---------------------------------------------------------------------------------------------- pretrain
def build_train_config(args: argparse.Namespace):
    """TrainConfig from --config file values overridden by the flags given on the command line."""
    values = load_config_file(args.config) if getattr(args, "config", None) else {}
    given = {k: v for k, v in vars(args).items() if k not in ("config", "func", "command")}
    return TrainConfig.from_dict({**values, **given})


def _pretrain(args: argparse.Namespace) -> int:
    cfg = build_train_config(args)
    try:
        summary = train(cfg)
    except TrainingDiverged as e:
        print(f"nanoseek pretrain: training diverged: {e}", file=sys.stderr)
        return DIVERGED_EXIT
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"pretrain": summary}))
    return 0
