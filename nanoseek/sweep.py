"""`nanoseek sweep`: tune on small proxies, transfer to a wide model (muTransfer).

What. For each parametrization (muP, and SP for comparison), width, seed and learning rate (and optionally init
std and embedding multiplier), run a short
pretraining (the real trainer, on the built-in corpus by default) and record the final validation loss.
Writes sweep.json (every run), a loss-vs-learning-rate plot per width and parametrization (sweep.png), and
the chosen learning rate: the best mean loss over seeds at the widest swept width. `--transfer-to WIDTH`
writes a TrainConfig file for the target width with the tuned values (muP base width kept), ready for
`nanoseek pretrain --config FILE`.

Why the real trainer: a sweep that used a different loop would tune a different thing. Each run is
independent and its directory is kept, so an interrupted sweep resumes by skipping finished runs.
Rejected: random search (a 1-D grid per width is what the muTransfer plots need) and in-process caching of
models across learning rates (runs must not share state).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from .train.config import TrainConfig


def run_name(param: str, width: int, seed: int, lr: float, init: float | None, emb: float | None) -> str:
    return (f"{param}-w{width}-s{seed}-lr{lr:.3g}" + ("" if init is None else f"-init{init:.3g}")
            + ("" if emb is None else f"-emb{emb:.3g}"))


def sweep(base: TrainConfig, widths: list[int], lrs: list[float], seeds: list[int], params: list[str],
          out_dir: str | Path, base_width: int, inits: list[float | None] | None = None,
          emb_mults: list[float | None] | None = None, progress=print) -> list[dict]:
    """Run the grid; returns one record per run: param, width, seed, lr, init, emb, val_loss, train_loss,
    diverged. `inits` (init std) and `emb_mults` (embedding multiplier) are optional extra grid axes."""
    from .train.trainer import TrainingDiverged, train

    out_dir = Path(out_dir)
    inits, emb_mults = inits or [None], emb_mults or [None]
    grid = [(p, w, s, lr, i, e) for p in params for w in widths for s in seeds for lr in lrs for i in inits
            for e in emb_mults]
    records = []
    for n, (param, width, seed, lr, init, emb) in enumerate(grid, start=1):
        run_dir = out_dir / "runs" / run_name(param, width, seed, lr, init, emb)
        done = run_dir / "result.json"
        if done.exists():
            rec = json.loads(done.read_text())
        else:
            cfg = dataclasses.replace(base, hidden_size=width, lr=lr, seed=seed, out_dir=str(run_dir),
                                      mup_base_width=base_width if param == "mup" else None,
                                      initializer_range=init, embedding_multiplier=emb, resume=None,
                                      plots=False, eval_every=0, save_every=0, keep_last=1)
            rec = {"param": param, "width": width, "seed": seed, "lr": lr, "init": init, "emb": emb}
            try:
                summary = train(cfg)
                rec.update(val_loss=summary["val_loss"], train_loss=summary["loss"], diverged=False)
            except TrainingDiverged as e:
                rec.update(val_loss=math.inf, train_loss=math.inf, diverged=True, error=str(e))
            run_dir.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps(rec) + "\n")
        records.append(rec)
        progress(f"[{n}/{len(grid)}] {param} width {width} seed {seed} lr {lr:.3g}"
                 + ("" if init is None else f" init {init:.3g}") + ("" if emb is None else f" emb {emb:.3g}")
                 + f": val_loss {rec['val_loss']:.4f}")
    return records


def best(records: list[dict], param: str, width: int) -> dict:
    """The (lr, init, emb) with the lowest val loss averaged over seeds at this width."""
    by_key: dict[tuple, list[float]] = {}
    for r in records:
        if r["param"] == param and r["width"] == width:
            by_key.setdefault((r["lr"], r["init"], r.get("emb")), []).append(r["val_loss"])
    (lr, init, emb), losses = min(by_key.items(), key=lambda kv: sum(kv[1]) / len(kv[1]))
    return {"lr": lr, "init": init, "emb": emb, "val_loss": sum(losses) / len(losses)}


def lr_shift(records: list[dict], param: str) -> float:
    """best lr at the widest width / best lr at the narrowest (1.0 = perfect transfer)."""
    widths = sorted({r["width"] for r in records if r["param"] == param})
    return best(records, param, widths[-1])["lr"] / best(records, param, widths[0])["lr"]


def plot(records: list[dict], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = [p for p in ("sp", "mup") if any(r["param"] == p for r in records)]
    fig, axes = plt.subplots(1, len(params), figsize=(5.5 * len(params), 4), squeeze=False, sharey=True)
    for ax, param in zip(axes[0], params):
        for width in sorted({r["width"] for r in records if r["param"] == param}):
            lrs = sorted({r["lr"] for r in records if r["param"] == param and r["width"] == width})
            means = []
            for lr in lrs:
                vals = [r["val_loss"] for r in records if (r["param"], r["width"], r["lr"]) == (param, width, lr)]
                means.append(sum(vals) / len(vals))
            finite = [(lr, m) for lr, m in zip(lrs, means) if math.isfinite(m)]
            if finite:
                ax.plot(*zip(*finite), marker="o", label=f"width {width}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("learning rate")
        ax.set_title("muP" if param == "mup" else "standard parametrization")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("validation loss")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def transfer(base: TrainConfig, chosen: dict, width: int, base_width: int, path: str | Path) -> Path:
    """Write the TrainConfig for the target width with the tuned values (a --config file for pretrain)."""
    cfg = dataclasses.replace(base, hidden_size=width, lr=chosen["lr"], mup_base_width=base_width,
                              initializer_range=chosen["init"], embedding_multiplier=chosen.get("emb"))
    d = {k: v for k, v in cfg.to_dict().items() if v is not None}
    path = Path(path)
    path.write_text(json.dumps(d, indent=2) + "\n")
    return path
