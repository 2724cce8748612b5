"""CPU thread settings for training, measured side by side: how bad can OpenMP oversubscription get?

What. Each setting runs in its own process (OpenMP reads its environment once, at load), round-robin over
`--rounds` rounds so that the machine's load hits every setting alike; each process times `--steps` optimizer
steps of a DeepSeek-V3 model (dsv3-tiny preset by default, B x T random tokens) after one warm-up step.
Settings:
  threads=1                      torch.set_num_threads(1)
  threads=N                      all cores (torch's default), OpenMP's default (spinning) wait policy
  threads=N passive              all cores, OMP_WAIT_POLICY=PASSIVE (idle threads sleep instead of spinning)
  threads=auto                   nanoseek's default (train/threads.py: the cores idle by the load average)
The load average at the start of each round is printed beside it.

    python3 benchmarks/threads.py                 # dsv3-tiny, 8 x 256, 3 steps, 3 rounds
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = r"""
import json, sys, time, torch
from nanoseek import Model, ModelConfig
from nanoseek.train.optim import configure_optimizer
from nanoseek.train.threads import default_threads
threads, preset, batch, seq, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(default_threads() if threads == "auto" else int(threads))
torch.set_flush_denormal(True)
torch.manual_seed(0)
cfg = ModelConfig.from_preset(preset)
model = Model(cfg)
opt = configure_optimizer(model, lr=1e-4)
x = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
def step():
    model(x[:, :-1], targets=x[:, 1:]).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
step()
t0 = time.perf_counter()
for _ in range(steps):
    step()
tps = steps * batch * seq / (time.perf_counter() - t0)
print(json.dumps({"threads": torch.get_num_threads(), "tokens_per_s": tps}))
"""


def settings(cores: int) -> dict[str, tuple[str, dict]]:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    return {"threads=1": ("1", base), f"threads={cores}": (str(cores), base),
            f"threads={cores} passive": (str(cores), {**base, "OMP_WAIT_POLICY": "PASSIVE"}),
            "threads=auto": ("auto", base)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="dsv3-tiny", help="model preset (default dsv3-tiny)")
    p.add_argument("--batch", type=int, default=8, help="batch (default 8)")
    p.add_argument("--seq", type=int, default=256, help="sequence length (default 256)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per process (default 3)")
    p.add_argument("--rounds", type=int, default=3, help="round-robin rounds (default 3)")
    args = p.parse_args()
    if args.steps < 1 or args.rounds < 1:
        p.error(f"--steps ({args.steps}) and --rounds ({args.rounds}) must be >= 1")
    cores = os.cpu_count() or 1
    runs: dict[str, list[dict]] = {k: [] for k in settings(cores)}
    loads = []
    env_path = {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for r in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for name, (threads, env) in settings(cores).items():
            out = subprocess.run([sys.executable, "-c", CHILD, threads, args.preset, str(args.batch), str(args.seq),
                                  str(args.steps)], capture_output=True, text=True, env={**env, **env_path},
                                 timeout=3600)
            if out.returncode != 0:
                raise SystemExit(f"{name}: child failed\n{out.stderr[-2000:]}")
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r} (load {loads[-1]:.1f}) {name:<20} {runs[name][-1]['tokens_per_s']:>9,.0f} tokens/s",
                  flush=True)
    base = statistics.median(x["tokens_per_s"] for x in runs["threads=1"])
    rows = []
    print(f"{cores} cores, load average {min(loads):.1f}-{max(loads):.1f} during the runs")
    print(f"{'setting':<20} {'threads':>7} {'median tok/s':>12} {'vs 1 thread':>11} {'worst round':>11}")
    for name, xs in runs.items():
        tps = [x["tokens_per_s"] for x in xs]
        rows.append({"setting": name, "threads": xs[0]["threads"], "tokens_per_s": statistics.median(tps),
                     "all": tps, "vs_one_thread": statistics.median(tps) / base, "worst_vs_one": min(tps) / base})
        r = rows[-1]
        print(f"{name:<20} {r['threads']:>7} {r['tokens_per_s']:>12,.0f} {r['vs_one_thread']:>10.2f}x "
              f"{r['worst_vs_one']:>10.2f}x")
    print(json.dumps({"benchmark": "threads", "cores": cores, "load_average": loads, "args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
