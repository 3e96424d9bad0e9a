"""Multi-process runs under ``torchrun``: world info, reductions, FSDP2 sharding, rank-0-only writes.

What: the one place edgekit talks to ``torch.distributed``. ``init_from_env()`` joins the process
group that ``torchrun`` (single- or multi-node rendezvous) describes in ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``: gloo on CPU hosts, ``cpu:gloo,cuda:nccl`` when
CUDA is present (CPU tensors such as calibration statistics go through gloo, CUDA tensors through
NCCL). The rest of the library calls helpers that are no-ops in a plain process:

- ``world()``: rank, size, local rank (``World()`` = one process when no group is initialized);
- ``shard_range(n)``: this rank's contiguous share of n items (calibration windows, batch rows);
- ``all_reduce_sums(values)``: sums tensors / numbers over ranks in one float64 collective;
- ``mean_over_ranks(x)``, ``agree(ok)``, ``broadcast(obj)``, ``main_first(check)`` (a check of
  ``-o`` and the like on rank 0 alone, its error raised on every rank);
- ``fsdp_copy(model, device)`` / ``copy_full_(dst, sharded)``: an FSDP2 (``fully_shard``) copy of a
  ``Transformer`` (one unit per decoder block plus the root) and the way back to a plain model;
- ``publish(out, write)``: rank 0 alone writes ``out`` through a staging dir beside it; it is renamed
  into place only after every rank has agreed that it succeeded.

Why: calibration and distillation are the stages whose cost grows with the model; splitting their
tokens over ranks (statistics summed, gradients averaged) gives the same numbers as one process.

Invariants: a single process never touches ``torch.distributed``; with N ranks, every rank calls
the same collectives in the same order (helpers are called unconditionally, never on one rank's
data-dependent branch); only rank 0 creates files, and ``out`` appears complete or not at all.

Failure modes: a partial torchrun environment (``WORLD_SIZE`` > 1 without ``MASTER_ADDR`` ...)
raises ``EdgekitError`` naming the launch command. When a rank dies, the others fail in their next
collective (gloo reports the closed connection) or are stopped by torchrun's SIGTERM, which is
turned into ``SystemExit`` so staging dirs are removed; ``publish`` then leaves nothing behind.
"""

from __future__ import annotations

import os
import signal
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as tdist

from .atomic import discard, finalize, staging_dir
from .errors import EdgekitError

TIMEOUT_ENV = "EDGEKIT_DIST_TIMEOUT"     # seconds a collective may wait (rank 0 writing a large checkpoint)
DEFAULT_TIMEOUT_S = 3600


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name, "")
    if not v:
        return default
    if not v.lstrip("-").isdigit():
        raise EdgekitError(f"{name}={v!r} is not an integer; launch with torchrun --nproc-per-node N")
    return int(v)


def launched() -> bool:
    """True when started by torchrun (or an equivalent launcher) with more than one process."""
    return _env_int("WORLD_SIZE", 1) > 1


def world() -> World:
    if tdist.is_available() and tdist.is_initialized():
        return World(tdist.get_rank(), tdist.get_world_size(), _env_int("LOCAL_RANK", 0))
    return World()


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds: staging dirs are removed by their except/finally blocks


def init_from_env() -> World:
    """Join the process group described by torchrun's environment; a no-op in a plain process."""
    if not launched() or tdist.is_initialized():
        return world()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise EdgekitError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {missing[0]} is not set; "
                           "launch with torchrun --nproc-per-node N (plus --nnodes/--rdzv-endpoint across hosts)")
    timeout = timedelta(seconds=_env_int(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    if torch.cuda.is_available():
        local, gpus = _env_int("LOCAL_RANK", 0), torch.cuda.device_count()
        if local >= gpus:
            raise EdgekitError(f"local rank {local} but this host has {gpus} GPUs; use --nproc-per-node {gpus} "
                               "(one process per GPU)")
        torch.cuda.set_device(local)
        tdist.init_process_group("cpu:gloo,cuda:nccl", timeout=timeout)
    else:
        tdist.init_process_group("gloo", timeout=timeout)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return world()


def shutdown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


@contextmanager
def session():
    """``with dist.session() as w:`` around a command: joins torchrun's group (if any) and leaves it
    when the body succeeds; on failure the process exits without a teardown handshake with peers
    that may already be gone."""
    w = init_from_env()
    yield w
    shutdown()


def device(preferred: str = "auto") -> torch.device:
    """This rank's compute device: its local GPU for "auto"/"cuda" when CUDA is present, else CPU."""
    if preferred != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", world().local_rank) if world().enabled else torch.device("cuda")
    if preferred == "cuda":
        raise EdgekitError("device='cuda' but no CUDA device is visible; use device='auto' or 'cpu'")
    return torch.device("cpu")


def shard_range(n: int, w: World | None = None) -> slice:
    """This rank's contiguous, balanced share of ``n`` items (sizes differ by at most one)."""
    w = w or world()
    return slice(n * w.rank // w.size, n * (w.rank + 1) // w.size)


def all_reduce_sums(values: list) -> list:
    """Sum each of ``values`` (tensors, ints, floats or None) over ranks, in one float64 collective.

    Returns the same kinds (tensors keep dtype and device, ints stay ints); a single process gets
    ``values`` back unchanged."""
    if not world().enabled:
        return list(values)
    parts = [torch.as_tensor(v, dtype=torch.float64).reshape(-1).cpu() for v in values if v is not None]
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    tdist.all_reduce(flat)
    out, i = [], 0
    for v in values:
        if v is None:
            out.append(None)
            continue
        n = v.numel() if torch.is_tensor(v) else 1
        chunk = flat[i: i + n]
        i += n
        if torch.is_tensor(v):
            out.append(chunk.view(v.shape).to(dtype=v.dtype, device=v.device))
        else:
            out.append(int(round(chunk.item())) if isinstance(v, int) else chunk.item())
    return out


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Mean of a detached scalar over ranks (for logging the global loss)."""
    if not world().enabled:
        return x.detach()
    return all_reduce_sums([x.detach()])[0] / world().size


def agree(ok: bool) -> bool:
    """True when ``ok`` holds on every rank (a barrier that also carries failure)."""
    if not world().enabled:
        return ok
    t = torch.tensor([1 if ok else 0], dtype=torch.int32)
    tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
    return bool(t.item())


def broadcast(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (picklable Python values only: flags, paths, small dicts)."""
    if not world().enabled:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def main_first(fn: Callable[[], object]):
    """Run ``fn`` (a check before any work, e.g. of ``-o``) on rank 0 alone and share its verdict:
    an ``EdgekitError`` there is raised on every rank with the same one-line message, instead of
    leaving the others in a collective. Returns ``fn()`` on rank 0 (and in one process), else None."""
    w = world()
    if not w.enabled:
        return fn()
    result = err = None
    if w.is_main:
        try:
            result = fn()
        except EdgekitError as e:
            err = str(e)
    err = broadcast(err)
    if err is not None:
        raise EdgekitError(err)
    return result


def publish(out: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Rank 0 calls ``write(tmp)`` on a staging dir beside ``out`` (``write`` may also replace ``tmp``
    wholesale, e.g. with ``checkpoint.save``, itself atomic); ``tmp`` becomes ``out`` only when every
    rank agrees that all went well. Other ranks write nothing. On any failure, on any rank, nothing
    is left behind and every rank raises."""
    out = Path(out)
    w = world()
    if not w.is_main:
        if not agree(True):
            raise EdgekitError(f"rank 0 failed while writing {out}; nothing was written (see its error)")
        return out
    tmp = staging_dir(out)
    try:
        try:
            write(tmp)
        except BaseException:
            if w.enabled:
                agree(False)
            raise
        if not agree(True):
            raise EdgekitError(f"another rank failed; {out} was not written (see that rank's error)")
        return finalize(tmp, out)
    except BaseException:
        discard(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# FSDP2 sharding of edgekit.model.Transformer
# ---------------------------------------------------------------------------------------------
@contextmanager
def quiet_fsdp():
    """FSDP2 warns that blocks return views (the latent cache slices); nothing in edgekit writes to
    them in place, so the warning is noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
        yield


def fsdp_copy(model, dev: torch.device):
    """A copy of ``model`` (a ``Transformer``) sharded over all ranks with FSDP2: each decoder block
    one ``fully_shard`` unit, embeddings, final norm and head in the root unit. Built on the meta
    device and filled from ``model``'s state, so no second full copy is made on ``dev``.
    ``forward_cached`` is registered as an FSDP forward method (it is what distillation calls)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(dev.type, (world().size,))
    with torch.device("meta"):
        m = type(model)(model.args)
    for layer in m.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    register_fsdp_forward_method(m, "forward_cached")
    m.to_empty(device=dev)
    set_model_state_dict(m, model.state_dict(), options=StateDictOptions(full_state_dict=True))
    with torch.no_grad():
        for name, b in model.named_buffers():       # incl. the non-persistent RoPE tables
            m.get_buffer(name).copy_(b)
    return m


@torch.no_grad()
def copy_full_(dst, sharded) -> None:
    """Copy the parameters of an ``fsdp_copy`` back into the plain model ``dst`` on every rank, one
    all-gathered tensor at a time (collective: every rank calls it)."""
    for name, p in sharded.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        dst.get_parameter(name).copy_(full)

