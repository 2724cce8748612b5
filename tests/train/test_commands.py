import json

import pytest
import yaml

from nanoseek.cli import build_parser, main
from nanoseek.train.commands import DIVERGED_EXIT, build_train_config
from nanoseek.train.config import TrainConfig
from nanoseek.train.state import list_checkpoints

from .conftest import cli_args, tiny_kwargs
from .faults import nan_at


def parse(argv):
    return build_train_config(build_parser().parse_args(["pretrain", *argv]))


def test_every_field_is_a_flag_with_help():
    help_text = build_parser()._subparsers._group_actions[0].choices["pretrain"].format_help()
    for name in TrainConfig.field_names():
        assert "--" + name.replace("_", "-") in help_text, name


def test_config_file_then_flags_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"lr": 1e-3, "batch_size": 4, "schedule": "wsd", "eval-batches": None}))
    cfg = parse(["--config", str(f), "--batch-size", "2", "--no-plots"])
    assert (cfg.lr, cfg.batch_size, cfg.schedule, cfg.eval_batches, cfg.plots) == (1e-3, 2, "wsd", None, False)
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"max_steps": 7}))
    assert parse(["--config", str(j)]).max_steps == 7
    assert parse(["--resume"]).resume == "latest" and parse([]).preset == "dsv3-tiny"


def test_unknown_config_key_lists_valid_keys(tmp_path, capsys):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"lr": 1e-3, "learning_rate": 1e-3}))
    assert main(["pretrain", "--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert "unknown TrainConfig key(s) ['learning_rate']" in err and "batch_size" in err and "max_steps" in err


@pytest.mark.parametrize("argv, match", [
    (["--batch-size", "0"], "batch_size"),
    (["--lr", "-1"], "lr"),
    (["--schedule", "linear"], "schedule"),
    (["--router-balance", "magic"], "router_balance"),
    (["--min-lr-ratio", "2"], "min_lr_ratio"),
    (["--config", "/nonexistent.yaml"], "does not exist"),
])
def test_bad_values_are_clean_errors(argv, match, capsys):
    assert main(["pretrain", *argv]) == 2
    assert match in capsys.readouterr().err


def test_seq_len_beyond_positions_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        TrainConfig(seq_len=4096, out_dir=str(tmp_path)).model_config_obj()


def test_pretrain_cli_nan_exit_code(tiny_corpus, cache_dir, tmp_path, monkeypatch, capsys):
    nan_at(monkeypatch, 3)
    argv = cli_args(tiny_kwargs(tiny_corpus, cache_dir, tmp_path / "run", max_steps=6, save_every=2))
    assert main(["pretrain", *argv]) == DIVERGED_EXIT
    assert "training diverged: step 3: non-finite loss, main_loss" in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-0000002"]


def test_eval_command(trained_checkpoint, capsys):
    assert main(["eval", "--checkpoint", str(trained_checkpoint), "--eval-batches", "3"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert {"val_loss", "val_ppl", "val_bpb", "val_unigram_byte_entropy"} <= set(res)
    assert res["seq_len"] == 32 and 0 < res["val_bpb"] < 10
    assert any(line.startswith("val_bpb") for line in out)


def test_generate_command(trained_checkpoint, capsys):
    argv = ["generate", "--checkpoint", str(trained_checkpoint), "--prompt", "def ", "--max-new-tokens", "8",
            "--seed", "1", "--top-k", "20", "--top-p", "0.9"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert first.startswith("def ") and len(first) > 5
    assert main(argv) == 0 and capsys.readouterr().out == first  # seeded: reproducible
    assert main(["generate", "--checkpoint", str(trained_checkpoint / "nope"), "--prompt", "x"]) == 2


def test_generate_speculative_command(trained_checkpoint, capsys):
    argv = ["generate", "--checkpoint", str(trained_checkpoint), "--prompt", "def ", "--max-new-tokens", "12",
            "--temperature", "0"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main([*argv, "--speculative", "--num-speculative-tokens", "2"]) == 0
    text, stats = capsys.readouterr().out.rsplit("[speculative]", 1)
    assert text == plain  # greedy: the same text
    assert "acceptance by draft position" in stats and "mean accepted length" in stats
    assert main([*argv, "--num-speculative-tokens", "2"]) == 2  # needs --speculative
    assert main([*argv, "--speculative", "--num-speculative-tokens", "0"]) == 2


def test_experts_command(trained_checkpoint, tmp_path, capsys):
    out = tmp_path / "experts"
    assert main(["experts", "--checkpoint", str(trained_checkpoint), "--out", str(out),
                 "--max-tokens-per-domain", "512"]) == 0
    data = json.loads((out / "experts.json").read_text())
    assert data["domains"] and len(data["fraction"]) == 1  # one main-model MoE layer in the tiny model
    for row in data["fraction"][0]:
        assert len(row) == 8 and sum(row) == pytest.approx(1.0, abs=1e-5)
    assert (out / "experts.png").stat().st_size > 1000


def test_tensorboard_flag(tiny_corpus, cache_dir, tmp_path, capsys):
    import importlib.util

    argv = cli_args(tiny_kwargs(tiny_corpus, cache_dir, tmp_path / "run", max_steps=2, tensorboard=True))
    rc = main(["pretrain", *argv])
    if importlib.util.find_spec("tensorboard") is None:
        assert rc == 2 and "needs the tensorboard package" in capsys.readouterr().err
    else:
        assert rc == 0 and any((tmp_path / "run" / "tb").iterdir())
