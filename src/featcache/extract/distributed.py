"""torch.distributed for extraction: which rank this process is, and the few collectives it needs.

Under ``torchrun`` (or ``srun torchrun``) the environment carries ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`context` reads them, initialises the process group when there is more
than one process (NCCL when the ranks compute on CUDA, Gloo on CPU) and opens a Gloo group
for the control messages, which are small Python objects on the CPU whatever the device.

Every collective has a timeout (``FEATCACHE_DIST_TIMEOUT`` seconds, default 3600) so that a
rank that died or hangs is reported, with its number, instead of stopping the others forever.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass

import torch

from ..errors import FeatcacheError

TIMEOUT_ENV = "FEATCACHE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 3600.0


class DistributedError(FeatcacheError):
    """A distributed extraction could not start, or another rank failed or vanished."""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def timeout_seconds() -> float:
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        return float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise DistributedError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds") from None


@dataclass
class DistContext:
    """This process's place in the run; a single process is rank 0 of 1 and needs no group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: object = None  # the Gloo control group
    owns_default_group: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: torch.device) -> torch.device:
        """``cuda`` (no index) means this rank's GPU, ``cuda:LOCAL_RANK``."""
        if requested.type == "cuda" and requested.index is None and self.active:
            if self.local_rank >= torch.cuda.device_count():
                raise DistributedError(
                    f"LOCAL_RANK {self.local_rank} but torch sees {torch.cuda.device_count()} CUDA devices; "
                    "start at most one process per GPU (torchrun --nproc-per-node)")
            return torch.device("cuda", self.local_rank)
        return requested

    def _wrap(self, what: str, fn, *args):
        try:
            return fn(*args)
        except FeatcacheError:
            raise
        except Exception as exc:  # a peer died or timed out: gloo raises RuntimeError and friends
            raise DistributedError(
                f"rank {self.rank}/{self.world_size}: {what} failed, another rank probably died or hangs "
                f"({str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__}); "
                "the parts written so far are kept: rerun the same command, with any number of processes, to resume"
            ) from exc

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        self._wrap("sending to the other ranks" if self.is_main else "waiting for rank 0",
                   dist.broadcast_object_list, box, 0, self.group)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        self._wrap("waiting for the other ranks", dist.all_gather_object, out, obj, self.group)
        return out

    def raise_if_any(self, error: str | None, what: str) -> None:
        """Exchange each rank's error (None when fine); raise everywhere if one rank failed."""
        errors = self.gather(error)
        bad = [(r, e) for r, e in enumerate(errors) if e]
        if bad:
            first = "; ".join(f"rank {r}: {e}" for r, e in bad[:3])
            raise DistributedError(f"{what} failed on {len(bad)} of {self.world_size} ranks ({first})"
                                   if self.active else f"{what} failed ({first})")

    def close(self) -> None:
        if not self.active:
            return
        import torch.distributed as dist

        if self.group is not None and dist.is_initialized():
            dist.destroy_process_group(self.group)
            self.group = None
        if self.owns_default_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_default_group = False


def context(device: torch.device) -> DistContext:
    """Read the launcher's environment and join (or reuse) the process group.

    ``device`` is the device the user asked for, before :meth:`DistContext.device` picks this
    rank's GPU; it chooses the default group's backend when this call initialises it.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK", rank % max(1, torch.cuda.device_count() or 1))
        owns = False
    else:
        world = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        local = _env_int("LOCAL_RANK", 0)
        owns = world > 1
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} and WORLD_SIZE={world} do not describe a process of the run")
    ctx = DistContext(rank=rank, world_size=world, local_rank=local, owns_default_group=owns)
    if world == 1:
        return ctx
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    timeout = _dt.timedelta(seconds=timeout_seconds())
    if owns:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise DistributedError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set; "
                                   "start the processes with torchrun, which sets them")
        cuda = ctx.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(ctx.device(device))
        try:
            dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=timeout)
        except Exception as exc:
            raise DistributedError(f"rank {rank}/{world}: cannot join the process group at "
                                   f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({exc})") from exc
    # Control messages are Python objects on the CPU: a Gloo group whatever the default backend.
    ctx.group = dist.new_group(backend="gloo", timeout=timeout)
    return ctx
