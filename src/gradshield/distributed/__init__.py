"""Data-parallel runs on torch.distributed (launched by torchrun): the process-group context and
BatchNorm over the global batch. See docs/distributed.md."""

from gradshield.distributed.batchnorm import GlobalBatchNorm, global_batchnorm
from gradshield.distributed.context import (
    SINGLE,
    Context,
    all_sum,
    barrier,
    broadcast,
    check_same,
    check_shared_folder,
    current,
    init_from_env,
    launched,
    local_device,
    on_main,
    shutdown,
    sum_over_ranks,
)

__all__ = ["SINGLE", "Context", "GlobalBatchNorm", "all_sum", "barrier", "broadcast", "check_same",
           "check_shared_folder", "current", "global_batchnorm", "init_from_env", "launched",
           "local_device", "on_main", "shutdown", "sum_over_ranks"]
