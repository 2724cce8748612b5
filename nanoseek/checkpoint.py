"""Hugging Face model directories in and out: config.json + safetensors (+ index when sharded).

The in-memory state dict already uses HF names; the on-disk form differs in four places only:
  * routed experts: stacked `mlp.experts.gate_up_proj` (E, 2I, H) / `down_proj` (E, H, I) in memory,
    per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight` on disk (what DeepSeek and `transformers` write;
    the fused keys are accepted on load too);
  * MTP module k (`mtp.{k}.*`) is written as layer `model.layers.{L + k}.*`, with copies of the shared
    `embed_tokens.weight` and `shared_head.head.weight`, as DeepSeek-V3's released checkpoint does;
  * GPT-2's four projections are Conv1D on disk (weight transposed: (in, out));
  * a tied lm_head is not written;
  * `save_pretrained(..., fp8=True)` writes DeepSeek-V3's FP8 release format: every projection weight
    (`*_proj.weight`, experts included; not the embedding, lm_head, router gate or norms) as float8_e4m3fn with
    a `*.weight_scale_inv` fp32 tensor of 128x128 block scales (weight ~ fp8 * scale_inv per block, the last
    blocks partial) and `quantization_config` in config.json, as DeepSeek and transformers' FineGrainedFP8
    write it. Loading dequantizes such weights (`dequantize_release`); the model itself is never FP8 on disk
    otherwise.

Writes are atomic: everything goes into a temporary sibling directory that is renamed into place, so a
crash leaves the old checkpoint or the new one, never half of one. Only safetensors are ever read.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .fileio import atomic_directory
from .fp8 import FP8, SCALE_INV, TILE, dequantize_blocks, quantize_blocks
from .model.transformer import CausalLM
from .mup import output_multiplier, scale_queries

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GPT2_IGNORED = re.compile(r"\.attn\.(bias|masked_bias)$")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt")
DEFAULT_SHARD_BYTES = 2 * 1024**3
FP8_QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [TILE, TILE],
                           "activation_scheme": "dynamic"}
FP8_WEIGHT = re.compile(r"_proj(_with_mqa)?\.weight$")  # projections and experts (router is mlp.gate.weight)


# ---------------------------------------------------------------------------------------------- mapping
def input_embedding_keys(cfg: ModelConfig) -> tuple[str, ...]:
    """State-dict keys of the input embeddings: the token table first (also the tied head), then GPT-2's wpe."""
    if cfg.model_type == "gpt2":
        return "transformer.wte.weight", "transformer.wpe.weight"
    return ("model.embed_tokens.weight",)


def to_hf_state_dict(model, sd: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The on-disk (HF) state dict of a nanoseek Model: contiguous tensors sharing no storage.

    `sd`: the in-memory state dict to write instead of `model.state_dict()` (e.g. gathered from FSDP shards).
    Frozen FP8 weights (`finetune --base-fp8`) are written dequantized, in the dtype of the other weights.
    """
    cfg: ModelConfig = model.config
    L = cfg.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    sd = dict(model.state_dict() if sd is None else sd)
    if any(t.dtype == FP8 for t in sd.values()):  # a frozen FP8 base (precision.quantize_base): ordinary weights
        sd = dequantize_release(sd)
    embed_key, *_ = input_embedding_keys(cfg)
    if cfg.tie_word_embeddings:  # a gathered state dict may hold a tied weight under one of its names only
        sd.setdefault(embed_key, sd.get("lm_head.weight"))
        sd.setdefault("lm_head.weight", sd[embed_key])
    if cfg.attention_multiplier != 1.0:  # fold muP's alpha_attn into the queries
        sd = scale_queries(cfg, sd, cfg.attention_multiplier)
    for key, t in sd.items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if key.startswith("mtp."):
            k, rest = key[4:].split(".", 1)
            key = f"model.layers.{L + int(k)}.{rest}"
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix, inter = key[: -len("gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = t[e, :inter].clone()
                out[f"{prefix}{e}.up_proj.weight"] = t[e, inter:].clone()
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e].clone()
        elif cfg.model_type == "gpt2" and key.endswith(GPT2_CONV1D):
            out[key] = t.t().contiguous()
        else:
            out[key] = t.detach().clone().contiguous()
    # fold the multipliers so that the file is a standard model: muP's readout 1/m, the embedding multiplier
    mult, alpha = output_multiplier(cfg), cfg.embedding_multiplier
    if alpha != 1.0:
        for key in input_embedding_keys(cfg):
            out[key] = sd[key] * alpha
    if mult != 1.0 or cfg.folds_tied_readout:  # the readout then has its own weights
        out["lm_head.weight"] = sd["lm_head.weight"] * mult
    for k in range(cfg.num_nextn_predict_layers if cfg.model_type == "deepseek_v3" else 0):
        out[f"model.layers.{L + k}.embed_tokens.weight"] = sd[embed_key] * alpha
        out[f"model.layers.{L + k}.shared_head.head.weight"] = sd["lm_head.weight"] * mult
    return out


def from_hf_state_dict(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an on-disk (HF) state dict to nanoseek's in-memory keys. Raises ValueError on foreign keys."""
    L = cfg.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, t in hf.items():
        if cfg.model_type == "gpt2":
            if GPT2_IGNORED.search(key):
                continue
            out[key] = t.t() if key.endswith(GPT2_CONV1D) else t
            continue
        m = re.match(r"model\.layers\.(\d+)\.(.*)", key)
        if m and int(m.group(1)) >= L:
            k, rest = int(m.group(1)) - L, m.group(2)
            if rest in ("embed_tokens.weight", "shared_head.head.weight"):
                continue  # copies of the shared embedding / head
            key = f"mtp.{k}.{rest}"
        e = re.match(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", key)
        if e:
            experts.setdefault(e.group(1), {}).setdefault(int(e.group(2)), {})[e.group(3)] = t
            continue
        out[key] = t
    for prefix, per_expert in experts.items():
        n = cfg.n_routed_experts
        if sorted(per_expert) != list(range(n)) or any(len(p) != 3 for p in per_expert.values()):
            raise ValueError(f"{prefix}: expected gate/up/down weights for experts 0..{n - 1}, "
                             f"found experts {sorted(per_expert)}")
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([per_expert[i]["gate_proj"], per_expert[i]["up_proj"]], dim=0) for i in range(n)])
        out[f"{prefix}.down_proj"] = torch.stack([per_expert[i]["down_proj"] for i in range(n)])
    embed_key, *_ = input_embedding_keys(cfg)
    alpha = cfg.embedding_multiplier
    if alpha != 1.0:  # unfold the embedding multiplier
        for key in input_embedding_keys(cfg):
            if key in out:
                out[key] = out[key] / alpha
    if cfg.tie_word_embeddings and embed_key in out:
        out["lm_head.weight"] = out[embed_key]
    elif output_multiplier(cfg) != 1.0 and "lm_head.weight" in out:  # unfold muP's readout multiplier
        out["lm_head.weight"] = out["lm_head.weight"] / output_multiplier(cfg)
    if cfg.attention_multiplier != 1.0:  # unfold alpha_attn
        out = scale_queries(cfg, out, 1.0 / cfg.attention_multiplier)
    return out


# ---------------------------------------------------------------------------------------------- FP8 release format
def quantize_release(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """On-disk state dict -> DeepSeek-V3 FP8 release form: each projection weight (out, in) becomes float8_e4m3fn
    (out, in) plus `<key>_scale_inv` (ceil(out/128), ceil(in/128)) fp32, weight ~ fp8 * scale_inv per block."""
    out: dict[str, torch.Tensor] = {}
    for key, t in hf.items():
        if FP8_WEIGHT.search(key) and t.dim() == 2:
            q, s = quantize_blocks(t)
            out[key], out[key + SCALE_INV] = q.contiguous(), s.contiguous()
        else:
            out[key] = t
    return out


def check_quantization_config(path: Path, qc) -> None:
    """Accept only the fine-grained FP8 scheme we can dequantize; name the bad field otherwise."""
    want = FP8_QUANTIZATION_CONFIG
    if not isinstance(qc, dict) or qc.get("quant_method") != want["quant_method"]:
        raise ValueError(f"{path}: quantization_config {qc!r} is not supported (only quant_method 'fp8')")
    for k in ("fmt", "weight_block_size"):
        if k in qc and qc[k] != want[k]:
            raise ValueError(f"{path}: quantization_config.{k}={qc[k]!r} is not supported (need {want[k]!r})")


def dequantize_release(hf: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Inverse of `quantize_release`: every fp8 weight with a `_scale_inv` becomes fp8 * scale_inv per 128x128
    block, in `dtype` (default: the dtype of the file's other floating tensors, as the rest of the model)."""
    if dtype is None:
        others = [t.dtype for k, t in hf.items() if t.is_floating_point() and t.dtype != FP8
                  and not k.endswith(SCALE_INV)]
        dtype = max(set(others), key=others.count) if others else torch.float32
    out: dict[str, torch.Tensor] = {}
    for key, t in hf.items():
        if key.endswith(SCALE_INV):
            if key[: -len(SCALE_INV)] not in hf:
                raise ValueError(f"{key}: scale without its weight")
            continue
        if t.dtype == FP8:
            s = hf.get(key + SCALE_INV)
            blocks = tuple(-(-n // TILE) for n in t.shape[-2:])
            if s is None or tuple(s.shape[-2:]) != blocks:
                raise ValueError(f"{key}: float8 weight {tuple(t.shape)} needs {key + SCALE_INV} of shape {blocks}, "
                                 f"found {None if s is None else tuple(s.shape)}")
            t = dequantize_blocks(t, s.float()).to(dtype)
        out[key] = t
    return out


# ---------------------------------------------------------------------------------------------- files
def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (single file or sharded with an index)."""
    if (path / INDEX).exists():
        try:
            index = json.loads((path / INDEX).read_text())
            files = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ValueError(f"{path / INDEX}: malformed index ({e})") from None
    elif (path / WEIGHTS).exists():
        files = [WEIGHTS]
    else:
        pickles = [f for f in PICKLE_FILES if (path / f).exists()]
        if pickles:
            raise ValueError(f"{path}: found {pickles[0]} but no {WEIGHTS}; nanoseek only loads safetensors "
                             "(pickle files can run code). Convert it with transformers' save_pretrained.")
        raise FileNotFoundError(f"{path}: no {WEIGHTS} or {INDEX}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        f = path / name
        if not f.exists():
            raise FileNotFoundError(f"{path}: shard {name} named in the index is missing")
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for k in sf.keys():
                    tensors[k] = sf.get_tensor(k)
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{f}: not a readable safetensors file ({e})") from None
    return tensors


def _shards(sd: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, cur, size = [], {}, 0
    for k, t in sd.items():
        n = t.numel() * t.element_size()
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = t, size + n
    return shards + [cur]


def write_weights(sd: dict[str, torch.Tensor], path: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    shards = _shards(sd, max_shard_bytes)
    if len(shards) == 1:
        save_file(sd, str(path / WEIGHTS), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


# ---------------------------------------------------------------------------------------------- API
def save_pretrained(model, path: str | Path, dtype: torch.dtype | None = None,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES, tokenizer=None,
                    extra: Callable[[Path], None] | None = None,
                    state_dict: dict[str, torch.Tensor] | None = None, fp8: bool = False) -> Path:
    """Write `model` as a HF model directory. `extra(tmp_dir)` may add files (e.g. trainer state) before
    the directory is renamed into place; `tokenizer` (anything with `.save(dir)`) is saved beside it;
    `state_dict` replaces `model.state_dict()` (a full state dict gathered from FSDP shards); `fp8=True` writes
    the projection weights in DeepSeek-V3's FP8 release format (see the module docstring)."""
    cfg: ModelConfig = model.config
    if fp8 and cfg.model_type != "deepseek_v3":
        raise ValueError(f"fp8=True: the FP8 release format is DeepSeek-V3's; model_type is {cfg.model_type!r}")
    sd = to_hf_state_dict(model, state_dict)
    if dtype is not None:
        sd = {k: (t if k.endswith("e_score_correction_bias") else t.to(dtype)) for k, t in sd.items()}
    if fp8:
        sd = quantize_release(sd)

    def fill(tmp: Path):
        hf = cfg.to_hf_dict()
        hf["dtype"] = str(dtype or next(model.parameters()).dtype).removeprefix("torch.")
        if fp8:
            hf["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        gen = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        write_weights(sd, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(tmp)
        if extra is not None:
            extra(tmp)

    return atomic_directory(path, fill)


def load_pretrained(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None, *,
                    cls: type[CausalLM] = CausalLM) -> CausalLM:
    """Build a `cls` (nanoseek.Model via Model.from_pretrained) from a HF directory written by nanoseek or
    `transformers` (safetensors only)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    cfg = ModelConfig.load(path)
    hf = read_safetensors_dir(path)
    qc = json.loads((path / "config.json").read_text()).get("quantization_config")
    if qc is not None or any(k.endswith(SCALE_INV) for k in hf):
        check_quantization_config(path, qc if qc is not None else FP8_QUANTIZATION_CONFIG)
        hf = dequantize_release(hf)
    sd = from_hf_state_dict(cfg, hf)
    if cfg.model_type == "deepseek_v3" and cfg.num_nextn_predict_layers and not any(k.startswith("mtp.") for k in sd):
        # transformers writes num_mtp_layers=1 by default but saves no MTP weights: load the model without MTP
        warnings.warn(f"{path}: config.json declares {cfg.num_nextn_predict_layers} MTP layer(s) but the "
                      "checkpoint has no MTP weights; loading without MTP", stacklevel=2)
        cfg = cfg.replace(num_nextn_predict_layers=0)
    model = cls(cfg, device="meta")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match config.json: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    for k, t in sd.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise ValueError(f"{path}: {k} has shape {tuple(t.shape)}, config.json implies {tuple(expected[k].shape)}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{path}: {k} contains NaN or infinite values")
    model.load_state_dict(sd, strict=True, assign=True)
    model.tie_weights()
    for moe in model.moe_layers():  # the routing bias is fp32 whatever the file holds
        moe.gate.e_score_correction_bias = moe.gate.e_score_correction_bias.float()
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model
