"""Several tenants, one base: does each LoRA adapter lower its own task's validation loss the most?

For one base checkpoint, one LoRA adapter is fine-tuned per built-in task (one stdlib package each, "continue
this file"), every run with the same settings and seed. Each finished adapter is evaluated on the validation
split of every task, and so is the base model. Printed: the matrix of losses and of loss drops (base - adapter)
with adapters as rows and tasks as columns, and two checks:
  * row check    — adapter A lowers task A's loss more than it lowers any other task's loss;
  * column check — on task A, adapter A is the best of all adapters (what a tenant who picks an adapter sees).
Writes adapter_specificity.png (the drop matrix) and ends with one JSON line. With --check-peft, each finished
adapter is also loaded with `peft.PeftModel.from_pretrained` on the base (transformers' AutoModelForCausalLM) and
its logits are compared with nanoseek's (fp32; printed, and in the JSON line).

    python3 benchmarks/adapter_specificity.py --base runs/main/checkpoints/step-0000600
    python3 benchmarks/adapter_specificity.py --base CKPT --tasks email,encodings,tkinter,ctypes --steps 200
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek.train.finetune import FinetuneConfig, finetune  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="a nanoseek/HF checkpoint directory with tokenizer.json")
    ap.add_argument("--tasks", default="email,encodings,tkinter", help="comma-separated built-in tasks (>= 2)")
    ap.add_argument("--out-dir", default="runs/adapters", help="one fine-tuning run (and adapter) per task here")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default="adapter_specificity.png")
    ap.add_argument("--check-peft", action="store_true",
                    help="load every adapter in peft on the base and compare logits with nanoseek's")
    a = ap.parse_args()
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    if len(tasks) < 2 or len(set(tasks)) != len(tasks):
        ap.error(f"--tasks needs at least two different tasks, got {tasks}")

    base_loss: dict[str, float] = {}
    loss: dict[str, dict[str, float]] = {}  # adapter (= its task) -> task -> validation loss
    seconds: dict[str, float] = {}
    for task in tasks:
        out = Path(a.out_dir) / task
        if out.exists() and any(out.iterdir()):
            sys.exit(f"{out} is not empty: remove it or pass another --out-dir")
        cfg = FinetuneConfig(base=a.base, data=f"builtin:{task}", out_dir=str(out), adapter_name=task, r=a.lora_r,
                             lr=a.lr, max_steps=a.steps, batch_size=a.batch, seq_len=a.seq_len,
                             warmup_steps=max(1, a.steps // 10), eval_every=0, eval_batches=a.eval_batches,
                             save_every=0, plots=False, seed=a.seed, log_every=max(1, a.steps // 4),
                             eval_tasks=",".join(t for t in tasks if t != task))
        t0 = time.perf_counter()
        s = finetune(cfg)
        seconds[task] = time.perf_counter() - t0

        first = _by_task(s["initial"], task, tasks)
        for t, v in first.items():  # the base model's loss: the same numbers from every run (same base, same data)
            if t in base_loss and abs(base_loss[t] - v) > 1e-4:
                raise RuntimeError(f"base loss on {t} differs between runs: {base_loss[t]} vs {v}")
            base_loss.setdefault(t, v)
        loss[task] = _by_task(s, task, tasks)
        print(f"adapter {task}: {a.steps} steps in {seconds[task]:.0f} s -> {s['output']}", file=sys.stderr)

    drop = {ad: {t: base_loss[t] - loss[ad][t] for t in tasks} for ad in tasks}
    row_ok = {ad: all(drop[ad][ad] > drop[ad][t] for t in tasks if t != ad) for ad in tasks}
    col_ok = {t: all(loss[t][t] < loss[ad][t] for ad in tasks if ad != t) for t in tasks}
    w = max(12, *(len(t) + 2 for t in tasks))
    print(f"base {a.base}  {a.steps} steps x {a.batch} x {a.seq_len}, LoRA r={a.lora_r} (all linear layers), "
          f"lr {a.lr:g}, host {platform.machine()}")
    print(f"validation loss (nats/token on completions); rows: adapter, columns: task\n{'':<{w}}"
          + "".join(f"{t:>{w}}" for t in tasks))
    print(f"{'(base)':<{w}}" + "".join(f"{base_loss[t]:>{w}.4f}" for t in tasks))
    for ad in tasks:
        print(f"{ad:<{w}}" + "".join(f"{loss[ad][t]:>{w}.4f}" for t in tasks))
    print(f"loss drop (base - adapter)\n{'':<{w}}" + "".join(f"{t:>{w}}" for t in tasks))
    for ad in tasks:
        print(f"{ad:<{w}}" + "".join(f"{drop[ad][t]:>{w}.4f}" for t in tasks)
              + f"   own task dropped most: {'yes' if row_ok[ad] else 'NO'}")
    print("best adapter on each task is its own: " + ", ".join(f"{t} {'yes' if col_ok[t] else 'NO'}" for t in tasks))
    _plot(tasks, drop, a.plot)
    peft_diff = {t: peft_check(a.base, Path(a.out_dir) / t / "adapter") for t in tasks} if a.check_peft else {}
    for t, d in peft_diff.items():
        print(f"peft check: adapter {t} " + ("not checked (peft or transformers missing)" if d is None else
                                            f"loads in peft, max |logit difference| {d:.2e} (fp32)"))
    print(json.dumps({"base": a.base, "tasks": tasks, "steps": a.steps, "lr": a.lr, "r": a.lora_r,
                      "base_loss": base_loss, "loss": loss, "drop": drop, "row_check": row_ok, "column_check": col_ok,
                      "seconds": seconds, "plot": a.plot, "peft_max_logit_diff": peft_diff}))


def peft_check(base: str, adapter: Path) -> float | None:
    """max |logits(nanoseek + adapter) - logits(peft.PeftModel on transformers' base)| on 2 x 64 fixed tokens."""
    try:
        import peft
        import transformers
    except ImportError:
        return None
    import torch

    from nanoseek import Model

    m = Model.from_pretrained(base).eval()
    m.load_adapter(adapter, "a")
    x = torch.randint(0, m.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        pm = peft.PeftModel.from_pretrained(hf, str(adapter)).eval()
    with torch.no_grad():
        return (m(x, adapter="a") - pm(x).logits).abs().max().item()


def _by_task(ev: dict, own: str, tasks: list[str]) -> dict[str, float]:
    """A fine-tuning summary's validation losses by task (its own task's is plain "val_loss")."""
    return {t: ev["val_loss"] if t == own else ev[f"val_loss/{t}"] for t in tasks}


def _plot(tasks: list[str], drop: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    m = [[drop[ad][t] for t in tasks] for ad in tasks]
    fig, ax = plt.subplots(figsize=(1.6 * len(tasks) + 2, 1.2 * len(tasks) + 1.5))
    im = ax.imshow(m, cmap="viridis")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("validation task")
    ax.set_ylabel("LoRA adapter trained on")
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            ax.text(j, i, f"{m[i][j]:.3f}", ha="center", va="center", color="w" if m[i][j] < max(map(max, m)) * 0.6
                    else "k")
    fig.colorbar(im, ax=ax, label="loss drop vs base (nats/token)")
    ax.set_title("each adapter's loss drop on each task")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
