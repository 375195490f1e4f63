"""Process-group set-up from any launcher, and the few collectives the rest uses.

Every other module takes a :class:`DistInfo` (or plain rank/world size) and calls the
functions below, so it runs unchanged in one process (world size 1, no process group)
and under gloo or NCCL. All collectives here work on tensors of the caller's device.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on this host now (for a single-host rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        # No scontrol: "gpu[07-08,10],cpu01" -> "gpu07" (prefix + first number of the range).
        m = re.match(r"([^,\[]*)(?:\[([^\],-]+))?", nodelist)
        return m.group(1) + (m.group(2) or "") if m and m.group(1) else nodelist


def env_from_launcher(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Return RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT.

    Order of precedence: torch-style variables (deepspeed launcher, torchrun, or set by
    the user), then SLURM (``srun``), then MPI (``mpirun``: Open MPI or MPICH/Hydra),
    then a single plain process. Pure function of ``environ`` so it is unit-testable.
    """
    env = dict(os.environ if environ is None else environ)
    out: dict[str, str] = {}
    if "RANK" in env and "WORLD_SIZE" in env:
        out["RANK"], out["WORLD_SIZE"] = env["RANK"], env["WORLD_SIZE"]
        out["LOCAL_RANK"] = env.get("LOCAL_RANK", "0")
        # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE.
        out["LOCAL_WORLD_SIZE"] = env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", env["WORLD_SIZE"]))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        out["RANK"], out["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        out["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        tasks_per_node = env.get("SLURM_NTASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", ""))
        out["LOCAL_WORLD_SIZE"] = tasks_per_node.split("(")[0].split(",")[0] or env["SLURM_NTASKS"]
        if "MASTER_ADDR" not in env:
            out["MASTER_ADDR"] = _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        if "MASTER_PORT" not in env:
            # Derived from the job id so all tasks agree without talking to each other.
            out["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    elif "OMPI_COMM_WORLD_RANK" in env:
        out["RANK"], out["WORLD_SIZE"] = env["OMPI_COMM_WORLD_RANK"], env["OMPI_COMM_WORLD_SIZE"]
        out["LOCAL_RANK"] = env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")
        out["LOCAL_WORLD_SIZE"] = env.get("OMPI_COMM_WORLD_LOCAL_SIZE", env["OMPI_COMM_WORLD_SIZE"])
    elif "PMI_RANK" in env and "PMI_SIZE" in env:
        out["RANK"], out["WORLD_SIZE"] = env["PMI_RANK"], env["PMI_SIZE"]
        out["LOCAL_RANK"] = env.get("MPI_LOCALRANKID", env["PMI_RANK"])
        out["LOCAL_WORLD_SIZE"] = env.get("MPI_LOCALNRANKS", env["PMI_SIZE"])
    else:
        out.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        if "MASTER_PORT" not in env:
            out["MASTER_PORT"] = str(free_port())
    out.setdefault("MASTER_ADDR", env.get("MASTER_ADDR", "127.0.0.1"))
    out.setdefault("MASTER_PORT", env.get("MASTER_PORT", "29500"))
    return out


def mpi_master_port() -> str:
    """Under mpirun, rank 0 picks a free port and broadcasts it (mpi4py)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    port = free_port() if comm.Get_rank() == 0 else None
    return str(comm.bcast(port, root=0))


def info_from_env() -> DistInfo:
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
    )


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_initialized() else 1


def rank(group=None) -> int:
    return dist.get_rank(group) if is_initialized() else 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def _comm(t: torch.Tensor) -> torch.Tensor:
    """``t`` on a device the backend can talk from (NCCL cannot send CPU tensors)."""
    if t.device.type == "cpu" and dist.get_backend() == "nccl":
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    return t


def all_reduce(t: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In-place all-reduce (``sum``, ``max`` or ``min``); returns ``t``."""
    if world_size(group) > 1:
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        x = _comm(t)
        dist.all_reduce(x, op=ops[op], group=group)
        if x is not t:
            t.copy_(x)
    return t


_LAUNCHER = re.compile(r"deepspeed|torchrun|torch\.distributed\.(run|launch)")


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])  # the name in (...) may hold spaces


def launcher_chain() -> list[tuple[int, int]]:
    """``(pid, parent pid)`` links from this process up to its outermost launcher ancestor
    (deepspeed's runner and per-node launcher, torchrun); [] without one or without /proc."""
    links, pid, top = [], os.getpid(), 0
    try:
        while pid > 1 and len(links) < 32:
            parent = _ppid(pid)
            links.append((pid, parent))
            cmd = Path(f"/proc/{parent}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if _LAUNCHER.search(cmd):
                top = len(links)
            pid = parent
    except (OSError, ValueError):
        pass
    return links[:top]


def launcher_alive(chain: list[tuple[int, int]]) -> bool:
    """False once any launcher of :func:`launcher_chain` died: its child was re-parented."""
    try:
        return all(_ppid(pid) == parent for pid, parent in chain)
    except (OSError, ValueError):
        return False


def all_ok(ok: bool, group=None) -> bool:
    """True on every rank iff ``ok`` is True on every rank."""
    return bool(all_reduce(torch.tensor([int(ok)]), "min", group)[0])


def all_gather_sizes(n: int, device: torch.device | str, group=None) -> list[int]:
    """Row counts of every rank (one tiny all-gather)."""
    if world_size(group) == 1:
        return [n]
    t = _comm(torch.tensor([n], dtype=torch.long, device=device))
    out = [torch.empty_like(t) for _ in range(world_size(group))]
    dist.all_gather(out, t, group=group)
    return [int(x.item()) for x in out]


def all_gather_cat(x: torch.Tensor, sizes: list[int] | None = None, group=None) -> torch.Tensor:
    """Concatenate ``x`` (shape ``[n_r, ...]``, n_r may differ per rank, even 0) over ranks.

    No gradient. ``sizes`` (every rank's n_r) saves one collective when already known.
    Returns ``[sum(n_r), ...]`` in rank order on every rank.
    """
    ws = world_size(group)
    if ws == 1:
        return x
    if x.dtype == torch.bool:  # gloo has no bool collectives
        return all_gather_cat(x.to(torch.uint8), sizes, group).bool()
    if sizes is None:
        sizes = all_gather_sizes(x.shape[0], x.device, group)
    pad = max(sizes)
    buf = _comm(x.new_zeros((pad, *x.shape[1:])))
    buf[: x.shape[0]] = x
    out = [torch.empty_like(buf) for _ in range(ws)]
    dist.all_gather(out, buf, group=group)
    return torch.cat([o[:n] for o, n in zip(out, sizes)], dim=0).to(x.device)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather_cat whose backward sums the gradient of the gathered tensor over
    ranks and returns this rank's slice, so that a loss computed on every rank from the
    gathered tensor back-propagates into each rank's own rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
        ctx.sizes, ctx.group = sizes, group
        ctx.rank = rank(group)
        return all_gather_cat(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        all_reduce(grad, "sum", ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def all_gather_cat_with_grad(x: torch.Tensor, sizes: list[int], group=None) -> torch.Tensor:
    """Like :func:`all_gather_cat`, differentiable with respect to this rank's rows."""
    if world_size(group) == 1:
        return x
    return _GatherWithGrad.apply(x, sizes, group)


def local_slice(sizes: list[int], rank_: int) -> slice:
    """Rows of ``rank_`` inside a tensor gathered with ``sizes``."""
    start = sum(sizes[:rank_])
    return slice(start, start + sizes[rank_])
