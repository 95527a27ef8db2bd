"""Both stages on several processes: `torchrun --nproc-per-node N -m pipeline cache-teacher|train ...`.

torchrun starts one process per device and tells each its place through the environment (WORLD_SIZE,
RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT). `launched()` turns that into a process group;
without torchrun (no WORLD_SIZE) it does nothing, and every helper below is the single-process no-op, so
the commands behave exactly as they do without it.

    launched()          init from torchrun's environment, threads per rank, destroy at the end
    rank(), local_rank(), world_size(), is_main()
    place(device)       cuda -> cuda:LOCAL_RANK (one device per process)
    agree(fn)           run fn on every rank; a user error on any rank is raised on every rank
    main_first(fn)      local rank 0 runs fn before the others (one-off work such as a model conversion)
    wait_for_all()      a barrier for waits as long as a stage (ranks finish their shards at different times)
    all_reduce_sum()    sum a few numbers over ranks (token counts, logged sums)
    broadcast_object(), gather_objects()

[no rank left waiting note] A rank that stops while the others wait in a collective would leave them waiting
until the collective times out. Setup steps that can fail on user input (config, input files, the output
directory, the cache) therefore run inside `agree`: every rank learns of the failure and stops with the same
message, printed once. A failure in the middle of the work (a full disk on one rank) ends that process with
a non-zero status, and torchrun then stops the other processes of the job.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

from pipeline.errors import ConfigError, PipelineError

T = TypeVar("T")

# Waits that may last as long as a stage (cache-teacher: a rank that finished its shards waits for the slowest
# one) run on their own gloo group with this timeout; the default group keeps torch's timeouts (10 min for
# NCCL, 30 min for gloo), which stay right for the collectives of a training step.
LONG_WAIT = datetime.timedelta(hours=24)
_long_wait_group: dist.ProcessGroup | None = None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip().isdigit() else default


def under_torchrun() -> bool:
    """True when started by torchrun (or another launcher that sets WORLD_SIZE), even with one process."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0) if initialized() else 0


def local_world_size() -> int:
    return _env_int("LOCAL_WORLD_SIZE", 1) if initialized() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes outputs and prints."""
    return rank() == 0


def error_prefix() -> str:
    """'[rank N] ' for an error printed by a process other than rank 0 of a torchrun job (else '').

    Read from the environment: the CLI prints errors after the process group is gone.
    """
    r = _env_int("RANK", 0)
    return f"[rank {r}] " if under_torchrun() and r != 0 else ""


def threads_per_rank() -> int:
    """CPU threads for torch in each of the LOCAL_WORLD_SIZE processes of this machine."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(_env_int("LOCAL_WORLD_SIZE", 1), 1))


@contextlib.contextmanager
def launched() -> Iterator[None]:
    """Join the torchrun job this process belongs to for the duration of a command (no-op without torchrun).

    Backend: gloo for CPU tensors, plus NCCL for CUDA tensors where CUDA is available ("cpu:gloo,cuda:nccl"),
    so both devices work and the small object collectives of `agree` never touch the GPU. On success the
    ranks leave together (a final barrier: rank 0 may still be writing outputs); on an error each rank
    leaves at once (the others are stopped by torchrun, see the [no rank left waiting note]).
    """
    global _long_wait_group
    if not under_torchrun() or initialized():
        yield
        return
    # torchrun sets OMP_NUM_THREADS=1 when it starts several processes and the user did not set it; that
    # suits GPU jobs, but would leave a CPU run on one core per process. A user's own value is kept, unless it
    # is 1 (which cannot be told apart from torchrun's default).
    if os.environ.get("OMP_NUM_THREADS", "1") == "1":
        torch.set_num_threads(threads_per_rank())
    if torch.cuda.is_available():
        local = _env_int("LOCAL_RANK", 0)
        if local >= torch.cuda.device_count():
            raise PipelineError(f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} CUDA "
                                "device(s); start at most that many processes per node (--nproc-per-node)")
        torch.cuda.set_device(local)
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo")
    _long_wait_group = dist.new_group(backend="gloo", timeout=LONG_WAIT)
    ok = False
    try:
        yield
        ok = True
    finally:
        try:
            if ok:
                wait_for_all()  # rank 0 may still be checksumming shards or writing the adapter
        finally:
            _long_wait_group = None
            dist.destroy_process_group()


def place(device: torch.device) -> torch.device:
    """One device per process: a CUDA device becomes cuda:LOCAL_RANK under torchrun."""
    if device.type == "cuda" and initialized():
        return torch.device("cuda", local_rank())
    return device


def barrier() -> None:
    if initialized():
        dist.barrier()


def wait_for_all() -> None:
    """Barrier on the long-timeout group: for a rank that may wait as long as another rank's share of a stage."""
    if initialized():
        dist.barrier(group=_long_wait_group)


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Sum each of a few numbers over all ranks (float64 on the CPU: exact for counts below 2**53)."""
    if not initialized():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank (picklable objects only)."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: T) -> list[T] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None on the other ranks)."""
    if not initialized():
        return [obj]
    out: list[T] | None = [None] * world_size() if is_main() else None  # type: ignore[list-item]
    dist.gather_object(obj, out, dst=0)
    return out


def quiet_elsewhere(error: PipelineError) -> PipelineError:
    """Mark an error that every rank raises alike (it comes from global values): only rank 0 prints it."""
    error.quiet = not is_main()  # type: ignore[attr-defined]
    return error


def agree(fn: Callable[[], T]) -> T:
    """Run `fn` on every rank. If it raises a PipelineError on any rank, raise it on every rank.

    The error raised is the one of the lowest failing rank, named in the message when rank 0 did not fail
    the same way, and printed by rank 0 only (see the module's [no rank left waiting note]).
    """
    if not initialized():
        return fn()
    result: T | None = None
    mine: tuple[int, list[str] | None, str] | None = None
    try:
        result = fn()
    except PipelineError as e:
        mine = (e.exit_code, e.problems if isinstance(e, ConfigError) else None, str(e))
    everyone: list = [None] * world_size()
    dist.all_gather_object(everyone, mine)
    failed = [(r, err) for r, err in enumerate(everyone) if err is not None]
    if not failed:
        return result  # type: ignore[return-value]
    who, (code, problems, message) = failed[0]
    named = who != 0 and everyone[0] != everyone[who]
    prefix = f"[rank {who}] " if named else ""
    error: PipelineError = ConfigError([prefix + p for p in problems]) if problems is not None else \
        PipelineError(prefix + message)
    error.exit_code = code
    raise quiet_elsewhere(error)


def main_first(fn: Callable[[], T]) -> T:
    """Run `fn` on local rank 0 of every machine first, then on the other ranks; errors as in `agree`.

    For one-off work whose result the others then find in place (a GGUF model converted under
    $PIPELINE_HOME), instead of every process doing it at once.
    """
    if not initialized():
        return fn()
    first = local_rank() == 0
    result = agree(fn if first else lambda: None)
    later = agree(lambda: None if first else fn())
    return result if first else later  # type: ignore[return-value]


def wrap_ddp(body: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Wrap the decoder body (where every LoRA parameter lives) in DistributedDataParallel.

    [ddp wrapping note] The output head runs outside the body, in losses.py, and is frozen, so the body is
    all DDP needs to see. Every LoRA parameter is used in every forward, so find_unused_parameters stays
    off; gradient checkpointing is non-reentrant (models.attach_lora), which DDP supports without
    static_graph. The frozen 4-bit base and the buffers are loaded from the same files on every rank and
    never change: DDP is told to ignore them, so it neither broadcasts the whole base model at start nor
    the buffers before every forward; only the LoRA parameters are broadcast from rank 0 at start.
    """
    from torch.nn.parallel import DistributedDataParallel

    frozen = [n for n, p in body.named_parameters() if not p.requires_grad] + [n for n, _ in body.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(body, frozen)
    return DistributedDataParallel(body, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=False)
