"""Training-step speed of this tree against another nanoseek tree (e.g. main), interleaved in one process.

For a refactor or a speed change: both packages are imported side by side (the baseline under the name
`nanoseek_baseline`), and for each case the two take turns, round after round, timing full optimizer steps
(forward + backward + clip + AdamW on random tokens, train_throughput.py's `time_steps`). Contention from other work
on the machine then hits both sides alike; the table gives each side's median ms/step and the ratio.

    python3 benchmarks/train_throughput_ab.py --baseline /work/main            # CPU cases of train_throughput.py
    python3 benchmarks/train_throughput_ab.py --baseline ../main --rounds 5 --steps 3
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from train_throughput import CPU_CASES, time_steps  # noqa: E402

import nanoseek  # noqa: E402


def load_baseline(root: Path):
    """The nanoseek package under `root`, imported as `nanoseek_baseline` (its imports are relative)."""
    spec = importlib.util.spec_from_file_location("nanoseek_baseline", root / "nanoseek" / "__init__.py",
                                                  submodule_search_locations=[str(root / "nanoseek")])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["nanoseek_baseline"] = pkg
    spec.loader.exec_module(pkg)
    return pkg


def timed(pkg, preset: str, batch: int, seq: int, steps: int, warmup: int) -> float:
    """Seconds per optimizer step of `pkg`'s model (train_throughput.time_steps, with `pkg`'s optimizer)."""
    import train_throughput

    torch.manual_seed(0)
    cfg = pkg.ModelConfig.from_preset(preset)
    model = pkg.Model(cfg, device="cpu")
    train_throughput.configure_optimizer = pkg.configure_optimizer  # the side under test builds its own AdamW
    return time_steps(model, torch.device("cpu"), batch, seq, cfg.vocab_size, steps, warmup, bf16=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="root of the other nanoseek tree (holds nanoseek/)")
    p.add_argument("--rounds", type=int, default=3, help="alternations per case (default 3)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per turn (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per turn (default 1)")
    args = p.parse_args()
    root = Path(args.baseline).resolve()
    if not (root / "nanoseek" / "__init__.py").is_file():
        raise SystemExit(f"--baseline {root}: no nanoseek/__init__.py there")
    torch.set_flush_denormal(True)  # as the trainer does on CPU (denormals make tiny-init steps ~30x slower)
    sides = {"baseline": load_baseline(root), "this": nanoseek}
    rows = []
    print(f"{'case':<22} {'baseline ms':>12} {'this ms':>10} {'this/base':>10}")
    for preset, batch, seq in CPU_CASES:
        times: dict[str, list[float]] = {k: [] for k in sides}
        for _ in range(args.rounds):
            for name, pkg in sides.items():
                times[name].append(timed(pkg, preset, batch, seq, args.steps, args.warmup))
        base, this = statistics.median(times["baseline"]), statistics.median(times["this"])
        rows.append({"case": f"{preset} {batch}x{seq}", "baseline_ms": 1e3 * base, "this_ms": 1e3 * this,
                     "ratio": this / base, "baseline_all_ms": [1e3 * t for t in times["baseline"]],
                     "this_all_ms": [1e3 * t for t in times["this"]]})
        print(f"{rows[-1]['case']:<22} {1e3 * base:>12.1f} {1e3 * this:>10.1f} {this / base:>10.3f}")
    print(json.dumps({"benchmark": "train_throughput_ab", "baseline": str(root), "rounds": args.rounds,
                      "steps": args.steps, "torch": torch.__version__,
                      "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                      "rows": rows}))


if __name__ == "__main__":
    main()
