"""MoE load balancing: auxiliary-loss-free bias vs auxiliary loss vs nothing, at equal steps.

Trains the same DeepSeek-V3-style model three times on the built-in corpus with router_balance in
{aux_free, aux_loss, none} (same seed, data order and steps) and reports, for each:
    MaxVio_batch   mean over steps of the per-step MaxVio (max over MoE layers), (max - mean) / mean load
    MaxVio_global  MaxVio of the loads summed over the whole run (max over layers), as in the V3 report
    val_loss, val_bpb at the end
Prints a table, writes balance.png (MaxVio over steps, val loss) and ends with one JSON line.

    python3 benchmarks/balance.py                       # CPU, a few minutes per run
    python3 benchmarks/balance.py --steps 2000 --seq-len 1024 --batch-size 32 --hidden-size 512  # a GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from nanoseek.train.config import TrainConfig  # noqa: E402
from nanoseek.train.metrics import read_metrics  # noqa: E402
from nanoseek.train.trainer import train  # noqa: E402

MODES = ("aux_free", "aux_loss", "none")


def run(mode: str, args) -> dict:
    """Train one mode; returns its balance and loss numbers plus per-step MaxVio."""
    out = Path(args.out) / mode
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cfg = TrainConfig(preset=args.preset, hidden_size=args.hidden_size, router_balance=mode,
                      aux_loss_alpha=args.aux_loss_alpha if mode == "aux_loss" else None,
                      data=args.data, seq_len=args.seq_len, batch_size=args.batch_size, max_steps=args.steps,
                      lr=args.lr, warmup_steps=max(1, args.steps // 20), eval_every=0,
                      eval_batches=args.eval_batches, out_dir=str(out), seed=args.seed, device=args.device,
                      bias_update_gamma=args.gamma, log_every=max(1, args.steps // 10), plots=False,
                      keep_last=1)
    t0 = time.time()
    summary = train(cfg)
    recs = read_metrics(out / "metrics.jsonl")
    steps = [r for r in recs if "loss" in r]
    loads = np.array([r["expert_load"] for r in steps], dtype=float)  # (S, n_moe_layers, E)
    per_step = np.array([max(r["max_vio"]) for r in steps])  # (S,)
    total = loads.sum(0)  # (n_moe_layers, E)
    global_vio = ((total.max(-1) - total.mean(-1)) / total.mean(-1)).max()
    return {"mode": mode, "maxvio_batch": float(per_step.mean()), "maxvio_global": float(global_vio),
            "val_loss": summary["val_loss"], "val_bpb": summary["val_bpb"], "seconds": time.time() - t0,
            "maxvio_per_step": per_step.tolist(), "main_loss_last10": float(np.mean([r["main_loss"]
                                                                                    for r in steps[-10:]]))}


def plot(results: list[dict], path: Path) -> None:
    """MaxVio per step for each mode, and the final validation loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    for r in results:
        v = np.array(r["maxvio_per_step"])
        k = max(1, len(v) // 50)
        smooth = np.convolve(v, np.ones(k) / k, mode="valid")
        a.plot(np.arange(len(smooth)) + k, smooth, label=r["mode"])
    a.set(xlabel="step", ylabel="MaxVio (max over MoE layers)", yscale="log", title="per-batch MaxVio")
    a.legend()
    a.grid(alpha=0.3)
    b.bar([r["mode"] for r in results], [r["val_loss"] for r in results], color=["C0", "C1", "C2"])
    lo, hi = min(r["val_loss"] for r in results), max(r["val_loss"] for r in results)
    b.set(ylim=(lo - 0.2, hi + 0.1), title="final val loss", ylabel="nats/token")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="dsv3-tiny")
    p.add_argument("--hidden-size", type=int, default=None, help="rescale the preset's width")
    p.add_argument("--data", default="stdlib")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--gamma", type=float, default=0.001, help="aux-free bias update speed")
    p.add_argument("--aux-loss-alpha", type=float, default=0.01, help="alpha of the aux_loss baseline")
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", default="out/balance")
    args = p.parse_args()
    results = [run(m, args) for m in args.modes.split(",")]
    print(f"\n{'mode':<10} {'MaxVio_batch':>12} {'MaxVio_global':>13} {'val_loss':>9} {'val_bpb':>8} {'sec':>6}")
    for r in results:
        print(f"{r['mode']:<10} {r['maxvio_batch']:>12.3f} {r['maxvio_global']:>13.3f} {r['val_loss']:>9.4f} "
              f"{r['val_bpb']:>8.4f} {r['seconds']:>6.0f}")
    png = Path(args.out) / "balance.png"
    plot(results, png)
    print(json.dumps({"benchmark": "balance", "args": vars(args), "plot": str(png),
                      "results": [{k: v for k, v in r.items() if k != "maxvio_per_step"} for r in results]}))


if __name__ == "__main__":
    main()
