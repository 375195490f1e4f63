"""What the benchmarks share: launching ranks, the machine's facts, spreads, markdown.

Every benchmark launches real processes with ``torchrun`` (2 ranks, gloo on CPU, one
OpenMP thread per rank so the ranks do not fight over the cores), reads what the trainer
writes (``metrics.jsonl``, TensorBoard event files) and renders a markdown section that
states the command reproducing it, the machine and the spread over repeats.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DOCS = ROOT / "docs"
WORK = ROOT / "runs" / "bench"
NPROC = 2
PERF_SECTIONS = ("throughput", "overhead", "memory", "loader")
PERF_TITLE = "## Performance: throughput, overhead, memory, data loader"


class BenchError(RuntimeError):
    """A benchmark process failed; the message carries the tail of its log."""


@dataclass(frozen=True)
class Spread:
    """min / median / max of repeated measurements (``n`` values)."""

    lo: float
    mid: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        v = sorted(float(x) for x in values)
        if not v:
            raise ValueError("Spread.of: no values")
        return cls(v[0], statistics.median(v), v[-1], len(v))

    def fmt(self, digits: int = 3, scale: float = 1.0) -> str:
        """``median [min–max]``, each multiplied by ``scale``."""
        d = digits
        return f"{self.mid * scale:.{d}f} [{self.lo * scale:.{d}f}–{self.hi * scale:.{d}f}]"

    def finite_positive(self) -> bool:
        return all(math.isfinite(x) and x > 0 for x in (self.lo, self.mid, self.hi))


def jest_chunks(k: int) -> int:
    """``selection.jest_chunks`` for k kept pairs: the most chunks, up to the paper's 16, that divide k."""
    return max(d for d in range(1, 17) if k % d == 0)


def median(values: Iterable[float]) -> float:
    v = list(values)
    if not v:
        raise ValueError("median: no values")
    return statistics.median(v)


# ------------------------------------------------------------------ machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def gpu_names() -> str:
    """GPU names from nvidia-smi, or ``none`` (avoids importing torch in the parent)."""
    if shutil.which("nvidia-smi") is None:
        return "none"
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, check=False
    )
    names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
    return ", ".join(names) if names else "none"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def loadavg() -> float:
    """The 1-minute load average: how busy the (shared) machine was."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def machine_line(load: tuple[float, float] | None = None) -> str:
    """One line naming the machine, and the load average at the start and end of a part."""
    line = f"Machine: {cores()} cores, {cpu_model()}, GPU: {gpu_names()}"
    if load is not None:
        when = datetime.now(timezone.utc)
        line += f"; measured {when:%Y-%m-%d %H:%M} UTC, 1-min load average {load[0]:.1f} at start, {load[1]:.1f} at end"
    return line + "."


# ------------------------------------------------------------------ launching


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_env() -> dict[str, str]:
    """The environment of every launched rank: one OpenMP thread per rank (2 ranks on
    2 cores), the repo importable. (Where DeepSpeed's JIT ops are cached and built is
    ``dissect_ds.engine.pin_jit_builds``'s concern, which every rank calls.)"""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


@functools.cache
def warm_jit(work: Path) -> None:
    """Build (or load) DeepSpeed's CPU shared-memory comm op once per process, before
    anything is timed, so no measured run pays for a compile."""
    code = (
        "from dissect_ds.engine import pin_jit_builds; pin_jit_builds(); "
        "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
    )
    run([str(BIN / "python"), "-c", code], work / "logs" / "warm_jit.log", timeout=900)


def torchrun(*args: str) -> list[str]:
    """``torchrun`` on :data:`NPROC` local ranks with a free rendezvous port.

    Put ``--`` before the script (or, with ``-m``, the module) when its options could be
    mistaken for torchrun's own abbreviated ones (``--logs`` matches ``--logs-specs``).
    """
    return [str(BIN / "torchrun"), f"--nproc_per_node={NPROC}", f"--master_port={free_port()}", *args]


def run(
    cmd: Sequence[str],
    log: Path,
    timeout: float,
    poll: Callable[[int], None] | None = None,
    poll_every: float = 0.2,
    env: dict[str, str] | None = None,
) -> float:
    """Run ``cmd`` from the repo root with :func:`bench_env` (plus ``env``), output to
    ``log``; return its wall-clock seconds. ``poll(pid)`` is called every ``poll_every``
    s while it runs.
    Raises :class:`BenchError` (with the log's tail) on a non-zero exit or a timeout."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(
            list(cmd), cwd=ROOT, env={**bench_env(), **(env or {})}, stdout=f, stderr=subprocess.STDOUT
        )
        try:
            while proc.poll() is None:
                if time.perf_counter() - t0 > timeout:
                    proc.kill()
                    proc.wait()
                    raise BenchError(f"timed out after {timeout:.0f} s: {' '.join(cmd)}\n{tail(log)}")
                if poll is not None:
                    poll(proc.pid)
                time.sleep(poll_every)
        except BaseException:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise
    if proc.returncode != 0:
        raise BenchError(f"exit {proc.returncode}: {' '.join(cmd)}\n{tail(log)}")
    return time.perf_counter() - t0


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def timed_setup(work: Path, num_samples: int, shard_size: int) -> Path:
    """What every timed part needs before its first measured run: the synthetic data set
    (:func:`ensure_synthetic`) and a built JIT cache (:func:`warm_jit`)."""
    data = ensure_synthetic(work, num_samples, shard_size)
    warm_jit(work)
    return data


def ensure_synthetic(work: Path, num_samples: int, shard_size: int, val_samples: int = 128) -> Path:
    """A synthetic data set (30% noisy captions, seed 0) under ``work/data``, written once
    and reused; returns the directory holding ``train/`` and ``val/``."""
    out = work / "data" / f"synthetic_n{num_samples}_shard{shard_size}"
    if (out / "train" / "sizes.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [str(BIN / "python"), "-m", "dissect_ds.prepare", "synthetic", "--num-samples", str(num_samples)]
    cmd += ["--noise-rate", "0.3", "--seed", "0", "--val-samples", str(val_samples)]
    cmd += ["--shard-size", str(shard_size), "--output", str(tmp)]
    run(cmd, work / "logs" / f"prepare_{out.name}.log", timeout=900)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def shard_paths(split_dir: Path) -> list[Path]:
    """The shards of a prepared split, in manifest order."""
    sizes = json.loads((split_dir / "sizes.json").read_text())
    return [split_dir / name for name in sorted(sizes)]


# ------------------------------------------------------------------ /proc


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (over all its threads), [] once it is gone."""
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(x) for x in (task / "children").read_text().split()]
    except OSError:
        pass
    return out


def descendants(pid: int) -> list[int]:
    todo, out = children(pid), []
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of live process ``pid`` (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime: fields 14, 15 of stat


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds used so far by ``root``'s live descendants (ranks, data workers)."""
    return sum(cpu_seconds(p) for p in descendants(root))


# ------------------------------------------------------------------ reading runs


def step_metrics(run_dir: Path) -> list[dict]:
    """The per-step lines of ``metrics.jsonl`` (those with a loss), in step order."""
    from dissect_ds.metrics import read_metrics

    return sorted((r for r in read_metrics(run_dir) if "loss" in r), key=lambda r: r["step"])


def loop_seconds(run_dir: Path) -> dict[int, float]:
    """Step -> seconds since the previous step was logged, from the wall times TensorBoard
    stores with each scalar: the whole loop iteration (data, step, logging, the
    preemption all-reduce), comparable to open_clip_train's ``batch_time``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    events = sorted(acc.Scalars("loss"), key=lambda e: e.step)
    return {b.step: b.wall_time - a.wall_time for a, b in zip(events, events[1:]) if b.step == a.step + 1}


def prune_run(run_dir: Path) -> None:
    """Delete a measured run's checkpoints and exported weights (~100 MB a run); its
    metrics.jsonl, TensorBoard files and logs stay for inspection."""
    for path in run_dir.rglob("*"):
        if path.is_dir() and path.name == "checkpoints":
            shutil.rmtree(path, ignore_errors=True)
    for path in run_dir.rglob("*.pt"):
        path.unlink(missing_ok=True)


def open_clip_train_data():
    """``open_clip_train.data`` with two compatibility shims: a stub for pandas (imported for
    its CSV dataset only; this project does not install it, the webdataset path never
    touches it), and ``eof_value=None`` for webdataset >= 0.2.96, whose end-of-shard
    ``eof_value={}`` marker open_clip_train's ``group_by_keys_nothrow`` cannot read
    (KeyError 'fname', mlfoundations/open_clip#935, where this fix is named)."""
    import types

    import webdataset.tariterators as wds_tar

    try:
        import pandas  # noqa: F401
    except ImportError:
        sys.modules["pandas"] = types.ModuleType("pandas")
    import open_clip_train.data as oc_data

    oc_data.tar_file_expander = functools.partial(wds_tar.tar_file_expander, eof_value=None)
    return oc_data


# ------------------------------------------------------------------ markdown


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _marker(name: str, end: bool = False) -> str:
    return f"<!-- bench:{'/' if end else ''}{name} -->"


def write_section(path: Path, name: str, body: str) -> None:
    """Replace section ``name`` of the generated ``perf.md`` at ``path`` (others are kept,
    so ``--only`` refreshes one part); sections stay in :data:`PERF_SECTIONS` order."""
    sections: dict[str, str] = {}
    if path.exists():
        text = path.read_text()
        for key in PERF_SECTIONS:
            m = re.search(re.escape(_marker(key)) + r"\n(.*?)\n" + re.escape(_marker(key, True)), text, re.S)
            if m:
                sections[key] = m.group(1)
    sections[name] = body.strip()
    parts = [PERF_TITLE, "", "Generated by `make bench`; each table names the command that reproduces it."]
    for key in PERF_SECTIONS:
        if key in sections:
            parts += ["", _marker(key), sections[key], _marker(key, True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(parts) + "\n")
    tmp.replace(path)


NOISE_NOTE = (
    "The machine is shared: other jobs ran beside these measurements, so single runs vary by tens of "
    "percent; the spread (median [min–max]) over repeats shows how much."
)


def part_main(part: str, run, render, argv: list[str] | None, doc: str, quick_help: str):
    """The command line of one perf part: ``--quick``, ``--out``, ``--work``; runs it, prints
    its section and writes it into ``OUT/bench/perf.md``. Returns ``run``'s result."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{part}", description=doc.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", type=Path, default=DOCS, help="docs directory (writes OUT/bench/perf.md)")
    p.add_argument("--work", type=Path, default=WORK, help="scratch directory for data, runs and logs")
    args = p.parse_args(argv)
    result = run(args.quick, args.work)
    text = render(result)
    print(text)
    write_section(args.out / "bench" / "perf.md", part, text)
    return result
