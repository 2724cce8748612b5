"""HTTP serving benchmark: N concurrent streaming clients against `nanoseek serve`.

Each client sends `--requests-per-client` streamed /v1/completions requests one after the other (model chosen
round-robin over the base and the adapters, `ignore_eos` so every request generates exactly --max-tokens), and
the script reports requests/s, output tokens/s, time to first token (TTFT) and inter-token latency (ITL: the
gap between consecutive streamed tokens, from per-token chunks) at p50 and p99, plus TPOT (a request's
(last - first token time) / (tokens - 1)), ending with one JSON line. With adapters, --compare-base also runs
the same load on the base alone, interleaved round by round on the same server (a shared machine's load then
hits both alike), and reports the mixed / base-only ratio of output tokens/s.

    python3 benchmarks/serve_http.py                                  # a random-weight dsv3-tiny, base only
    python3 benchmarks/serve_http.py --random-adapters 8              # ... and 8 random adapters, mixed
    python3 benchmarks/serve_http.py --checkpoint CKPT --adapter email=DIR --adapter tkinter=DIR
    python3 benchmarks/serve_http.py --url http://127.0.0.1:8000      # a server that is already running
    from benchmarks.serve_http import run_http_benchmark              # run_http_benchmark(url, models, ...)

Without --url the server is started as its own process (`python -m nanoseek serve`), so that the clients'
Python does not share a GIL with the engine, and stopped at the end. Needs httpx, fastapi and uvicorn; without
them it prints why and a JSON line with "skipped".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nanoseek import LoraConfig, Model, ModelConfig  # noqa: E402
from nanoseek.data import train_tokenizer  # noqa: E402

PROMPTS = ["import os\n", "def main(", "class Config:\n", "for i in range(", "# Copyright", "if __name__ == "]


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


async def _one_request(http, url: str, model: str, prompt: str, max_tokens: int, headers: dict) -> dict:
    # logprobs=0 with token ids: every token makes a chunk (even one whose text is held back or empty)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "logprobs": 0,
            "return_tokens_as_token_ids": True}
    start = time.perf_counter()
    times: list[float] = []
    gaps: list[float] = []
    tokens = 0
    async with http.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            n = sum(len((c.get("logprobs") or {}).get("tokens", [])) for c in chunk.get("choices", []))
            if n:
                now = time.perf_counter()
                if times:  # a chunk of n tokens: n gaps of equal share
                    gaps += [(now - times[-1]) / n] * n
                times.append(now)
    if not times:
        raise RuntimeError("no token streamed")
    return {"ttft": times[0] - start, "gaps": gaps, "tokens": tokens,
            "tpot": (times[-1] - times[0]) / (tokens - 1) if tokens > 1 else None}


async def _run(url: str, models: list[str], clients: int, per_client: int, max_tokens: int, api_key: str | None):
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results, errors = [], []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        async def client(c: int):
            for j in range(per_client):
                k = c * per_client + j
                try:
                    results.append(await _one_request(http, url, models[k % len(models)],
                                                      PROMPTS[k % len(PROMPTS)], max_tokens, headers))
                except Exception as e:  # counted, reported
                    errors.append(repr(e))

        start = time.perf_counter()
        await asyncio.gather(*[client(c) for c in range(clients)])
        wall = time.perf_counter() - start
    return results, errors, wall


def run_http_benchmark(url: str, models: list[str], clients: int = 16, requests_per_client: int = 4,
                       max_tokens: int = 32, api_key: str | None = None) -> dict:
    """Run the clients against a live server at url; returns the figures (latencies in ms)."""
    results, errors, wall = asyncio.run(_run(url.rstrip("/"), models, clients, requests_per_client, max_tokens,
                                             api_key))
    ttft = [r["ttft"] * 1e3 for r in results]
    gaps = [g * 1e3 for r in results for g in r["gaps"]]
    tpot = [r["tpot"] * 1e3 for r in results if r["tpot"] is not None]
    tokens = sum(r["tokens"] for r in results)

    def p(values):
        return {"p50": percentile(values, 50), "p99": percentile(values, 99)}

    return {"clients": clients, "requests": len(results) + len(errors), "errors": len(errors),
            "first_errors": errors[:3], "models": models, "max_tokens": max_tokens, "wall_s": wall,
            "requests_per_s": len(results) / wall, "output_tokens_per_s": tokens / wall,
            "ttft_ms": p(ttft), "itl_ms": p(gaps), "tpot_ms": p(tpot)}


# ---------------------------------------------------------------------------------------------- a server to test
def tiny_checkpoint(directory: Path, num_adapters: int = 0, rank: int = 16) -> tuple[Path, list[str]]:
    """A random-weight dsv3-tiny with a small tokenizer (a stand-in when no checkpoint is given) and
    num_adapters random LoRA adapters on every linear layer and expert; returns (dir, ["name=DIR", ...])."""
    tok = train_tokenizer([p * 20 for p in PROMPTS] * 10, vocab_size=512)
    cfg = ModelConfig.from_preset("dsv3-tiny")
    cfg.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model = Model(cfg)
    model.save_pretrained(directory / "tiny", tokenizer=tok)
    specs = []
    for i in range(num_adapters):
        model.add_adapter(f"lora{i}", LoraConfig(r=rank, init_lora_weights=False, target_modules="all-linear"))
        model.save_adapter(directory / f"lora{i}", f"lora{i}")
        model.delete_adapter(f"lora{i}")
        specs.append(f"lora{i}={directory / f'lora{i}'}")
    return directory / "tiny", specs


def start_server(checkpoint: Path, adapters: list[str], extra: list[str]) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "nanoseek", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
           "--max-queue", "100000", *[a for spec in adapters for a in ("--adapter", spec)], *extra]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nanoseek serve exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("nanoseek serve did not come up in 300 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start one)")
    ap.add_argument("--models", help="comma-separated model names (default: every model of /v1/models)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--checkpoint", help="checkpoint to serve (default: a random-weight dsv3-tiny)")
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="adapter to serve (repeat)")
    ap.add_argument("--random-adapters", type=int, default=0,
                    help="without --checkpoint: serve this many random r=16 adapters beside the random base")
    ap.add_argument("--clients", type=int, default=16, help="concurrent streaming clients")
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (ignore_eos)")
    ap.add_argument("--compare-base", action="store_true",
                    help="also run the load on the base model alone, interleaved, and report the ratio")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the run(s) this many times")
    ap.add_argument("--server-args", default="", help="extra `nanoseek serve` flags, e.g. '--max-batch-tokens 512'")
    a = ap.parse_args()
    for name in ("clients", "requests_per_client", "max_tokens", "rounds"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    try:
        import fastapi  # noqa: F401
        import httpx
        import uvicorn  # noqa: F401
    except ImportError as e:
        print(f"skipped: {e} (the HTTP benchmark needs fastapi, uvicorn and httpx)")
        print(json.dumps({"benchmark": "serve_http", "skipped": str(e)}))
        return
    proc, tmp = None, None
    url = a.url
    if url is None:
        tmp = tempfile.TemporaryDirectory()
        if a.checkpoint:
            ckpt, adapters = Path(a.checkpoint), a.adapter
        else:
            ckpt, adapters = tiny_checkpoint(Path(tmp.name), a.random_adapters)
        proc, url = start_server(ckpt, adapters, a.server_args.split())
    try:
        headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
        models = a.models.split(",") if a.models else \
            [m["id"] for m in httpx.get(url + "/v1/models", headers=headers).json()["data"]]
        kinds = ["base_only", "mixed"] if a.compare_base and len(models) > 1 else ["mixed"]
        runs: dict[str, list[dict]] = {k: [] for k in kinds}
        for _ in range(a.rounds):
            for kind in kinds:
                runs[kind].append(run_http_benchmark(url, models[:1] if kind == "base_only" else models, a.clients,
                                                     a.requests_per_client, a.max_tokens, a.api_key))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
        if tmp is not None:
            tmp.cleanup()
    print(f"{a.clients} streaming clients x {a.requests_per_client} requests x {a.max_tokens} tokens; models "
          f"{', '.join(models)}; {a.rounds} round(s)")
    print(f"{'run':<12}{'requests':>9}{'errors':>7}{'req/s':>8}{'tok/s':>8}{'TTFT p50':>10}{'p99':>8}"
          f"{'ITL p50':>9}{'p99':>8}{'TPOT p50':>10}")
    for kind, results in runs.items():
        for res in results:
            lat = [res[k][q] or 0.0 for k, q in (("ttft_ms", "p50"), ("ttft_ms", "p99"), ("itl_ms", "p50"),
                                                 ("itl_ms", "p99"), ("tpot_ms", "p50"))]
            print(f"{kind:<12}{res['requests']:>9}{res['errors']:>7}{res['requests_per_s']:>8.2f}"
                  f"{res['output_tokens_per_s']:>8.1f}{lat[0]:>10.1f}{lat[1]:>8.1f}{lat[2]:>9.1f}{lat[3]:>8.1f}"
                  f"{lat[4]:>10.1f}")
    summary = {}
    if "base_only" in runs:
        tps = {k: sorted(r["output_tokens_per_s"] for r in v)[len(v) // 2] for k, v in runs.items()}
        summary["mixed_over_base_only_tokens_per_s"] = tps["mixed"] / tps["base_only"]
        print(f"mixed over {len(models)} models / base only (output tokens/s, median of rounds): "
              f"{summary['mixed_over_base_only_tokens_per_s']:.2f}x")
    print(json.dumps({"benchmark": "serve_http", "machine": platform.platform(), "cpu_count": os.cpu_count(),
                      "checkpoint": a.checkpoint or ("(url)" if a.url else "random dsv3-tiny"), "models": models,
                      "clients": a.clients, "requests_per_client": a.requests_per_client,
                      "max_tokens": a.max_tokens, **summary, "runs": runs}))


if __name__ == "__main__":
    main()
