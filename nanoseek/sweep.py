"""`nanoseek sweep`: tune on a small proxy, transfer to a wide model (muTransfer).

What. Two ways to spend the proxy budget, both running short pretrainings with the real trainer (built-in
corpus by default) and recording the final validation loss of each run:
  * grid  (`sweep`): parametrizations x widths x seeds x learning rates (x optional init / embedding-multiplier
    axes); gives the loss-vs-learning-rate curves per width that show whether the optimum moves (sweep.png).
  * search (`search`): random search over every muP hyperparameter TP5 tunes on the proxy (learning rate, init
    std, alpha_emb, alpha_out, alpha_attn, embedding lr factor, zero-init query/readout; see mup.py) with
    successive halving: n random configurations run for max_steps / eta^(rungs-1) steps, the best 1/eta go on
    to the next rung with eta times the steps, until the last rung runs the full max_steps.
`transfer` writes a TrainConfig file for the target width with every tuned value (muP base width kept), ready
for `nanoseek pretrain --config FILE`.

Why the real trainer: a sweep that used a different loop would tune a different thing. Each run is
independent and its directory is kept, so an interrupted sweep resumes by skipping finished runs. Why random
search + halving: with 8 knobs a grid is out of reach; most random draws are visibly bad after a quarter of
the steps, so halving spends the full-length runs on the few that are not (Hyperband's inner loop).
Rejected: in-process caching of models across runs (runs must not share state); Bayesian optimisation (a
dependency, and no better than random at 16-32 trials).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

from .train.config import TrainConfig
from .train.trainer import TrainingDiverged, train

# record key -> TrainConfig field; None in a record = the model's default
HPARAMS = {"init": "initializer_range", "emb": "embedding_multiplier", "out": "readout_multiplier",
           "attn": "attention_multiplier", "emb_lr": "embedding_lr_multiplier", "zero_query": "zero_init_query",
           "zero_readout": "zero_init_readout"}
# the default search space: log-uniform (lo, hi) ranges, or a tuple of choices for switches
SPACE = {"lr": (2.0 ** -9, 2.0 ** -3), "init": (0.005, 0.08), "emb": (0.25, 8.0), "out": (0.25, 8.0),
         "attn": (0.25, 2.0), "emb_lr": (1 / 32, 1.0), "zero_query": (False, True), "zero_readout": (False, True)}


def run_name(param: str, width: int, seed: int, lr: float, hp: dict, steps: int) -> str:
    parts = [f"{k}{v:.3g}" if isinstance(v, float) else f"{k}{int(v)}" for k, v in sorted(hp.items())
             if v is not None]
    return "-".join([f"{param}-w{width}-s{seed}-lr{lr:.3g}", *parts, f"n{steps}"])


def run(base: TrainConfig, param: str, width: int, seed: int, lr: float, hp: dict, out_dir: str | Path,
        base_width: int, steps: int | None = None) -> dict:
    """One pretraining run (reused if its result.json exists): a record with param, width, seed, lr, steps,
    every HPARAMS key (None = default), val_loss, train_loss, diverged, seconds."""
    steps = steps or base.max_steps
    hp = {k: hp.get(k) for k in HPARAMS}
    run_dir = Path(out_dir) / "runs" / run_name(param, width, seed, lr, hp, steps)
    done = run_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    overrides = {HPARAMS[k]: v for k, v in hp.items() if v is not None}
    cfg = dataclasses.replace(base, hidden_size=width, lr=lr, seed=seed, out_dir=str(run_dir), max_steps=steps,
                              warmup_steps=min(base.warmup_steps, steps // 4) if steps < base.max_steps
                              else base.warmup_steps,
                              mup_base_width=base_width if param == "mup" else None, resume=None, plots=False,
                              eval_every=0, save_every=0, keep_last=1, **overrides)
    rec = {"param": param, "width": width, "seed": seed, "lr": lr, "steps": steps, **hp}
    try:
        summary = train(cfg)
        rec.update(val_loss=summary["val_loss"], train_loss=summary["loss"], diverged=False)
    except TrainingDiverged as e:
        rec.update(val_loss=math.inf, train_loss=math.inf, diverged=True, error=str(e))
    run_dir.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(rec) + "\n")
    return rec


def describe(rec: dict) -> str:
    hp = " ".join(f"{k} {rec[k]:.3g}" if isinstance(rec[k], float) else f"{k} {rec[k]}" for k in HPARAMS
                  if rec.get(k) is not None)
    return f"{rec['param']} width {rec['width']} seed {rec['seed']} lr {rec['lr']:.3g}" + (f" {hp}" if hp else "")


def sweep(base: TrainConfig, widths: list[int], lrs: list[float], seeds: list[int], params: list[str],
          out_dir: str | Path, base_width: int, inits: list[float | None] | None = None,
          emb_mults: list[float | None] | None = None, fixed: dict | None = None, progress=print) -> list[dict]:
    """Run the grid; returns one record per run (see `run`). `inits` (init std) and `emb_mults` (alpha_emb)
    are optional extra grid axes; `fixed` holds HPARAMS values applied to every run (e.g. a search's choice)."""
    inits, emb_mults = inits or [None], emb_mults or [None]
    grid = [(p, w, s, lr, i, e) for p in params for w in widths for s in seeds for lr in lrs for i in inits
            for e in emb_mults]
    records = []
    for n, (param, width, seed, lr, init, emb) in enumerate(grid, start=1):
        hp = {**(fixed or {}), **({} if init is None else {"init": init}), **({} if emb is None else {"emb": emb})}
        rec = run(base, param, width, seed, lr, hp, out_dir, base_width)
        records.append(rec)
        progress(f"[{n}/{len(grid)}] {describe(rec)}: val_loss {rec['val_loss']:.4f}")
    return records


def sample(rng: random.Random, space: dict) -> dict:
    """One random configuration: log-uniform in each (lo, hi) range, uniform over a tuple of choices."""
    out = {}
    for k, v in space.items():
        if isinstance(v[0], bool) or len(v) != 2:
            out[k] = rng.choice(v)
        else:
            out[k] = math.exp(rng.uniform(math.log(v[0]), math.log(v[1])))
    return out


REFINE_LR = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 2.0)  # lr factors tried around the search's winner, others fixed


def search(base: TrainConfig, width: int, out_dir: str | Path, base_width: int, n: int = 16, eta: int = 4,
           rungs: int = 2, seed: int = 0, space: dict | None = None, param: str = "mup",
           refine_lr: tuple[float, ...] = REFINE_LR, progress=print) -> tuple[list[dict], dict]:
    """Random search + successive halving at one (proxy) width, then a 1-D lr refinement; `seed` seeds the
    draws and every run. Returns (all records, the chosen config).

    Trial 0 is the default model at the centre of the lr range (so the search never loses to "lr only" by
    bad luck of the draw). `zero_readout` is dropped from the space for tied heads. The winner of the last
    rung (full max_steps) is then re-run at lr x each `refine_lr` factor with every other value fixed, also at
    full max_steps, and the best of these (winner included) is chosen: a dict with lr, every HPARAMS key and
    val_loss. Why: random search samples lr jointly with seven other knobs, so its winner's lr is only as
    good as the draw (measured on GPT-2 at width 32: x1/4 of the drawn lr was 0.08 nats better, and at width
    256 that gap grew to 0.54; BENCHMARKS.md "muTransfer that pays?").
    """
    space = dict(SPACE if space is None else space)
    if base.model_config_obj().tie_word_embeddings:
        space.pop("zero_readout", None)
    rng = random.Random(seed)
    lo, hi = space["lr"]
    trials = [{"lr": math.sqrt(lo * hi)}] + [sample(rng, space) for _ in range(n - 1)]
    records: list[dict] = []
    for rung in range(rungs):
        steps = max(1, base.max_steps // eta ** (rungs - 1 - rung))
        scored = []
        for i, t in enumerate(trials, start=1):
            rec = run(base, param, width, seed, t["lr"], t, out_dir, base_width, steps=steps)
            records.append({**rec, "rung": rung})
            scored.append((rec["val_loss"], t))
            progress(f"[rung {rung}: {steps} steps, {i}/{len(trials)}] {describe(rec)}: val_loss "
                     f"{rec['val_loss']:.4f}")
        scored.sort(key=lambda st: st[0])
        if rung < rungs - 1:
            trials = [t for _, t in scored[: max(1, len(scored) // eta)]]
    best_loss, best_t = scored[0]
    for i, f in enumerate(refine_lr, start=1):
        t = {**best_t, "lr": best_t["lr"] * f}
        rec = run(base, param, width, seed, t["lr"], t, out_dir, base_width)
        records.append({**rec, "rung": rungs})
        scored.append((rec["val_loss"], t))
        progress(f"[lr refinement: x{f:g}, {i}/{len(refine_lr)}] {describe(rec)}: val_loss {rec['val_loss']:.4f}")
    loss, t = min(scored, key=lambda st: st[0])
    return records, {"lr": t["lr"], **{k: t.get(k) for k in HPARAMS}, "val_loss": loss}


def best(records: list[dict], param: str, width: int) -> dict:
    """The (lr, HPARAMS) with the lowest val loss averaged over seeds at this width (longest runs only)."""
    rows = [r for r in records if r["param"] == param and r["width"] == width]
    steps = max(r.get("steps", 0) for r in rows)
    by_key: dict[tuple, list[float]] = {}
    for r in rows:
        if r.get("steps", 0) == steps:
            by_key.setdefault((r["lr"], *(r.get(k) for k in HPARAMS)), []).append(r["val_loss"])
    key, losses = min(by_key.items(), key=lambda kv: sum(kv[1]) / len(kv[1]))
    return {"lr": key[0], **dict(zip(HPARAMS, key[1:])), "val_loss": sum(losses) / len(losses)}


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
    """Write the TrainConfig for the target width with every tuned value (a --config file for pretrain)."""
    tuned = {HPARAMS[k]: chosen[k] for k in HPARAMS if chosen.get(k) is not None}
    cfg = dataclasses.replace(base, hidden_size=width, lr=chosen["lr"], mup_base_width=base_width, **tuned)
    d = {k: v for k, v in cfg.to_dict().items() if v is not None}
    path = Path(path)
    path.write_text(json.dumps(d, indent=2) + "\n")
    return path
