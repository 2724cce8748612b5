"""Expert parallelism, training side: the 2-D (data, expert) mesh, gradient averaging, checkpoint gather/scatter.

What. `pretrain --expert-parallel N` under torchrun with W ranks builds a DeviceMesh of shape (W/N, N) named
("dp", "ep"): rank = dp * N + ep. The N ranks of one "ep" row share the routed experts (rank ep holds
E/N of them, model/expert_parallel.py dispatches tokens between them); the W/N ranks of one "dp" column hold
the same experts. Every rank still reads its own micro-batch (W ranks x batch B = 1 process x W*B).
`ExpertParallel` wraps the model like DDP does and, after the step's backward passes:
  * replicated parameters (attention, dense MLPs, shared experts, router, MTP, embeddings): gradient
    all-reduced over all W ranks and divided by W (what DDP does);
  * routed experts: each rank's gradient already holds the contributions of every token of its expert
    group (they came back through the all-to-all's backward); it is summed over the "dp" column and divided
    by W, not by the column size: the trainer scales each rank's loss by W / (global target tokens) so that
    DDP's mean over W ranks gives the global token mean; an expert sees N ranks' tokens in one backward,
    so sum over W/N replicas / W = the same global token mean as one process.
The gradient norm for clipping is the global one: sum of squares of the replicated gradients (equal on every
rank) plus the all-reduced sum over the expert group of the expert shards'.
Checkpoints are ordinary HF directories: `full_state` all-gathers expert weights and their AdamW moments over
the expert group (the optimizer state dict then has exactly the 1-process layout); `shard_state` slices a full
checkpoint for this rank, so a run saved with N ranks resumes with M (or with one process, or DDP).
LoRA on routed experts: the per-expert factors are expert parameters here (sharded, reduced over "dp" only);
`full_adapter_state` writes the one-process PEFT tensors and optimizer state, `load_adapter_weights_` resumes
from such a directory (gathered / sliced through model/expert_parallel.full_adapter_view).

Why. DDP-equivalent arithmetic with explicit collectives keeps the scaling visible in one place. The full model
is initialised on every rank from the same seed, then sliced: the same weights as one process, bit for bit.
Rejected: DDP with the experts ignored plus a second reducer (two gradient paths, no_sync interplay); FSDP2
over the data dimension (not built: `--fsdp` with `--expert-parallel` is refused); meta-device init of the
local shard only (cheaper memory for experts that do not fit one device, but different init draws than one
process; not built).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from .. import lora_io
from ..model.expert_parallel import ExpertGroup, check_divisible, full_adapter_view, shard_experts
from ..model.moe import Experts
from .distributed import Dist


def check_mesh(world_size: int, n: int, n_experts: int) -> None:
    """ValueError unless W ranks form a (W/n, n) mesh and n divides the routed experts."""
    if n < 1:
        raise ValueError(f"--expert-parallel {n}: must be >= 1")
    if world_size % n:
        raise ValueError(f"--expert-parallel {n} does not fit {world_size} process(es): the world size must be a "
                         f"multiple of {n} (launch with torchrun --nproc-per-node {n}, or a multiple of it)")
    check_divisible(n_experts, n)


class ExpertParallel(nn.Module):
    """The model with its routed experts sharded over the "ep" mesh dimension; DDP's role for the rest."""

    def __init__(self, module: nn.Module, d: Dist, n: int, device: torch.device, model: nn.Module | None = None):
        """module: what forward runs; model: the nanoseek Model inside it (default: module itself)."""
        super().__init__()
        model = module if model is None else model
        check_mesh(d.world_size, n, model.config.n_routed_experts)
        self.module, self.world = module, d.world_size
        self.model = model
        self.mesh = init_device_mesh(device.type, (d.world_size // n, n), mesh_dim_names=("dp", "ep"))
        self.ep = ExpertGroup(n, self.mesh.get_local_rank("ep"), self.mesh.get_group("ep"))
        self.dp_group = self.mesh.get_group("dp")
        shard_experts(model, self.ep)

    @property
    def expert_names(self) -> set[str]:
        """Names of the sharded parameters: routed-expert weights and their LoRA factors (adapters may come later)."""
        return {f"{name}.{p}" for name, m in self.model.named_modules() if isinstance(m, Experts)
                for p, _ in m.named_parameters()}

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def no_sync(self):
        """Gradients are reduced once per step by `reduce_and_clip_` anyway."""
        return contextlib.nullcontext()

    def _split(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(replicated, expert) trainable parameters, tied weights once."""
        seen, rep, exp, experts = set(), [], [], self.expert_names
        for name, p in self.model.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                (exp if name in experts else rep).append(p)
        return rep, exp

    def reduce_and_clip_(self, max_norm: float) -> torch.Tensor:
        """Average the step's gradients (see the module docstring), clip to the global norm; returns it."""
        rep, exp = self._split()
        for params, group in ((rep, None), (exp, self.dp_group)):  # None: all W ranks
            if not params:
                continue
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            tdist.all_reduce(flat, group=group)
            flat /= self.world
            for p, g in zip(params, flat.split([q.numel() for q in params])):
                p.grad = g.view_as(p)  # views of the reduced buffer (as DDP's gradient_as_bucket_view)
        zero = torch.zeros((), dtype=torch.float32, device=next(self.model.parameters()).device)
        rep_sq = sum((p.grad.float().pow(2).sum() for p in rep), zero)  # equal on every rank
        exp_sq = sum((p.grad.float().pow(2).sum() for p in exp), zero)  # this rank's shard
        tdist.all_reduce(exp_sq, group=self.ep.group)
        norm = (rep_sq + exp_sq).sqrt()
        if max_norm > 0:
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for p in rep + exp:
                p.grad.mul_(coef.to(p.grad.dtype))
        return norm

    # ------------------------------------------------------------------ checkpoints
    def _expert_slots(self, optimizer) -> dict[int, str]:
        """Optimizer state index -> parameter name, for the expert parameters."""
        experts = self.expert_names
        names = {id(p): n for n, p in self.model.named_parameters() if n in experts}
        order = [p for g in optimizer.param_groups for p in g["params"]]
        return {i: names[id(p)] for i, p in enumerate(order) if id(p) in names}

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        return self.ep.gather(t).cpu()

    def full_state(self, optimizer) -> tuple[dict, dict]:
        """(model state dict, optimizer state dict) with every expert gathered: the 1-process layout, on CPU.
        Every rank must call it (it all-gathers over the expert group)."""
        experts = self.expert_names
        sd = {k: (self._gather(v) if k in experts else v.detach().cpu()) for k, v in self.model.state_dict().items()}
        return sd, self._full_optimizer_state(optimizer)

    def _full_optimizer_state(self, optimizer) -> dict:
        osd = optimizer.state_dict()
        for i in self._expert_slots(optimizer):
            osd["state"][i] = {k: (self._gather(v) if torch.is_tensor(v) and v.dim() else v)
                               for k, v in osd["state"][i].items()}
        return osd

    def full_adapter_state(self, name: str, optimizer) -> tuple[dict, dict]:
        """(PEFT tensors of adapter `name`, optimizer state dict), expert factors gathered: what one process
        would save. Every rank must call it."""
        with self.adapter_view():
            tensors = {k: v.cpu() for k, v in lora_io.adapter_state_dict(self.model, name).items()}
        return tensors, self._full_optimizer_state(optimizer)

    def adapter_view(self):
        """A `with` in which the expert factors hold all E experts (model/expert_parallel.full_adapter_view)."""
        return full_adapter_view(self.model)

    def load_adapter_weights_(self, name: str, path) -> None:
        """Resume: overwrite adapter `name` in place from a one-process PEFT directory (expert factors sliced)."""
        with self.adapter_view():
            lora_io.copy_adapter_weights_(self.model, name, path)

    def shard_state(self, sd: dict, osd: dict, optimizer) -> tuple[dict, dict]:
        """This rank's slices of a full (model, optimizer) state, as `full_state` or one process wrote it.
        `optimizer` is this run's (its groups list the parameters in the order the saved indices follow)."""
        lo, hi = self.ep.local_experts(self.model.config.n_routed_experts)
        experts = self.expert_names
        sd = {k: (v[lo:hi] if k in experts else v) for k, v in sd.items()}
        for i in self._expert_slots(optimizer):
            if i in osd["state"]:
                osd["state"][i] = {k: (v[lo:hi] if torch.is_tensor(v) and v.dim() else v)
                                   for k, v in osd["state"][i].items()}
        return sd, osd
