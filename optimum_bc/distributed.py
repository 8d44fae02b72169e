"""Data-parallel calibration over ``torch.distributed``: shard the windows, all-reduce the statistics, rank 0 saves.

Launched with ``torchrun --nproc-per-node N`` or ``accelerate launch``, every rank samples the same calibration
windows (same seed), checks that all ranks agree on the config and the data (:func:`check_same`), then keeps a
contiguous share of whole batches of them (:func:`shard`). Every statistic is a sum over tokens, so each statistics
object sums its tensors over ranks once, right before it is used (:func:`all_reduce_sum`); all ranks then solve the
same problem and hold the same quantized model, which the next block's forward passes need. Only rank 0 writes a
checkpoint (:func:`run_on_main`).

Summation order: a rank runs the same batches as one process would (same windows per batch, so the same float32
forward passes and per-batch sums); the statistics add those per-batch sums in float64 and round to float32 once
when used. One process adds them batch after batch, the ranks add their partial sums: the float64 results differ
at most by float64 rounding (and not at all when the batch sums' magnitudes span less than 2^29), so the float32
statistics, the codes and the biases are identical except in the rare case where that float64 difference straddles
a float32 rounding boundary (a tie). Identical also needs identical per-batch arithmetic: the same torch thread
count (``torchrun`` sets ``OMP_NUM_THREADS=1``) and the same kind of device.

Without a process group (or with one process) every function here is a no-op, so one code path serves both.
A rank that dies makes the collectives of the others fail (gloo and NCCL report the closed connection, or the
process-group timeout expires: 30 min when optimum-bc creates the group); they raise a RuntimeError saying so, and
since the checkpoint is written only after calibration, and atomically, no partial checkpoint is left.
"""

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist


logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Process-group timeout when optimum-bc initialises the group itself (a dead rank is reported after at most this).
TIMEOUT = timedelta(minutes=30)

#: Characters of the sha256 hex digests compared between ranks.
HASH_PREFIX = 16


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def _launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started this process as one of several ranks."""
    try:
        return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def init_from_env() -> bool:
    """Initialise the default process group from the launcher's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``...) when a launcher started us and nobody initialised one yet; returns :func:`is_distributed`.

    A group the user initialised is used as it is. The backend is NCCL when CUDA is available, else gloo.
    """
    if not dist.is_available() or dist.is_initialized() or not _launched():
        return is_distributed()
    backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    logger.warning(
        "optimum-bc: initialised torch.distributed from the launcher's environment (backend=%s, rank %d of %d); "
        "calibration windows are split across ranks",
        backend,
        dist.get_rank(),
        dist.get_world_size(),
    )
    return is_distributed()


def _collective(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run one collective; a failure (a rank died, or the timeout expired) becomes an error that says so."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as err:  # DistBackendError, gloo's closed connections and timeouts derive from it
        raise RuntimeError(
            f"optimum-bc: rank {dist.get_rank()} of {dist.get_world_size()}: the collective for {what} failed: "
            "another rank stopped (crashed, was killed, or did not arrive within the process-group timeout). "
            "Nothing was saved. Fix: find the first error in the other ranks' output, then rerun all ranks."
        ) from err


def _backend_device() -> torch.device:
    """Where the backend reduces: the current GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(tensors: Iterable[torch.Tensor], op: str, what: str) -> None:
    """Reduce each tensor over all ranks with ``op`` (a ``ReduceOp`` name), in place (no-op without a process group); tensors on another
    device than the backend's (a device map, offloaded statistics) go through a copy."""
    if not is_distributed():
        return
    device = _backend_device()
    for tensor in tensors:
        buffer = tensor if tensor.device == device else tensor.to(device)
        _collective(what, dist.all_reduce, buffer, op=getattr(dist.ReduceOp, op))
        if buffer is not tensor:
            tensor.copy_(buffer)


def all_reduce_sum(tensors: Iterable[torch.Tensor], what: str) -> None:
    """Sum each tensor over all ranks, in place (no-op without a process group)."""
    _all_reduce(tensors, "SUM", what)


def all_reduce_max(tensors: Iterable[torch.Tensor], what: str) -> None:
    """The elementwise maximum of each tensor over all ranks, in place (no-op without a process group)."""
    _all_reduce(tensors, "MAX", what)


def all_gather_rows(tensor: torch.Tensor, what: str) -> list[torch.Tensor]:
    """Every rank's 1-D ``tensor`` (lengths may differ), in rank order, on the tensor's device (``[tensor]`` alone
    without a process group)."""
    if not is_distributed():
        return [tensor]
    device = _backend_device()
    lengths = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world())]
    _collective(what, dist.all_gather, lengths, torch.tensor([tensor.numel()], device=device))
    longest = int(max(n.item() for n in lengths))
    padded = torch.zeros(longest, dtype=tensor.dtype, device=device)
    padded[: tensor.numel()] = tensor.reshape(-1).to(device)
    gathered = [torch.empty_like(padded) for _ in range(world())]
    _collective(what, dist.all_gather, gathered, padded)
    return [g[: int(n.item())].to(tensor.device) for g, n in zip(gathered, lengths, strict=True)]


def all_reduce_count(count: int, what: str) -> int:
    """The sum of an integer count over all ranks (``count`` itself without a process group)."""
    if not is_distributed():
        return count
    total = torch.tensor([count], dtype=torch.int64)
    all_reduce_sum([total], what)
    return int(total.item())


def fingerprint(value: Any) -> str:
    """sha256 hex digest of a JSON-able value (a config dict) or of tensors nested in lists and dicts (windows)."""
    digest = hashlib.sha256()

    def feed(item: Any) -> None:
        if isinstance(item, torch.Tensor):
            cpu = item.detach().cpu().contiguous()
            digest.update(f"tensor{tuple(cpu.shape)}{cpu.dtype}".encode())
            digest.update(cpu.view(-1).view(torch.uint8).numpy().tobytes() if cpu.numel() else b"")
        elif isinstance(item, dict):
            for key in sorted(item):
                digest.update(json.dumps(str(key)).encode())
                feed(item[key])
        elif isinstance(item, list | tuple):
            digest.update(f"list{len(item)}".encode())
            for element in item:
                feed(element)
        else:
            digest.update(json.dumps(item, sort_keys=True, default=str).encode())

    feed(value)
    return digest.hexdigest()


def _differing_ranks(mine: Any, what: str) -> list[list[int]]:
    """All-gather ``mine`` (a tuple of short strings); per entry, the ranks whose value differs from rank 0's."""
    gathered: list[Any] = [None] * world()
    _collective(what, dist.all_gather_object, gathered, mine)
    return [[r for r, values in enumerate(gathered) if values[i] != gathered[0][i]] for i in range(len(mine))]


def check_same(config_hash: str, data_hash: str) -> None:
    """Refuse, on every rank, a run where ranks disagree on the config or the calibration data.

    Each rank's hash prefixes are all-gathered and compared to rank 0's; the ValueError names the differing ranks.
    """
    if not is_distributed():
        return
    mine = (config_hash[:HASH_PREFIX], data_hash[:HASH_PREFIX])
    differing = _differing_ranks(mine, "the config and data check")
    problems = []
    for ranks, label, fix in zip(
        differing,
        ("quantization config", "calibration data"),
        (
            "build the same BCQuantizationConfig on every rank (same arguments)",
            "give every rank the same dataset, num_samples, seq_len and seed",
        ),
        strict=True,
    ):
        if ranks:
            problems.append(f"ranks {ranks} have another {label} than rank 0 (fix: {fix})")
    if problems:
        raise ValueError(
            f"optimum-bc data-parallel calibration (rank {rank()} of {world()}): " + "; ".join(problems) + "."
        )


def check_agree(value: Any, what: str) -> None:
    """Refuse, on every rank, a run where ranks derived different ``value`` from their own windows (e.g. which
    Linears of a block are quantized): their collectives would no longer match, and would hang or mix statistics."""
    if not is_distributed():
        return
    differing = _differing_ranks((fingerprint(value)[:HASH_PREFIX],), what)[0]
    if differing:
        raise ValueError(
            f"optimum-bc data-parallel calibration (rank {rank()} of {world()}): ranks {differing} found another "
            f"{what} than rank 0 on their share of the calibration windows. Fix: calibrate in one process, or with "
            "more windows per rank so every rank sees every layer called."
        )


def shard_range(total: int) -> range:
    """Global indices of this rank's contiguous share of ``total`` items (the first ``total % world`` ranks get
    one more). Code that splits the windows further (held-out splits) must decide on global indices so that all
    ranks agree."""
    base, extra = divmod(total, world())
    start = rank() * base + min(rank(), extra)
    return range(start, start + base + (1 if rank() < extra else 0))


def shard(windows: Sequence[T], batch_size: int = 1) -> list[T]:
    """This rank's contiguous share of whole batches of ``windows`` (all of them without a process group); the union
    over ranks, in rank order, is ``windows``, and every batch holds the windows it holds in one process. Refuses
    more ranks than batches: a rank without windows has nothing to add."""
    batches = -(-len(windows) // batch_size)
    if world() > batches:
        raise ValueError(
            f"optimum-bc data-parallel calibration: {world()} processes but only {len(windows)} calibration "
            f"windows in {batches} batches of batch_size={batch_size}, so rank(s) {list(range(batches, world()))} "
            f"would get none. Fix: num_samples >= {world() * batch_size} (a multiple of {world()} x batch_size "
            "keeps every rank equally busy), a smaller batch_size, or fewer processes."
        )
    span = shard_range(batches)
    return list(windows[span.start * batch_size : span.stop * batch_size])


def prepare(config_dict: dict[str, Any], windows: Sequence[T], batch_size: int = 1) -> list[T]:
    """Start of a data-parallel calibration: join the launcher's process group, check that all ranks agree on the
    config and the windows, and return this rank's share of them (all of them in one process)."""
    if not init_from_env():
        return list(windows)
    check_same(fingerprint(config_dict), fingerprint(list(windows)))
    if not windows:  # nothing to split (RTN without BC): every rank computes the same model
        return []
    mine = shard(windows, batch_size)
    logger.info("optimum-bc: rank %d of %d calibrates on %d of %d windows", rank(), world(), len(mine), len(windows))
    return mine


def run_on_main(fn: Callable[[], T], what: str) -> T | None:
    """Run ``fn`` on rank 0 only (writing a checkpoint); the other ranks wait for it and return None.

    If rank 0 fails, the other ranks raise too, so no rank reports a save that did not happen.
    """
    if not is_distributed():
        return fn()
    result: T | None = None
    failure: BaseException | None = None
    if rank() == 0:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below, after telling the other ranks
            failure = err
    status = [None if failure is None else f"{type(failure).__name__}: {failure}"]
    _collective(what, dist.broadcast_object_list, status, src=0)
    if failure is not None:
        raise failure
    if status[0] is not None:
        raise RuntimeError(f"optimum-bc: rank 0 failed to {what} ({status[0]}); this rank wrote nothing")
    return result
