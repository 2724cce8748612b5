"""`nanoseek serve` as a process: --help, bad flags, and SIGTERM (in-flight stream finishes, exit status 0)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from nanoseek import LoraConfig, Model
from nanoseek.cli import main
from nanoseek.serve.metrics import ServerMetrics

ROOT = Path(__file__).resolve().parents[2]


def test_serve_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--checkpoint", "--adapter NAME=DIR", "--host", "--port", "--max-batch-tokens", "--max-loras",
                 "--kv-cache-tokens", "--block-size", "--api-key", "--adapter-root", "--dtype",
                 "--served-model-name", "--max-queue", "--grace"):
        assert flag in out, flag


@pytest.mark.parametrize("args,message", [
    (["--adapter", "nodir"], "NAME=DIR"),
    (["--adapter", "x=/does/not/exist"], "/does/not/exist"),
    (["--adapter-root", "/does/not/exist"], "--adapter-root"),
    (["--max-queue", "-1"], "--max-queue"),
])
def test_serve_bad_flags_name_the_value(sft_base, capsys, args, message):
    assert main(["serve", "--checkpoint", str(sft_base / "base"), *args]) == 2
    assert message in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a whole server process: ~10-20 s on a busy 2-core machine
def test_sigterm_finishes_in_flight_and_exits_0(sft_base, tmp_path):
    model = Model.from_pretrained(sft_base / "base")
    torch.manual_seed(0)
    model.add_adapter("t", LoraConfig(r=4, init_lora_weights=False, target_modules=["o_proj"]))
    model.save_adapter(tmp_path / "t", "t")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", "--checkpoint", str(sft_base / "base"),
                             "--adapter", f"t={tmp_path / 't'}", "--port", str(port), "--grace", "20"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["base", "t"]
        events: list[str] = []
        with httpx.stream("POST", url + "/v1/completions", timeout=60,
                          json={"model": "t", "prompt": "def f1(x):\n", "max_tokens": 40, "ignore_eos": True,
                                "stream": True}) as r:
            lines = r.iter_lines()
            events.append(next(lines))  # the request is running
            proc.send_signal(signal.SIGTERM)
            events += [line for line in lines if line]
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read()
    assert events[-1] == "data: [DONE]" and '"finish_reason":"length"' in events[-2], events[-3:]
    assert "status=200" in log and "generated=40" in log, log  # the in-flight request ran to its end
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=1)


def test_throughput_line():
    """metrics.throughput_line: a rate line once tokens were generated, None when idle."""
    stats = {"running": 1, "waiting": 0, "blocks_used": 3, "blocks_total": 10, "prefix_hits": 1, "prefix_queries": 4}
    m = ServerMetrics(lambda: stats)
    m.tokens(5, first=True, since_s=0.1)
    line = m.throughput_line()
    assert line and "generation" in line and "3/10" in line and "25%" in line
    stats["running"] = 0
    assert m.throughput_line() is None
