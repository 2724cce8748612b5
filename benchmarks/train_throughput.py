"""Training throughput (tokens/s) and MFU: eager vs torch.compile, each against an eager baseline in-run.

For each model config it times full optimizer steps (forward + backward + AdamW) on random tokens:
    eager     the plain model (the baseline)
    compiled  torch.compile(model), timed after its warm-up compile
and reports tokens/s, ms/step, MFU (FLOPs/token from nanoseek.accounting against the GPU's dense bf16 peak;
n/a on CPU) and the speed-up over the eager baseline of the same run.

    python3 benchmarks/train_throughput.py            # GPU: gpt2-124m (12 x 1024), dsv3-small (8 x 1024), bf16
    python3 benchmarks/train_throughput.py --cpu      # CPU (default without CUDA): gpt2-tiny, dsv3-tiny, fp32
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nanoseek import Model, ModelConfig  # noqa: E402
from nanoseek.train.metrics import flops_per_token, peak_flops  # noqa: E402
from nanoseek.train.optim import configure_optimizer  # noqa: E402

GPU_CASES = [("gpt2-124m", 12, 1024), ("dsv3-small", 8, 1024)]
CPU_CASES = [("gpt2-tiny", 8, 256), ("dsv3-tiny", 8, 256)]


def time_steps(model, device, batch, seq_len, vocab, steps, warmup, bf16) -> float:
    """Seconds per optimizer step, averaged over `steps` after `warmup` untimed steps."""
    opt = configure_optimizer(model if not hasattr(model, "_orig_mod") else model._orig_mod, lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, vocab, (batch, seq_len + 1), generator=g).to(device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step():
        with ctx:
            out = model(x[:, :-1], targets=x[:, 1:])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"] + opt.param_groups[1]["params"], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="force the CPU cases")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 GPU, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5 GPU, 1 CPU)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--cases", default=None, help="preset:batch:seq,... to override the case list")
    args = p.parse_args()
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    cases = GPU_CASES if cuda else CPU_CASES
    if args.cases:
        cases = [(c.split(":")[0], int(c.split(":")[1]), int(c.split(":")[2])) for c in args.cases.split(",")]
    steps, warmup = args.steps or (20 if cuda else 3), args.warmup or (5 if cuda else 1)
    if not cuda:
        torch.set_flush_denormal(True)  # as the trainer does: denormals make early CPU steps ~30x slower
    peak = peak_flops(device)
    rows = []
    for preset, batch, seq_len in cases:
        cfg = ModelConfig.from_preset(preset)
        fpt, _ = flops_per_token(cfg, seq_len)
        modes = ["eager"] + ([] if args.no_compile else ["compiled"])
        base = None
        for mode in modes:
            torch.manual_seed(0)
            model = Model(cfg, device=device)
            model.train()
            run = torch.compile(model) if mode == "compiled" else model
            try:
                sec = time_steps(run, device, batch, seq_len, cfg.vocab_size, steps, warmup, bf16=cuda)
            except Exception as e:  # a compile failure is a result, not a crash of the benchmark
                rows.append({"preset": preset, "mode": mode, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                continue
            tps = batch * seq_len / sec
            base = base or tps
            rows.append({"preset": preset, "mode": mode, "batch": batch, "seq_len": seq_len,
                         "ms_per_step": 1000 * sec, "tokens_per_s": tps, "speedup_vs_eager": tps / base,
                         "mfu": fpt * tps / peak if peak else None, "flops_per_token": fpt})
            del model, run
            if cuda:
                torch.cuda.empty_cache()
    dev_name = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, " \
        f"{torch.get_num_threads()} threads)"
    print(f"device: {dev_name}, dtype {'bf16 autocast' if cuda else 'fp32'}, torch {torch.__version__}")
    print(f"{'preset':<12} {'mode':<9} {'batch x seq':>12} {'ms/step':>9} {'tokens/s':>11} {'vs eager':>9} "
          f"{'MFU':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:<12} {r['mode']:<9} error: {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{r['preset']:<12} {r['mode']:<9} {r['batch']:>5} x {r['seq_len']:<5} {r['ms_per_step']:>9.1f} "
              f"{r['tokens_per_s']:>11,.0f} {r['speedup_vs_eager']:>8.2f}x {mfu:>7}")
    print(json.dumps({"benchmark": "train_throughput", "device": dev_name, "torch": torch.__version__,
                      "peak_flops": peak, "steps": steps, "rows": rows}))


if __name__ == "__main__":
    main()
