"""The muP coordinate check: is every layer's activation scale independent of width after a few Adam steps?

What. For each parametrization (standard, muP) and each width, build `config.with_width(w)` (muP base width
= the config's own width), take `steps` AdamW steps at one learning rate on the same batches, and record the
mean |activation| of each layer type (embedding, attention, mlp/moe, block output, logits) before each
step. Under muP the curves against width are flat; under SP they grow (Tensor Programs V, Figure 5).

Why hooks by module type: the check must see what the model computes without a second code path.
Rejected: Microsoft's `mup.coord_check` (needs its MuReadout layers and pulls torchvision).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig
from .model.attention import MLA, GPT2Attention
from .model.layers import GPT2MLP, SwiGLU
from .model.moe import MoE
from .model.transformer import DecoderLayer, GPT2Block, MTPLayer
from .modeling import Model
from .mup import param_groups

LAYER_TYPES = ("embedding", "attention", "mlp", "block", "logits")


def _layer_type(module: nn.Module) -> str | None:
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (MLA, GPT2Attention)):
        return "attention"
    if isinstance(module, (MoE, SwiGLU, GPT2MLP)):
        return "mlp"
    if isinstance(module, (DecoderLayer, GPT2Block)) and not isinstance(module, MTPLayer):
        return "block"
    return None


def _record(model: Model, x: torch.Tensor) -> dict[str, float]:
    """Mean |activation| per layer type over one forward of x (averaged over layers of that type)."""
    sums: dict[str, list[float]] = {t: [] for t in LAYER_TYPES}
    hooks = []
    for name, module in model.named_modules():
        kind = _layer_type(module)
        if kind is None or name.startswith("mtp.") or (kind == "embedding" and "wpe" in name):
            continue

        def hook(mod, inputs, output, kind=kind):
            out = output[0] if isinstance(output, tuple) else output
            sums[kind].append(out.detach().abs().mean().item())

        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            sums["logits"].append(model(x).abs().mean().item())
    finally:
        for h in hooks:
            h.remove()
    return {k: sum(v) / len(v) for k, v in sums.items() if v}


def coord_check(base: ModelConfig, widths: list[int], batches: list[tuple[torch.Tensor, torch.Tensor]],
                lr: float = 1e-2, parametrizations: tuple[str, ...] = ("sp", "mup"), seed: int = 0,
                progress=None) -> list[dict]:
    """Records {"param", "width", "step", <layer type>: mean |act|} for each step (before its update).

    `base` fixes everything but width; its hidden_size is the muP base width. One step per batch.
    """
    records = []
    for param in parametrizations:
        for width in widths:
            cfg = base.with_width(width).replace(mup_base_width=base.hidden_size if param == "mup" else None)
            torch.manual_seed(seed)
            model = Model(cfg)
            groups = param_groups(model, weight_decay=0.0)
            opt = torch.optim.AdamW([{**g, "lr": lr * g["lr_scale"]} for g in groups], betas=(0.9, 0.95))
            for step, (x, y) in enumerate(batches):
                records.append({"param": param, "width": width, "step": step, **_record(model.eval(), x)})
                model.train()
                loss = model(x, targets=y).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                model.update_router_bias(0.0)  # consume the accumulated loads; no balancing in the check
            if progress is not None:
                progress(param, width)
    return records


def growth(records: list[dict], param: str, kind: str = "logits") -> float:
    """max over steps of (scale at the widest width / scale at the narrowest): ~1 means flat."""
    rows = [r for r in records if r["param"] == param and kind in r]
    widths = sorted({r["width"] for r in rows})
    ratios = []
    for step in sorted({r["step"] for r in rows}):
        by_w = {r["width"]: r[kind] for r in rows if r["step"] == step}
        ratios.append(by_w[widths[-1]] / by_w[widths[0]])
    return max(ratios)


def plot(records: list[dict], path: str | Path) -> Path:
    """One panel per (parametrization, step): mean |activation| vs width (log-log), a line per layer type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = [p for p in ("sp", "mup") if any(r["param"] == p for r in records)]
    steps = sorted({r["step"] for r in records})
    fig, axes = plt.subplots(len(params), len(steps), figsize=(3.2 * len(steps), 3 * len(params)),
                             squeeze=False, sharey="row")
    for i, p in enumerate(params):
        for j, s in enumerate(steps):
            ax = axes[i][j]
            rows = sorted((r for r in records if r["param"] == p and r["step"] == s), key=lambda r: r["width"])
            for kind in LAYER_TYPES:
                if kind in rows[0]:
                    ax.plot([r["width"] for r in rows], [r[kind] for r in rows], marker="o", label=kind)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{'muP' if p == 'mup' else 'SP'}, step {s}")
            ax.set_xlabel("width")
            if j == 0:
                ax.set_ylabel("mean |activation|")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save(records: list[dict], out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {p: {k: growth(records, p, k) for k in LAYER_TYPES if any(k in r for r in records)}
               for p in sorted({r["param"] for r in records})}
    (out_dir / "coord_check.json").write_text(json.dumps({"summary": summary, "records": records}, indent=1))
    plot(records, out_dir / "coord_check.png")
    return summary
