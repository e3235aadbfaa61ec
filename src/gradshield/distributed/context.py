"""The process group of a data-parallel run: joining it, finding it, and the few collectives
gradshield needs (run on rank 0 and share the outcome, sum numbers, check ranks agree).

gradshield never starts processes: ``torchrun`` (or Slurm's ``srun`` running torchrun) starts one
process per device and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; the command line then joins the group with :func:`init_from_env` (NCCL for CUDA
devices, gloo on CPUs) and the library finds it with :func:`current`. Without those variables
:func:`launched` is False, no group exists and every function here is the one-process identity.
"""

from __future__ import annotations

import datetime
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from gradshield.errors import GradshieldError

T = TypeVar("T")
#: Seconds a collective may wait for the other ranks (rank 0 alone writes the merged results file,
#: its diagnostics and reports while the others wait). Override with this environment variable.
TIMEOUT_ENV = "GRADSHIELD_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 3600


@dataclass(frozen=True)
class Context:
    """Where this process stands: its ``rank`` among ``world_size`` processes, ``local_rank`` on
    its node (the CUDA device it drives). One process: rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0


SINGLE = Context()


def launched(environ: dict | None = None) -> bool:
    """Whether this process was started by torchrun (``RANK`` and ``WORLD_SIZE`` are set)."""
    environ = os.environ if environ is None else environ
    return "RANK" in environ and "WORLD_SIZE" in environ


def current() -> Context:
    """The context of the initialised default process group, else :data:`SINGLE`."""
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return SINGLE


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw.strip() else float(DEFAULT_TIMEOUT_S)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise GradshieldError(f"${TIMEOUT_ENV} must be a number of seconds > 0, got {raw!r}")
    return value


def local_device(device: str | torch.device, context: Context | None = None) -> torch.device:
    """``device`` for this process: a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` in a distributed run
    (one GPU per process); an explicit index or a CPU is kept."""
    device = torch.device(device)
    context = current() if context is None else context
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GradshieldError("--device cuda but torch sees no CUDA GPU; use --device cpu")
        if device.index is None and context.distributed:
            return torch.device("cuda", context.local_rank)
    return device


def init_from_env(device: str | torch.device = "cpu") -> Context:
    """Join the process group torchrun described in the environment: NCCL when ``device`` is CUDA
    (this process drives GPU ``LOCAL_RANK``), gloo otherwise. Returns the :class:`Context`."""
    if not launched():
        raise GradshieldError("not started by torchrun (RANK/WORLD_SIZE unset); run "
                              "`torchrun --nproc-per-node=N -m gradshield ...`")
    if not dist.is_available():
        raise GradshieldError("this torch build has no torch.distributed; install a standard torch")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(device)
    kwargs = {}
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GradshieldError("--device cuda but torch sees no CUDA GPU; use --device cpu")
        if local >= torch.cuda.device_count():
            raise GradshieldError(f"process LOCAL_RANK={local} but this node has "
                                  f"{torch.cuda.device_count()} GPU(s); start at most one process "
                                  "per GPU (torchrun --nproc-per-node)")
        torch.cuda.set_device(local)
        backend, kwargs["device_id"] = "nccl", torch.device("cuda", local)
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s()), **kwargs)
    return current()


def shutdown() -> None:
    """Leave the process group (after the last collective)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _tensor_device() -> torch.device:
    """Where collective tensors live: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier(context: Context) -> None:
    if context.distributed:
        dist.barrier()


def broadcast(value: T, context: Context) -> T:
    """Rank 0's ``value`` on every rank (plain data and tensors, sent between gradshield's own
    processes; nothing read from a user's file is unpickled here)."""
    if not context.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T], context: Context) -> T:
    """``fn()`` run on rank 0 only, its result sent to every rank; a :class:`GradshieldError` it
    raises is raised on every rank (so no rank is left waiting in a collective)."""
    if not context.distributed:
        return fn()
    outcome: tuple[bool, object] = (True, None)
    if context.main:
        try:
            outcome = (True, fn())
        except GradshieldError as err:
            outcome = (False, str(err))
    ok, value = broadcast(outcome, context)
    if not ok:
        raise GradshieldError(value)
    return value  # type: ignore[return-value]


def all_sum(values: list[float], context: Context) -> list[float]:
    """The sums over ranks of ``values`` (float64)."""
    if not context.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_tensor_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks of the default group (a new tensor; not differentiable)."""
    out = t.detach().to(_tensor_device(), copy=True)
    dist.all_reduce(out)
    return out.to(t.device)


def check_same(value, what: str, context: Context) -> None:
    """Raise on every rank unless every rank holds the same ``value`` (plain data) as rank 0."""
    if not context.distributed:
        return
    values: list = [None] * context.world_size
    dist.all_gather_object(values, value)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise GradshieldError(
            f"the processes disagree on {what}: rank(s) {differ} differ from rank 0. Every rank "
            "must run the same command on the same data and files (same options, same files on "
            "a filesystem all nodes see)")


def check_shared_folder(folder, context: Context, what: str = "the output folder") -> None:
    """Raise on every rank unless every rank sees the files rank 0 writes in ``folder`` (a
    filesystem shared by all nodes, as rank 0 merges or writes what the others read)."""
    if not context.distributed:
        return
    folder = Path(folder)
    token = broadcast(secrets.token_hex(8), context)
    marker = folder / f".gradshield-shared-{token}"
    if context.main:
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(token)
    barrier(context)
    try:
        seen = marker.read_text() == token
    except OSError:
        seen = False
    (missing,) = all_sum([0.0 if seen else 1.0], context)
    if context.main:
        marker.unlink(missing_ok=True)
    if missing:
        raise GradshieldError(
            f"{int(missing)} process(es) cannot see {what} {folder} that rank 0 writes; put it on a "
            "filesystem every node mounts (the same path on every node)")
