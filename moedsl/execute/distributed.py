"""Several processes quantizing one model: expert parallelism on torch.distributed (docs/distributed.md).

`torchrun --nproc-per-node N -m moedsl quantize …` starts N ranks; `init` reads torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and joins the process group: NCCL on CUDA (device
cuda:LOCAL_RANK), gloo on the CPU. Without that environment a run is one rank, and every collective
here returns at once.

What is split, and why the bytes never depend on N:
- Work comes in fixed units that do not depend on N: every linear statistics key of a layer, and each
  of `expert_blocks` contiguous blocks of every MoE layer's experts (`expert_blocks`). Each unit has one
  owner (`owner`); only the owner holds its statistics and solves it. One process owns every unit and
  does exactly the same operations, on the same shapes, in the same order.
- The calibration batches are split for the forwards: batch b's statistics forward runs on rank b mod N,
  which broadcasts what the hooks recorded (`share_record`: the inputs at the capture points), and its
  replay too (`share_batches`: the layer's output).
- Every statistic is computed whole by its owner, from every batch's record, in batch order: no partial
  sums are ever reduced, so there is no order of summation that N could change.
- Every collective's sequence comes from the plan, never from what one rank holds, so every rank
  calls the same collectives in the same order (llm-compressor #2734 is the hang this avoids).

A peer that fails or is killed makes the collective that waits for it fail (gloo at once; NCCL by
torchrun ending the other workers, and by the process group's timeout, `MOEDSL_DIST_TIMEOUT`
seconds): `RankLost` says so, and `exit_on_failure` ends the process without waiting for anything.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from moedsl.errors import MoedslError

ENV_TIMEOUT = "MOEDSL_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800  # a collective waits at most this long for a slow peer (rank 0 writing a big shard)
EXIT_RANK_LOST = 1


class RankLost(MoedslError):
    """Another rank failed, was killed or stopped answering: this rank cannot go on."""


def expert_blocks(num_experts: int, blocks: int) -> list[tuple[int, int]]:
    """The fixed contiguous expert ranges [start, stop) of a MoE layer: `blocks` of them (fewer when there
    are fewer experts), sizes differing by at most one. They depend on the model and the option alone."""
    k = max(1, min(blocks, num_experts))
    return [(j * num_experts // k, (j + 1) * num_experts // k) for j in range(k)]


def _timeout() -> datetime.timedelta:
    raw = os.environ.get(ENV_TIMEOUT, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        raise MoedslError(f"{ENV_TIMEOUT}={raw}: not a number of seconds") from None
    if not seconds > 0 or seconds == float("inf"):
        raise MoedslError(f"{ENV_TIMEOUT}={raw}: must be a positive, finite number of seconds")
    return datetime.timedelta(seconds=seconds)


@dataclass
class Ranks:
    """This process's place among the run's ranks (one rank: `Ranks()`)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    comm_device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives' tensors live

    @property
    def main(self) -> bool:
        """Rank 0: the one that holds the output directory and writes the checkpoint."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def owner(self, unit: int) -> int:
        return unit % self.world

    def describe(self) -> dict:
        return {"world_size": self.world, "backend": self.backend}

    # ---- collectives: every one names what it is for, so a lost peer is reported with it --------

    def _guard(self, what: str, fn: Callable, *args, **kwargs):
        import torch.distributed as dist

        try:
            return fn(*args, **kwargs)
        except (RuntimeError, dist.DistError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            first = first.split(". This is typically caused")[0]  # gloo's advice, which the notes replace
            raise RankLost(f"rank {self.rank} of {self.world}: lost contact with the other ranks while {what}: "
                           f"{first[:300]}", notes=[
                               "another rank failed or was killed: its own message (above, or in torchrun's summary) "
                               "says why",
                               "the output directory keeps every finished layer: run the same command again to "
                               "resume"]) from None

    def broadcast(self, tensor: torch.Tensor, src: int, what: str) -> torch.Tensor:
        """`tensor` (same shape and dtype on every rank) as rank `src` has it; returned, and written in place."""
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        buf = tensor if tensor.device == self.comm_device and tensor.is_contiguous() else \
            tensor.to(self.comm_device).contiguous()
        self._guard(what, dist.broadcast, buf, src)
        if buf is not tensor:
            tensor.copy_(buf)
        return tensor

    def broadcast_object(self, obj: Any, src: int, what: str) -> Any:
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        self._guard(what, dist.broadcast_object_list, box, src, device=self.comm_device)
        return box[0]

    def gather_objects(self, obj: Any, what: str) -> list | None:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.main else None
        self._guard(what, dist.gather_object, obj, out, 0)
        return out

    def send_bytes(self, buffer: torch.Tensor, what: str) -> None:
        """A uint8 buffer to rank 0 (its size first)."""
        import torch.distributed as dist

        size = torch.tensor([buffer.numel()], dtype=torch.int64, device=self.comm_device)
        self._guard(what, dist.send, size, 0)
        self._guard(what, dist.send, buffer.to(self.comm_device).contiguous(), 0)

    def recv_bytes(self, src: int, what: str) -> torch.Tensor:
        import torch.distributed as dist

        size = torch.zeros(1, dtype=torch.int64, device=self.comm_device)
        self._guard(what, dist.recv, size, src)
        buf = torch.empty(int(size), dtype=torch.uint8, device=self.comm_device)
        self._guard(what, dist.recv, buf, src)
        return buf.cpu()

    def send_object(self, obj: Any, what: str) -> None:
        """A picklable object to rank 0."""
        import torch.distributed as dist

        self._guard(what, dist.send_object_list, [obj], 0, device=self.comm_device)

    def recv_object(self, src: int, what: str) -> Any:
        import torch.distributed as dist

        box = [None]
        self._guard(what, dist.recv_object_list, box, src, device=self.comm_device)
        return box[0]

    def agree(self, fn: Callable[[], Any], what: str) -> Any:
        """Run `fn` on rank 0 alone (holding the output directory, reading its resume state) and hand its
        value to every rank; when it raises a MoedslError, every rank raises it."""
        if not self.distributed:
            return fn()
        value, error = None, None
        if self.main:
            try:
                value = fn()
            except MoedslError as exc:
                error = exc
        sent = self.broadcast_object((value, error.render() if error is not None else None), 0, what)
        if error is not None:
            raise error
        if sent[1] is not None:
            raise MoedslError(f"rank 0 refused the run: {sent[1]}")
        return sent[0]


SINGLE = Ranks()
_current: Ranks | None = None


def launched() -> bool:
    """Whether this process is one of several ranks that torchrun (or a launcher like it) started."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def init(device_option: str) -> Ranks:
    """This process's ranks, joining the process group on first call under torchrun; `Ranks()` otherwise.

    device_option: the run's --device. Under NCCL every rank uses cuda:LOCAL_RANK."""
    global _current
    if _current is not None:
        return _current
    if not launched():
        return SINGLE
    import torch.distributed as dist

    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise MoedslError("WORLD_SIZE is set but RANK or LOCAL_RANK is not: start several ranks with torchrun",
                          notes=["torchrun --nproc-per-node N -m moedsl quantize …"]) from None
    if device_option.startswith("cuda:"):
        raise MoedslError(f"--device {device_option}: under torchrun every rank uses cuda:LOCAL_RANK",
                          notes=["pass --device cuda (or auto), and choose the GPUs with CUDA_VISIBLE_DEVICES"])
    cuda = device_option != "cpu" and torch.cuda.is_available()
    if device_option == "cuda" and not cuda:
        raise MoedslError("--device cuda: no CUDA device is available here")
    if cuda:
        if local >= torch.cuda.device_count():
            raise MoedslError(f"rank {rank}: LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) are "
                              "visible", notes=["start at most as many ranks per host as it has GPUs"])
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if cuda else {}
        try:
            dist.init_process_group(backend, timeout=_timeout(), **kwargs)
        except (RuntimeError, ValueError) as exc:
            raise MoedslError(f"rank {rank}: cannot join the other ranks ({backend}): {exc}") from None
    _current = Ranks(rank=rank, world=world, local_rank=local, backend=backend, comm_device=device)
    return _current


def check_plan(ranks: Ranks, plan) -> None:
    """What several ranks cannot run yet, refused on every rank before any layer is read."""
    if not ranks.distributed:
        return
    for kind in plan.kinds:
        grouped = [t.path for s in kind.stages for t in s.targets if t.kind == "grouped"] + \
            [m.experts.path for m in kind.moe if m.experts.grouped]
        if grouped:
            raise MoedslError(f"`{grouped[0]}` ({kind.layer_class}) holds its experts in grouped containers "
                              f"(`:grouped`), which moedsl quantizes in one process only: {ranks.world} ranks "
                              "were started", notes=["run it without torchrun (or with --nproc-per-node 1)"])


def _move(obj: Any, device: torch.device) -> Any:
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_move(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def share_batches(ranks: Ranks, outs: list, carried: list, out_device: torch.device, device: torch.device,
                  what: str) -> None:
    """Fill in the batches other ranks replayed (batch b: rank b mod N), in batch order, in place."""
    for b in range(len(outs)):
        src = ranks.owner(b)
        mine = src == ranks.rank
        meta = (tuple(outs[b].shape), outs[b].dtype, _move(carried[b], torch.device("cpu"))) if mine else None
        shape, dtype, carry = ranks.broadcast_object(meta, src, what)
        if not mine:
            outs[b] = torch.empty(shape, dtype=dtype, device=out_device)
            carried[b] = _move(carry, device)
        ranks.broadcast(outs[b], src, what)


def gather_packed(ranks: Ranks, units: list, packed: list[tuple[int, Any]], what: str) -> list:
    """Every unit's packed tensors (`(unit, Packed)` as this rank's packer made them) on rank 0, in unit
    order, which is the order one rank writes them in; [] on the other ranks."""
    from moedsl.execute.packer import Packed

    by_unit: dict[int, list] = {}
    for u, p in packed:
        by_unit.setdefault(u, []).append(p)
    out: list = []
    for u in units:
        mine = by_unit.pop(u.index, [])
        if u.owner == ranks.rank:
            if ranks.main:
                out += mine
                continue
            ranks.send_object([(p.names, p.layout, p.join, p.omit) for p in mine], what)
            for p in mine:
                if p.ready is not None:
                    p.ready.synchronize()
                ranks.send_bytes(p.buffer, what)
        elif ranks.main:
            for names, layout, join, omit in ranks.recv_object(u.owner, what):
                out.append(Packed(names, ranks.recv_bytes(u.owner, what), layout, join=join, omit=omit))
    return out


def share_record(ranks: Ranks, record: tuple[list, list[torch.Tensor]] | None, src: int, device: torch.device,
                 what: str) -> tuple[list, list[torch.Tensor]]:
    """What a stage's hooks recorded during batch b's forward on rank `src` ((calls, tensors)), on every rank."""
    meta = (record[0], [(tuple(t.shape), t.dtype) for t in record[1]]) if ranks.rank == src else None
    calls, metas = ranks.broadcast_object(meta, src, what)
    tensors = record[1] if ranks.rank == src else [torch.empty(shape, dtype=dtype, device=device)
                                                   for shape, dtype in metas]
    for t in tensors:
        ranks.broadcast(t, src, what)
    return calls, tensors


def share_tensors(ranks: Ranks, tensors: list[torch.Tensor] | None, device: torch.device, what: str
                  ) -> list[torch.Tensor]:
    """Rank 0's list of tensors on every rank (the resumed run's layer inputs)."""
    metas = ranks.broadcast_object([(tuple(t.shape), t.dtype) for t in tensors] if ranks.main else None, 0, what)
    out = tensors if ranks.main else [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in metas]
    for t in out:
        ranks.broadcast(t, 0, what)
    return out


@contextlib.contextmanager
def exit_on_failure():
    """Around a distributed run: a rank that fails prints why, with its rank, and ends at once (os._exit),
    so nothing it leaves running — a thread, a process group's teardown — can keep it, or the others, waiting."""
    if not launched():
        yield
        return
    rank = os.environ.get("RANK", "?")
    try:
        yield
        import torch.distributed as dist

        if dist.is_initialized():  # every rank has passed the last agreement: a clean teardown
            dist.destroy_process_group()
    except RankLost as exc:
        _die(f"moedsl rank {rank}: " + exc.render(), EXIT_RANK_LOST)
    except MoedslError as exc:
        _die(f"moedsl rank {rank}: " + exc.render(), 2)
    except KeyboardInterrupt:
        _die(f"moedsl rank {rank}: interrupted", 130)
    except BaseException as exc:  # a bug: its traceback, then out
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        import traceback

        traceback.print_exc()
        _die(f"moedsl rank {rank}: failed: {type(exc).__name__}: {exc}", 1)


def _die(message: str, code: int) -> None:
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def test_fault(rank: int, where: str) -> None:
    """Tests: `MOEDSL_TEST_RANK_FAULT=<rank>:<where>:kill|raise` SIGKILLs that rank, or makes it raise, at
    `where` (`layer:<i>:start`, `layer:<i>:solved`); `MOEDSL_TEST_RANK_FAULT_FILE` receives the time it did."""
    spec = os.environ.get("MOEDSL_TEST_RANK_FAULT")
    if not spec:
        return
    who, _, rest = spec.partition(":")
    point, _, how = rest.rpartition(":")
    if who != str(rank) or point != where:
        return
    marker = os.environ.get("MOEDSL_TEST_RANK_FAULT_FILE")
    if marker:  # when the fault struck, for the test's clock
        import time

        with open(marker, "w") as f:
            f.write(f"{time.time()}\n")
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"test fault injected on rank {rank} at {where}")


def share_resumed(ranks: Ranks, hidden: list[torch.Tensor], carried: list[dict], device: torch.device
                  ) -> tuple[list[torch.Tensor], list[dict]]:
    """The resumed run's layer inputs (and carried state), read by rank 0, on every rank."""
    what = "sharing the resumed run's layer inputs"
    hidden = share_tensors(ranks, hidden if ranks.main else None, device, what)
    carried = _move(ranks.broadcast_object(_move(carried, torch.device("cpu")) if ranks.main else None, 0, what),
                    device)
    return hidden, carried


def record_peaks(ranks: Ranks, report, peak: int | None, what: str) -> int | None:
    """A layer's peak device memory: this rank's alone, or under several ranks the largest (rank 0 keeps
    each rank's largest over the run in `report.ranks`)."""
    if not ranks.distributed:
        return peak
    peaks = ranks.gather_objects(peak, what)
    if peaks is None:
        return peak
    known = [p for p in peaks if p is not None]
    figures = _ranks_figures(ranks, report)
    figures["peak_gpu_bytes"] = [max(filter(None, (a, b)), default=None) for a, b in
                                 zip(figures.get("peak_gpu_bytes") or [None] * ranks.world, peaks)]
    return max(known) if known else None


def record_host_peaks(ranks: Ranks, report) -> None:
    """Each rank's peak host memory, in `report.ranks` on rank 0."""
    import resource

    if not ranks.distributed:
        return
    peaks = ranks.gather_objects(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "gathering memory figures")
    if peaks is not None:
        _ranks_figures(ranks, report)["host_peak_bytes"] = peaks


def _ranks_figures(ranks: Ranks, report) -> dict:
    if report.ranks is None:
        report.ranks = ranks.describe()
    return report.ranks


class _NoWriter:
    """The layer writer of a rank other than 0: it writes nothing (rank 0 writes every layer)."""

    def submit(self, layer) -> None:
        pass

    def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


NO_WRITER = _NoWriter()
