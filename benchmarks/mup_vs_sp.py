"""muTransfer that pays? Hyperparameters searched on a narrow proxy vs SP tuned at the target (issue 15).

For each architecture, with the same data, steps, batch and seed everywhere:
  search    `nanoseek sweep --search`: random search + successive halving over lr, init std, alpha_emb,
            alpha_out, alpha_attn, embedding lr factor, zero-init query/readout at the proxy width (muP).
  transfer  the chosen values written by `sweep.transfer` (= `--transfer-to`) and trained from that file at
            the target width.
  sp        the standard parametrization at the target width, one run per learning rate (>= 3).
  lr_only   (optional) the old workflow: muP with default multipliers, lr alone tuned at the proxy, transferred.
  curves    (optional) muP loss vs lr (chosen lr x 1, 1/4, 4) at the curve widths, other values as chosen.
  ablate    (optional) the chosen values at the target width with one knob at a time back to its default
            (--ablate-knobs): which tuned knob breaks (or carries) the transfer.
--chosen FILE takes the proxy's choice from a transfer file written earlier (`--transfer-to` /
benchmarks/results/mup_vs_sp_<arch>_transfer-<width>.json) instead of running the search again.
Budget = training FLOPs (accounting.model_stats x tokens) of the proxy search vs the SP sweep at the target,
and wall seconds (the CPU machine was shared, so wall time is only indicative).
Every finished run is appended to OUT/rows.jsonl and cached in OUT/<arch>/runs (a rerun skips it).

    python3 benchmarks/mup_vs_sp.py                            # CPU: gpt2 and dsv3, widths 32 -> 256, 400 steps
    python3 benchmarks/mup_vs_sp.py --proxy-width 128 --target-width 1024 --steps 2000 --seq-len 256 \\
        --batch-size 32 --curve-widths 128,256,512 --arms search,transfer,sp,lr_only,curves   # GPU scale
    python3 benchmarks/mup_vs_sp.py --archs gpt2 --arms ablate --ablate-knobs out \
        --chosen benchmarks/results/mup_vs_sp_gpt2_transfer-256.json             # one knob back to default
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek import sweep  # noqa: E402
from nanoseek.accounting import model_stats  # noqa: E402
from nanoseek.train.config import TrainConfig, load_config_file  # noqa: E402
from nanoseek.train.trainer import train  # noqa: E402

PRESETS = {"gpt2": "gpt2-tiny", "dsv3": "dsv3-tiny"}
SP_LRS = {"gpt2": "2^-11,2^-10,2^-9", "dsv3": "2^-10,2^-9,2^-8"}


def floats(s: str) -> list[float]:
    return [2.0 ** float(v[2:]) if v.startswith("2^") else float(v) for v in s.split(",") if v]


def run_flops(base: TrainConfig, width: int, steps: int) -> float:
    cfg = dataclasses.replace(base, hidden_size=width).model_config_obj()
    return model_stats(cfg, base.seq_len)["flops_per_token"] * base.seq_len * base.batch_size * steps


def log_row(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def train_from_file(path: Path, out_dir: Path) -> dict:
    """Pretrain exactly what the transfer file says (cached by out_dir/result.json)."""
    done = out_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    cfg = TrainConfig.from_dict({**load_config_file(path), "out_dir": str(out_dir), "plots": False,
                                 "eval_every": 0, "save_every": 0, "keep_last": 1})
    summary = train(cfg)
    rec = {"val_loss": summary["val_loss"], "train_loss": summary["loss"], "config": str(path)}
    done.write_text(json.dumps(rec) + "\n")
    return rec


def chosen_from_file(path: str) -> dict:
    """The proxy's choice (lr and every sweep.HPARAMS key; None = default) read back from a transfer file."""
    d = load_config_file(Path(path))
    return {"lr": d["lr"], **{k: d.get(field) for k, field in sweep.HPARAMS.items()}}


def run_arch(arch: str, args: argparse.Namespace, rows: Path, base_width: int) -> dict:
    """Every requested arm for one architecture; returns its results."""
    arms = set(args.arms.split(","))
    t_arch = time.time()
    base = TrainConfig(preset=PRESETS[arch], seq_len=args.seq_len, batch_size=args.batch_size,
                       max_steps=args.steps, warmup_steps=max(1, args.steps // 10),
                       eval_batches=args.eval_batches, vocab_size=args.vocab_size, device=args.device,
                       log_every=max(1, args.steps // 4), seed=args.seed)
    adir, res = Path(args.out) / arch, {}
    stamp = {"arch": arch, "steps": args.steps, "batch": f"{args.batch_size}x{args.seq_len}"}

    def record(arm: str, rec: dict, width: int, steps: int, seconds: float) -> None:
        row = {**stamp, "arm": arm, **rec, "width": width, "run_steps": steps,
               "flops": run_flops(base, width, steps), "seconds": round(seconds, 1)}
        log_row(rows, row)
        print(f"  {arch} {arm:9s} width {width:4d}: val_loss {rec['val_loss']:.4f}  ({seconds:.0f} s)", flush=True)

    def timed_run(arm, param, width, lr, hp, steps=None):
        t = time.time()
        rec = sweep.run(base, param, width, args.seed, lr, hp, adir, base_width, steps=steps)
        record(arm, rec, width, rec.get("steps", args.steps), time.time() - t)
        return rec

    if args.chosen:
        if "search" in arms:
            sys.exit("--chosen replaces the search: drop 'search' from --arms")
        chosen = chosen_from_file(args.chosen)
        print(f"{arch} chosen (from {args.chosen}): {chosen}")
    elif arms & {"search", "transfer", "curves", "ablate"}:
        t = time.time()
        recs, chosen = sweep.search(base, args.proxy_width, adir, base_width, n=args.trials, eta=args.eta,
                                    rungs=args.rungs, seed=args.seed)
        flops = sum(run_flops(base, args.proxy_width, r["steps"]) for r in recs)
        res["search"] = {"chosen": chosen, "runs": len(recs), "flops": flops, "seconds": time.time() - t}
        log_row(rows, {**stamp, "arm": "search_summary", **res["search"]})
        print(f"{arch} search: {len(recs)} runs, chosen {chosen}")
    if "transfer" in arms:
        path = sweep.transfer(base, chosen, args.target_width, base_width,
                              adir / f"transfer-{args.target_width}.json")
        t = time.time()
        rec = train_from_file(path, adir / "transferred")
        record("transfer", {**chosen, **rec}, args.target_width, args.steps, time.time() - t)
        res["transfer"] = rec["val_loss"]
    if "sp" in arms:
        sp = [timed_run("sp", "sp", args.target_width, lr, {}) for lr in floats(args.sp_lrs or SP_LRS[arch])]
        b = min(sp, key=lambda r: r["val_loss"])
        res["sp"] = {"by_lr": {r["lr"]: r["val_loss"] for r in sp}, "best_lr": b["lr"], "best": b["val_loss"],
                     "flops": sum(run_flops(base, args.target_width, args.steps) for _ in sp)}
    if "lr_only" in arms:
        grid = [timed_run("lr_only_proxy", "mup", args.proxy_width, lr, {}) for lr in floats(args.lr_only_lrs)]
        lr = min(grid, key=lambda r: r["val_loss"])["lr"]
        res["lr_only"] = {"lr": lr, "val_loss": timed_run("lr_only", "mup", args.target_width, lr, {})["val_loss"]}
    if "curves" in arms:
        hp = {k: chosen[k] for k in sweep.HPARAMS}
        res["curves"] = {w: {f"{f:g}": timed_run("curves", "mup", w, chosen["lr"] * f, hp)["val_loss"]
                             for f in floats(args.curve_factors)} for w in map(int, args.curve_widths.split(","))}
    if "ablate" in arms:
        hp = {k: chosen[k] for k in sweep.HPARAMS}
        res["ablate"] = {k: timed_run(f"ablate:{k}", "mup", args.target_width, chosen["lr"],
                                      {**hp, k: None})["val_loss"] for k in args.ablate_knobs.split(",") if k}
    res["seconds"] = time.time() - t_arch
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="gpt2,dsv3")
    ap.add_argument("--arms", default="search,transfer,sp", help="of search,transfer,sp,lr_only,curves,ablate")
    ap.add_argument("--chosen", default=None, help="a transfer file (JSON) whose lr and tuned values replace the "
                    "search (which is then not run)")
    ap.add_argument("--ablate-knobs", default="out,emb_lr", help="ablate: comma-separated knobs of "
                    f"{','.join(sweep.HPARAMS)}, each reset to its default in turn")
    ap.add_argument("--proxy-width", type=int, default=32)
    ap.add_argument("--target-width", type=int, default=256)
    ap.add_argument("--base-width", type=int, default=None, help="muP base width (default: the proxy width)")
    ap.add_argument("--trials", type=int, default=16, help="random configurations in the search's first rung")
    ap.add_argument("--eta", type=int, default=4, help="successive halving keeps 1/eta per rung")
    ap.add_argument("--rungs", type=int, default=2)
    ap.add_argument("--sp-lrs", default=None, help="SP learning rates at the target (default per arch; 2^k ok)")
    ap.add_argument("--lr-only-lrs", default="2^-7,2^-6,2^-5,2^-4", help="the lr-only grid at the proxy")
    ap.add_argument("--curve-widths", default="32,64,128")
    ap.add_argument("--curve-factors", default="1,0.25,4", help="curves: multiples of the chosen lr")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--eval-batches", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the CPU machine is shared)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="out/mup_vs_sp")
    args = ap.parse_args()
    bad = [k for k in args.ablate_knobs.split(",") if k and k not in sweep.HPARAMS]
    if bad:
        ap.error(f"--ablate-knobs: unknown knob(s) {bad}; choose from {list(sweep.HPARAMS)}")
    if args.chosen and not Path(args.chosen).is_file():
        ap.error(f"--chosen: no such file {args.chosen!r}")
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = out / "rows.jsonl"
    base_width = args.base_width or args.proxy_width
    results = {arch: run_arch(arch, args, rows, base_width) for arch in args.archs.split(",")}

    print(f"\nmuP transfer vs SP tuned at the target: proxy width {args.proxy_width} -> target "
          f"{args.target_width}, {args.steps} steps, batch {args.batch_size}x{args.seq_len}, base width {base_width}")
    print(f"{'arch':5s} {'muP transferred':>16s} {'SP best (lr)':>20s} {'lr-only muP':>12s} "
          f"{'search cost':>12s} {'SP sweep cost':>14s}")
    for arch, r in results.items():
        tr = f"{r['transfer']:.4f}" if "transfer" in r else "-"
        sp = f"{r['sp']['best']:.4f} ({r['sp']['best_lr']:.2g})" if "sp" in r else "-"
        lo = f"{r['lr_only']['val_loss']:.4f}" if "lr_only" in r else "-"
        sc = f"{r['search']['flops']:.3g}" if "search" in r else "-"
        spc = f"{r['sp']['flops']:.3g}" if "sp" in r else "-"
        print(f"{arch:5s} {tr:>16s} {sp:>20s} {lo:>12s} {sc:>12s} {spc:>14s}")
    print("costs in training FLOPs; val loss on the built-in corpus' validation split; one seed")
    print(json.dumps({"benchmark": "mup_vs_sp", "proxy_width": args.proxy_width, "target_width": args.target_width,
                      "steps": args.steps, "results": results}, default=str))


if __name__ == "__main__":
    main()
