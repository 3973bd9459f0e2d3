"""Data-parallel training with torchrun / DistributedDataParallel, and the same code on one process.

``torchrun --nproc_per_node N -m cropmap.pipeline.cli train ...`` starts N copies of the command
with ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` set; :func:`init_from_env` (called by the CLI
entry point) joins them into a process group (NCCL on CUDA, gloo on CPU). The training loops
then ask :func:`current` where they run:

* each rank sees its own shard of every epoch (:class:`~torch.utils.data.DistributedSampler`,
  ``set_epoch`` every epoch, so shards reshuffle) and its own augmentation seed;
* gradients are averaged by DDP, so weights stay identical on every rank (checked at the end);
* rank 0 alone validates (and broadcasts the result, so early stopping agrees), logs, writes
  checkpoints and the model directory; the others wait at a barrier.

Without torchrun every helper is a no-op and the loops behave exactly as before.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistContext", "env_context", "current", "init_from_env", "shutdown", "rank_device", "shard", "wrap",
           "broadcast_object", "all_gather_cat", "sum_over_ranks", "sync_buffers", "barrier", "check_identical"]


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_context() -> DistContext:
    """Where torchrun says this process is (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``); one process without it."""
    try:
        return DistContext(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        return DistContext()


def current() -> DistContext:
    """The process group this process belongs to (single process when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), env_context().local_rank)
    return DistContext()


def init_from_env(device: str | None = None) -> DistContext:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (NCCL for CUDA, gloo for CPU)."""
    ctx = env_context()
    if not ctx.enabled or dist.is_initialized():
        return current()
    cuda = device in ("cuda", "auto", None) and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(ctx.local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return current()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: str, ctx: DistContext | None = None) -> str:
    """``cuda`` becomes this rank's GPU (``cuda:LOCAL_RANK``) under torchrun."""
    ctx = ctx or current()
    if ctx.enabled and device == "cuda":
        return f"cuda:{ctx.local_rank}"
    return device


def shard(indices: np.ndarray, epoch: int, seed: int, ctx: DistContext | None = None) -> np.ndarray:
    """This rank's share of ``indices`` for ``epoch``, shuffled (all ranks get the same count)."""
    from torch.utils.data import DistributedSampler

    ctx = ctx or current()
    sampler = DistributedSampler(range(len(indices)), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed,
                                 drop_last=False)
    sampler.set_epoch(epoch)
    return np.asarray(indices)[np.fromiter(iter(sampler), dtype=np.int64)]


def wrap(module: nn.Module, device: str, find_unused: bool = False) -> nn.Module:
    """``module`` in DistributedDataParallel (gradients averaged over ranks); ``find_unused`` when some
    trainable parameters take no part in the loss (MoCo: the classifier head of the encoder)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(device).index] if device.startswith("cuda") else None
    # every registered pixel model uses all its trainable parameters in each forward (frozen ones are
    # ignored by DDP), so by default no extra graph traversal for unused parameters
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not current().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """The tensors of every rank concatenated along dim 0 (same shape on every rank)."""
    ctx = current()
    if not ctx.enabled:
        return t
    parts = [torch.empty_like(t) for _ in range(ctx.world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def sum_over_ranks(*values: float) -> tuple[float, ...]:
    if not current().enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return tuple(float(v) for v in t)


def sync_buffers(module: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics). DDP broadcasts them at the
    start of each forward, so after an epoch's last step each rank still holds the statistics of its
    own last batch; syncing at the end of the epoch makes validation, checkpoints and the final
    weights the same on every rank."""
    if not current().enabled:
        return
    for b in module.buffers():
        dist.broadcast(b.data, src=0)


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def weights_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_identical(module: nn.Module) -> bool:
    """True when every rank holds exactly the same weights (always True on one process)."""
    if not current().enabled:
        return True
    digests = [None] * current().world_size
    dist.all_gather_object(digests, weights_digest(module))
    return len(set(digests)) == 1
