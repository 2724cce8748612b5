"""Do the adapters of `benchmarks/lora_vs_full.py` load in Hugging Face `peft`? (LoRA, DoRA, VeRA on one base)

What. For one base checkpoint, each adapter kind of the LoRA-vs-DoRA-vs-VeRA table is built with the same targets
as that benchmark (LoRA on the defaults = every linear + routed experts; LoRA, DoRA and VeRA on "linears" = every
linear layer but lm_head), its trainable tensors moved off their init (a seeded random nudge, so the adapter
changes the logits), written with `save_adapter`, and loaded with
`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(exported base), dir)`. Printed per kind:
loads or refused (peft's error), the largest logit difference nanoseek vs peft (fp32), the adapter's own effect
on the logits, and any warning `save_adapter` gave. Ends with one JSON line.
Why: the table's DoRA row uses targets peft cannot express on DeepseekV3 (its dense-MLP linears); this shows
which rows a user can take to peft, on the real base rather than the tests' tiny configs.
Rejected: training the adapters first (minutes per kind; loading depends on the layout, not the values).

    python3 benchmarks/peft_load_check.py --base runs/main/checkpoints/step-0000600
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_vs_full import expand_targets  # noqa: E402

from nanoseek import LoraConfig, Model, VeraConfig  # noqa: E402


def kinds(base: str, r: int, alpha: float, vera_r: int) -> dict:
    lin = expand_targets(base, "linears").split(",")
    return {"lora r=16": LoraConfig(r=r, lora_alpha=alpha),
            "lora r=16 [linears]": LoraConfig(r=r, lora_alpha=alpha, target_modules=lin),
            "dora r=16 [linears]": LoraConfig(r=r, lora_alpha=alpha, target_modules=lin, use_dora=True),
            f"vera r={vera_r} [linears]": VeraConfig(r=vera_r, target_modules=lin)}


def check(model: Model, name: str, cfg, tmp: Path, x: torch.Tensor, seed: int) -> dict:
    """Add, nudge, save the adapter `name`; load it in peft on the exported base; compare logits."""
    import peft
    import transformers

    key = "".join(c if c.isalnum() else "_" for c in name)  # an adapter (and directory) name
    model.add_adapter(key, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_adapter(key):
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_adapter(tmp / key, key)
    row = {"adapter": name, "save_warnings": [str(w.message) for w in caught if "peft" in str(w.message)]}
    with torch.no_grad():
        ours = model(x, adapter=key)
        row["adapter_effect"] = (ours - model(x)).abs().max().item()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp / "base").eval()
            pm = peft.PeftModel.from_pretrained(hf, tmp / key).eval()
        with torch.no_grad():
            row |= {"loads_in_peft": True, "max_logit_diff": (ours - pm(x).logits).abs().max().item()}
    except Exception as e:  # peft's refusal is the result
        row |= {"loads_in_peft": False, "error": f"{type(e).__name__}: {e}"[:300]}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="a nanoseek/HF checkpoint directory")
    ap.add_argument("--r", type=int, default=16, help="LoRA / DoRA rank")
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--vera-r", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if not Path(a.base, "config.json").is_file():
        ap.error(f"--base: no checkpoint (config.json) in {a.base!r}")
    import peft
    import transformers

    transformers.logging.set_verbosity_error()
    model = Model.from_pretrained(a.base).eval()
    x = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(a.seed))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "base")
        for name, cfg in kinds(a.base, a.r, a.alpha, a.vera_r).items():
            rows.append(check(model, name, cfg, Path(tmp), x, a.seed))
    print(f"base {a.base}  peft {peft.__version__}  transformers {transformers.__version__}  (fp32 logits)")
    print(f"{'adapter':<22} {'peft':>8} {'max |diff|':>11} {'effect':>8}  note")
    for r in rows:
        diff = f"{r['max_logit_diff']:.1e}" if r["loads_in_peft"] else "-"
        note = r.get("error", "") or "; ".join(r["save_warnings"])
        print(f"{r['adapter']:<22} {'loads' if r['loads_in_peft'] else 'REFUSED':>8} {diff:>11} "
              f"{r['adapter_effect']:>8.2f}  {note[:110]}")
    print(json.dumps({"benchmark": "peft_load_check", "base": a.base, "peft": peft.__version__,
                      "transformers": transformers.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
