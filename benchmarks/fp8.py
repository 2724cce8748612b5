"""Fine-grained FP8 (issue 12): loss vs fp32, memory of saved activations and of an FP8 base, and (GPU) speed.

CPU (emulated FP8: quantize, dequantize, fp32 matmul; see nanoseek/fp8.py):
  * loss: dsv3-tiny at two widths trained side by side from the same init on the same batches, one model with
    `set_precision("fp8")` and one plain fp32, steps interleaved in one process; the relative error of the
    FP8 run's loss against the fp32 run (last-50-step mean of the training loss, and the validation loss at the
    end), against the DeepSeek-V3 report's < 0.25 % (V3 section 3.3, measured there vs BF16 at 16B/230B scale).
  * memory: bytes the autograd graph saves for one forward (torch.autograd.graph.saved_tensors_hooks,
    distinct storages), plain vs fp8, the latter with and without the MLP recomputation of
    `Precision.recompute`; and the bytes of the projection weights (every linear but lm_head, and the routed
    experts) held in bf16 vs what `precision.quantize_base` (the frozen base of `--base-fp8`) leaves in the
    model: 128x128 FP8 blocks + fp32 scale buffers.
GPU (only when CUDA is present; otherwise the section prints that it was skipped):
  * GEMM TFLOP/s at M = N = K in 1024..8192: bf16 torch.mm vs blockwise FP8 through `fp8.fp8_mm`, the
    forward/dgrad kind (1x128 x 128x128) and the wgrad kind (1x128 x 1x128), torch._scaled_mm when the probe
    accepts that kind, else the emulation, which is then what is timed; interleaved.
  * one end-to-end training step of dsv3-tiny widened to hidden 2048: bf16 autocast vs fp8 recipe.

    python3 benchmarks/fp8.py                      # CPU: 300 steps at widths 128 and 256, 8 x 128 tokens
    python3 benchmarks/fp8.py --steps 50 --widths 64  # quick look
Prints tables and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from side_by_side import train_step  # noqa: E402  (benchmarks/side_by_side.py)

from nanoseek import Model, ModelConfig  # noqa: E402
from nanoseek.data import PackedLoader, eval_batches, get_or_train_tokenizer, load_corpus, tokenize_corpus  # noqa: E402
from nanoseek.fp8 import BLOCKS, TILES, Precision, fp8_mm, quantize_blocks, quantize_tiles  # noqa: E402
from nanoseek.model.layers import Linear  # noqa: E402
from nanoseek.model.moe import Experts  # noqa: E402
from nanoseek.model.precision import quantize_base  # noqa: E402
from nanoseek.train.optim import configure_optimizer, lr_at  # noqa: E402

V3_BOUND = 0.0025  # DeepSeek-V3 report: FP8 loss relative error vs BF16 stays below 0.25 %


def data(seq_len: int, batch: int, seed: int):
    corpus = load_corpus(None)
    tok = get_or_train_tokenizer(corpus, ModelConfig.from_preset("dsv3-tiny").vocab_size)
    train = tokenize_corpus(corpus, tok, "train")
    val = tokenize_corpus(corpus, tok, "val")
    return PackedLoader(train, seq_len, batch, seed=seed), val


ARMS = ("fp32", "fp8", "fp32-perturbed", "bf16", "fp8-no-recompute")


def pair(width: int, seed: int, device) -> tuple[Model, Model]:
    """(plain, fp8) models with identical weights."""
    models = arm_models(width, seed, device, ("fp32", "fp8"))
    return models["fp32"], models["fp8"]


def arm_models(width: int, seed: int, device, arms) -> dict[str, Model]:
    """One model per arm from the same init. "fp32-perturbed": every weight rounded once to bf16 at init, the
    noise floor (how far two fp32 trajectories drift apart from a perturbation far smaller than FP8's);
    "bf16": bf16 autocast, the baseline the V3 report measures FP8 against."""
    torch.manual_seed(seed)
    ref = Model(ModelConfig.from_preset("dsv3-tiny").with_width(width), device=device)
    out = {}
    for arm in arms:
        m = copy.deepcopy(ref)
        if arm == "fp8":
            m.set_precision("fp8")
        elif arm == "fp8-no-recompute":  # the same training bit for bit, MLPs not recomputed (time, memory)
            m.set_precision("fp8").recompute = False
        elif arm == "fp32-perturbed":
            with torch.no_grad():
                for p in m.parameters():
                    p.copy_(p.bfloat16().float())
        out[arm] = m
    return out


def val_loss(model: Model, val, seq_len: int, batch: int, n: int) -> float:
    model.eval()
    with torch.no_grad():
        losses = [model(x, targets=y, return_output=True).main_loss.item()
                  for x, y in eval_batches(val, seq_len, batch, max_batches=n)]
    model.train()
    return sum(losses) / len(losses)


def loss_run(width: int, args, device) -> dict:
    """Train every arm side by side (interleaved steps, same batches); losses and seconds per step."""
    loader, val = data(args.seq_len, args.batch, args.seed)
    models = arm_models(width, args.seed, device, args.arms)
    opts = {k: configure_optimizer(m, args.lr, 0.1) for k, m in models.items()}
    hist = {k: [] for k in models}
    secs = dict.fromkeys(models, 0.0)
    order = list(models)
    for step in range(args.steps):
        x, y = loader.next_batch()
        lr = lr_at(step, args.lr, args.steps, warmup_steps=args.steps // 10)
        for k in order[step % len(order):] + order[:step % len(order)]:  # rotate who runs first
            ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=k == "bf16")
            loss, sec = train_step(models[k], opts[k], x, y, lr, ctx)
            secs[k] += sec
            hist[k].append(loss)
        if step % max(1, args.steps // 6) == 0 or step == args.steps - 1:
            print(f"  width {width} step {step:4d}  " + "  ".join(f"{k} {h[-1]:.4f}" for k, h in hist.items()),
                  flush=True)
    tail = min(50, args.steps)
    train = {k: sum(h[-tail:]) / tail for k, h in hist.items()}
    vals = {k: val_loss(m, val, args.seq_len, args.batch, args.eval_batches) for k, m in models.items()}
    row = {"width": width, "params": sum(p.numel() for p in models["fp32"].parameters())}
    for k in models:
        row[f"train_loss_{k}"], row[f"val_loss_{k}"] = train[k], vals[k]
        row[f"s_per_step_{k}"] = secs[k] / args.steps
        if k != "fp32":
            row[f"train_rel_err_{k}"] = abs(train[k] - train["fp32"]) / train["fp32"]
            row[f"val_rel_err_{k}"] = abs(vals[k] - vals["fp32"]) / vals["fp32"]
    if "bf16" in models and "fp8" in models:  # the V3 report's comparison: FP8 against BF16
        row["val_rel_err_fp8_vs_bf16"] = abs(vals["fp8"] - vals["bf16"]) / vals["bf16"]
    row["train_rel_err"], row["val_rel_err"] = row.get("train_rel_err_fp8"), row.get("val_rel_err_fp8")
    return row


def saved_bytes(model: Model, x: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """Bytes of distinct storages the autograd graph holds after one training forward (parameters excluded),
    and the part of them that is fp8 (the projections' quantized inputs)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[torch.Tensor, int, bool]] = {}  # the tensor is held: no address reuse, no miscount

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = (t, s.nbytes(), t.dtype == torch.float8_e4m3fn)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, targets=y)
    del loss
    return sum(n for _, n, _ in seen.values()), sum(n for _, n, fp8 in seen.values() if fp8)


def projection_weights(model: Model) -> list[torch.Tensor]:
    """The weights the FP8 recipe covers: every Linear but lm_head, and the routed experts' stacks."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, Linear) and name != "lm_head":
            out.append(m.weight)
        elif isinstance(m, Experts):
            out += [m.gate_up_proj, m.down_proj]
    return out


def memory(width: int, args, device) -> dict:
    plain, fp8 = pair(width, args.seed, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, plain.config.vocab_size, (args.batch, args.seq_len + 1), generator=g).to(device)
    act = {k: saved_bytes(m, x[:, :-1], x[:, 1:])[0] for k, m in (("fp32", plain), ("fp8", fp8))}
    fp8_inputs = saved_bytes(fp8, x[:, :-1], x[:, 1:])[1]  # the projections' inputs, 1 byte per element
    fp8.set_precision("fp8").recompute = False  # MLP up-projections and SwiGLU not recomputed: all kept
    act["fp8_no_recompute"] = saved_bytes(fp8, x[:, :-1], x[:, 1:])[0]
    bf16 = sum(w.numel() * 2 for w in projection_weights(plain))
    quantize_base(plain)  # what `finetune --base-fp8` holds: blocks in place of the weights, + the scale buffers
    fp8_bytes = sum(w.numel() * w.element_size() for w in projection_weights(plain)) + \
        sum(b.numel() * b.element_size() for n, b in plain.named_buffers() if n.endswith("_scale_inv"))
    return {"width": width, "saved_act_bytes_fp32": act["fp32"], "saved_act_bytes_fp8": act["fp8"],
            "saved_act_ratio": act["fp8"] / act["fp32"], "saved_fp8_input_bytes": fp8_inputs,
            "saved_act_bytes_fp8_no_recompute": act["fp8_no_recompute"],
            "saved_act_ratio_no_recompute": act["fp8_no_recompute"] / act["fp32"],
            "base_bytes_bf16": bf16, "base_bytes_fp8": fp8_bytes,
            "base_ratio": fp8_bytes / bf16}


def gpu_section(args) -> dict:
    if not torch.cuda.is_available():
        print("\nGPU section skipped: no CUDA device (blockwise FP8 GEMM TFLOP/s and the hidden-2048 step wait "
              "for a GPU)")
        return {"skipped": "no CUDA device"}
    dev = torch.device("cuda")
    recipe = Precision("fp8")
    native = {k: recipe.native(dev, k) for k in (BLOCKS, TILES)}
    rows = []
    print("\nGEMM TFLOP/s, M = N = K (blockwise FP8: "
          + ", ".join(f"1x128 x {k} via {'torch._scaled_mm' if v else 'EMULATION'}" for k, v in native.items()) + ")")
    for n in (1024, 2048, 4096, 8192):
        a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        aq, as_ = quantize_tiles(a)
        bq, bs = quantize_blocks(b)
        tq, ts = quantize_tiles(b)
        fns = {"bf16": lambda a=a, b=b: a @ b.t(),
               "fp8": lambda aq=aq, as_=as_, bq=bq, bs=bs: fp8_mm(aq, as_, bq, bs, BLOCKS, native[BLOCKS]),
               "fp8_wgrad": lambda aq=aq, as_=as_, tq=tq, ts=ts: fp8_mm(aq, as_, tq, ts, TILES, native[TILES])}
        t = dict.fromkeys(fns, 0.0)
        for f in fns.values():
            f()
        torch.cuda.synchronize()
        for _ in range(args.gemm_reps):  # interleaved
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                torch.cuda.synchronize()
                t[k] += time.perf_counter() - t0
        tf = {k: 2 * n**3 * args.gemm_reps / v / 1e12 for k, v in t.items()}
        rows.append({"n": n, "tflops_bf16": tf["bf16"], "tflops_fp8": tf["fp8"], "speedup": tf["fp8"] / tf["bf16"],
                     "tflops_fp8_wgrad": tf["fp8_wgrad"]})
        print(f"  {n:5d}  bf16 {tf['bf16']:8.1f}  fp8 {tf['fp8']:8.1f}  x{tf['fp8'] / tf['bf16']:.2f}  "
              f"fp8 wgrad kind {tf['fp8_wgrad']:8.1f}")
    plain, fp8 = pair(2048, args.seed, dev)
    x = torch.randint(0, plain.config.vocab_size, (8, 1025), device=dev)
    opts = {k: configure_optimizer(m, 1e-4) for k, m in (("bf16", plain), ("fp8", fp8))}
    step_t = {"bf16": 0.0, "fp8": 0.0}
    for i in range(args.gpu_steps + 2):
        for k, m in (("bf16", plain), ("fp8", fp8)):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = m(x[:, :-1], targets=x[:, 1:])
            loss.backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i >= 2:
                step_t[k] += (time.perf_counter() - t0) / args.gpu_steps
    print(f"end-to-end step, dsv3-tiny at hidden 2048, 8 x 1024: bf16 {step_t['bf16'] * 1e3:.1f} ms, "
          f"fp8 {step_t['fp8'] * 1e3:.1f} ms")
    return {"native_blockwise_scaled_mm": native, "gemm": rows, "step_ms_bf16": step_t["bf16"] * 1e3,
            "step_ms_fp8": step_t["fp8"] * 1e3, "device": torch.cuda.get_device_name()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps per width (default 300)")
    p.add_argument("--widths", default="128,256", help="comma-separated hidden sizes of dsv3-tiny (default 128,256)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate, cosine with 10%% warmup")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches at the end (default 8)")
    p.add_argument("--seed", type=int, default=0, help="init and data-order seed")
    p.add_argument("--memory-widths", default=None,
                   help="hidden sizes for the memory table (one forward each; default: --widths)")
    p.add_argument("--arms", default="fp32,fp8,fp32-perturbed,bf16",
                   help="comma-separated runs trained side by side; fp32 is the reference and always runs: "
                        f"{', '.join(ARMS)} (default fp32,fp8,fp32-perturbed,bf16)")
    p.add_argument("--gemm-reps", type=int, default=20, help="GPU: timed repetitions per GEMM size")
    p.add_argument("--gpu-steps", type=int, default=5, help="GPU: timed end-to-end steps")
    args = p.parse_args(argv)
    try:
        widths = [int(w) for w in args.widths.split(",")]
    except ValueError:
        p.error(f"--widths {args.widths!r}: need comma-separated integers")
    try:
        mem_widths = [int(w) for w in args.memory_widths.split(",")] if args.memory_widths else widths
    except ValueError:
        p.error(f"--memory-widths {args.memory_widths!r}: need comma-separated integers")
    args.arms = ["fp32"] + [a for a in args.arms.split(",") if a and a != "fp32"]
    bad = [a for a in args.arms if a not in ARMS]
    if bad:
        p.error(f"--arms: unknown run(s) {', '.join(bad)}; choose from {', '.join(ARMS)}")
    if args.steps < 1:
        p.error(f"--steps {args.steps}: must be >= 1")
    torch.set_flush_denormal(True)  # as the trainer does on CPU (small-init denormals are ~30x slower)
    cpu = torch.device("cpu")
    print(f"CPU emulated FP8 vs fp32 ({', '.join(args.arms)}): {args.steps} steps of {args.batch} x "
          f"{args.seq_len} tokens, "
          f"{torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}")
    losses = [loss_run(w, args, cpu) for w in widths]
    print("\n| width | run | train loss | rel err vs fp32 | val loss | rel err vs fp32 | s/step |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in losses:
        for k in args.arms:
            err = ("" if k == "fp32" else f"{100 * r[f'train_rel_err_{k}']:.2f}%",
                   "" if k == "fp32" else f"{100 * r[f'val_rel_err_{k}']:.2f}%")
            print(f"| {r['width']} | {k} | {r[f'train_loss_{k}']:.4f} | {err[0]} | {r[f'val_loss_{k}']:.4f} | "
                  f"{err[1]} | {r[f's_per_step_{k}']:.3f} |")
        if "val_rel_err_fp8_vs_bf16" in r:
            print(f"|  | fp8 vs bf16 (V3's comparison, bound < {100 * V3_BOUND:.2f}%) | | | | "
                  f"{100 * r['val_rel_err_fp8_vs_bf16']:.2f}% | |")
    mem = [memory(w, args, cpu) for w in mem_widths]
    print("\n| width | saved activations fp32 | fp8 without MLP recompute | ratio | fp8 | ratio | "
          "of which fp8 inputs (fp32 would be 4x) | projection weights bf16 | FP8 blocks+scales | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in mem:
        print(f"| {r['width']} | {r['saved_act_bytes_fp32'] / 2**20:.2f} MiB | "
              f"{r['saved_act_bytes_fp8_no_recompute'] / 2**20:.2f} MiB | {r['saved_act_ratio_no_recompute']:.3f} | "
              f"{r['saved_act_bytes_fp8'] / 2**20:.2f} MiB | {r['saved_act_ratio']:.3f} | "
              f"{r['saved_fp8_input_bytes'] / 2**20:.2f} MiB | "
              f"{r['base_bytes_bf16'] / 2**20:.3f} MiB | "
              f"{r['base_bytes_fp8'] / 2**20:.3f} MiB | {r['base_ratio']:.3f} |")
    gpu = gpu_section(args)
    print(json.dumps({"benchmark": "fp8", "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
                      "v3_bound": V3_BOUND, "loss": losses, "memory": mem, "gpu": gpu}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
