"""nanoseek.train.finetune: LoRA and full fine-tuning through the shared optimizer step; exact resume."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from nanoseek import Model
from nanoseek.train.finetune import FinetuneConfig, finetune, main


@pytest.fixture(scope="module")
def base(sft_base):
    return sft_base


def _cfg(base, out, **kw):
    args = dict(r=4, max_steps=4, batch_size=4, seq_len=24, warmup_steps=0, eval_every=2, eval_batches=2,
                save_every=2, plots=False, lr=3e-3)
    return FinetuneConfig(base=str(base / "base"), data=str(base / "sft.jsonl"), out_dir=str(out), **{**args, **kw})


def test_lora_finetune_learns_and_writes_adapter(base, tmp_path):
    s = finetune(_cfg(base, tmp_path / "run", max_steps=12, eval_every=12, save_every=12))
    assert s["val_loss"] < s["initial"]["val_loss"]
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    m = Model.from_pretrained(base / "base")
    m.load_adapter(adapter, "ft")  # a plain PEFT directory that the model reads back
    # the base is untouched: the checkpoint directory holds the adapter, not a model
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000012"
    assert not (ckpt / "model.safetensors").exists() and (ckpt / "adapter_model.safetensors").is_file()


def test_lora_resume_is_exact(base, tmp_path):
    finetune(_cfg(base, tmp_path / "a"))
    want = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    metrics_a = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    # as if killed while writing step 4: its directory is still a temp one, and the final adapter is missing
    ckpts = tmp_path / "b" / "checkpoints"
    (ckpts / "step-0000004").rename(ckpts / ".step-0000004.tmp-12345")
    shutil.rmtree(tmp_path / "b" / "adapter")
    finetune(_cfg(base, tmp_path / "b", resume="latest"))
    assert not (ckpts / ".step-0000004.tmp-12345").exists() and (ckpts / "step-0000004").is_dir()
    got = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    metrics_b = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(r).items() if k not in ("tokens_per_s", "step_time_s", "max_memory_bytes")}
             for r in metrics_a]
    assert strip == [{k: v for k, v in json.loads(r).items() if k not in ("tokens_per_s", "step_time_s",
                                                                          "max_memory_bytes")} for r in metrics_b]


@pytest.mark.parametrize("variant", [dict(dora=True), dict(peft="vera", r=32)])
def test_dora_and_vera_finetune_write_peft_adapters_and_resume_exactly(base, tmp_path, variant):
    finetune(_cfg(base, tmp_path / "a", **variant))
    conf = json.loads((tmp_path / "a" / "adapter" / "adapter_config.json").read_text())
    assert conf["peft_type"] == ("VERA" if "peft" in variant else "LORA") and conf.get("use_dora", False) == \
        variant.get("dora", False)
    want = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    trained = "vera_lambda_b" if "peft" in variant else "lora_magnitude_vector"
    assert any(trained in k for k in want)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-0000004")
    shutil.rmtree(tmp_path / "b" / "adapter")
    finetune(_cfg(base, tmp_path / "b", resume="latest", **variant))  # from step 2: the same tensors at step 4
    got = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    m = Model.from_pretrained(base / "base")
    m.load_adapter(tmp_path / "b" / "adapter", "ft")


def test_full_finetune_writes_model(base, tmp_path):
    s = finetune(_cfg(base, tmp_path / "full", full=True, lr=1e-3))
    m = Model.from_pretrained(tmp_path / "full" / "model")
    ref = Model.from_pretrained(base / "base")
    assert any(not torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
    assert s["output"].endswith("model")


def test_cli_entry_point(base, tmp_path, capsys):
    assert main(["--base", str(base / "base"), "--data", str(base / "sft.jsonl"), "--out-dir", str(tmp_path / "c"),
                 "--max-steps", "2", "--batch-size", "2", "--seq-len", "24", "--r", "2", "--no-plots",
                 "--target-modules", "o_proj,experts", "--eval-every", "0", "--save-every", "0"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["step"] == 2 and out["output"].endswith("adapter")


def _launch(nproc: int, base, out, *flags: str) -> list[dict]:
    """`nanoseek finetune` on nproc processes (torchrun, gloo on CPU); returns metrics.jsonl's records."""
    from .conftest import REPO
    from .test_distributed import torchrun

    args = ["--base", str(base / "base"), "--data", str(base / "sft.jsonl"), "--out-dir", str(out),
            "--lora-r", "4", "--max-steps", "4", "--seq-len", "24", "--warmup-steps", "0", "--eval-every", "2",
            "--eval-batches", "2", "--save-every", "4", "--no-plots", "--lr", "3e-3", "--log-every", "1"]
    args += list(flags)
    cmd = (torchrun() + ["--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else [sys.executable]) + [
        "-m", "nanoseek", "finetune", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert len([line for line in r.stdout.splitlines() if line.startswith("{")]) == 1  # rank 0 prints the summary
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_two_processes_ddp_match_one(base, tmp_path, full):
    """DDP: 2 processes x batch 2 follow 1 process x batch 4 (same global batch), loss for loss; rank 0 alone
    writes the adapter / model."""
    extra = ["--full"] if full else []
    one = _launch(1, base, tmp_path / "one", "--batch-size", "4", *extra)
    two = _launch(2, base, tmp_path / "two", "--batch-size", "2", *extra)
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    out = "model/model.safetensors" if full else "adapter/adapter_model.safetensors"
    w1, w2 = load_file(tmp_path / "one" / out), load_file(tmp_path / "two" / out)
    assert w1.keys() == w2.keys() and all(torch.allclose(w1[k], w2[k], atol=1e-4) for k in w1)


def test_grad_accum_weights_tokens_like_one_batch(base, tmp_path):
    """2 micro-batches of 2 follow 1 batch of 4 although their completion-token counts differ: every target
    token of the step weighs the same (a mean of per-micro-batch means would not)."""
    def curve(out, **kw):
        finetune(_cfg(base, out, eval_every=0, save_every=0, **kw))
        return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    one = curve(tmp_path / "one", batch_size=4)
    two = curve(tmp_path / "two", batch_size=2, grad_accum=2)
    assert two == pytest.approx(one, rel=1e-5)


def test_merge_and_generate_with_adapter(base, tmp_path, capsys):
    """`nanoseek merge` writes a plain checkpoint equal to base + adapter; `generate --adapter` runs the adapter."""
    from nanoseek.cli import main as cli

    finetune(_cfg(base, tmp_path / "run", max_steps=6, eval_every=0, save_every=0, lr=1e-2))
    adapter = tmp_path / "run" / "adapter"
    assert cli(["merge", "--checkpoint", str(base / "base"), "--adapter", str(adapter), "--out",
                str(tmp_path / "merged")]) == 0
    merged = Model.from_pretrained(tmp_path / "merged")
    assert not any("lora" in k for k in load_file(tmp_path / "merged" / "model.safetensors"))
    ref = Model.from_pretrained(base / "base")
    ref.load_adapter(adapter, "ft")
    x = torch.randint(3, ref.config.vocab_size, (2, 16))
    with torch.no_grad():
        want, plain = ref(x, adapter="ft"), ref(x)
        assert (want - plain).abs().max() > 1e-3  # the adapter learned something
        assert (merged(x) - want).abs().max() < 1e-5
    assert cli(["merge", "--checkpoint", str(base / "base"), "--adapter", str(adapter), "--out",
                str(tmp_path / "merged")]) == 2  # refuses to overwrite
    capsys.readouterr()
    outs = []
    for ckpt, extra in ((tmp_path / "merged", []), (base / "base", ["--adapter", str(adapter)]), (base / "base", [])):
        assert cli(["generate", "--checkpoint", str(ckpt), "--prompt", "def f3(x):\n", "--temperature", "0",
                    "--max-new-tokens", "12", *extra]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]
    corpus = tmp_path / "corpus" / "pkg"  # `eval --adapter` on a tiny corpus equals eval of the merged model
    corpus.mkdir(parents=True)
    for i in range(30):
        (corpus / f"m{i}.py").write_text("".join(f"def f{j}(x):\n    return x * {j}\n" for j in range(i, i + 20)))
    losses = []
    for ckpt, extra in ((tmp_path / "merged", []), (base / "base", ["--adapter", str(adapter)]), (base / "base", [])):
        assert cli(["eval", "--checkpoint", str(ckpt), "--data", str(tmp_path / "corpus"), "--seq-len", "32",
                    "--cache-dir", str(tmp_path / "cache"), *extra]) == 0
        losses.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["val_loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5) and abs(losses[0] - losses[2]) > 1e-4


@pytest.mark.parametrize("bad", [dict(r=0), dict(schedule="linear"), dict(dtype="fp16"), dict(lr=-1.0),
                                 dict(lora_dropout=1.0), dict(max_steps=0), dict(peft="ia3"),
                                 dict(peft="vera", dora=True)])
def test_bad_config_is_rejected(base, tmp_path, bad):
    with pytest.raises(ValueError, match="FinetuneConfig"):
        _cfg(base, tmp_path / "x", **bad)


def test_help_names_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "--lora-r" in text and "LoRA rank" in text and "builtin:<task>" in text
