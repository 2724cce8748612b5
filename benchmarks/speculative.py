"""MTP speculative decoding on a checkpoint: how often the drafts are accepted, and what that buys in tokens/s.

Prompts are held-out files of the corpus's validation split (stdlib files hashed out of training, see
nanoseek/data/corpus.py): one prompt of --prompt-len tokens from each of the first files (sorted by name) that
are long enough. For each draft count k in --ks, decoding continues every prompt by --new-tokens tokens:
  * acceptance  P(draft j accepted) by draft position j, and the mean accepted length (tokens emitted per row
                per verify forward = 1 + sum_j P(a >= j)), at batch 16, greedy and (if --temperatures has it)
                sampled; greedy speculative output is checked token for token against plain greedy decoding;
  * teacher-forced, on the held-out text itself (one forward, no decoding): top-1 accuracy of the main model
                (t_{i+1}) and of MTP module 1 (t_{i+2}), and how often MTP's argmax at i equals the main model's
                argmax at i+1 (the greedy acceptance rate of draft 1 if the model were continuing real text);
  * speed       tokens/s of plain and speculative greedy decoding at batch 1 and batch 16, the two measured
                alternately (--repeats rounds, plain then speculative, same prompts) in this one process, so that
                load from other processes on a shared machine hits both alike; the median of the rounds counts.
  * engine      the serving engine (nanoseek/serve) with and without `speculative=True` (each k of --ks),
                greedy, batch 1 and batch --batch (all requests added at once, prefill included, prefix caching
                off), alternating rounds as above; tokens/s, the engine's acceptance by draft position and mean
                accepted length, and a check that both engines return the same tokens.
Prints a table and ends with one JSON line.

    python3 benchmarks/speculative.py                                   # the main job's last checkpoint
    python3 benchmarks/speculative.py --checkpoint runs/main/checkpoints/step-0000600 --ks 1,2,3
    python3 benchmarks/speculative.py --parts engine --new-tokens 32    # only the engine rows
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek import Model  # noqa: E402
from nanoseek.data import Tokenizer, load_corpus  # noqa: E402
from nanoseek.serve import Engine, SamplingParams  # noqa: E402


def last_checkpoint(run_dir: str) -> str:
    found = sorted(Path(run_dir, "checkpoints").glob("step-*"))
    if not found:
        sys.exit(f"no checkpoint under {run_dir}/checkpoints: run scripts/main_job.sh first or pass --checkpoint")
    return str(found[-1])


def held_out_prompts(tok: Tokenizer, n: int, prompt_len: int, data: str | None) -> tuple[torch.Tensor, list[str]]:
    """(n, prompt_len) tokens: the first prompt_len tokens of the first n validation files long enough."""
    docs = sorted(load_corpus(data).docs("val"), key=lambda d: d.name)
    rows, names = [], []
    for d in docs:
        ids = tok.encode(d.text)
        if len(ids) >= prompt_len:
            rows.append(ids[:prompt_len])
            names.append(d.name)
        if len(rows) == n:
            break
    if len(rows) < n:
        sys.exit(f"only {len(rows)} validation files have >= {prompt_len} tokens; lower --prompt-len or --batch")
    return torch.tensor(rows), names


@torch.no_grad()
def teacher_forced(model: Model, x: torch.Tensor) -> dict:
    """x (B, T) real text -> main top-1 accuracy, MTP-1 top-1 accuracy, agreement MTP_i == main_{i+1}."""
    out = model(x, return_output=True)
    main = out.logits.argmax(-1)  # (B, T): predicts t_{i+1}
    cache = model.make_mtp_caches(x.shape[0], x.shape[1])[0]
    _, logits = model.mtp_forward(0, x[:, 1:], out.hidden[:, :-1], cache)  # position i predicts t_{i+2}
    mtp = logits.argmax(-1)  # (B, T-1)
    return {"main_top1": float((main[:, :-1] == x[:, 1:]).float().mean()),
            "mtp_top1": float((mtp[:, :-1] == x[:, 2:]).float().mean()),
            "mtp_agrees_with_main": float((mtp[:, :-1] == main[:, 1:-1]).float().mean())}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def engine_generate(engine: Engine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """All prompts at once, greedy, exactly new_tokens each; -> the generated ids in prompt order."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    out = {f"b{i}": [] for i in range(len(prompts))}
    for rid, p in zip(out, prompts):
        engine.add_request(rid, p, params)
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
    return list(out.values())


def engine_rows(ckpt: str, prompts: torch.Tensor, batches: list[int], new_tokens: int, ks: list[int],
                repeats: int, device: torch.device) -> dict:
    """Tokens/s of the engine with and without speculation, alternating rounds; acceptance; same tokens."""
    rows = {}
    for B in batches:
        x = prompts[:B].tolist()
        fields = dict(device=device, max_num_seqs=B, enable_prefix_caching=False,
                      kv_cache_tokens=B * (len(x[0]) + new_tokens + 2 * 64))
        engines = {"plain": Engine.from_checkpoint(ckpt, **fields)}
        for k in ks:
            engines[f"spec_k{k}"] = Engine.from_checkpoint(ckpt, speculative=True, num_speculative_tokens=k, **fields)
        outs = {name: engine_generate(e, x, new_tokens) for name, e in engines.items()}  # warm-up, and the check
        if len({json.dumps(o) for o in outs.values()}) != 1:
            sys.exit(f"batch {B}: the speculative engine's greedy tokens differ from the plain engine's")
        secs = {name: [] for name in engines}
        for _ in range(repeats):
            for name, e in engines.items():
                secs[name].append(timed(lambda e=e, x=x: engine_generate(e, x, new_tokens), device)[1])
        tps = {name: B * new_tokens / statistics.median(s) for name, s in secs.items()}
        stats = {f"spec_k{k}": engines[f"spec_k{k}"].stats() for k in ks}
        rows[f"batch{B}"] = {
            "tokens_per_s": tps, "speedup": {n: tps[n] / tps["plain"] for n in tps if n != "plain"},
            "acceptance_by_position": {n: st["spec_acceptance_by_position"] for n, st in stats.items()},
            "mean_accepted_length": {n: st["spec_mean_accepted_length"] for n, st in stats.items()}, "identical": True}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="checkpoint dir (default: the last of runs/main/checkpoints)")
    ap.add_argument("--data", default=None, help="corpus (default: the built-in stdlib corpus)")
    ap.add_argument("--ks", default=None, help="draft counts, comma-separated (default: num_nextn_predict_layers)")
    ap.add_argument("--batch", type=int, default=16, help="the large batch size (default 16)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--temperatures", default="0,1", help="acceptance measured at these temperatures (0 = greedy)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating timing rounds (0: no timing)")
    ap.add_argument("--forced-len", type=int, default=512, help="tokens per file for the teacher-forced numbers")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda")
    ap.add_argument("--parts", default="generate,engine",
                    help="what to measure: generate (Model.generate: acceptance, teacher-forced, speed) and/or "
                         "engine (the serving engine with and without speculation)")
    a = ap.parse_args()
    parts = set(a.parts.split(","))
    if not parts or parts - {"generate", "engine"}:
        sys.exit(f"--parts {a.parts!r}: use generate, engine or generate,engine")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    ckpt = a.checkpoint or last_checkpoint("runs/main")
    if not Path(ckpt, "config.json").is_file():
        sys.exit(f"--checkpoint {ckpt}: not a checkpoint directory (no config.json)")
    model = Model.from_pretrained(ckpt, device=device).eval()
    D = model.config.num_nextn_predict_layers
    if model.config.model_type != "deepseek_v3" or D < 1:
        sys.exit(f"{ckpt} has no MTP module (model_type={model.config.model_type}, num_nextn_predict_layers={D})")
    ks = [int(k) for k in a.ks.split(",")] if a.ks else [D]
    temps = [float(t) for t in a.temperatures.split(",")]
    tok = Tokenizer.load(ckpt)
    prompts, names = held_out_prompts(tok, a.batch, a.prompt_len, a.data)
    batches = sorted({1, a.batch}) if a.repeats > 0 else []
    engine = engine_rows(ckpt, prompts, batches, a.new_tokens, ks, a.repeats, device) if "engine" in parts else {}
    if "generate" not in parts:
        ks, temps, batches = [], [], []
    forced = teacher_forced(model, held_out_prompts(tok, a.batch, a.forced_len, a.data)[0].to(device)) \
        if "generate" in parts else {}
    prompts = prompts.to(device)
    gen = dict(max_new_tokens=a.new_tokens)  # no eos: every row decodes the same number of tokens

    # ---- acceptance at batch a.batch; greedy identity
    plain = model.generate(prompts, **gen) if ks else None
    acceptance = {}
    for k in ks:
        for temp in temps:
            out, st = model.generate(prompts, **gen, temperature=temp, seed=0, speculative=True,
                                     num_speculative_tokens=k, return_stats=True)
            if temp == 0 and not torch.equal(out, plain):
                sys.exit(f"k={k}: greedy speculative output differs from plain greedy decoding")
            acceptance[f"k={k},T={temp:g}"] = {key: st[key] for key in (
                "acceptance_by_position", "conditional_acceptance", "mean_accepted_length", "rounds")}

    # ---- speed: plain vs speculative greedy, alternating
    speed = {}
    for B in batches:
        x = prompts[:B]
        runs = {"plain": lambda x=x: model.generate(x, **gen)}
        for k in ks:
            runs[f"spec_k{k}"] = lambda x=x, k=k: model.generate(x, **gen, speculative=True, num_speculative_tokens=k)
        for fn in runs.values():  # warm-up
            fn()
        secs = {name: [] for name in runs}
        for _ in range(a.repeats):
            for name, fn in runs.items():
                secs[name].append(timed(fn, device)[1])
        tps = {name: B * a.new_tokens / statistics.median(s) for name, s in secs.items()}
        speed[f"batch{B}"] = {"tokens_per_s": tps,
                              "speedup": {n: tps[n] / tps["plain"] for n in tps if n != "plain"}}

    print(f"checkpoint {ckpt}; {len(names)} held-out files, prompt {a.prompt_len} tokens, {a.new_tokens} new")
    if forced:
        print("teacher-forced on held-out text: " + ", ".join(f"{k} {v:.3f}" for k, v in forced.items()))
    if acceptance:
        print(f"{'setting':<14} {'P(draft j accepted), j = 1..k':<34} {'cond. (j | j-1)':<26} mean accepted length")
    for key, r in acceptance.items():
        acc = " ".join(f"{v:.3f}" for v in r["acceptance_by_position"])
        cond = " ".join(f"{v:.3f}" for v in r["conditional_acceptance"])
        print(f"{key:<14} {acc:<34} {cond:<26} {r['mean_accepted_length']:.3f}")
    if speed:
        print(f"{'batch':<8} {'mode':<10} {'tokens/s':>10} {'x plain':>8}")
    for b, r in speed.items():
        for name, v in r["tokens_per_s"].items():
            print(f"{b:<8} {name:<10} {v:>10.1f} {r['speedup'].get(name, 1.0):>8.2f}")
    if engine:
        print(f"engine (nanoseek/serve, greedy, same tokens both ways)\n{'batch':<8} {'mode':<10} {'tokens/s':>10} "
              f"{'x plain':>8}  P(draft j accepted)  mean accepted length")
    for b, r in engine.items():
        for name, v in r["tokens_per_s"].items():
            acc = "" if name == "plain" else (" ".join(f"{x:.3f}" for x in r["acceptance_by_position"][name]) +
                                              f"  {r['mean_accepted_length'][name]:.3f}")
            print(f"{b:<8} {name:<10} {v:>10.1f} {r['speedup'].get(name, 1.0):>8.2f}  {acc}")
    print(json.dumps({"benchmark": "speculative", "checkpoint": ckpt, "device": str(device),
                      "machine": platform.node(), "threads": torch.get_num_threads(),
                      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                      "files": len(names), "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                      "repeats": a.repeats, "greedy_identical": True, "teacher_forced": forced,
                      "acceptance": acceptance, "speed": speed, "engine": engine}))


if __name__ == "__main__":
    main()
