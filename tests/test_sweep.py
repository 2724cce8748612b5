"""`nanoseek sweep` and muP through the trainer: groups, records, plot, and a transfer file pretrain accepts."""

import json
import shutil
import sysconfig
from pathlib import Path

import pytest

from nanoseek import sweep
from nanoseek.cli import main
from nanoseek.train.config import TrainConfig, load_config_file


@pytest.fixture()
def corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    for f in sorted((Path(sysconfig.get_paths()["stdlib"]) / "json").glob("*.py")):
        shutil.copy(f, root / f.name)
    return root


def test_sweep_records_plot_and_transfer(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sweep"
    args = ["sweep", "--preset", "gpt2-tiny", "--widths", "32,64", "--lrs", "0.002,0.02", "--max-steps", "3",
            "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--vocab-size", "300",
            "--warmup-steps", "1", "--data", str(corpus), "--params", "mup,sp", "--transfer-to", "256",
            "--emb-mults", "1,2",
            "--out", str(out)]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["sweep"]
    data = json.loads((out / "sweep.json").read_text())
    assert len(data["runs"]) == 2 * 2 * 2 * 2
    assert {r["emb"] for r in data["runs"]} == {1.0, 2.0}
    assert {r["param"] for r in data["runs"]} == {"mup", "sp"}
    assert all(r["val_loss"] > 0 for r in data["runs"])
    assert (out / "sweep.png").stat().st_size > 10_000
    best = summary["mup"]["best"]["64"]
    cfg = TrainConfig.from_dict(load_config_file(out / "transfer-256.json"))
    assert cfg.hidden_size == 256 and cfg.mup_base_width == 128 and cfg.lr == best["lr"]
    assert cfg.embedding_multiplier == best["emb"]
    mcfg = cfg.model_config_obj()
    assert mcfg.hidden_size == 256 and mcfg.mup_base_width == 128
    # a second call reuses the finished runs instead of training again
    assert main(args) == 0
    assert "fresh start" not in capsys.readouterr().out


def test_mup_trainconfig_builds_mup_optimizer(corpus, tmp_path):
    from nanoseek import Model
    from nanoseek.train.optim import configure_optimizer

    cfg = TrainConfig(preset="dsv3-tiny", hidden_size=256, mup_base_width=128, data=str(corpus))
    model = Model(cfg.model_config_obj())
    opt = configure_optimizer(model, lr=1e-3, weight_decay=0.1)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert scales == [0.5, 1.0]
    assert all(g["lr"] == pytest.approx(1e-3 * g["lr_scale"]) for g in opt.param_groups)
    hidden = [g for g in opt.param_groups if g["lr_scale"] == 0.5]
    assert hidden and all(g["weight_decay"] == pytest.approx(0.2) for g in hidden)


def _search_args(corpus, out, *search) -> list[str]:
    """`nanoseek sweep --search` on dsv3-tiny at width 32, tiny runs on `corpus`; `search`: the search flags."""
    return ["sweep", "--preset", "dsv3-tiny", "--widths", "32", *search, "--max-steps", "3", "--batch-size", "2",
            "--seq-len", "16", "--eval-batches", "1", "--vocab-size", "300", "--warmup-steps", "1", "--data",
            str(corpus), "--base-width", "32", "--out", str(out)]


def test_sweep_search_halves_and_transfers_every_value(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "search"
    args = _search_args(corpus, out, "--search", "3", "--search-eta", "3", "--transfer-to", "64",
                        "--search-refine-lr", "")
    assert main(args) == 0
    data = json.loads((out / "sweep.json").read_text())
    runs, chosen = data["runs"], data["summary"]["chosen"]
    assert [r["steps"] for r in runs] == [1, 1, 1, 3]  # 3 configurations for 1 step, the best one for 3
    first = min(runs[:3], key=lambda r: r["val_loss"])
    assert runs[3]["lr"] == first["lr"] == chosen["lr"] and chosen["val_loss"] == runs[3]["val_loss"]
    assert runs[0]["out"] is None and runs[1]["out"] is not None  # trial 0: the defaults; others: random draws
    cfg = TrainConfig.from_dict(load_config_file(out / "transfer-64.json"))
    for key, field in sweep.HPARAMS.items():
        assert getattr(cfg, field) == chosen[key], key
    assert cfg.hidden_size == 64 and cfg.mup_base_width == 32 and cfg.lr == chosen["lr"]
    assert main([*args[:-2], "--search-eta", "1", "--out", str(out)]) == 2
    assert "--search-eta >= 2" in capsys.readouterr().err


def test_sweep_search_refines_the_winners_lr(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "search"
    args = _search_args(corpus, out, "--search", "2", "--search-eta", "2", "--search-refine-lr", "0.25,4")
    assert main(args) == 0
    data = json.loads((out / "sweep.json").read_text())
    runs, chosen = data["runs"], data["summary"]["chosen"]
    assert [r["steps"] for r in runs] == [1, 1, 3, 3, 3]  # 2 configurations, the best for 3, then 2 lr factors
    winner, refined = runs[2], runs[3:]
    assert [r["lr"] for r in refined] == pytest.approx([winner["lr"] * 0.25, winner["lr"] * 4])
    for r in refined:  # only the lr moves
        assert all(r[k] == winner[k] for k in sweep.HPARAMS)
    best = min(runs[2:], key=lambda r: r["val_loss"])
    assert chosen["lr"] == best["lr"] and chosen["val_loss"] == best["val_loss"]
    assert main([*args[:-2], "--search-refine-lr", "0.5,-1", "--out", str(out)]) == 2
    assert "--search-refine-lr" in capsys.readouterr().err
