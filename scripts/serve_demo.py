"""Send a mixed batch to a running `nanoseek serve` with the official `openai` client and print the replies.

One request per served model (the base and every adapter, each with a prompt from its tenant's package when
the adapter is named after one), all in flight at once, plus one streamed request whose text is printed as it
arrives. Exits 1 if any request failed. Used by the main job's serve stage:

    python3 scripts/serve_demo.py --url http://127.0.0.1:8000 [--wait 120] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import httpx
import openai

PROMPTS = {  # tenant task -> a prompt in its style; anything else gets the generic one
    "email": "from email.message import EmailMessage\n\n\ndef build_message(",
    "encodings": "import codecs\n\n### Codec APIs\n\nclass Codec(codecs.Codec):\n",
    "tkinter": "import tkinter as tk\nfrom tkinter import ttk\n\n\nclass App(",
}
GENERIC = "import os\nimport sys\n\n\ndef main("


def wait_healthy(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"serve_demo: {url}/health did not answer 200 within {seconds:.0f} s")
        time.sleep(0.5)


async def demo(url: str, api_key: str, max_tokens: int) -> int:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0)
    models = [m.id for m in (await client.models.list()).data]
    print(f"served models: {', '.join(models)} (the first is the base)")

    async def complete(model: str):
        prompt = PROMPTS.get(model, GENERIC)
        t0 = time.perf_counter()
        r = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0)
        return model, prompt, r, time.perf_counter() - t0

    async def stream(model: str) -> str:
        prompt = PROMPTS.get(model, GENERIC)
        chunks = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                                 temperature=0.8, top_p=0.95, seed=0, stream=True)
        return "".join([c.choices[0].text async for c in chunks if c.choices])

    streamed_model = models[-1]
    results = await asyncio.gather(*[complete(m) for m in models], stream(streamed_model), return_exceptions=True)
    failed = 0
    for res in results[:-1]:
        if isinstance(res, BaseException):
            print(f"---- request failed: {res!r}")
            failed += 1
            continue
        model, prompt, r, secs = res
        print(f"---- model {model} (greedy, {r.usage.completion_tokens} tokens, {secs:.2f} s, "
              f"finish {r.choices[0].finish_reason})")
        print(prompt + r.choices[0].text)
    if isinstance(results[-1], BaseException):
        print(f"---- streamed request failed: {results[-1]!r}")
        failed += 1
    else:
        print(f"---- model {streamed_model}, streamed (temperature 0.8, top-p 0.95, seed 0)")
        print(PROMPTS.get(streamed_model, GENERIC) + results[-1])
    print(f"== {len(results) - failed}/{len(results)} requests answered")
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    ap.add_argument("--api-key", default="none", help="bearer token, if the server has --api-key")
    ap.add_argument("--wait", type=float, default=120.0, help="seconds to wait for /health first")
    ap.add_argument("--max-tokens", type=int, default=48)
    a = ap.parse_args()
    url = a.url.rstrip("/")
    wait_healthy(url, a.wait)
    return asyncio.run(demo(url, a.api_key, a.max_tokens))


if __name__ == "__main__":
    sys.exit(main())
