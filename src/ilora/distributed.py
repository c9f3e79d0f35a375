"""Data parallelism on `torch.distributed`: who this process is, and the few collectives we use.

A run started by ``torchrun`` (one process per GPU, on one or several nodes) finds
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in its environment;
`init_from_env` joins the process group (NCCL on CUDA, gloo on CPU) and returns a
`Dist`, the one object the trainers and the export receive to know their rank. Nothing
here is global: code that is not given a `Dist` runs as a single process (`SINGLE`).

Training batches and evaluation batches are split into contiguous, rank-ordered chunks
(`Dist.chunk`), so that gathering them in rank order (`Dist.gather`) restores the
single-process order; the export deals whole shards round-robin instead
(`ilora.outputs.export.export_split`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ilora.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: ``rank`` of ``world_size``, GPU ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes logs, checkpoints, manifests and prints results."""
        return self.rank == 0

    def chunk(self, items: Sequence[T]) -> Sequence[T]:
        """This rank's contiguous share of ``items``; shares differ in size by at most one, and
        concatenating the shares of ranks 0, 1, ... gives ``items`` back."""
        n, w = len(items), self.world_size
        lo = self.rank * (n // w) + min(self.rank, n % w)
        return items[lo : lo + n // w + (self.rank < n % w)]

    # -- collectives (identity when single) --------------------------------------------------
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, value: float) -> float:
        """The sum of ``value`` over all ranks (float64, so that it does not depend on the device)."""
        return self.sums([value])[0]

    def sums(self, values: Sequence[float]) -> list[float]:
        """Each of ``values`` summed over all ranks, in one all-reduce (float64)."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj`` in rank order, on every rank (picklable objects, e.g. CPU tensors)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite ``tensors`` in place with rank 0's values."""
        if self.enabled:
            with torch.no_grad():
                for t in tensors:
                    dist.broadcast(t.data, src=0)

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


SINGLE = Dist()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def require_device(device: str) -> None:
    """`ConfigError` when ``device`` is cuda and torch sees no CUDA device."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but torch sees no CUDA device (use --device cpu)")


def init_from_env(device: str) -> Dist:
    """Join the process group ``torchrun`` described in the environment (or return `SINGLE`).

    On CUDA each process uses GPU ``LOCAL_RANK`` (made the current device, so ``"cuda"``
    means it) and NCCL; on CPU gloo. Joining twice returns the same `Dist`. ``device`` cuda
    where torch sees no CUDA device is a `ConfigError`, single process or not.
    """
    require_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ConfigError(f"WORLD_SIZE={world} but {name} is not set: start distributed runs with torchrun")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        if torch.cuda.device_count() <= local_rank:
            raise ConfigError(f"rank {rank}: LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        timeout = collective_timeout()
        if device == "cuda":  # bound to this rank's GPU, so that collectives never guess it
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank), timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise ConfigError(f"process group (rank {dist.get_rank()} of {dist.get_world_size()}) disagrees with RANK={rank} WORLD_SIZE={world}")
    return Dist(rank=rank, world_size=world, local_rank=local_rank)


TIMEOUT_ENV = "ILORA_DIST_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 60.0


def collective_timeout() -> datetime.timedelta:
    """How long a rank waits in a collective before the job fails: ``ILORA_DIST_TIMEOUT_MIN``
    minutes (default 60). NCCL's own default, 10 minutes, is shorter than some waits of a 7B run:
    in the export's last round a rank without a shard waits while the others score theirs."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return datetime.timedelta(minutes=DEFAULT_TIMEOUT_MIN)
    try:
        minutes = float(text)
    except ValueError:
        minutes = float("nan")
    if not (0 < minutes < 100_000):  # also refuses nan and inf
        raise ConfigError(f"{TIMEOUT_ENV}={text!r}: expected a positive number of minutes")
    return datetime.timedelta(minutes=minutes)


def shutdown(ctx: Dist) -> None:
    """Leave the process group (at the end of a command)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str) -> Iterator[Dist]:
    """A command's `Dist`: joins the process group when started by torchrun (`init_from_env`),
    leaves it at the end (`shutdown`). On a normal end every rank first waits for the others:
    a rank that tore its connections down while another still received the last collective's
    data would abort that rank (gloo)."""
    ctx = init_from_env(device)
    try:
        yield ctx
        ctx.barrier()
    finally:
        shutdown(ctx)


def check_ranks_agree(ctx: Dist, what: dict | Callable[[], dict], reads: str = "dataset, SASRec checkpoint, base LLM and options") -> None:
    """`IloraError` on every rank unless every rank computed the same ``what`` (fingerprints of
    its inputs, sample counts, options; a callable is called only with several ranks, so one
    process never hashes anything for it). A node with a stale copy would otherwise train,
    evaluate or export other samples, or, with another sample count, run other steps or
    rounds than the rest and hang them. Every rank sees every answer, so all raise together."""
    from ilora.errors import IloraError

    if not ctx.enabled:
        return
    everyone = ctx.gather(what() if callable(what) else what)
    for rank, theirs in enumerate(everyone):
        differ = sorted(k for k in set(theirs) | set(everyone[0]) if theirs.get(k) != everyone[0].get(k))
        if differ:
            raise IloraError(f"rank {rank} does not read what rank 0 reads ({', '.join(differ)} differ): every rank must see the same {reads}")
