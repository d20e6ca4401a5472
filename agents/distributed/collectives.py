"""The few ``torch.distributed`` collectives the learning side needs, as no-ops outside data-parallel runs.

Every function here works in a single process exactly as if the world held one rank: it returns
its input (or a one-element list), so the modules that call them (the episode buffers, the KL
callback, evaluation, resume) have one code path. In a data-parallel run (a process group of world
size > 1, e.g. under ``torchrun`` after :func:`agents.data_parallel`) they are collectives: **every
rank must call them the same number of times, in the same order**, or the run waits until the
process group's timeout and fails.

Values travel as float64 CPU tensors (``gloo``) or on the rank's GPU (``nccl``), so sums of
float64 statistics are exact to float64 rounding. This module imports nothing else of ``agents``:
it is the floor the others stand on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch as th
import torch.distributed as dist


def is_data_parallel() -> bool:
    """Whether this process is one rank of an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the default process group; ``0`` outside one."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks in the default process group; ``1`` outside one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _device() -> th.device:
    # NCCL moves only CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return th.device("cuda", th.cuda.current_device())
    return th.device("cpu")


def all_reduce_sum(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Element-wise sum of ``values`` over all ranks.

    :param values: the same number of floats on every rank.
    :return: ``float64`` array of the sums (``values`` as float64 outside a data-parallel run).
    """
    array = np.asarray(values, dtype=np.float64)
    if not is_data_parallel():
        return array
    tensor = th.as_tensor(array, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().numpy()


def global_mean(total: float, count: float) -> tuple[float, float]:
    """Mean over all ranks of a quantity each rank holds as ``(sum, count)``.

    :return: ``(mean, global count)``; the mean is ``nan`` when the global count is 0.
    """
    total, count = all_reduce_sum([total, count])
    return (float(total / count) if count else float("nan")), float(count)


def agree_min(value: int) -> int:
    """The smallest of ``value`` over all ranks (e.g. how many minibatches every rank can make)."""
    if not is_data_parallel():
        return int(value)
    tensor = th.tensor([int(value)], dtype=th.int64, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` outside a data-parallel run."""
    if not is_data_parallel():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable); ``obj`` outside a data-parallel run."""
    if not is_data_parallel():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait until every rank gets here (a no-op outside a data-parallel run)."""
    if is_data_parallel():
        dist.barrier()
