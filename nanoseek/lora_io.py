"""Adapters on disk: save, read, load and resume PEFT directories (LoRA, DoRA, VeRA), both ways with `peft`.

What. `save_adapter` writes `adapter_config.json` + `adapter_model.safetensors` as peft 0.21 (transformers 5)
loads them on the exported base; `read_adapter` / `load_adapter` read what peft or nanoseek (any version) wrote;
`copy_adapter_weights_` overwrites an adapter in place for `finetune --resume`. The names and the config fields are
in peft_format.py; the adapters themselves in model/linear.py (state, forward) and lora.py (targets, merge).
Why its own module: lora.py adds and merges adapters; this is file handling and validation.
Rejected: writing what peft cannot load and warning about it (the old dense-MLP layout on DeepseekV3): the
defaults now leave out what peft cannot express (lora.resolve_targets) and write the rest in a layout peft reads.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from .fileio import atomic_directory
from .lora import (
    LoraConfig,
    VeraConfig,
    _disk_path,
    _memory_path,
    _owners,
    attach,
    candidates,
    peft_cannot_load,
    target_shapes,
    vera_dims,
)
from .lora_variants import vera_projections
from .model.linear import Linear, LinearAdapters
from .peft_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    EXPERT_PROJS,
    MLP_LEAVES,
    PEFT_PREFIX,
    PICKLE_WEIGHTS,
    config_from_peft,
    lora_config_dict,
    pack_experts,
    parse_key,
    unpack_experts,
    vera_config_dict,
)


# ---------------------------------------------------------------------------------------------- PEFT I/O
def _vera_shared(model, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole shared pair of VeRA adapter `name`, rebuilt from its slices: the layer with the widest input holds
    all of vera_A's columns, the one with the widest output all of vera_B's rows."""
    projs = [m.vera_proj[name] for m, _ in _owners(model, name)]
    return max((p.A for p in projs), key=lambda a: a.shape[1]), max((p.B for p in projs), key=lambda b: b.shape[0])


def adapter_state_dict(model, name: str) -> dict[str, torch.Tensor]:
    """The PEFT-format tensors of adapter `name` (names: peft_format.py)."""
    if name not in model.lora_context.configs:
        raise ValueError(f"unknown adapter {name!r}; this model has {model.adapters}")
    cfg = model.lora_context.configs[name]
    out = {}
    for module, path in _owners(model, name):
        disk = PEFT_PREFIX + _disk_path(model, path)
        if isinstance(module, LinearAdapters):
            if name in module.vera_lambda_d:
                out[f"{disk}.vera_lambda_d"] = module.vera_lambda_d[name].weight.detach().clone().contiguous()
                out[f"{disk}.vera_lambda_b"] = module.vera_lambda_b[name].weight.detach().clone().contiguous()
                continue
            out[f"{disk}.lora_A.weight"] = module.lora_A[name].weight.detach().clone().contiguous()
            out[f"{disk}.lora_B.weight"] = module.lora_B[name].weight.detach().clone().contiguous()
            if name in module.lora_magnitude_vector:
                out[f"{disk}.lora_magnitude_vector"] = module.lora_magnitude_vector[name].weight.detach().clone()
            continue
        projs = list(module.lora_A[name])
        for proj in projs:
            inner = ".base_layer" if proj == "gate_up_proj" and len(projs) == 2 else ""  # PEFT's nesting
            A, B = pack_experts(module.lora_A[name][proj].detach(), module.lora_B[name][proj].detach())
            out[f"{disk}{inner}.lora_A.weight"], out[f"{disk}{inner}.lora_B.weight"] = A, B
    if isinstance(cfg, VeraConfig) and cfg.save_projection:
        A, B = _vera_shared(model, name)
        out["base_model.vera_A"], out["base_model.vera_B"] = A.detach().clone(), B.detach().clone()
    return out


def peft_config_dict(model, name: str, base_model_name_or_path: str | None = None) -> dict:
    """adapter_config.json of adapter `name`. Linear leaves go to target_modules (PEFT matches them by suffix; a
    layer PEFT targets beyond ours gets B = 0 / lambda_b = 0 from its own init, so the logits are the same), except
    on DeepseekV3 the dense-MLP / shared-expert linears and the routers, which go to target_parameters (why:
    peft_format.py); routed experts are target_parameters too."""
    cfg = model.lora_context.configs[name]
    owners = _owners(model, name)
    fan_in_fan_out = model.config.model_type == "gpt2"
    if isinstance(cfg, VeraConfig):  # the shared pair's size depends on the set peft selects: make it ours exactly
        paths = sorted(p for _, p in owners)
        leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
        peft_set = {p for p, (m, proj) in candidates(model).items() if isinstance(m, Linear) and
                    not p.startswith("mtp.") and p.rsplit(".", 1)[-1] in leaves}
        targets = leaves if peft_set == set(paths) else [_disk_path(model, p) for p in paths]
        return vera_config_dict(cfg, targets, base_model_name_or_path, fan_in_fan_out)
    dsv3 = model.config.model_type == "deepseek_v3"
    modules, params = set(), set()
    for m, p in owners:
        leaf = p.rsplit(".", 1)[-1]
        if not isinstance(m, LinearAdapters):
            params |= {f"experts.{proj}" for proj in m.lora_A[name]}
        elif not isinstance(m, Linear):
            params.add("gate.weight")  # the router (peft's own name for it)
        elif dsv3 and leaf in MLP_LEAVES:
            params.add(f"{p.rsplit('.', 2)[-2]}.{leaf}.weight")  # mlp.gate_proj.weight, shared_experts.up_proj.weight
        else:
            modules.add(leaf)
    return lora_config_dict(cfg, sorted(modules), sorted(params), base_model_name_or_path, fan_in_fan_out)


def write_adapter(model, name: str, directory: Path, base_model_name_or_path: str | None = None,
                  tensors: dict[str, torch.Tensor] | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors of adapter `name` into an existing `directory`; `tensors`:
    its PEFT tensors when the caller gathered them (expert parallelism), else the model's own."""
    config = peft_config_dict(model, name, base_model_name_or_path)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    tensors = adapter_state_dict(model, name) if tensors is None else tensors
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def save_adapter(model, path, name: str, base_model_name_or_path: str | None = None) -> Path:
    """Write adapter `name` as a PEFT directory (LoRA/DoRA or VeRA), atomically (temp dir + rename)."""
    config = peft_config_dict(model, name, base_model_name_or_path)
    cfg = model.lora_context.configs[name]
    lost = sorted({p for _, p in _owners(model, name) if peft_cannot_load(model, p, cfg)})
    if lost:
        warnings.warn(f"adapter {name!r}: peft 0.21 cannot load this adapter: DoRA on the DeepseekV3 dense-MLP / "
                      f"shared-expert linears ({lost[0]}, ... {len(lost)} in all) is refused by peft (it rewrites "
                      "gate_proj/up_proj/down_proj targets to the routed experts); nanoseek loads it", stacklevel=3)
    if config.get("target_parameters") and cfg.lora_dropout:
        warnings.warn(f"adapter {name!r}: lora_dropout is written as 0 (peft's parameter wrapper, used for the "
                      f"{config['target_parameters']} targets, refuses dropout; it does not change the logits)",
                      stacklevel=3)
    return atomic_directory(path, lambda tmp: write_adapter(model, name, tmp, base_model_name_or_path))


def _read_tensors(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor], Path]:
    """adapter_model.safetensors -> ({on-disk module path: {kind: tensor}}, {shared name: tensor}, file)."""
    from safetensors import safe_open

    wfile = path / ADAPTER_WEIGHTS
    if not wfile.is_file():
        pickles = [f for f in PICKLE_WEIGHTS if (path / f).exists()]
        if pickles:
            raise ValueError(f"{path}: found {pickles[0]} but no {ADAPTER_WEIGHTS}; nanoseek only loads safetensors "
                             "(pickle files can run code). Re-save it with peft's save_pretrained.")
        raise ValueError(f"{path}: no {ADAPTER_WEIGHTS}")
    try:
        with safe_open(str(wfile), framework="pt", device="cpu") as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{wfile}: not a readable safetensors file ({e})") from None
    groups: dict[str, dict[str, torch.Tensor]] = {}
    shared: dict[str, torch.Tensor] = {}
    for key, t in raw.items():
        parsed = parse_key(key)
        if parsed is None:
            raise ValueError(f"{wfile}: unexpected tensor {key!r} (only LoRA, DoRA and VeRA tensors are supported)")
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise ValueError(f"{wfile}: {key} contains NaN or infinite values" if t.is_floating_point()
                             else f"{wfile}: {key} is not a floating-point tensor")
        disk, kind = parsed
        want = 2 if kind in ("A", "B", "vera_A", "vera_B") else 1
        if t.dim() != want:
            raise ValueError(f"{wfile}: {key} has shape {tuple(t.shape)}; it must be {want}-D")
        if disk:
            groups.setdefault(disk, {})[kind] = t
        else:
            shared[kind] = t
    if not groups:
        raise ValueError(f"{wfile}: no adapter tensors")
    return groups, shared, wfile


def _expert_target(model, cands, mem: str, disk: str, A, B, wfile):
    """Stacked experts: which projection (by (in, out) shape), and the (E, r, in), (E, out, r) factors."""
    module = cands[f"{mem}.gate_up_proj"][0]
    E = module.gate_up_proj.shape[0]
    shapes = {p: (getattr(module, p).shape[2], getattr(module, p).shape[1]) for p in EXPERT_PROJS}
    proj = [p for p, (i, o) in shapes.items() if (A.shape[1], B.shape[0]) == (i, o)]
    if not proj or A.shape[0] % E or A.shape[0] != B.shape[1]:
        raise ValueError(f"{wfile}: {disk} expert factors A {tuple(A.shape)}, B {tuple(B.shape)} fit neither "
                         f"gate_up_proj nor down_proj of {E} experts {shapes} (in, out)")
    return f"{mem}.{proj[0]}", *unpack_experts(A, B, E)


def read_adapter(model, path):
    """Parse and validate a PEFT adapter directory against `model`; returns (config, {in-memory path: tensors},
    VeRA's shared pair or None)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory {path} does not exist")
    if not (path / ADAPTER_CONFIG).is_file():
        raise ValueError(f"{path}: no {ADAPTER_CONFIG}; not a PEFT adapter directory")
    try:
        cfg = config_from_peft(json.loads((path / ADAPTER_CONFIG).read_text()), path / ADAPTER_CONFIG)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / ADAPTER_CONFIG}: not valid JSON ({e})") from None
    groups, shared, wfile = _read_tensors(path)
    vera = isinstance(cfg, VeraConfig)
    need = {"d", "b"} if vera else ({"A", "B", "m"} if cfg.use_dora else {"A", "B"})
    cands = candidates(model)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for disk, f in sorted(groups.items()):
        if set(f) != need:
            kind = type(cfg).__name__ + (" (use_dora)" if not vera and cfg.use_dora else "")
            raise ValueError(f"{wfile}: {disk} has {sorted(f)} (missing {sorted(need - set(f))}), a {kind} adapter "
                             f"needs {sorted(need)}")
        mem = _memory_path(model, disk.removesuffix(".base_layer"))
        if mem in cands and cands[mem][1] is None:
            target = mem
        elif f"{mem}.gate_up_proj" in cands and not vera:
            target, f["A"], f["B"] = _expert_target(model, cands, mem, disk, f["A"], f["B"], wfile)
        else:
            raise ValueError(f"{wfile}: {disk} is not a LoRA-capable layer of this {model.config.model_type} model")
        if target in factors:
            raise ValueError(f"{wfile}: {disk} gives a second adapter for {target}")
        if not vera:
            r_want = cfg.rank_for(_disk_path(model, target))
            if f["A"].shape[-2] != r_want:
                raise ValueError(f"{wfile}: {disk} has rank {f['A'].shape[-2]}, adapter_config.json says r={r_want}")
            sa, sb = target_shapes(*cands[target], r_want)
            if tuple(f["A"].shape) != sa or tuple(f["B"].shape) != sb:
                raise ValueError(f"{wfile}: {disk} needs lora_A {sa} and lora_B {sb}, got {tuple(f['A'].shape)}, "
                                 f"{tuple(f['B'].shape)}")
        factors[target] = {k: v.contiguous() for k, v in f.items()}
    pair = None
    if vera:
        pair = (shared["vera_A"], shared["vera_B"]) if {"vera_A", "vera_B"} <= set(shared) else \
            vera_projections(cfg.projection_prng_key, cfg.r, *vera_dims(model, list(factors)))
    return cfg, factors, pair


def load_adapter(model, path, name: str) -> LoraConfig | VeraConfig:
    """Load a PEFT LoRA / DoRA / VeRA directory as adapter `name`; nothing changes unless everything is valid."""
    cfg, factors, shared = read_adapter(model, path)
    attach(model, name, cfg, factors, shared)
    return cfg


def _held(model, name: str) -> dict[str, dict[str, torch.Tensor]]:
    """{in-memory target path: {kind: Parameter}} of adapter `name` (the tensors a PEFT directory holds)."""
    have = {}
    for module, p in _owners(model, name):
        if isinstance(module, LinearAdapters):
            kinds = {"A": module.lora_A, "B": module.lora_B, "m": module.lora_magnitude_vector,
                     "d": module.vera_lambda_d, "b": module.vera_lambda_b}
            have[p] = {k: d[name].weight for k, d in kinds.items() if name in d}
        else:
            for proj in module.lora_A[name]:
                have[f"{p}.{proj}"] = {"A": module.lora_A[name][proj], "B": module.lora_B[name][proj]}
    return have


@torch.no_grad()
def copy_adapter_weights_(model, name: str, path) -> None:
    """Overwrite the tensors of existing adapter `name` in place from a PEFT directory (resume: the optimizer
    keeps pointing at the same Parameters). The directory must hold exactly that adapter's targets."""
    _, factors, _ = read_adapter(model, path)
    have = _held(model, name)
    if set(have) != set(factors):
        raise ValueError(f"{path}: targets differ from adapter {name!r}: missing {sorted(set(have) - set(factors))[:4]}"
                         f", extra {sorted(set(factors) - set(have))[:4]}")
    for p, f in factors.items():
        if set(f) != set(have[p]) or any(have[p][k].shape != t.shape for k, t in f.items()):
            raise ValueError(f"{path}: {p} holds {[(k, tuple(t.shape)) for k, t in f.items()]}, adapter {name!r} "
                             f"{[(k, tuple(t.shape)) for k, t in have[p].items()]}")
        for k, t in f.items():
            have[p][k].copy_(t)
    model.lora_context.changed()
