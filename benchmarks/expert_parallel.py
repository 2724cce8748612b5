"""Expert parallelism: bytes dispatched per token per MoE layer vs topk_group, and step time vs processes.

Part 1 (traffic). One MoE layer of the dsv3-small shape (H=1024, 32 routed experts top-4, n_group=4) on
4 processes = 4 simulated nodes, each holding 8 experts = one routing group. Every rank routes its tokens
(random hidden states, the layer's random init: a shape-only run) and dispatches them with the real
all_to_all_single; the rows and bytes are read from the collectives' split sizes (DispatchStats). For each
topk_group in 1..n_group it reports, per token and layer:
    copies_remote   token copies whose expert is on another rank (what a dispatch without dedup sends)
    rows_remote     rows actually sent to other ranks (one per token and destination rank: deduplicated)
    bytes_remote    rows_remote * H * 2 (bf16 activations, as on a GPU; the CPU run moves fp32 = 2x)
    max_dest        the most ranks one token was sent to (node-limited routing bounds it by topk_group)
Part 2 (step time). dsv3-tiny, the same global batch (8 x 128 tokens), on 1 process and on 2 and 4 processes
with --expert-parallel = the world size (and 2-process DDP for comparison); runs interleaved, median step.

    python3 benchmarks/expert_parallel.py              # CPU, gloo (~2 min on 2 shared cores)
    python3 benchmarks/expert_parallel.py --device cuda --procs 2 4 8   # a multi-GPU machine: NCCL

Prints a table and ends with one JSON line. Rejected: modelling the bytes from the routing math (the point is
to measure what the collectives move).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402

from nanoseek import Model, ModelConfig  # noqa: E402
from nanoseek.model.expert_parallel import ExpertGroup, shard_experts  # noqa: E402
from nanoseek.model.moe import MoE  # noqa: E402
from nanoseek.train.distributed import Dist  # noqa: E402
from nanoseek.train.expert_parallel import ExpertParallel  # noqa: E402
from nanoseek.train.optim import configure_optimizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- workers
def traffic(dev: torch.device, tokens: int) -> list[dict]:
    """Part 1 on this rank: dispatch stats of one dsv3-small MoE layer per topk_group (summed over ranks)."""
    cfg = ModelConfig.from_preset("dsv3-small")
    W, rank = tdist.get_world_size(), tdist.get_rank()
    torch.manual_seed(0)
    with torch.device(dev):
        moe = MoE(cfg)
        torch.nn.init.normal_(moe.gate.weight, 0.0, cfg.initializer_range)
        torch.nn.init.normal_(moe.experts.gate_up_proj, 0.0, cfg.initializer_range)
        torch.nn.init.normal_(moe.experts.down_proj, 0.0, cfg.initializer_range)
    ep = ExpertGroup(W, rank, tdist.group.WORLD)
    shard_experts(moe, ep)
    torch.manual_seed(1 + rank)
    x = torch.randn(1, tokens, cfg.hidden_size, device=dev)
    rows = []
    for tg in range(1, cfg.n_group + 1):
        moe.gate.topk_group = tg
        ep.stats.reset()
        with torch.no_grad():
            moe(x)
        s = torch.tensor([ep.stats.tokens, ep.stats.copies_remote, ep.stats.rows_remote, ep.stats.rows],
                         dtype=torch.float64, device=dev)
        tdist.all_reduce(s)
        m = torch.tensor([ep.stats.max_destinations], device=dev)
        tdist.all_reduce(m, op=tdist.ReduceOp.MAX)
        n = s[0].item()
        rows.append({"topk_group": tg, "copies_remote": s[1].item() / n, "rows_remote": s[2].item() / n,
                     "rows_all": s[3].item() / n, "bytes_remote_bf16": s[2].item() / n * cfg.hidden_size * 2,
                     "bytes_no_dedup_bf16": s[1].item() / n * cfg.hidden_size * 2, "max_dest": int(m.item())})
    return rows


def step_time(dev: torch.device, mode: str, steps: int, seq: int, global_batch: int) -> list[float]:
    """Part 2 on this rank: per-step seconds of forward+backward+gradient averaging+AdamW on dsv3-tiny."""
    W = tdist.get_world_size() if tdist.is_initialized() else 1
    cfg = ModelConfig.from_preset("dsv3-tiny")
    torch.manual_seed(0)
    model = Model(cfg, device=dev)
    d = Dist(tdist.get_rank() if W > 1 else 0, W)
    if mode == "ep":
        wrapped = ExpertParallel(model, d, W, dev)
    elif mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        wrapped = model
    opt = configure_optimizer(model, 1e-3)
    g = torch.Generator().manual_seed(d.rank)
    times = []
    for _ in range(steps):
        x = torch.randint(0, cfg.vocab_size, (global_batch // W, seq + 1), generator=g).to(dev)
        t0 = time.perf_counter()
        out = wrapped(x[:, :-1], targets=x[:, 1:])
        out.loss.backward()
        if mode == "ep":
            wrapped.reduce_and_clip_(1.0)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    return times


def worker(a) -> None:
    W = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(a.device)
    if a.device == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    torch.set_flush_denormal(True)
    if W > 1:
        tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    result = {"traffic": traffic(dev, a.tokens)} if a.part == "traffic" else \
        {"times": step_time(dev, a.mode, a.steps, a.seq_len, a.global_batch)}
    if W == 1 or tdist.get_rank() == 0:
        Path(a.result).write_text(json.dumps(result))
    if W > 1:
        tdist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- driver
def launch(nproc: int, a, part: str, mode: str = "single") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        res = Path(tmp) / "r.json"
        args = [str(Path(__file__).resolve()), "--worker", "--part", part, "--mode", mode, "--result", str(res),
                "--device", a.device, "--tokens", str(a.tokens), "--steps", str(a.steps), "--seq-len",
                str(a.seq_len), "--global-batch", str(a.global_batch)]
        cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
               if nproc > 1 else [sys.executable]) + args
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
        if r.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
        return json.loads(res.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per process)")
    p.add_argument("--tokens", type=int, default=512, help="tokens per rank in the traffic run")
    p.add_argument("--procs", type=int, nargs="+", default=[2, 4], help="process counts timed against 1")
    p.add_argument("--steps", type=int, default=6, help="timed steps per run (the first is dropped)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence in the timing runs")
    p.add_argument("--global-batch", type=int, default=8, help="sequences per step, all ranks together")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats of every timing run")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--part", default="traffic", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="single", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    for n in a.procs:
        if a.global_batch % n:
            raise SystemExit(f"--global-batch {a.global_batch} is not divisible by {n} processes")

    traffic_rows = launch(4, a, "traffic")["traffic"]
    print("bytes dispatched per token per MoE layer, dsv3-small shape (H=1024, 32 experts top-4, 4 groups), "
          "4 ranks = 4 nodes")
    print(f"{'topk_group':>10} {'copies off-rank':>15} {'rows off-rank':>13} {'bytes (bf16)':>12} "
          f"{'no dedup':>9} {'max ranks/token':>15}")
    for r in traffic_rows:
        print(f"{r['topk_group']:>10} {r['copies_remote']:>15.3f} {r['rows_remote']:>13.3f} "
              f"{r['bytes_remote_bf16']:>12.0f} {r['bytes_no_dedup_bf16']:>9.0f} {r['max_dest']:>15}")

    runs = [(1, "single")] + [(n, "ep") for n in a.procs] + ([(2, "ddp")] if 2 in a.procs else [])
    times: dict[str, list[float]] = {}
    for _ in range(a.repeats):  # interleaved: contention on a shared machine hits every variant alike
        for n, mode in runs:
            t = launch(n, a, "time", mode)["times"][1:]
            times.setdefault(f"{mode}{n}", []).extend(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nstep time, dsv3-tiny, global batch {a.global_batch} x {a.seq_len} tokens, {a.device} "
          f"(median of {a.repeats} x {a.steps - 1} steps)")
    for k, v in med.items():
        print(f"{k:>8}: {v * 1e3:8.1f} ms   x{v / med['single1']:.2f} of 1 process")
    print(json.dumps({"benchmark": "expert_parallel", "device": a.device, "traffic": traffic_rows,
                      "step_time_s": med, "ratio_vs_1": {k: v / med["single1"] for k, v in med.items()},
                      "args": {k: v for k, v in vars(a).items() if k not in ("worker", "part", "mode", "result")}}))


if __name__ == "__main__":
    main()
