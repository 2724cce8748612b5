"""torch.distributed set-up from torchrun's environment, and the few collectives the trainer needs.

What. `init_distributed(device)` reads RANK/WORLD_SIZE/LOCAL_RANK (set by torchrun), starts a process group
(nccl on CUDA, gloo on CPU) and returns a `Dist` with rank/world/local_rank; without those variables it is
a single process and every collective is a no-op. `wrap_model` applies DDP (or FSDP2's `fully_shard`).

Why. One code path for 1 and N processes: the trainer calls `dist.all_reduce_mean(x)` unconditionally.
Rejected: torch.multiprocessing.spawn inside the trainer (torchrun already does it, and scales to nodes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes files and prints."""
        return self.rank == 0

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (no-op for one process)."""
        if self.enabled:
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t

    def all_reduce_mean_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place mean over ranks."""
        if self.enabled:
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
            t /= self.world_size
        return t

    def barrier(self) -> None:
        """Wait for every rank (no-op for one process)."""
        if self.enabled:
            tdist.barrier()


def init_distributed(device: str) -> tuple[Dist, torch.device]:
    """Start the process group when launched by torchrun; returns (Dist, this rank's device)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist(), torch.device(device)
    d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(dev)
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=None)
    return d, dev


def distributed_run(body, cfg):
    """body(cfg, dist, device) between init_distributed(cfg.device) and shutdown_distributed (also on error)."""
    d, device = init_distributed(cfg.device)
    try:
        return body(cfg, d, device)
    finally:
        shutdown_distributed()


def shutdown_distributed() -> None:
    """Destroy the process group if one is running."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def wrap_model(model: nn.Module, d: Dist, device: torch.device, fsdp: bool = False) -> nn.Module:
    """DDP (or FSDP2 fully_shard, in place) for world_size > 1; the model itself otherwise.

    DDP's find_unused_parameters is turned on only when some parameters get no gradient by construction:
    MTP modules while mtp_loss_weight == 0. Routed experts are stacked tensors, so an expert that got no
    tokens still receives a (zero) gradient and needs no special casing.
    """
    if not d.enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        # every block is its own unit: main layers, and MTP modules (which use all their parameters inside
        # their own forward); embedding, final norm and head stay in the root unit
        for block in model.blocks():
            fully_shard(block)
        fully_shard(model)
        return model
    cfg = model.config
    unused = cfg.model_type == "deepseek_v3" and cfg.num_nextn_predict_layers > 0 and cfg.mtp_loss_weight == 0
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused)
