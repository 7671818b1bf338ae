"""Process group set-up from torchrun's environment, and the few collectives the engine needs.

Without RANK/WORLD_SIZE in the environment (or with WORLD_SIZE 1) everything runs in one process and
the collectives below are no-ops, so the training code has a single path.
"""
from __future__ import annotations

import atexit
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import UserError

__all__ = [
    "DistEnv",
    "all_gather",
    "all_reduce_sum",
    "barrier",
    "broadcast_buffers",
    "cleanup",
    "init_distributed",
    "is_main_process",
    "select_device",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its rank among `world_size` and the device it computes on."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer; launch with torchrun") from None


def select_device(local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available (and made the current device), else the CPU.

    A process whose CUDA_VISIBLE_DEVICES names one GPU uses it whatever its LOCAL_RANK: clusters that
    bind one GPU per process (SLURM, Kubernetes) show each process only its own, as cuda:0.
    """
    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        if torch.cuda.device_count() == 1 and visible and "," not in visible:
            local_rank = 0
        elif local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                "start at most that many processes per node (run.sh -g N)"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(timeout_s: float, cuda_backend: str = "nccl") -> DistEnv:
    """Join the process group torchrun describes (`cuda_backend`, the config's DIST_BACKEND, on CUDA;
    Gloo on CPU, where NCCL cannot run), or run alone.

    `timeout_s` bounds every collective, so a rank that died ends the run with an error instead of
    leaving the others waiting forever; ranks that do not all meet within it are a UserError. The
    group is joined once per process and left at exit, so a script may call train() and then
    test(): re-creating the default group after destroying it would reuse its rendezvous keys in
    torchrun's store and could connect to stale addresses.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = select_device(local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = cuda_backend if device.type == "cuda" else "gloo"
        _join(backend, rank, world_size, device, timeout_s)
        atexit.register(cleanup)
        log.info("process group: rank %d of %d, backend %s, device %s", rank, world_size, backend, device)
    return DistEnv(rank=rank, world_size=world_size, device=device)


def _join(backend: str, rank: int, world_size: int, device: torch.device, timeout_s: float) -> None:
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
        # torchrun keeps one store for all restarts of a worker group: without a prefix per attempt a
        # restarted group would read the addresses its dead predecessor published there.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend=backend,
            store=dist.PrefixStore(f"cvt/attempt_{attempt}/", store),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            # NCCL binds the communicator to this rank's GPU up front instead of guessing it later.
            device_id=device if device.type == "cuda" else None,
        )
    except ValueError as e:  # a variable of the env:// rendezvous is missing or malformed
        raise UserError(f"rank {rank} of {world_size}: {e}; launch with torchrun (run.sh)") from None
    except (dist.DistError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(
            f"rank {rank} of {world_size}: the processes did not all meet at {where} within "
            f"DIST_TIMEOUT_S={timeout_s:g} s ({reason}); check that every process was started and can reach it"
        ) from None


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    return not _active() or dist.get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks in place (and return it); unchanged when running alone."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj` (any picklable value), indexed by rank; `[obj]` when running alone."""
    if not _active():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics). Each rank updates them from its
    own batches between DDP's per-forward broadcasts, so without this each rank would evaluate a
    slightly different model, and the combined score would be no saved model's score."""
    if _active():
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)


def barrier() -> None:
    if _active():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group, if this process joined one (run at exit by `init_distributed`)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
