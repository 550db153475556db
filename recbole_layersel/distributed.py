"""Data parallelism for the passes over the full LLM: importance, distillation and the frozen-state pass
(the greedy search runs in the first process, ``from_main``).

One process group serves them and RecBole's own DDP trainer. It is set up by ``LayerSelConfig`` (see
``registry.py``) from RecBole's ``--nproc`` or from a launcher's environment (``accelerate launch``,
``torchrun``). Each of these passes walks its rows in mini-batches; batch ``i`` goes to process
``i % world_size``, each process fills the rows of its own batches (zeros elsewhere) and adds its
sums, and an all-reduce sums both over processes. Every process then holds exactly what a single
process would have computed, up to floating-point summation order, and goes on identically (same
ranking, same selection, same bridges). Without a process group every function here is the
single-process identity.
"""

import os
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
import torch.distributed as dist

from recbole_layersel.errors import LayerSelError

# Set by torchrun and by `accelerate launch` (which runs torchrun) in every process they start.
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def is_main() -> bool:
    return rank_and_world()[0] == 0


def my_batches(num_rows: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of this process's mini-batches of ``range(num_rows)``: batch i goes to rank i % world."""
    rank, world = rank_and_world()
    starts = range(0, num_rows, batch_size)
    return [(start, min(start + batch_size, num_rows)) for start in starts[rank::world]]


# Elements reduced at a time: large tensors (the teacher's per-layer states) go through in pieces, so
# the copy on the reduction device and in float32 stays small.
_CHUNK = 1 << 24
T = TypeVar("T")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over processes (returned; the argument may be changed). NCCL reduces on the GPU;
    gloo reduces half-precision through float32, which it cannot sum."""
    if not active():
        return tensor
    reduce_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    reduce_dtype = tensor.dtype if tensor.dtype not in (torch.bfloat16, torch.float16) \
        or reduce_device.type == "cuda" else torch.float32
    flat = tensor.contiguous().view(-1)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start:start + _CHUNK]
        buffer = part.to(reduce_device, reduce_dtype)
        dist.all_reduce(buffer)
        part.copy_(buffer)
    return flat.view(tensor.shape)


def mean_under_ddp(total: torch.Tensor, count: int) -> torch.Tensor:
    """``total / count`` over every process of a group, as this process's share: DDP averages the
    processes' gradients, so each returns ``total * world / (count summed over processes)``, which
    weighs every term alike however unevenly the processes' batches hold them."""
    if not active():
        return total / count
    counts = all_reduce_sum(torch.tensor(float(count), device=total.device))
    return total * rank_and_world()[1] / counts


def from_main(load: Callable[[], T]) -> T:
    """Rank 0's ``load()`` in every process (e.g. a cache lookup: the processes must agree on a hit, or
    some would skip a pass whose collectives the others wait in)."""
    if not active():
        return load()
    value = [load() if is_main() else None]
    dist.broadcast_object_list(value, src=0)
    return value[0]


def all_reduce_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Sum ``.grad`` over processes; a parameter without a gradient here counts as zeros."""
    if not active():
        return
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        parameter.grad.copy_(all_reduce_sum(parameter.grad))


def broadcast_parameters(module: torch.nn.Module, skip_prefix: str | None = None) -> None:
    """Copy rank 0's parameters into every process, except those named ``skip_prefix...`` (e.g. the
    pretrained layers, which every process loaded from the same files)."""
    if not active():
        return
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if skip_prefix is None or not name.startswith(skip_prefix):
                buffer = parameter.detach().clone() if is_main() else torch.zeros_like(parameter)
                parameter.copy_(all_reduce_sum(buffer))


def launcher_settings() -> dict:
    """RecBole's DDP settings for a process started by torchrun or ``accelerate launch``; {} otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return {}
    missing = [name for name in LAUNCHER_VARIABLES if name not in os.environ]
    if missing:
        raise LayerSelError(f"WORLD_SIZE is set but the launcher did not set {missing}; start with "
                           "`accelerate launch` or `torchrun`, or use --nproc.")
    local_rank, rank = int(os.environ["LOCAL_RANK"]), int(os.environ["RANK"])
    return {"local_rank": local_rank, "offset": rank - local_rank,
            "world_size": int(os.environ["WORLD_SIZE"]), "nproc": int(os.environ["LOCAL_WORLD_SIZE"]),
            "ip": os.environ["MASTER_ADDR"], "port": os.environ["MASTER_PORT"], "launcher": "env"}
