"""One dataclass-to-argparse helper (train/flags.py) for `pretrain` and `finetune`."""

import argparse
import dataclasses

import pytest

from nanoseek.train.config import TrainConfig
from nanoseek.train.finetune import FinetuneConfig
from nanoseek.train.flags import add_flags


@pytest.mark.parametrize("cls", [TrainConfig, FinetuneConfig])
def test_every_field_has_help_in_its_metadata(cls):
    assert all(f.metadata.get("help") for f in dataclasses.fields(cls))


def test_finetune_flags_types_aliases_and_required():
    p = argparse.ArgumentParser()
    add_flags(p, FinetuneConfig)
    args = p.parse_args(["--base", "b", "--data", "d", "--out-dir", "o", "--lora-r", "4", "--no-plots", "--resume",
                         "--lr", "none", "--bias-update-stop-frac", "0.25"])
    cfg = FinetuneConfig(**vars(args))
    assert (cfg.r, cfg.plots, cfg.resume, cfg.bias_update_stop_frac) == (4, False, "latest", 0.25)
    assert cfg.lr == 5e-4  # "none": the default for LoRA
    with pytest.raises(SystemExit):
        p.parse_args(["--data", "d", "--out-dir", "o"])  # --base is required
    with pytest.raises(SystemExit):
        p.parse_args(["--base", "b", "--data", "d", "--out-dir", "o", "--peft", "ia3"])  # not a choice


def test_pretrain_flags_leave_absent_fields_unset():
    """With suppress_defaults, a --config file's values are not overwritten by the dataclass defaults."""
    p = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    add_flags(p, TrainConfig, suppress_defaults=True)
    assert vars(p.parse_args(["--max-steps", "5"])) == {"max_steps": 5}
