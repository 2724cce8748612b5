"""Offline serving throughput: the nanoseek engine vs `transformers` generate, and many adapters in one batch.

Measured side by side in one process, interleaved round by round (median of --rounds), on the same weights:
  * engine offline tokens/s vs transformers `generate` (greedy, fixed length) at batch 1 and batch 32;
  * a batch of 32 requests over 8 adapters (different ranks, all linears and the routed experts) vs the same
    batch on the base model alone (Punica / S-LoRA: near base speed) vs serving the 8 adapters one at a time;
  * the same mixed batch with attention-only adapters vs PEFT's `adapter_names` mixed-batch inference in
    transformers (PEFT is optional; without it that row says "skipped");
  * HTTP: `benchmarks/serve_http.run_http_benchmark` against `nanoseek serve` on the same checkpoint and adapters,
    unless --no-http.
Prefix caching is off (repeated prompts would hit it; transformers has none). Every request generates exactly
--new-tokens tokens (ignore_eos / min_new_tokens). Ends with one JSON line.

    python3 benchmarks/serve_throughput.py                       # a random-weight dsv3-tiny
    python3 benchmarks/serve_throughput.py --checkpoint CKPT --rounds 5 --no-http
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nanoseek import LoraConfig, Model, ModelConfig  # noqa: E402
from nanoseek.data import Tokenizer, train_tokenizer  # noqa: E402
from nanoseek.serve import LLM, Engine, EngineConfig, SamplingParams  # noqa: E402

ATTENTION = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


def random_checkpoint(directory: Path) -> Path:
    tok = train_tokenizer([f"def f{i}(x):\n    return x * {i}\n" for i in range(200)], vocab_size=512)
    cfg = ModelConfig.from_preset("dsv3-tiny", vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    Model(cfg).save_pretrained(directory / "base", tokenizer=tok)
    return directory / "base"


def make_adapters(model: Model, directory: Path, prefix: str, targets, n: int = 8) -> dict[str, str]:
    """n random adapters of ranks 4, 8, 16, ... saved as PEFT directories (B non-zero: they change the output)."""
    out = {}
    for i in range(n):
        name = f"{prefix}{i}"
        torch.manual_seed(1000 + i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft-compatibility note on dense-MLP targets
            model.add_adapter(name, LoraConfig(r=(4, 8, 16)[i % 3], target_modules=targets, init_lora_weights=False))
            out[name] = str(model.save_adapter(directory / name, name))
        model.delete_adapter(name)
    return out


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="nanoseek checkpoint directory (default: a random-weight dsv3-tiny)")
    ap.add_argument("--batch", type=int, default=32, help="the large batch size")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-http", action="store_true", help="skip the HTTP benchmark at the end")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers / PEFT comparisons")
    ap.add_argument("--profile", metavar="CASE", help="only profile one engine case (e.g. engine_b32_mixed8) with "
                    "cProfile after a warm-up, print the top functions and exit")
    a = ap.parse_args()
    for name in ("batch", "prompt_len", "new_tokens", "rounds", "block_size"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    tmp = tempfile.TemporaryDirectory()
    work = Path(tmp.name)
    ckpt = Path(a.checkpoint) if a.checkpoint else random_checkpoint(work)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Model.from_pretrained(ckpt, device=device).eval()
    tok = Tokenizer.load(ckpt)
    full = make_adapters(model, work, "lora", "all-linear")
    attn = make_adapters(model, work, "attn", ATTENTION)
    B, P, N = a.batch, a.prompt_len, a.new_tokens
    if P + N > model.config.max_position_embeddings:
        ap.error(f"--prompt-len + --new-tokens = {P + N} exceeds the model's context "
                 f"{model.config.max_position_embeddings}")
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, model.config.vocab_size, (B, P), generator=g)
    plist = prompts.tolist()
    cfg = EngineConfig(block_size=a.block_size, kv_cache_tokens=(B + 8) * (P + N + a.block_size),
                       max_batch_tokens=max(2048, B * P), max_num_seqs=max(64, B), max_loras=8,
                       enable_prefix_caching=False)
    llm = LLM(engine=Engine(model, tok, cfg, {**full, **attn}))
    params = SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True)
    names = list(full)
    mixed = [names[i % len(names)] for i in range(B)]
    attn_mixed = [list(attn)[i % len(attn)] for i in range(B)]

    def engine_run(rows, adapter):
        outs = llm.generate(rows, params, adapter=adapter)
        assert all(len(o.token_ids) == N for o in outs)

    def one_at_a_time(adapters_of_rows):
        for name in dict.fromkeys(adapters_of_rows):
            rows = [p for p, n in zip(plist, adapters_of_rows) if n == name]
            engine_run(rows, name)

    cases = {
        "engine_b1": lambda: engine_run(plist[:1], None),
        f"engine_b{B}": lambda: engine_run(plist, None),
        f"engine_b{B}_mixed8": lambda: engine_run(plist, mixed),
        f"engine_b{B}_one_adapter_at_a_time": lambda: one_at_a_time(mixed),
        f"engine_b{B}_mixed8_attn": lambda: engine_run(plist, attn_mixed),
    }
    if a.profile:
        if a.profile not in cases:
            ap.error(f"--profile {a.profile!r}: not one of {list(cases)}")
        return profile(cases[a.profile])
    hf_note = "skipped (--no-hf)"
    if not a.no_hf:
        try:
            hf_cases, hf_note = hf_setup(ckpt, device, prompts, N, attn, attn_mixed)
            cases.update(hf_cases)
        except Exception as e:  # transformers/peft missing or incompatible: say why, keep the engine figures
            hf_note = f"skipped: {type(e).__name__}: {e}"[:300]
    for fn in cases.values():  # warm-up, untimed
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(a.rounds):
        for k, fn in cases.items():
            times[k].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = {k: (N if "_b1" in k else B * N) for k in med}
    tps = {k: tokens[k] / med[k] for k in med}
    print(f"{'case':<40}{'median s':>10}{'tokens/s':>12}   (prompt {P}, {N} new tokens, {a.rounds} rounds, {device})")
    for k in med:
        print(f"{k:<40}{med[k]:>10.3f}{tps[k]:>12.1f}")
    ratios = {
        "mixed8_vs_base": tps[f"engine_b{B}_mixed8"] / tps[f"engine_b{B}"],
        "mixed8_vs_one_at_a_time": tps[f"engine_b{B}_mixed8"] / tps[f"engine_b{B}_one_adapter_at_a_time"],
    }
    if "hf_b1" in tps:
        ratios["engine_vs_hf_b1"] = tps["engine_b1"] / tps["hf_b1"]
        ratios[f"engine_vs_hf_b{B}"] = tps[f"engine_b{B}"] / tps[f"hf_b{B}"]
    if "peft_mixed8_attn" in tps:
        ratios["engine_vs_peft_mixed8_attn"] = tps[f"engine_b{B}_mixed8_attn"] / tps["peft_mixed8_attn"]
    for k, v in ratios.items():
        print(f"{k:<40}{v:>10.2f}x")
    print(f"transformers/PEFT: {hf_note}")
    http = None
    if not a.no_http:
        http = http_benchmark(ckpt, full)
        print(f"http: {http}")
    tmp.cleanup()
    print(json.dumps({"benchmark": "serve_throughput", "machine": platform.platform(), "cpu_count": os.cpu_count(),
                      "torch_threads": torch.get_num_threads(), "device": device,
                      "checkpoint": a.checkpoint or "random dsv3-tiny", "batch": B, "prompt_len": P, "new_tokens": N,
                      "rounds": a.rounds, "median_s": med, "tokens_per_s": tps, "ratios": ratios, "hf": hf_note,
                      "http": http}))


def profile(fn) -> None:
    fn()  # warm-up
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.runcall(fn)
    print(f"profiled run: {time.perf_counter() - t:.2f} s")
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


def hf_setup(ckpt: Path, device: str, prompts: torch.Tensor, N: int, attn: dict[str, str], attn_mixed: list[str]):
    """transformers generate (batch 1 and B) and, when peft imports, PEFT's adapter_names mixed batch."""
    import transformers

    transformers.logging.set_verbosity_error()  # the MTP layer's weights are unused by transformers: expected
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt).to(device).eval()
    x = prompts.to(device)
    kw = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0)

    def gen(model, ids, **extra):
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw, **extra)
        assert out.shape[1] == ids.shape[1] + N

    cases = {"hf_b1": lambda: gen(hf, x[:1]), f"hf_b{x.shape[0]}": lambda: gen(hf, x)}
    note = "transformers " + transformers.__version__
    try:
        import peft
    except ImportError:
        return cases, note + "; peft not installed"
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(ckpt).to(device).eval()
    names = list(attn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(hf2, attn[names[0]], adapter_name=names[0])
        for n in names[1:]:
            pm.load_adapter(attn[n], adapter_name=n)
    pm.eval()
    cases["peft_mixed8_attn"] = lambda: gen(pm, x, adapter_names=attn_mixed)
    return cases, note + f", peft {peft.__version__}"


def http_benchmark(ckpt: Path, adapters: dict[str, str]) -> dict | None:
    try:
        from benchmarks.serve_http import run_http_benchmark, start_server
    except ImportError as e:
        return {"skipped": str(e)}
    try:
        proc, url = start_server(ckpt, [f"{n}={d}" for n, d in list(adapters.items())[:3]], [])
    except Exception as e:
        return {"skipped": f"server did not start: {e}"[:300]}
    try:
        return run_http_benchmark(url, [ckpt.name, *list(adapters)[:3]], clients=8, requests_per_client=2,
                                  max_tokens=16)
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()
