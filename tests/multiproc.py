"""Run a function on W CPU ranks in a real gloo process group and collect results."""

from __future__ import annotations

import os
import pickle
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp

from dissect_ds.distributed import free_port


def _worker(rank: int, world: int, port: int, fn, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        # Plain pickle copies tensors by value: torch's queue pickler would pass shared-memory
        # handles that die with this process, racing the parent's read.
        queue.put((rank, pickle.dumps(fn(rank, world, *args)), None))
        dist.destroy_process_group()
    except Exception:  # report instead of hanging the parent
        queue.put((rank, None, traceback.format_exc()))


def run_ranks(fn, world: int, *args, timeout: float = 120.0) -> list:
    """``fn(rank, world, *args)`` on ``world`` processes; returns results in rank order.
    ``fn`` must be a module-level function (it is pickled)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    try:
        for _ in range(world):
            rank, value, err = queue.get(timeout=timeout)
            if err:
                raise AssertionError(f"rank {rank} failed:\n{err}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
