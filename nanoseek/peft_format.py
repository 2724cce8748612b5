"""The PEFT on-disk format of adapters: `adapter_config.json` fields and tensor names, both ways (pure functions).

What.
  * Tensor names: `base_model.model.<module>.lora_A.weight`, `.lora_B.weight`, `.lora_magnitude_vector` (DoRA, (out,)),
    `.vera_lambda_d` (r,), `.vera_lambda_b` (out,), and VeRA's shared `base_model.vera_A` / `base_model.vera_B`.
    `parse_key` reads every spelling PEFT and older nanoseek versions wrote (with or without the adapter name).
  * Routed experts use PEFT's `target_parameters` layout for 3-D expert tensors: lora_A (E*r, in), row e*r + k;
    lora_B (out, r*E), column k*E + e (`pack_experts` / `unpack_experts`).
  * Configs: `lora_config_dict` / `vera_config_dict` write the JSON, `config_from_peft` reads it back.
Why DeepseekV3's MLP linears go to `target_parameters`: on transformers 5, peft rewrites every *target_modules*
  entry named gate_proj / up_proj / down_proj (any path ending so) to the fused routed-expert parameters
  (peft/utils/transformers_weight_conversion.py, `_convert_peft_config_moe`: DeepseekV3 maps to qwen2_moe), so a
  dense-MLP or shared-expert target written there is lost and, with both gate and up named, the routed
  gate_up_proj is expected at rank 2r ("size mismatch ... experts.base_layer.lora_A"). `target_parameters` entries
  are not rewritten, and a 2-D parameter is wrapped as a plain LoRA on that weight (ParamWrapper, num_experts 1):
  `mlp.gate_proj.weight`, `shared_experts.up_proj.weight`, ... load with the same tensor names. The router is
  `gate.weight` there too (peft's own all-linear targets it). Limits that come with it: ParamWrapper refuses
  lora_dropout (written as 0: dropout is a training-time setting and does not change the logits) and DoRA.
Rejected: writing routed experts per expert (`experts.{e}.gate_proj`) for peft to fuse — it still needs
  gate_proj/up_proj in target_modules, which takes the dense MLPs away from peft; a regex `target_modules` —
  peft resolves it to leaf names before the same rewrite.
"""

from __future__ import annotations

import re

import torch

from .lora_config import INIT_CHOICES, LoraConfig, VeraConfig

EXPERT_PROJS = ("gate_up_proj", "down_proj")
MLP_LEAVES = ("gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PEFT_PREFIX = "base_model.model."
KINDS = {"lora_A": "A", "lora_B": "B", "lora_magnitude_vector": "m", "vera_lambda_d": "d", "vera_lambda_b": "b"}
_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B|lora_magnitude_vector|vera_lambda_d|vera_lambda_b)"
                  r"(?:\.(?!weight$)[^.]+)?(?:\.weight)?")
_SHARED = re.compile(r"base_model\.(vera_[AB])(?:\.[^.]+)?")


def parse_key(key: str) -> tuple[str, str] | None:
    """'base_model.model.X.lora_A[.name].weight' -> ('X', 'A'); VeRA shared 'base_model.vera_A' -> ('', 'vera_A');
    None for a name that is none of these."""
    m = _SHARED.fullmatch(key)
    if m:
        return "", m.group(1)
    m = _KEY.fullmatch(key)
    return (m.group(1), KINDS[m.group(2)]) if m else None


def pack_experts(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (E, r, in), B (E, out, r) -> PEFT's A (E*r, in) (row e*r + k), B (out, r*E) (column k*E + e)."""
    return A.flatten(0, 1).contiguous(), B.permute(1, 2, 0).flatten(1).contiguous()


def unpack_experts(A: torch.Tensor, B: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor]:
    r = A.shape[0] // E
    return A.view(E, r, A.shape[1]), B.view(B.shape[0], r, E).permute(2, 0, 1)


def lora_config_dict(cfg: LoraConfig, target_modules: list[str], target_parameters: list[str],
                     base: str | None, fan_in_fan_out: bool) -> dict:
    d = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": cfg.r, "lora_alpha": cfg.lora_alpha, "use_rslora": cfg.use_rslora,
        # PEFT's parameter wrapper refuses dropout; it acts in training only, so 0 gives the same logits
        "lora_dropout": 0.0 if target_parameters else cfg.lora_dropout,
        "target_modules": target_modules, "bias": "none", "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True,  # what PEFT gives a module it targets beyond ours: B = 0
        "rank_pattern": dict(cfg.rank_pattern), "alpha_pattern": dict(cfg.alpha_pattern), "modules_to_save": None,
        "use_dora": cfg.use_dora, "lora_bias": False, "inference_mode": True,
    }
    if target_parameters:
        d["target_parameters"] = target_parameters
    return d


def vera_config_dict(cfg: VeraConfig, target_modules: list[str], base: str | None, fan_in_fan_out: bool) -> dict:
    return {"peft_type": "VERA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": cfg.r,
            "target_modules": target_modules, "projection_prng_key": cfg.projection_prng_key,
            "save_projection": cfg.save_projection, "vera_dropout": cfg.vera_dropout, "d_initial": cfg.d_initial,
            "fan_in_fan_out": fan_in_fan_out, "bias": "none", "modules_to_save": None, "init_weights": True,
            "inference_mode": True}


def parameter_target(t: str) -> str:
    """A `target_parameters` entry -> our target name: '[mlp.]experts.gate_up_proj' / 'gate_up_proj' ->
    'experts.gate_up_proj'; 'mlp.gate_proj.weight' -> 'mlp.gate_proj'; 'gate.weight' -> 'gate' (the router)."""
    t = t.removesuffix(".weight")
    leaf = t.rsplit(".", 1)[-1]
    return f"experts.{leaf}" if leaf in EXPERT_PROJS else t


def config_from_peft(d: dict, where) -> LoraConfig | VeraConfig:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: adapter_config.json must hold a JSON object")
    kind = d.get("peft_type", "LORA")
    if kind not in ("LORA", "VERA"):
        raise ValueError(f"{where}: peft_type is {kind!r}; only LORA (incl. DoRA) and VERA adapters are supported")
    unsupported = {"lora_bias": False, "bias": "none"}
    for k, ok in unsupported.items():
        if d.get(k, ok) not in (ok, None):
            raise ValueError(f"{where}: {k}={d[k]!r} is not supported (need {ok!r})")
    if d.get("modules_to_save"):
        raise ValueError(f"{where}: modules_to_save={d['modules_to_save']} is not supported")
    targets = d.get("target_modules") or []
    if isinstance(targets, str):
        targets = targets if targets == "all-linear" else [targets]
    try:
        if kind == "VERA":
            return VeraConfig(r=d.get("r", 256), target_modules=targets or "all-linear",
                              projection_prng_key=d.get("projection_prng_key", 0),
                              save_projection=bool(d.get("save_projection", True)),
                              vera_dropout=d.get("vera_dropout", 0.0), d_initial=d.get("d_initial", 0.1))
        params = [parameter_target(t) for t in d.get("target_parameters") or []]
        if params:
            targets = [*([] if isinstance(targets, str) else targets), *params]
        init = d.get("init_lora_weights", True)
        return LoraConfig(r=d.get("r", 8), lora_alpha=d.get("lora_alpha", 8), lora_dropout=d.get("lora_dropout", 0.0),
                          target_modules=targets or "all-linear", use_rslora=bool(d.get("use_rslora", False)),
                          init_lora_weights=init if init in INIT_CHOICES else True,
                          rank_pattern=dict(d.get("rank_pattern") or {}),
                          alpha_pattern=dict(d.get("alpha_pattern") or {}), use_dora=bool(d.get("use_dora", False)))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
