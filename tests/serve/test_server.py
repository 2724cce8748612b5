"""The HTTP server against the official `openai` client and raw HTTP, on a live uvicorn on 127.0.0.1.

One module-scoped engine (a tiny DeepSeek-V3 with two LoRA adapters built here) behind two apps: the open one
every test uses, and one with an API key and --max-queue 1 for 401 and 429. Outputs are checked against
`Model.generate` greedy decoding of the same weights, run offline on each request alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import openai
import pytest
import torch

from nanoseek import LoraConfig
from nanoseek.data import Tokenizer, train_tokenizer
from nanoseek.data.sft import encode_record
from nanoseek.serve.async_engine import AsyncEngine
from nanoseek.serve.engine import Engine
from nanoseek.serve.server import ServerSettings, ServerThread, create_app
from tests.tiny import ds, make_model

BASE = "tiny-base"
PROMPTS = ["def f1(x):\n", "def f7(x):\n    return", "import os\n", "class A:\n", "x = 3\n", "def g(",
           "    return x * 1", "<|user|>\nhi\n"]
CTX = 256


@pytest.fixture(scope="module")
def env(tmp_path_factory, single_thread):
    d = tmp_path_factory.mktemp("serve")
    lines = [f"def f{i}(x):\n    return x * {i}\n" for i in range(40)] + ["import os\nclass A:\n    pass\n"] * 20
    tok = train_tokenizer(lines * 3 + ["<|user|>\nhello\n<|assistant|>\nhi\n"] * 10, vocab_size=320)
    model = make_model(ds(vocab_size=tok.vocab_size, max_position_embeddings=CTX))
    model.save_pretrained(d / "base", tokenizer=tok)
    root = d / "adapters"
    for i, (name, targets) in enumerate((("a1", "all-linear"), ("a2", ["q_a_proj", "kv_b_proj", "o_proj"]),
                                         ("a3", ["o_proj", "experts"]))):
        torch.manual_seed(10 + i)
        model.add_adapter(name, LoraConfig(r=4 + 4 * i, lora_alpha=16, init_lora_weights=False,
                                           target_modules=targets))
        model.save_adapter(root / name, name)
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{not json")
    outside = d / "outside"
    model.save_adapter(outside, "a3")
    os.symlink(outside, root / "link_out")
    engine = AsyncEngine(Engine.from_checkpoint(str(d / "base"), adapters={"a1": str(root / "a1"),
                                                                           "a2": str(root / "a2")},
                                                max_num_seqs=4, kv_cache_tokens=64 * 64, block_size=16)).start()
    open_app = create_app(engine, ServerSettings(model_name=BASE, adapter_root=root, max_queue=1000))
    key_app = create_app(engine, ServerSettings(model_name=BASE, api_key="sesame", max_queue=1))
    with ServerThread(open_app) as srv, ServerThread(key_app) as key_srv:
        yield {"url": srv.url, "key_url": key_srv.url, "engine": engine, "tok": Tokenizer.load(d / "base"),
               "model": model, "root": root, "outside": outside}
    engine.shutdown()


@pytest.fixture(scope="module")
def client(env):
    return openai.OpenAI(base_url=env["url"] + "/v1", api_key="unused", max_retries=0)


def greedy(env, ids: list[int], adapter: str | None, n: int) -> list[int]:
    """Model.generate alone on this request (temperature 0): the token ids, cut before EOS."""
    out = env["model"].generate(torch.tensor([ids]), n, temperature=0.0, eos_token_id=env["tok"].eos_id,
                                adapter=adapter)[0, len(ids):].tolist()
    return cut_eos(env, out)


def cut_eos(env, ids: list[int]) -> list[int]:
    return ids[:ids.index(env["tok"].eos_id)] if env["tok"].eos_id in ids else ids


# the generated ids, named "token_id:N" in logprobs (vLLM's extension): exact checks even where a random
# model's bytes are no valid UTF-8 and the text shows U+FFFD
AS_IDS = {"logprobs": 0, "extra_body": {"return_tokens_as_token_ids": True}}
CHAT_AS_IDS = {"logprobs": True, "top_logprobs": 0, "extra_body": {"return_tokens_as_token_ids": True}}


def ids_of(env, tokens: list[str]) -> list[int]:
    return cut_eos(env, [int(t.removeprefix("token_id:")) for t in tokens])


def completion_ids(env, r) -> list[int]:
    return ids_of(env, r.choices[0].logprobs.tokens)


def chat_ids(env, messages: list[dict]) -> list[int]:
    """The finetune chat template up to the assistant header (how sft.py tokenizes a chat record)."""
    return list(encode_record(env["tok"], {"messages": messages + [{"role": "assistant", "content": ""}]}).ids[:-1])


def post(env, path: str, body, key_app: bool = False, **kw) -> httpx.Response:
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return httpx.post((env["key_url"] if key_app else env["url"]) + path, content=data,
                      headers={"Content-Type": "application/json", **kw.pop("headers", {})}, timeout=60, **kw)


def wait_idle(env, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = env["engine"].stats
        if not s["running"] and not s["waiting"] and env["engine"].num_waiting == 0:
            return s
        time.sleep(0.02)
    raise AssertionError(f"engine not idle: {env['engine'].stats}")


# ---------------------------------------------------------------------------------------------- happy paths
def test_models_lists_base_and_adapters(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == BASE and sorted(ids[1:]) == ["a1", "a2"]


@pytest.mark.parametrize("model", [BASE, "a1", "a2"])
def test_completion_equals_offline_greedy(env, client, model):
    r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=12, temperature=0, **AS_IDS)
    ids = env["tok"].encode(PROMPTS[0])
    assert completion_ids(env, r) == greedy(env, ids, None if model == BASE else model, 12)
    assert r.usage.prompt_tokens == len(ids) and 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length") and r.model == model


def test_adapters_change_the_output(env, client):
    texts = {m: client.completions.create(model=m, prompt=PROMPTS[1], max_tokens=10, temperature=0).choices[0].text
             for m in (BASE, "a1", "a2")}
    assert len(set(texts.values())) == 3, texts  # the request's model really picks the adapter


def test_prompt_forms_token_ids_and_batches(env, client):
    ids = env["tok"].encode(PROMPTS[2])
    by_ids = client.completions.create(model="a1", prompt=ids, max_tokens=6, temperature=0, **AS_IDS)
    assert completion_ids(env, by_ids) == greedy(env, ids, "a1", 6)
    batch = client.completions.create(model=BASE, prompt=PROMPTS[:3], max_tokens=5, temperature=0, **AS_IDS)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [ids_of(env, c.logprobs.tokens) for c in batch.choices] == \
        [greedy(env, env["tok"].encode(p), None, 5) for p in PROMPTS[:3]]
    two_ids = client.completions.create(model=BASE, prompt=[ids, ids[:2]], max_tokens=4, temperature=0, **AS_IDS)
    assert completion_ids(env, two_ids) == greedy(env, ids, None, 4) and len(two_ids.choices) == 2
    assert two_ids.usage.prompt_tokens == len(ids) + 2


def test_chat_uses_the_finetune_template(env, client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model="a2", messages=messages, max_tokens=10, temperature=0, **CHAT_AS_IDS)
    ids = chat_ids(env, messages)
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.role == "assistant"
    assert ids_of(env, [t.token for t in r.choices[0].logprobs.content]) == greedy(env, ids, "a2", 10)
    r2 = client.chat.completions.create(model=BASE, messages=messages, max_completion_tokens=3, temperature=0)
    assert r2.usage.completion_tokens <= 3


def test_streaming_completion_and_chat(env, client):
    full = client.completions.create(model="a1", prompt=PROMPTS[3], max_tokens=10, temperature=0).choices[0].text
    chunks = list(client.completions.create(model="a1", prompt=PROMPTS[3], max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")

    messages = [{"role": "user", "content": "hello"}]
    want = greedy(env, chat_ids(env, messages), "a2", 8)
    full = client.chat.completions.create(model="a2", messages=messages, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model="a2", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, **CHAT_AS_IDS))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert ids_of(env, [t.token for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]) \
        == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and chunks[-1].usage is None

    with httpx.stream("POST", env["url"] + "/v1/completions", timeout=60,
                      json={"model": BASE, "prompt": "x", "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_logprobs(env, client):
    r = client.completions.create(model=BASE, prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert all(len(t) <= 3 and v <= 0 for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    assert "".join(lp.tokens).startswith(r.choices[0].text[:1])
    # greedy: the chosen token is the most likely one
    assert all(abs(v - max(t.values())) < 1e-4 for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    c = client.chat.completions.create(model="a1", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens and all(len(t.top_logprobs) <= 2 for t in content)


def test_sampling_fields_seed_stop_penalties(env, client):
    kw = dict(model="a1", prompt=PROMPTS[4], max_tokens=12, temperature=1.0, top_p=0.9, seed=123,
              presence_penalty=0.5, frequency_penalty=0.5)
    a, b = (client.completions.create(**kw).choices[0].text for _ in range(2))
    assert a == b  # a seeded request gives the same tokens
    full = client.completions.create(model=BASE, prompt=PROMPTS[0], max_tokens=12, temperature=0).choices[0].text
    stops = [ch for ch in full[1:] if ch.isascii() and ch.isprintable()]
    assert stops, f"no printable ASCII in {full!r}: pick another prompt"
    cut = client.completions.create(model=BASE, prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stops[0]])
    assert cut.choices[0].text == full[:full.index(stops[0])] and cut.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------------------------------------- runtime adapters
def test_runtime_load_and_unload(env, client):
    r = post(env, "/v1/load_lora_adapter", {"lora_name": "a3", "lora_path": "a3"})
    assert r.status_code == 200, r.text
    assert "a3" in [m.id for m in client.models.list().data]
    out = client.completions.create(model="a3", prompt=PROMPTS[0], max_tokens=8, temperature=0, **AS_IDS)
    assert completion_ids(env, out) == greedy(env, env["tok"].encode(PROMPTS[0]), "a3", 8)
    again = post(env, "/v1/load_lora_adapter", {"lora_name": "a3", "lora_path": "a3"})
    assert again.status_code == 400 and "already" in again.json()["error"]["message"]
    assert post(env, "/v1/unload_lora_adapter", {"lora_name": "a3"}).status_code == 200
    assert "a3" not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="a3", prompt="x", max_tokens=2)
    assert post(env, "/v1/unload_lora_adapter", {"lora_name": "a3"}).status_code == 404


@pytest.mark.parametrize("path,why", [("../outside", "outside"), ("link_out", "outside"), ("{outside}", "outside"),
                                      ("broken", "refused"), ("missing", "no such")])
def test_runtime_load_refusals_change_nothing(env, client, path, why):
    before = [m.id for m in client.models.list().data]
    r = post(env, "/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": path.format(outside=env["outside"])})
    assert r.status_code == 400 and why in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] == "lora_path"
    assert [m.id for m in client.models.list().data] == before
    assert httpx.get(env["url"] + "/health").json() == {"status": "ok"}


def test_runtime_adapters_need_adapter_root(env):
    r = post(env, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "a3"}, key_app=True,
             headers={"Authorization": "Bearer sesame"})
    assert r.status_code == 404 and "--adapter-root" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- errors
MALFORMED = [
    ("/v1/completions", '{"model": "tiny-base", "prompt": "x"', "malformed JSON"),
    ("/v1/completions", "[1, 2]", "body"),
    ("/v1/completions", {"prompt": "x"}, "model"),
    ("/v1/completions", {"model": BASE, "prompt": 5}, "prompt"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "temperature": 2.5}, "temperature"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "presence_penalty": -3}, "presence_penalty"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "n": 2}, "n"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "echo": True}, "echo"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"model": BASE, "prompt": ""}, "prompt"),
    ("/v1/completions", {"model": BASE, "prompt": []}, "prompt"),
    ("/v1/completions", {"model": BASE, "prompt": [10 ** 6]}, "prompt"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "max_tokens": CTX}, "max_tokens"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "stop": [1]}, "stop"),
    ("/v1/chat/completions", {"model": BASE, "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "robot", "content": "x"}]}, "role"),
    ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "user"}]}, "content"),
    ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     "top_logprobs"),
    ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 10 * CTX}, "max_tokens"),
    ("/v1/load_lora_adapter", {"lora_name": "z"}, "lora_path"),
]


@pytest.mark.parametrize("path,body,mentions", MALFORMED, ids=[f"{i}-{m[2]}" for i, m in enumerate(MALFORMED)])
def test_malformed_requests_get_400_and_server_stays_healthy(env, path, body, mentions):
    r = post(env, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert mentions in err["message"] or mentions == err["param"], err
    assert httpx.get(env["url"] + "/health").status_code == 200


def test_unknown_model_and_route_404(env, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found" and "a1" in e.value.body["message"]
    r = httpx.get(env["url"] + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_api_key_401(env):
    body = {"model": BASE, "prompt": "x", "max_tokens": 2}
    assert post(env, "/v1/completions", body, key_app=True).status_code == 401
    wrong = post(env, "/v1/completions", body, key_app=True, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=env["key_url"] + "/v1", api_key="nope", max_retries=0).models.list()
    good = openai.OpenAI(base_url=env["key_url"] + "/v1", api_key="sesame", max_retries=0)
    assert good.completions.create(**body).usage.completion_tokens >= 1
    assert httpx.get(env["key_url"] + "/health").status_code == 200  # health needs no key


def test_queue_full_429_and_disconnect_frees_blocks(env):
    """Fill the engine's 4 slots with long streams, so that one more request waits; with --max-queue 1 the next
    is refused 429. Then drop the long streams mid-way: their requests are aborted and every block comes back."""
    eng = env["engine"]
    idle = wait_idle(env)
    long = {"model": BASE, "prompt": "x", "max_tokens": CTX - 8, "ignore_eos": True, "stream": True}

    async def until(condition, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out; engine stats {eng.stats}"
            await asyncio.sleep(0.005)

    async def scenario():
        async with httpx.AsyncClient(timeout=60) as http:
            streams = []
            for _ in range(4):
                cm = http.stream("POST", env["url"] + "/v1/completions", json=long)
                r = await cm.__aenter__()
                lines = r.aiter_lines()
                while not (await lines.__anext__()).startswith("data: {"):
                    pass
                streams.append((cm, lines))
            await until(lambda: eng.stats["running"] >= 4)  # stats are published just after the step that streamed
            gen_before = eng.stats["generated_tokens"]
            headers = {"Authorization": "Bearer sesame"}
            waiter = asyncio.create_task(http.post(env["key_url"] + "/v1/completions", headers=headers,
                                                   json={"model": BASE, "prompt": "y", "max_tokens": 2}))
            await until(lambda: eng.num_waiting >= 1)
            refused = await http.post(env["key_url"] + "/v1/completions", headers=headers,
                                      json={"model": BASE, "prompt": "z", "max_tokens": 2})
            for _, lines in streams[:2]:  # read a little more, then drop the connection
                await lines.__anext__()
            for cm, _ in streams:
                await cm.__aexit__(None, None, None)
            served = await waiter
            return refused, served, gen_before

    refused, served, gen_before = asyncio.run(scenario())
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
    assert served.status_code == 200  # the one that waited ran once the streams were dropped
    after = wait_idle(env)
    assert after["blocks_used"] == idle["blocks_used"] and after["blocks_free"] == idle["blocks_free"]
    assert after["generated_tokens"] - gen_before < 4 * (CTX - 8) - 100  # aborted, not run to the end
    assert httpx.get(env["url"] + "/health").status_code == 200
    metrics = httpx.get(env["url"] + "/metrics").text
    assert 'nanoseek_requests_total{adapter="base",status="499"}' in metrics


def test_non_streamed_request_is_aborted_when_the_client_leaves(env):
    wait_idle(env)
    gen_before = env["engine"].stats["generated_tokens"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(env["url"] + "/v1/completions", timeout=httpx.Timeout(60, read=0.2),
                   json={"model": "a1", "prompt": "x", "max_tokens": CTX - 8, "ignore_eos": True})
    after = wait_idle(env)
    assert after["generated_tokens"] - gen_before < CTX - 8  # stopped early, not run to max_tokens
    assert 'nanoseek_requests_total{adapter="a1",status="499"}' in httpx.get(env["url"] + "/metrics").text


# ---------------------------------------------------------------------------------------------- metrics, page
def test_metrics_have_the_series(env, client):
    client.completions.create(model="a1", prompt="x", max_tokens=3, stream=True).close()
    client.completions.create(model="a2", prompt="x", max_tokens=3, temperature=0)
    text = httpx.get(env["url"] + "/metrics").text
    for series in ('nanoseek_requests_total{adapter="a2",status="200"}', "nanoseek_prompt_tokens_total",
                   "nanoseek_generation_tokens_total", "nanoseek_requests_running", "nanoseek_requests_waiting",
                   "nanoseek_cache_blocks_used", "nanoseek_cache_blocks_free", "nanoseek_prefix_cache_hit_rate",
                   "nanoseek_time_to_first_token_seconds_bucket", "nanoseek_inter_token_latency_seconds_count"):
        assert series in text, series
    assert 'adapter="unresolved",status="400"' in text  # refused requests are counted too
    gen = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("nanoseek_generation_tokens_total")]
    assert gen and gen[0] > 0


def test_chat_page(env):
    r = httpx.get(env["url"] + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/v1/models" in r.text and "/v1/chat/completions" in r.text and "getReader" in r.text


# ---------------------------------------------------------------------------------------------- concurrency
def test_64_concurrent_mixed_adapter_requests_equal_offline_greedy(env):
    models = [BASE, "a1", "a2"]
    jobs = [(models[i % 3], PROMPTS[i % len(PROMPTS)], 4 + i % 5, i % 4 == 0) for i in range(64)]

    async def one(aclient, model, prompt, n, stream):
        r = await aclient.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0,
                                             stream=stream, **AS_IDS)
        if stream:
            return ids_of(env, [t async for c in r if c.choices for t in c.choices[0].logprobs.tokens])
        return completion_ids(env, r)

    async def run():
        aclient = openai.AsyncOpenAI(base_url=env["url"] + "/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*[one(aclient, *j) for j in jobs], return_exceptions=True)

    results = asyncio.run(run())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    want = {}
    for model, prompt, n, _ in jobs:
        key = (model, prompt, n)
        if key not in want:
            want[key] = greedy(env, env["tok"].encode(prompt), None if model == BASE else model, n)
    assert [want[(m, p, n)] for m, p, n, _ in jobs] == results
    assert wait_idle(env)["running"] == 0
