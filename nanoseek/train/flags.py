"""One dataclass-to-argparse helper: every field of a run config is a --flag, its help text in the field's metadata.

What. `flag(default, help, **kw)` declares a field (`metadata["help"]`; optional `choices`, `names` (the flag
spellings, when not just `--field-name`), `const` (the value of a bare flag: `--resume` alone = latest));
`add_flags(parser, Config)` adds one argument per field: `batch_size` <-> `--batch-size`, bools as `--x/--no-x`,
`int | None` fields accept "none".
Used by `nanoseek pretrain` (TrainConfig) and `nanoseek finetune` (FinetuneConfig).
Why: two generators with two help styles had drifted (one read metadata, one a separate HELP dict).
Rejected: click / typer (another dependency and a second way to declare the same fields).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import field

TYPES = {"int": int, "float": float, "str": str}


def flag(default, help: str, **kw):
    """A dataclass field that is also a command-line flag (see the module docstring for `kw`)."""
    if default is dataclasses.MISSING:
        return field(metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def optional(kind):
    """argparse type: `kind`, or None for "none" / "null" / "all"."""
    def parse(s: str):
        return None if s.lower() in ("none", "null", "all") else kind(s)

    parse.__name__ = kind.__name__
    return parse


def add_flags(p: argparse.ArgumentParser, cls, suppress_defaults: bool = False) -> None:
    """One argument per field of dataclass `cls`. suppress_defaults: absent flags leave no attribute, so values from
    a --config file can fill them (the dataclass defaults then apply in the constructor)."""
    for f in dataclasses.fields(cls):
        meta = f.metadata
        names = meta.get("names", ("--" + f.name.replace("_", "-"),))
        required = f.default is dataclasses.MISSING
        shown = "" if required or f.default in (None, "") else f" (default: {f.default})"
        kw: dict = {"dest": f.name, "help": meta["help"] + shown}
        if not suppress_defaults and not required:
            kw["default"] = f.default
        t = str(f.type).split(" |")[0]
        if t == "bool":
            p.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
            continue
        kind = optional(TYPES[t]) if "None" in str(f.type) else TYPES[t]
        if "const" in meta:
            kw.update(nargs="?", const=meta["const"], metavar="PATH")
        p.add_argument(*names, type=kind, required=required, choices=meta.get("choices"), **kw)
