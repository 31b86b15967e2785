"""Several processes: the process group of a launcher (`torchrun`, `accelerate launch`) as the stages see it.

A process started by a launcher finds RANK / WORLD_SIZE / LOCAL_RANK in its environment; `init()` joins the
group once (gloo on CPU, nccl on CUDA; transformers' Trainer and accelerate then reuse it). Every helper here
also works in a plain single process, as rank 0 of 1, where the collectives do nothing; so the stages are
written once. Collectives must be called by every rank in the same order: the stages call them only on
paths that every rank takes.

What is split: `share(n)` gives this rank a contiguous part of n work items (measure's calibration
batches, a sweep's points, evaluation batches); `all_reduce_sum` adds tensors of every rank in place
(float64 sums stay float64); `gather` brings Python objects to rank 0. Only rank 0 writes stage folders
(`run.artifacts.stage_folder` uses `is_main` and `barrier`).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

T = TypeVar("T")

TIMEOUT_ENV = "GRAVITY_SPARSE_DIST_TIMEOUT"  # seconds a rank waits in a collective (default 2 h)
_GROUP_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
_alone = False  # inside `alone()`: this process works by itself


def launched() -> bool:
    """True in a process that a launcher started as one of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _group() -> bool:
    return not _alone and torch.distributed.is_available() and torch.distributed.is_initialized()


def init() -> None:
    """Join the launcher's process group (a no-op in a single process or when already joined).

    The backend is gloo for CPU tensors plus nccl for CUDA tensors when CUDA is available (so a model
    kept on the CPU of a GPU node still reduces), gloo alone otherwise; the timeout
    of every collective is `GRAVITY_SPARSE_DIST_TIMEOUT` seconds (default 7200), long enough for rank 0 to
    run a stage that is not data-parallel while the others wait at a barrier.
    """
    if not launched() or _group():
        return
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "7200")))
    cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in (
        "1",
        "true",
        "yes",
    )
    if cuda:
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    torch.distributed.init_process_group(backend=backend, timeout=timeout)


def rank() -> int:
    return torch.distributed.get_rank() if _group() else int(os.environ.get("RANK", "0"))


def is_alone() -> bool:
    """True inside `alone()`."""
    return _alone


@contextmanager
def alone() -> Iterator[None]:
    """This rank works by itself inside the block (a sweep's point), while the group stays up.

    transformers' Trainer and accelerate decide from the environment whether they are one process of
    several; inside the block they see one process (RANK 0 of WORLD_SIZE 1, no LOCAL_RANK), so a Trainer
    built here trains this rank's model alone instead of joining the others in DDP, and the collectives
    of this module do nothing. The environment and accelerate's state are restored after.
    """
    global _alone
    from accelerate.state import AcceleratorState

    saved = {key: os.environ.get(key) for key in _GROUP_ENV}
    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.pop("LOCAL_RANK", None)
    _alone = True
    try:
        yield
    finally:
        _alone = False
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        AcceleratorState._reset_state(reset_partial_state=True)
        if device is not None:
            torch.cuda.set_device(device)


def world_size() -> int:
    return (
        torch.distributed.get_world_size() if _group() else int(os.environ.get("WORLD_SIZE", "1"))
    )


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes stage folders and prints results."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """A CUDA device without an index, in a launched process: this process's own GPU (LOCAL_RANK)."""
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", local_rank() % max(1, torch.cuda.device_count()))
    return device


def _comm_device(tensor: torch.Tensor | None = None) -> torch.device:
    """Where a collective runs: the tensor's own device when the group's backend serves it, else the
    device it does serve (objects go through the CPU unless the group is NCCL only)."""
    backend = torch.distributed.get_backend() if _group() else "gloo"
    serves_cpu = backend != "nccl"
    serves_cuda = "nccl" in backend
    if tensor is not None and (tensor.device.type == "cpu" and serves_cpu):
        return tensor.device
    if tensor is not None and tensor.device.type == "cuda" and serves_cuda:
        return tensor.device
    if serves_cpu:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def barrier() -> None:
    """Wait for every rank (nothing in a single process)."""
    if _group() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def share(n: int, part: int | None = None, parts: int | None = None) -> range:
    """This rank's contiguous share of n items: rank r of W gets [r·n // W, (r+1)·n // W)."""
    part = rank() if part is None else part
    parts = world_size() if parts is None else parts
    return range(part * n // parts, (part + 1) * n // parts)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks, in place (its dtype kept: float64 sums are added in float64)."""
    if not _group() or torch.distributed.get_world_size() == 1:
        return tensor
    comm = _comm_device(tensor)
    buf = tensor if tensor.device == comm else tensor.to(comm)
    torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def sum_float(value: float) -> float:
    """A Python float summed over all ranks, in float64."""
    return float(all_reduce_sum(torch.tensor([value], dtype=torch.float64))[0])


def broadcast(obj: T, src: int = 0) -> T:
    """Rank `src`'s value of a picklable object, on every rank."""
    if not _group() or torch.distributed.get_world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def gather(obj: Any) -> list[Any]:
    """Every rank's picklable object, in rank order, on every rank."""
    if not _group() or torch.distributed.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def describe() -> dict[str, Any]:
    """World size, rank count per node and backend, for meta.json."""
    return {
        "world_size": world_size(),
        "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size()))),
        "backend": torch.distributed.get_backend() if _group() else None,
    }


def shutdown() -> None:
    """Leave the process group after a command finished on every rank."""
    if _group():
        barrier()
        torch.distributed.destroy_process_group()
