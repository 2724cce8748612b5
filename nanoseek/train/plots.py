"""PNG plots of a run from its metrics.jsonl: losses + validation, lr, expert load per layer, MaxVio.

Drawn with matplotlib's Agg backend (no display needed), from the metrics file alone, so a plot can be
redrawn for any finished or running run (`plot_run(out_dir)`). Rejected: live plotting in the loop (slow,
and TensorBoard already covers it when wanted).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .metrics import read_metrics


def plot_run(out_dir: str | Path) -> list[Path]:
    """Write loss.png, lr.png and (for MoE runs) experts.png into out_dir; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    recs = read_metrics(out_dir / "metrics.jsonl")
    train = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "val_loss" in r]
    if not train:
        return []
    steps = np.array([r["step"] for r in train])
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "main_loss", "mtp_loss"):
        vals = [r.get(key) for r in train]
        if any(v is not None for v in vals):
            ax.plot(steps, [np.nan if v is None else v for v in vals], label=key, lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val_loss")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    written.append(_save(fig, out_dir / "loss.png"))

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(steps, [r["lr"] for r in train])
    ax.set(xlabel="step", ylabel="lr", title="learning rate")
    ax.grid(alpha=0.3)
    written.append(_save(fig, out_dir / "lr.png"))

    loads = [r.get("expert_load") for r in train]
    if loads and all(x is not None for x in loads):
        load = np.array(loads, dtype=float)  # (S, n_layers, E)
        frac = load / load.sum(-1, keepdims=True).clip(min=1)
        n_layers = load.shape[1]
        fig, axes = plt.subplots(n_layers + 1, 1, figsize=(8, 2.2 * (n_layers + 1)), squeeze=False)
        for i in range(n_layers):
            ax = axes[i, 0]
            im = ax.imshow(frac[:, i].T, aspect="auto", origin="lower", cmap="viridis",
                           extent=(steps[0], steps[-1], -0.5, load.shape[2] - 0.5))
            ax.set(ylabel="expert", title=f"MoE layer {i}: fraction of routed tokens")
            fig.colorbar(im, ax=ax)
        ax = axes[n_layers, 0]
        vio = np.array([r["max_vio"] for r in train], dtype=float)  # (S, n_layers)
        for i in range(n_layers):
            ax.plot(steps, vio[:, i], lw=1, label=f"layer {i}")
        ax.set(xlabel="step", ylabel="MaxVio", title="MaxVio per MoE layer")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        written.append(_save(fig, out_dir / "experts.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
