"""Per-step measurements and where they go: MFU, MaxVio, peak memory, metrics.jsonl, console, TensorBoard.

What. Pure helpers (`peak_flops`, `max_vio`, `peak_memory_bytes`) and `MetricsLog`, which appends one JSON
object per line to out_dir/metrics.jsonl, reports its byte length (saved in each checkpoint so a resumed run
truncates the file back to exactly that step), prints to a tqdm bar or plain lines, and mirrors scalars to
TensorBoard when asked.

Why. The model returns statistics as data; the trainer decides what to keep. JSON lines are greppable,
append-only and trivially truncatable, which is what exact resume needs.

Rejected: wandb/mlflow (network, accounts); MFU against a single hard-coded peak (wrong on every other GPU):
the peak is looked up by device name and is None where unknown (CPU), so MFU is reported as null there.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import torch

from ..accounting import model_stats

# Dense bf16 tensor-core peak FLOP/s by substring of torch.cuda.get_device_name(); first match wins.
PEAK_BF16_FLOPS = (
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12),
    ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12),
    ("T4", 65e12),
)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of `device`, or None (CPU, unknown GPU): MFU is then not reported."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS if k in name), None)


def flops_per_token(cfg, seq_len: int) -> tuple[float, str]:
    """Training FLOPs per token (forward + backward) and where the number came from."""
    return float(model_stats(cfg, seq_len)["flops_per_token"]), "accounting.model_stats"


def max_vio(load: torch.Tensor) -> torch.Tensor:
    """load (n_layers, E) token counts -> (n_layers,) MaxVio = (max - mean) / mean per layer."""
    mean = load.float().mean(-1).clamp_min(1e-9)
    return (load.float().max(-1).values - mean) / mean


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA max allocated bytes, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss if sys.platform == "darwin" else rss * 1024)


class MetricsLog:
    """Append-only metrics.jsonl (+ optional TensorBoard) with a progress display. Rank 0 only."""

    def __init__(self, out_dir: Path, total_steps: int, start_step: int, log_every: int,
                 truncate_to: int | None = None, tensorboard: bool = False):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_to is None:  # a fresh run starts a fresh file
            self.path.write_text("")
        else:  # resume: drop lines written after the checkpoint
            with open(self.path, "a+b") as f:
                if f.seek(0, os.SEEK_END) < truncate_to:
                    raise ValueError(f"{self.path} is shorter ({f.tell()} bytes) than the checkpoint recorded "
                                     f"({truncate_to}): it is not this run's metrics file")
                f.truncate(truncate_to)
        self.f = open(self.path, "a")
        self.log_every = log_every
        self.tty = sys.stdout.isatty()
        self.bar = None
        if self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError("--tensorboard needs the tensorboard package (pip install tensorboard)") from e
            self.tb = SummaryWriter(str(Path(out_dir) / "tb"))

    def offset(self) -> int:
        """Bytes written so far: what a checkpoint records to truncate back to."""
        self.f.flush()
        return self.f.tell()

    def write(self, record: dict) -> None:
        """Append one record; train records (with "loss") update the display, eval records are printed."""
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, record["step"])
        step = record["step"]
        if "loss" in record:
            brief = f"loss {record['loss']:.4f} lr {record['lr']:.2e} {record['tokens_per_s']:,.0f} tok/s"
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix_str(brief)
            elif step % self.log_every == 0 or step == 1:
                print(f"step {step:>6} | {brief} | gnorm {record['grad_norm']:.3f}", flush=True)
        else:
            line = f"step {step:>6} | " + " ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "step")
            (self.bar.write if self.bar is not None else print)(line)

    def print(self, msg: str) -> None:
        """A message that does not break the progress bar."""
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        self.f.close()
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics.jsonl."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
