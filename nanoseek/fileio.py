"""Atomic directory writes, shared by model checkpoints (checkpoint.py), adapters (lora_io.py) and training state.

What. `atomic_directory(path, fill)` runs fill(tmp) in a temporary sibling directory, fsyncs it and renames it into
place, so a crash leaves the old directory or the new one, never half of one. It refuses to replace a directory
holding files that no checkpoint or adapter writes (`OWNED`), so a wrong --out-dir never deletes user files.
Why its own module: both checkpoint.py and lora.py/lora_io.py need it, and neither should import the other for it.
Rejected: writing in place and marking completion with a flag file only (a reader can still see half a directory).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

# Files a checkpoint (or PEFT adapter) directory may hold; anything else makes save refuse to replace the directory.
OWNED = re.compile(r"^(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|"
                   r"model\.safetensors\.index\.json|tokenizer\.json|tokenizer_config\.json|"
                   r"special_tokens_map\.json|adapter_config\.json|adapter_model\.safetensors|trainer_state|"
                   r"metrics\.jsonl|README\.md|.*\.png)$")


def atomic_directory(path: str | Path, fill: Callable[[Path], None]) -> Path:
    """Run fill(tmp_dir), then move tmp_dir to `path` (replacing an older checkpoint there)."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path} exists and is not a directory")
        foreign = sorted(p.name for p in path.iterdir() if not OWNED.match(p.name))
        if foreign:
            raise ValueError(f"refusing to replace {path}: it holds files that are not part of a checkpoint "
                             f"({', '.join(foreign[:5])}); choose another directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        fill(tmp)
        _fsync_dir(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{tag}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _fsync_dir(path: Path) -> None:
    for f in [*path.iterdir(), path] if path.is_dir() else [path]:
        if f.is_file() or f == path:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
