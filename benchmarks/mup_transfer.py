"""muTransfer, a small reproduction of Tensor Programs V Figure 1 on the built-in corpus.

For each architecture (GPT-2, DeepSeek-V3) and parametrization (standard, muP), sweep the learning rate at
four widths with the real trainer (nanoseek.sweep) and report, per width, the best learning rate and loss.
Targets: under muP the best learning rate moves at most one grid step (2x) from the narrowest to the widest
model and the widest model reaches a lower loss than the narrowest; under SP it moves two steps or more.
Prints a table, writes mup_transfer.png (loss vs lr, a panel per architecture x parametrization) and ends
with one JSON line.

    python3 benchmarks/mup_transfer.py                                  # CPU default: small, ~tens of minutes
    python3 benchmarks/mup_transfer.py --widths 128,256,512,1024 --steps 2000 --seq-len 256 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek import sweep  # noqa: E402
from nanoseek.train.config import TrainConfig  # noqa: E402

PRESETS = {"gpt2": "gpt2-tiny", "dsv3": "dsv3-tiny"}


def grid_steps(records, param) -> float:
    """How many factor-of-2 grid steps the best lr moved from the narrowest to the widest width."""
    return abs(math.log2(sweep.lr_shift(records, param)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="gpt2,dsv3")
    ap.add_argument("--widths", default="32,64,128,256")
    ap.add_argument("--base-width", type=int, default=32, help="muP base width (the proxy)")
    ap.add_argument("--lrs", default=",".join(f"{2.0 ** -k:g}" for k in range(11, 3, -1)))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="out/mup_transfer")
    args = ap.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    lrs = [float(v) for v in args.lrs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]

    results, all_records, t0 = {}, {}, time.time()
    for arch in args.archs.split(","):
        base = TrainConfig(preset=PRESETS[arch], seq_len=args.seq_len, batch_size=args.batch_size,
                           max_steps=args.steps, warmup_steps=max(1, args.steps // 10), eval_batches=args.eval_batches,
                           vocab_size=args.vocab_size, device=args.device, log_every=max(1, args.steps // 2))
        records = sweep.sweep(base, widths, lrs, seeds, ["sp", "mup"], Path(args.out) / arch, args.base_width)
        all_records[arch] = records
        for param in ("sp", "mup"):
            best = {w: sweep.best(records, param, w) for w in widths}
            results[f"{arch}/{param}"] = {
                "best_lr": {w: b["lr"] for w, b in best.items()},
                "best_loss": {w: b["val_loss"] for w, b in best.items()},
                "lr_shift_grid_steps": grid_steps(records, param),
                "widest_beats_narrowest": best[widths[-1]]["val_loss"] < best[widths[0]]["val_loss"],
            }

    print(f"\nmuTransfer sweep: widths {widths}, {len(lrs)} learning rates, {args.steps} steps, "
          f"batch {args.batch_size}x{args.seq_len}, muP base width {args.base_width}")
    print(f"{'arch/param':12s} " + " ".join(f"{'w' + str(w):>16s}" for w in widths) + "  shift  wide<narrow")
    for key, r in results.items():
        cells = " ".join(f"{r['best_lr'][w]:>7.2g} ({r['best_loss'][w]:.3f})" for w in widths)
        print(f"{key:12s} {cells}  {r['lr_shift_grid_steps']:5.0f}  {r['widest_beats_narrowest']}")
    print("cells: best lr (val loss at it); shift: grid steps (x2) the best lr moved, narrowest -> widest")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(all_records)
    fig, axes = plt.subplots(len(archs), 2, figsize=(11, 4 * len(archs)), squeeze=False)
    for i, arch in enumerate(archs):
        for j, param in enumerate(("sp", "mup")):
            ax = axes[i][j]
            for w in widths:
                pts = []
                for lr in lrs:
                    vals = [r["val_loss"] for r in all_records[arch]
                            if (r["param"], r["width"], r["lr"]) == (param, w, lr)]
                    m = sum(vals) / len(vals)
                    if math.isfinite(m):
                        pts.append((lr, m))
                ax.plot(*zip(*pts), marker="o", label=f"width {w}")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{arch}: {'muP' if param == 'mup' else 'standard parametrization'}")
            ax.set_xlabel("learning rate")
            ax.set_ylabel("validation loss")
            ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    fig.savefig(Path(args.out) / "mup_transfer.png", dpi=110)
    print(f"wrote {Path(args.out) / 'mup_transfer.png'} ({time.time() - t0:.0f} s)")
    print(json.dumps({"benchmark": "mup_transfer", "widths": widths, "steps": args.steps, "results": results}))


if __name__ == "__main__":
    main()
