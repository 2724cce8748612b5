"""Adapter configurations: `LoraConfig` (LoRA, rsLoRA, DoRA) and `VeraConfig` (VeRA), with PEFT's field names.

What. Plain dataclasses that validate their fields and compute per-target rank and scale. lora.py builds the
adapters from them; peft_format.py turns them into `adapter_config.json` and back.
Why a module of its own: lora.py (targets, merge), model/linear.py (the adapter state) and peft_format.py (the
on-disk layout) all need the configs, and it imports nothing, so the model can use it without importing lora.py.
Rejected: one config class with a `peft_type` switch — VeRA's fields (shared projections, `d_initial`) mean
nothing to LoRA and the reverse; PEFT keeps them apart too.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

INIT_CHOICES = (True, False, "gaussian")


def _bad(obj, name, why):
    raise ValueError(f"{type(obj).__name__}.{name}={getattr(obj, name)!r}: {why}")


def _check_common(cfg, dropout_field: str) -> None:
    """r, dropout and target_modules: the same rules for LoRA and VeRA."""
    if isinstance(cfg.r, bool) or not isinstance(cfg.r, int) or cfg.r < 1:
        _bad(cfg, "r", "must be a positive integer")
    p = getattr(cfg, dropout_field)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        _bad(cfg, dropout_field, "must be in [0, 1)")
    if isinstance(cfg.target_modules, str):
        if cfg.target_modules != "all-linear":
            _bad(cfg, "target_modules", "must be a list of module-name suffixes or 'all-linear'")
    else:
        cfg.target_modules = list(cfg.target_modules or [])
        if not cfg.target_modules or not all(isinstance(t, str) and t.strip(".") for t in cfg.target_modules):
            _bad(cfg, "target_modules", "must be a non-empty list of module names (or 'all-linear')")


@dataclass
class LoraConfig:
    """One adapter's hyper-parameters (PEFT's `LoraConfig` field names).

    target_modules: module-name suffixes (PEFT rule: a module matches t if its path is t or ends with ".t"),
        e.g. ["q_a_proj", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "experts"], or
        "all-linear" (every projection and the routed experts; not lm_head, not the routers). With use_dora,
        "all-linear" means the linear layers only (DoRA on the stacked experts is refused, as PEFT does).
    init_lora_weights: True = A kaiming-uniform(a=sqrt(5)) (nn.Linear's init, as PEFT), B = 0 (the adapter starts
        as the base model); "gaussian" = A ~ N(0, 1/r), B = 0; False = A and B random (tests only).
    rank_pattern / alpha_pattern: PEFT's per-target overrides {regex: value}, matched against the module path.
    use_dora: DoRA (Liu et al. 2024): W' = m * (W + gamma B A) / ||W + gamma B A||_row, m trainable (out,).
    """

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False

    def __post_init__(self):
        _check_common(self, "lora_dropout")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or \
                not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            _bad(self, "lora_alpha", "must be a positive number")
        if not isinstance(self.use_rslora, bool):
            _bad(self, "use_rslora", "must be True or False")
        if not isinstance(self.use_dora, bool):
            _bad(self, "use_dora", "must be True or False")
        if self.init_lora_weights not in INIT_CHOICES or isinstance(self.init_lora_weights, int) and \
                not isinstance(self.init_lora_weights, bool):
            _bad(self, "init_lora_weights", f"must be one of {INIT_CHOICES}")
        for k, v in self.rank_pattern.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"LoraConfig.rank_pattern[{k!r}]={v!r}: must be a positive integer")
        for k, v in self.alpha_pattern.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"LoraConfig.alpha_pattern[{k!r}]={v!r}: must be a positive number")

    def _pattern(self, patterns: dict, path: str):
        for key, value in patterns.items():  # PEFT's get_pattern_key: the regex must match a path suffix
            if re.match(rf"(.*\.)?({key})$", path):
                return value
        return None

    def rank_for(self, path: str) -> int:
        return self._pattern(self.rank_pattern, path) or self.r

    def scale_for(self, path: str, r: int | None = None) -> float:
        """gamma = alpha / r (rsLoRA: alpha / sqrt(r)) for the target at `path`."""
        r = r or self.rank_for(path)
        alpha = self._pattern(self.alpha_pattern, path) or self.lora_alpha
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    @property
    def scale(self) -> float:
        return self.scale_for("")


@dataclass
class VeraConfig:
    """VeRA (Kopiczko et al. 2024), PEFT's `VeraConfig` field names.

    Every targeted linear W (out, in) gets y = x W^T + lambda_b * ((lambda_d * (x A^T)) B^T) with A = vera_A[:, :in],
    B = vera_B[:out, :]: vera_A (r, in_max) and vera_B (out_max, r) are ONE frozen random pair shared by all
    targets, drawn from `projection_prng_key` exactly as PEFT draws them (so both sides agree bit for bit);
    only lambda_d (r,) (init d_initial) and lambda_b (out,) (init 0) train.
    target_modules: as LoraConfig, but linear layers only ("all-linear": every projection of the main stack
        but lm_head; the routed experts, the routers and the MTP modules have no VeRA, PEFT has none there).
    """

    r: int = 256
    target_modules: list[str] | str = "all-linear"
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1

    def __post_init__(self):
        _check_common(self, "vera_dropout")
        if isinstance(self.projection_prng_key, bool) or not isinstance(self.projection_prng_key, int) or \
                self.projection_prng_key < 0:
            _bad(self, "projection_prng_key", "must be a non-negative integer")
        if not isinstance(self.save_projection, bool):
            _bad(self, "save_projection", "must be True or False")
        if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float)) or \
                not math.isfinite(self.d_initial):
            _bad(self, "d_initial", "must be a finite number")

    def rank_for(self, path: str) -> int:
        return self.r

    def scale_for(self, path: str, r: int | None = None) -> float:
        return 1.0
