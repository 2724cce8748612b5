"""`nanoseek serve --speculative`: a live uvicorn over a speculative engine answers the official `openai` client
with plain greedy decoding's tokens and exposes the acceptance counters in /metrics; the CLI flags have help
and refuse a checkpoint without MTP modules, naming the problem."""

from __future__ import annotations

import re

import httpx
import openai
import pytest
import torch

from nanoseek.cli import main
from nanoseek.data import train_tokenizer
from nanoseek.serve import LLM, SamplingParams
from nanoseek.serve.async_engine import AsyncEngine
from nanoseek.serve.engine import Engine
from nanoseek.serve.server import ServerSettings, ServerThread, create_app
from tests.tiny import ds, make_model

PROMPT = "def f3(x):\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory, single_thread):
    d = tmp_path_factory.mktemp("spec_serve")
    tok = train_tokenizer([f"def f{i}(x):\n    return x * {i}\n" for i in range(40)] * 3, vocab_size=300)
    model = make_model(ds(vocab_size=tok.vocab_size, max_position_embeddings=128))
    model.save_pretrained(d / "base", tokenizer=tok)
    make_model(ds(vocab_size=tok.vocab_size, num_nextn_predict_layers=0)).save_pretrained(d / "no_mtp", tokenizer=tok)
    engine = AsyncEngine(Engine.from_checkpoint(str(d / "base"), speculative=True, num_speculative_tokens=2,
                                                kv_cache_tokens=1024, block_size=16)).start()
    with ServerThread(create_app(engine, ServerSettings(model_name="base"))) as srv:
        yield {"url": srv.url, "model": model, "tok": tok, "dir": d}
    engine.shutdown()


def test_completion_equals_plain_greedy_and_metrics_count_acceptance(env):
    client = openai.OpenAI(base_url=env["url"] + "/v1", api_key="unused", max_retries=0)
    r = client.completions.create(model="base", prompt=PROMPT, max_tokens=20, temperature=0,
                                  extra_body={"ignore_eos": True})
    ids = env["tok"].encode(PROMPT)
    want = env["model"].generate(torch.tensor([ids]), 20)[0, len(ids):].tolist()
    assert r.choices[0].text == env["tok"].decode(want) and r.usage.completion_tokens == 20
    text = httpx.get(env["url"] + "/metrics").text

    def value(series: str) -> float:
        m = re.search("^" + re.escape(series) + r" (\S+)$", text, re.M)
        assert m, series
        return float(m.group(1))

    drafted = [value(f'nanoseek_spec_draft_tokens_total{{position="{j}"}}') for j in (1, 2)]
    accepted = [value(f'nanoseek_spec_accepted_tokens_total{{position="{j}"}}') for j in (1, 2)]
    assert drafted[0] >= drafted[1] > 0 and all(0 <= a <= d for a, d in zip(accepted, drafted))
    rows = value("nanoseek_spec_verifications_total")
    assert rows == drafted[0]  # every verifying row drafted position 1
    assert value("nanoseek_spec_mean_accepted_length") == pytest.approx(1 + sum(accepted) / rows)


def test_offline_llm_takes_the_speculative_options(env):
    llm = LLM(str(env["dir"] / "base"), speculative=True, num_speculative_tokens=3, kv_cache_tokens=512,
              block_size=16)
    out = llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    ids = env["tok"].encode(PROMPT)
    assert out.token_ids == env["model"].generate(torch.tensor([ids]), 12)[0, len(ids):].tolist()
    assert llm.engine.stats()["spec_num_tokens"] == 3 and llm.engine.stats()["spec_verify_rows"] > 0


def test_serve_help_lists_the_speculative_flags(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--speculative" in out and "--num-speculative-tokens K" in out


@pytest.mark.parametrize("ckpt,args,message", [
    ("no_mtp", ["--speculative"], "MTP"),
    ("base", ["--num-speculative-tokens", "2"], "--num-speculative-tokens 2 needs --speculative"),
    ("base", ["--speculative", "--num-speculative-tokens", "0"], "--num-speculative-tokens must be >= 1, got 0"),
])
def test_serve_refuses_bad_speculative_flags(env, capsys, ckpt, args, message):
    assert main(["serve", "--checkpoint", str(env["dir"] / ckpt), *args]) == 2
    assert message in capsys.readouterr().err
