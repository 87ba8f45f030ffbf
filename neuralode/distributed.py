r"""Data parallelism for ODE-Nets and CNFs: the small pieces :func:`neuralode.fit` needs under ``torchrun``.

Under ``torchrun --nproc_per_node=N`` every process (a *rank*) holds a replica of the model and a
shard of every batch. Each replica's adaptive solver takes its own number of steps on its shard;
the gradients meet once per batch, in DistributedDataParallel's all-reduce during ``backward``,
which averages them:

.. math::

    g = \frac{1}{N} \sum_{r=1}^{N} \nabla_\theta L_r ,

exactly the gradient of the mean loss over the union of the shards when the shards have equal
sizes. That holds for backpropagation through the solver and for the adjoint alike: the adjoint's
custom autograd function hands its parameter gradients to autograd, whose accumulation hooks are
what DDP listens to. The price of adaptivity is waiting: every rank waits in the all-reduce for the
slowest replica, the one whose solver needed the most evaluations.

Everything here is a no-op in a single process, so the same code runs with and without ``torchrun``.
"""

from __future__ import annotations

import os
from typing import Iterable, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

__all__ = ["is_distributed", "rank", "world_size", "is_main_process", "init_from_environment",
           "shard_loader", "wrap_model", "unwrap_model", "all_reduce_sum", "all_gather_ints", "barrier"]


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 outside a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0: the one that prints, shows progress bars and writes checkpoints."""
    return rank() == 0


def init_from_environment(backend: Optional[str] = None) -> bool:
    """Join the process group ``torchrun`` describes in the environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``); returns whether it did.

    The backend defaults to ``nccl`` when CUDA is available and ``gloo`` otherwise; each rank then
    uses the GPU ``LOCAL_RANK``. Outside ``torchrun`` (no ``WORLD_SIZE``) it does nothing.
    """
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2 or dist.is_initialized():
        return dist.is_initialized()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def shard_loader(dataset: Dataset, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True, **loader_kwargs) -> DataLoader:
    """A ``DataLoader`` over this rank's shard of ``dataset``.

    ``batch_size`` is per rank (the global batch is ``batch_size * world_size()``). The shards come
    from a :class:`~torch.utils.data.distributed.DistributedSampler` seeded with ``seed``;
    :func:`neuralode.fit` calls its ``set_epoch`` so every epoch is reshuffled, identically on every
    rank. In a single process this is an ordinary loader with a seeded generator.
    ``drop_last`` (default) keeps every rank's batches the same size, so the averaged gradient is
    the gradient of the global mean loss.
    """
    if is_distributed():
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **loader_kwargs)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      generator=torch.Generator().manual_seed(seed) if shuffle else None, **loader_kwargs)


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when distributed (unchanged otherwise).

    The parameters are broadcast from rank 0 at wrapping, so all replicas start equal.
    """
    if not is_distributed() or isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (what checkpoints store, so they load anywhere)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(values: Iterable[float], device: torch.device) -> List[float]:
    """Sum each number over the ranks (returned unchanged in a single process)."""
    values = list(values)
    if not is_distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather_ints(value: int, device: torch.device) -> List[int]:
    """Every rank's ``value``, in rank order (``[value]`` in a single process)."""
    if not is_distributed():
        return [int(value)]
    mine = torch.tensor([int(value)], dtype=torch.int64, device=device)
    gathered = [torch.zeros_like(mine) for _ in range(world_size())]
    dist.all_gather(gathered, mine)
    return [int(t.item()) for t in gathered]


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()
