"""A small "LoRA Without Regret" reproduction: learning-rate sweeps of full fine-tuning, LoRA at several ranks, and the
LoRA variants DoRA and VeRA.

For one base checkpoint and one SFT task (default: the built-in `email` task, "continue this file"), every
(method, learning rate) pair fine-tunes from the same base for the same steps and data order (same seed) and
reports the final validation loss on the task's held-out completions. Printed: the table, the best loss and
best learning rate of each method, and the ratio best-LoRA-LR / best-full-LR per rank (published: about 10x).
alpha is held fixed (default 32, as in the paper), so gamma = alpha / r: the 1/r scaling under which the best
LoRA learning rate barely moves with the rank. LoRA targets every linear layer and the routed experts.
DoRA and VeRA have no form on the routed experts that peft loads, so they run on --variant-targets (default
"linears": every linear layer but lm_head), each at its own grid of learning rates, beside a LoRA row on the same
targets ("lora r=16 [linears]"): the like-for-like comparison. DoRA keeps alpha; VeRA has no alpha (its scale is
the trained lambda vectors). Printed too: trainable parameters of each method.
Writes lora_vs_full.png (val loss against LR, one curve per method) and ends with one JSON line.

    python3 benchmarks/lora_vs_full.py --base CKPT                       # default grid
    python3 benchmarks/lora_vs_full.py --base CKPT --ranks 1,4,16,64 --steps 60 --task builtin:xml
    python3 benchmarks/lora_vs_full.py --base CKPT --ranks 16 --dora-ranks 16 --vera-ranks 256   # the variants
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek.train.finetune import FinetuneConfig, finetune  # noqa: E402


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v]


def lora_label(r: int, targets: str, kind: str = "lora") -> str:
    return f"{kind} r={r}" + ("" if targets == "all-linear" else f" [{targets}]")


def expand_targets(base: str, targets: str) -> str:
    """"all-linear+lm_head": every module name LoRA can wrap in the base, lm_head included; "linears": every linear
    layer's name but lm_head (no experts, no router); comma-separated."""
    if targets not in ("all-linear+lm_head", "linears"):
        return targets
    from nanoseek import Model
    from nanoseek.lora import LoraLinear, candidates

    model = Model.from_pretrained(base, device="meta")
    if targets == "linears":
        names = {p.rsplit(".", 1)[-1] for p, (m, proj) in candidates(model).items()
                 if isinstance(m, LoraLinear) and p != "lm_head"}
    else:
        names = {("experts" if proj else path.rsplit(".", 1)[-1]) for path, (_, proj) in candidates(model).items()}
    return ",".join(sorted(names))


def finetune_config(base: str, task: str, kind: str, r: int, lr: float, targets: str, a, out: Path) -> FinetuneConfig:
    """kind: full, lora, dora or vera."""
    return FinetuneConfig(base=base, data=task, out_dir=str(out), full=kind == "full", dora=kind == "dora",
                          peft="vera" if kind == "vera" else "lora", r=r, lora_alpha=a.alpha, lr=lr,
                          target_modules=targets, max_steps=a.steps, batch_size=a.batch,
                          seq_len=a.seq_len, warmup_steps=a.steps // 10, eval_every=0, eval_batches=a.eval_batches,
                          save_every=0, plots=False, seed=a.seed, weight_decay=0.0)


def run(base: str, task: str, method: tuple, lr: float, a, tmp: Path) -> dict:
    label, kind, r, targets = method
    cfg = finetune_config(base, task, kind, r, lr, targets, a, tmp / f"{re.sub(r'[^A-Za-z0-9=]+', '_', label)}-{lr:g}")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = finetune(cfg)
    return {"method": label, "rank": None if kind == "full" else r, "lr": lr,
            "val_loss": s["val_loss"], "initial_val_loss": s["initial"]["val_loss"],
            "seconds": time.perf_counter() - t0}


def trainable_parameters(base: str, task: str, method: tuple, a) -> int:
    """Parameters the method trains on this base (an adapter added on a meta-device copy: nothing is computed)."""
    from nanoseek import Model

    label, kind, r, targets = method
    model = Model.from_pretrained(base, device="meta")
    if kind == "full":
        return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    cfg = finetune_config(base, task, kind, r, 1.0, targets, a, Path("unused"))
    model.add_adapter("x", cfg.lora_config())
    return sum(p.numel() for p in model.trainable_adapter("x"))


def _finished(rows_file: str, key: dict) -> dict:
    """(method, lr) -> row of the runs with these settings already in the rows file."""
    done = {}
    if rows_file and Path(rows_file).is_file():
        for line in Path(rows_file).read_text().splitlines():
            x = json.loads(line)
            if x.get("key") == key:
                done[(x["method"], x["lr"])] = x
    return done


def fitted_best_lr(points: list[tuple[float, float]]) -> float | None:
    """The minimum of the parabola through the grid's best point and its two neighbours, in log(lr): a finer
    estimate of the best learning rate than the grid point. None when the best point is at an edge of the grid."""
    pts = sorted(points)
    i = min(range(len(pts)), key=lambda j: pts[j][1])
    if i == 0 or i == len(pts) - 1:
        return None
    (x0, y0), (x1, y1), (x2, y2) = [(math.log(p), v) for p, v in pts[i - 1:i + 2]]
    den = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / den
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / den
    if a <= 0:
        return math.exp(x1)
    return math.exp(min(max(-b / (2 * a), x0), x2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="a nanoseek/HF checkpoint directory with tokenizer.json")
    ap.add_argument("--task", default="builtin:email")
    ap.add_argument("--full-lrs", type=_floats, default=_floats("5e-5,1e-4,2e-4,5e-4,1e-3,2e-3"))
    ap.add_argument("--lora-lrs", type=_floats, default=_floats("2e-4,5e-4,1e-3,2e-3,5e-3,1e-2,2e-2"))
    ap.add_argument("--ranks", default="1,8,64", help="LoRA ranks on --targets")
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--targets", default="all-linear",
                    help='LoRA target_modules: "all-linear" (every projection and expert, not lm_head), '
                         '"all-linear+lm_head", "linears", or a comma-separated list')
    ap.add_argument("--variant-targets", default="linears",
                    help="targets of the DoRA, VeRA and like-for-like LoRA rows (default: every linear layer but "
                         "lm_head; neither variant has a peft-loadable form on the routed experts)")
    ap.add_argument("--variant-lora-ranks", default="", help="LoRA ranks on --variant-targets ('' = none)")
    ap.add_argument("--dora-ranks", default="", help="DoRA ranks on --variant-targets ('' = none)")
    ap.add_argument("--vera-ranks", default="", help="VeRA ranks on --variant-targets ('' = none)")
    ap.add_argument("--dora-lrs", type=_floats, default=_floats("2e-3,5e-3,1e-2,2e-2"),
                    help="learning rates of the DoRA rows and of the LoRA rows on --variant-targets")
    ap.add_argument("--vera-lrs", type=_floats, default=_floats("5e-3,1e-2,2e-2,5e-2,1e-1"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default="lora_vs_full.png")
    ap.add_argument("--rows", default="lora_vs_full.rows.jsonl",
                    help="finished runs are appended here and reused by a rerun with the same settings ('' = off)")
    ap.add_argument("--reverse", action="store_true",
                    help="run the grid from its end: a second process on the same --rows file splits the work")
    a = ap.parse_args()
    def ints(s: str) -> list[int]:
        return [int(r) for r in s.split(",") if r]

    ranks = ints(a.ranks)
    target_list = expand_targets(a.base, a.targets)  # once, not per run
    variant_list = expand_targets(a.base, a.variant_targets)
    mine: dict = {}  # this process's rows when there is no rows file
    # every finished run is appended to --rows (JSONL) at once and reused by a rerun with the same settings:
    # a sweep that is interrupted loses at most the run in progress. The file is re-read before each run, so
    # a second process on the same file with --reverse works from the other end and they meet in the middle.
    key = {"base": str(a.base), "task": a.task, "steps": a.steps, "batch": a.batch, "seq_len": a.seq_len,
           "alpha": a.alpha, "seed": a.seed, "eval_batches": a.eval_batches}
    # a method is (label, kind, rank, targets); the plan is (method, lr) pairs
    methods = [("full", "full", 1, "all-linear")] + [(lora_label(r, a.targets), "lora", r, target_list) for r in ranks]
    plan = [(methods[0], lr) for lr in a.full_lrs] + [(m, lr) for m in methods[1:] for lr in a.lora_lrs]
    for kind, rs, lrs in (("lora", a.variant_lora_ranks, a.dora_lrs), ("dora", a.dora_ranks, a.dora_lrs),
                          ("vera", a.vera_ranks, a.vera_lrs)):
        for r in ints(rs):
            m = (lora_label(r, a.variant_targets, kind), kind, r, variant_list)
            methods.append(m)
            plan += [(m, lr) for lr in lrs]
    with tempfile.TemporaryDirectory() as tmp:
        for m, lr in (reversed(plan) if a.reverse else plan):
            if (m[0], lr) in _finished(a.rows, key):
                continue
            row = run(a.base, a.task, m, lr, a, Path(tmp)) | {"key": key}
            print(json.dumps(row), file=sys.stderr, flush=True)
            if a.rows:
                with open(a.rows, "a") as f:
                    f.write(json.dumps(row) + "\n")
            else:
                mine[(m[0], lr)] = row
    done = {**_finished(a.rows, key), **mine}
    missing = [f"{m[0]} lr={lr:g}" for m, lr in plan if (m[0], lr) not in done]
    if missing:
        sys.exit(f"not finished yet (another process?): {', '.join(missing)}")
    rows = [done[(m[0], lr)] for m, lr in plan]
    methods = [m for m in methods if any(p == m for p, _ in plan)]  # e.g. --full-lrs= : no full rows
    n_params = {m[0]: trainable_parameters(a.base, a.task, m, a) for m in methods}
    methods = [m[0] for m in methods]
    best = {m: min((x for x in rows if x["method"] == m), key=lambda x: x["val_loss"]) for m in methods}
    fit = {m: fitted_best_lr([(x["lr"], x["val_loss"]) for x in rows if x["method"] == m]) for m in methods}
    print(f"base {a.base}  task {a.task}  {a.steps} steps x {a.batch} x {a.seq_len}  host {platform.machine()}  "
          f"initial val loss {rows[0]['initial_val_loss']:.4f}")
    w = max(12, *(len(m) for m in methods))
    print(f"{'method':<{w}} {'trained':>9} " + " ".join(f"{lr:>9g}" for lr in sorted({x['lr'] for x in rows})))
    for m in methods:
        by_lr = {x["lr"]: x["val_loss"] for x in rows if x["method"] == m}
        print(f"{m:<{w}} {n_params[m]:>9,} " + " ".join(f"{by_lr[lr]:>9.4f}" if lr in by_lr else f"{'':>9}"
                                                         for lr in sorted({x['lr'] for x in rows})))
    full = best.get("full")
    ratios = {m: best[m]["lr"] / full["lr"] for m in methods if full and m != "full"}
    fit_ratios = {m: fit[m] / fit["full"] for m in ratios if fit[m] and fit["full"]}
    for m in methods:
        extra = f"   best LR / best full LR = {ratios[m]:g}" if m in ratios else ""
        if m in fit_ratios:
            extra += f" (parabola fit: {fit_ratios[m]:.2f})"
        f = f"{fit[m]:.3g}" if fit[m] else "at the grid's edge: extend the grid"
        print(f"best {m:<{w}} val loss {best[m]['val_loss']:.4f} at lr {best[m]['lr']:g} (fit {f}){extra}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        base_loss = rows[0]["initial_val_loss"]
        top = base_loss + 0.5 * (base_loss - min(x["val_loss"] for x in rows))  # diverged runs: off the top
        for m in methods:
            xs = sorted((x["lr"], x["val_loss"]) for x in rows if x["method"] == m)
            line, = ax.plot([p for p, _ in xs], [min(v, top) for _, v in xs], "o-", label=m)
            ax.plot([p for p, v in xs if v > top], [top for _, v in xs if v > top], "^", ms=10, color=line.get_color())
            ax.axvline(best[m]["lr"], color=line.get_color(), ls=":", lw=1)
        ax.axhline(base_loss, color="grey", ls="--", lw=1, label="base (no fine-tuning)")
        ax.set(xscale="log", xlabel="learning rate", ylabel="final val loss (completion tokens)",
               title=f"LoRA vs full fine-tuning, {a.task} ({a.steps} steps; ^ = off the scale)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
    except ImportError:
        pass
    print(json.dumps({"benchmark": "lora_vs_full", "task": a.task, "steps": a.steps,
                      "best": {m: {"lr": best[m]["lr"], "val_loss": best[m]["val_loss"],
                               "trainable_params": n_params[m]} for m in methods},
                      "fitted_best_lr": fit, "lora_lr_over_full_lr": ratios,
                      "lora_lr_over_full_lr_fitted": fit_ratios, "rows": rows}))


if __name__ == "__main__":
    main()
