"""The torch.distributed job this process belongs to, if any: who it is, which share of the work is its own, and how
the shares come back together.

A job is launched by torchrun (directly, through Slurm, or by `./run_all.sh --nproc N`), which sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_from_env` joins it with NCCL on CUDA, gloo on the CPU. A notebook
kernel started by lib.runner joins a namespace of its own (ADV_DIST_PREFIX) in the launcher's rendezvous store, so
each notebook is a fresh process group. Outside a job every function here is the single-process identity: rank 0 of
1, the whole index range, gathers that return the local part.

Collectives wait at most ADV_DIST_TIMEOUT_S seconds (default 1800): a rank that dies then ends the others' waits with
an error instead of a hang (with gloo a dead peer is noticed at once), a `RankFailure`, which tells the launcher
(lib.runner) that this rank failed because another one did. Objects (gathers, broadcasts) always travel
over gloo on the CPU, so an NCCL job does not stage pickles on its GPUs; every gather returns to every rank, so that
all ranks go on with the same results and reach the same collectives. Every rank must call the same collectives in
the same order: none may run inside one rank's own share of the work.
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Any, Callable, Iterator, Mapping, TypeVar

import torch
import torch.distributed as dist

TIMEOUT_ENV = "ADV_DIST_TIMEOUT_S"
PREFIX_ENV = "ADV_DIST_PREFIX"
DEFAULT_TIMEOUT_S = 1800.0

T = TypeVar("T")


class RankFailure(RuntimeError):
    """A collective could not complete: another rank of the job died, failed or did not answer in time."""


_objects: Any = None   # the gloo group that carries objects in an NCCL job (None: the default group)


def active() -> bool:
    """Whether this process is part of an initialised torch.distributed job."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 outside a job)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of processes of the job (1 outside a job)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process is rank 0: the one that writes results and shared cache entries."""
    return rank() == 0


def env_rank() -> int:
    """The rank torchrun gave this process (RANK), known before the job is joined (0 outside a job)."""
    return int(os.environ.get("RANK", "0"))


def init_from_env(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Join the job that torchrun (or lib.runner) describes in the environment, once; False when there is none
    (WORLD_SIZE unset or 1). `backend` defaults to NCCL when CUDA is present (device = LOCAL_RANK), else gloo;
    collectives wait `timeout_s` (default ADV_DIST_TIMEOUT_S, else 30 min) for the other ranks."""
    global _objects
    if active():
        return True
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        return False
    wait = timedelta(seconds=timeout_s or float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    prefix = os.environ.get(PREFIX_ENV)
    if prefix:   # a notebook kernel: a fresh namespace in the store its launcher already serves
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=wait)
        dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=env_rank(), world_size=world,
                                timeout=wait)
    else:
        dist.init_process_group(backend, init_method="env://", timeout=wait)
    _objects = dist.new_group(backend="gloo", timeout=wait) if backend != "gloo" else None
    return True


def shard(n: int, *, strided: bool = False) -> range:
    """This rank's share of range(n): a contiguous block (blocks in rank order, sizes differing by at most one), or
    every world_size-th index from its rank when `strided`. Over all ranks the shares cover range(n) exactly once."""
    r, w = rank(), world_size()
    return range(r, n, w) if strided else range(n * r // w, n * (r + 1) // w)


def all_gather(obj: T) -> list[T]:
    """Every rank's `obj` (picklable; tensors on the CPU), in rank order, on every rank; [obj] outside a job."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    with _collective("all_gather"):
        dist.all_gather_object(out, obj, group=_objects)
    return out


def gather_parts(parts: Mapping[int, T]) -> list[T]:
    """The parts all ranks computed, {global index: part}, merged and in index order, on every rank: e.g. the chunks
    of a sharded set back in the original order of its images."""
    merged: dict[int, T] = {}
    for shares in all_gather(dict(parts)):
        merged.update(shares)
    return [merged[i] for i in sorted(merged)]


def from_main(fn: Callable[[], T]) -> T:
    """fn() run on rank 0 alone, its result (picklable; tensors on the CPU) sent to every rank: for what all ranks
    must agree on, such as whether a cache entry exists. An exception on rank 0 is raised on every rank."""
    if not active():
        return fn()
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = (True, fn())
        except Exception as exc:   # every rank must reach the broadcast, then fail alike
            box[0] = (False, exc)
    with _collective("broadcast from rank 0"):
        dist.broadcast_object_list(box, src=0, group=_objects)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks, in place (on the job's device: CUDA under NCCL); unchanged outside a job."""
    if active():
        with _collective("all_reduce"):
            dist.all_reduce(tensor)
    return tensor


def broadcast_(tensor: torch.Tensor) -> torch.Tensor:
    """Overwrite `tensor` with rank 0's, in place; unchanged outside a job."""
    if active():
        with _collective("broadcast from rank 0"):
            dist.broadcast(tensor, src=0)
    return tensor


def barrier() -> None:
    """Wait until every rank gets here (nothing outside a job)."""
    if active():
        with _collective("barrier"):
            dist.barrier(group=_objects)


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. a download), the other ranks after it (then finding its result on disk)."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn the failure of a collective (torch.distributed raises RuntimeErrors) into a RankFailure naming this rank."""
    try:
        yield
    except RuntimeError as exc:
        detail = (str(exc).strip().splitlines() or [""])[0][:300]
        raise RankFailure(f"rank {rank()} of {world_size()}: {what} failed, another rank died, failed or did not "
                          f"answer in time ({type(exc).__name__}: {detail})") from exc
