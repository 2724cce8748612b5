"""Peak memory and step time: LoRA fine-tuning vs full fine-tuning vs inference alone, on the same model.

Claim checked (REFERENCE.md, "LoRA"): LoRA trains in little more than the inference layout (the frozen base +
~16 bytes per LoRA parameter), while full fine-tuning with AdamW needs several times more (weights, grads and
two moments: ~16 bytes/parameter in fp32, or bf16 weights + fp32 master/moments with mixed precision).

Variants, each in its own subprocess so that peaks never mix:
    inference  model.eval(), forward under no_grad (the serving layout)
    lora       base frozen, one adapter (r, all linear layers + routed experts), AdamW on the adapter only
    full       every parameter trained with AdamW
Memory: CUDA max allocated on a GPU; on a CPU the process's peak RSS, also shown minus the RSS the process had
before building the model (Python + torch runtime), which is the part the variant is responsible for.
On a GPU the base is bf16 for inference/LoRA (adapter factors fp32, autocast) and fp32 master weights with
bf16 autocast for full fine-tuning; on a CPU everything is fp32.

    python3 benchmarks/finetune_memory.py                 # dsv3-bench (~30M params), batch 4 x 256
    python3 benchmarks/finetune_memory.py --rank 64 --steps 5
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nanoseek import LoraConfig, Model, ModelConfig  # noqa: E402
from nanoseek.train.metrics import peak_memory_bytes  # noqa: E402

VARIANTS = ("inference", "lora", "full")


def bench_config() -> ModelConfig:
    return ModelConfig(vocab_size=4096, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                       intermediate_size=1536, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64,
                       qk_rope_head_dim=32, v_head_dim=64, moe_intermediate_size=256, n_routed_experts=16,
                       n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                       num_nextn_predict_layers=1, max_position_embeddings=1024)


def run_variant(variant: str, rank: int, batch: int, seq_len: int, steps: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    before = peak_memory_bytes(device) if not gpu else 0
    torch.manual_seed(0)
    model = Model(bench_config(), device=device)
    n_params = sum(p.numel() for p in model.parameters())
    trainable = 0 if variant == "inference" else n_params
    if variant in ("inference", "lora") and gpu:
        model.to(torch.bfloat16)
    if variant == "lora":
        model.add_adapter("ft", LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
        params = model.trainable_adapter("ft")
        for p in params:  # fp32 factors (the base may be bf16)
            p.data = p.data.float()
        trainable = sum(p.numel() for p in params)
    elif variant == "full":
        params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1),
                      generator=torch.Generator().manual_seed(0)).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else contextlib.nullcontext()
    if variant == "inference":
        model.eval()

        def step():
            with torch.no_grad(), autocast:
                model(x[:, :-1])
    else:
        model.train()
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            with autocast:
                loss = model(x[:, :-1], targets=x[:, 1:], adapter="ft" if variant == "lora" else None).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()  # warm-up (allocates optimizer state)
    if gpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if gpu:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    peak = peak_memory_bytes(device)
    return {"variant": variant, "device": torch.cuda.get_device_name() if gpu else "cpu", "params": n_params,
            "trainable": trainable, "peak_bytes": peak, "peak_minus_runtime_bytes": peak - before,
            "ms_per_step": dt * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=VARIANTS, help="run one variant in this process (internal)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    common = ["--rank", str(a.rank), "--batch", str(a.batch), "--seq-len", str(a.seq_len), "--steps", str(a.steps)]
    if a.variant:
        print(json.dumps(run_variant(a.variant, a.rank, a.batch, a.seq_len, a.steps)))
        return
    rows = []
    for v in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--variant", v, *common], capture_output=True, text=True,
                             check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    inf = rows[0]
    key = "peak_bytes" if inf["device"] != "cpu" else "peak_minus_runtime_bytes"
    print(f"device: {inf['device']}   host: {platform.processor() or platform.machine()}   "
          f"model: {inf['params'] / 1e6:.1f}M params   batch {a.batch} x {a.seq_len}   LoRA r={a.rank}")
    print(f"{'variant':<10} {'trainable':>12} {'peak MiB':>10} {'peak-rt MiB':>12} {'x inference':>12} {'ms/step':>9}")
    for r in rows:
        print(f"{r['variant']:<10} {r['trainable']:>12,} {r['peak_bytes'] / 2**20:>10.0f} "
              f"{r['peak_minus_runtime_bytes'] / 2**20:>12.0f} {r[key] / inf[key]:>12.2f} {r['ms_per_step']:>9.1f}")
    lora, full = rows[1], rows[2]
    print(json.dumps({"benchmark": "finetune_memory", "device": inf["device"], "params": inf["params"],
                      "rank": a.rank, "batch": a.batch, "seq_len": a.seq_len, "metric": key,
                      "lora_over_inference": lora[key] / inf[key], "full_over_inference": full[key] / inf[key],
                      "full_over_lora": full[key] / lora[key],
                      "lora_step_over_full_step": lora["ms_per_step"] / full["ms_per_step"], "rows": rows}))


if __name__ == "__main__":
    main()
