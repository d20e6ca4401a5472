"""Collectives for data-parallel runs (:mod:`agents.distributed.collectives`), no-ops in one process.

The ground floor of ``agents``: it imports nothing else of it, so the policy, the algorithms' parts
and the training operations can all agree across ranks. The helper that makes a run data-parallel,
:func:`agents.data_parallel`, is a training operation (:mod:`agents.training.distributed`).
"""

from agents.distributed.collectives import (agree_min, all_gather_object, all_reduce_sum, barrier, broadcast_object,
                                            global_mean, is_data_parallel, rank, world_size)

__all__ = ["agree_min", "all_gather_object", "all_reduce_sum", "barrier", "broadcast_object", "global_mean",
           "is_data_parallel", "rank", "world_size"]
