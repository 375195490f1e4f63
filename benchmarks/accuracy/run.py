"""Running the planned training runs: data sets, in-process workers, the 2-rank check.

Start-up (importing torch and DeepSpeed, building the op cache) costs seconds per
process, a sizeable share of a benchmark run of a minute; so each worker is one process
(world size 1, one torch thread) that runs its share of the runs in sequence through
:class:`dissect_ds.train.Trainer`, and :data:`PARALLEL` workers run side by side. The
selection is the same at any world size (the trainer's own tests check it); one run of
the plan is repeated with 2 ranks under torchrun as a check of that here.

    python -m benchmarks.accuracy.run JOBS.json     # a worker: run the jobs in order
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks import common as c
from benchmarks.accuracy.plan import Job

PARALLEL = 2  # workers side by side: one per core of the 2-core machine


def prepare_data(out: Path, num_samples: int, noise: float, val: int, image_size: int, shard: int, seed: int) -> Path:
    """``python -m dissect_ds.prepare synthetic ...`` into ``out`` once (kept and reused while
    its splits have the sizes asked for: another scale in the same work dir writes it again)."""
    if _pairs(out / "train") == num_samples and _pairs(out / "val") == val:
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "dissect_ds.prepare", "synthetic", "--num-samples", str(num_samples)]
    cmd += ["--noise-rate", str(noise), "--seed", str(seed), "--val-samples", str(val)]
    cmd += ["--image-size", str(image_size), "--shard-size", str(shard), "--output", str(tmp)]
    c.run(cmd, out.parent / "logs" / f"prepare_{out.name}.log", timeout=1800)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _pairs(split: Path) -> int:
    """Pairs in a written split (its ``sizes.json``), 0 when there is none."""
    sizes = split / "sizes.json"
    return sum(json.loads(sizes.read_text()).values()) if sizes.exists() else 0


def source_hash(src: Path) -> str:
    """A hash of the ``.py`` and ``.json`` files under ``src``, names and contents."""
    h = hashlib.blake2b(digest_size=8)
    for path in sorted(p for p in src.rglob("*") if p.suffix in (".py", ".json") and p.is_file()):
        h.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


@functools.cache
def code_version() -> str:
    """The trainer's sources (``dissect_ds/``) as this process found them: a run is reused
    only if the code that trained it is the code now."""
    return source_hash(c.ROOT / "dissect_ds")


def _spec(job: Job) -> dict:
    """What ``job.json`` stores beside a finished run: the job and the code's version."""
    return {**json.loads(json.dumps(asdict(job))), "code": code_version()}


def finished(job: Job) -> bool:
    """A finished run of exactly this job (its overrides stored beside it) by this code."""
    run_dir = Path(job.run_dir)
    spec = run_dir / "job.json"
    same = spec.is_file() and json.loads(spec.read_text()) == _spec(job)
    return (run_dir / "eval.json").is_file() and same


def run_jobs(jobs: list[Job], work: Path, reuse: bool, timeout: float, parallel: int = PARALLEL) -> None:
    """Run ``jobs`` (world size 1 ones in ``parallel`` in-process workers, the rest
    with torchrun), skipping finished ones when ``reuse``. Raises BenchError on a failure."""
    todo = [j for j in jobs if not (reuse and finished(j))]
    if len(todo) < len(jobs):
        print(f"  reusing {len(jobs) - len(todo)} finished runs", flush=True)
    single = [j for j in todo if j.world_size == 1]
    # Longest first, dealt round-robin: the workers end at about the same time.
    single.sort(key=lambda j: -j.cost)
    for j in single:  # a run being redone does not count as finished until it is
        (Path(j.run_dir) / "job.json").unlink(missing_ok=True)
    shares = [single[i::parallel] for i in range(parallel)]
    procs = []
    for i, share in enumerate(s for s in shares if s):
        spec = work / "logs" / f"worker{i}.json"
        spec.parent.mkdir(parents=True, exist_ok=True)
        spec.write_text(json.dumps([asdict(j) for j in share]))
        log = work / "logs" / f"worker{i}.log"
        cmd = [sys.executable, "-m", "benchmarks.accuracy.run", str(spec)]
        with log.open("w") as f:
            procs.append(
                (log, subprocess.Popen(cmd, cwd=c.ROOT, env=c.bench_env(), stdout=f, stderr=subprocess.STDOUT))
            )
    try:
        # The first failing worker stops the benchmark at once (the others are killed below).
        t0, running, done = time.perf_counter(), list(procs), 0
        while running:
            time.sleep(2)
            for log, proc in list(running):
                rc = proc.poll()
                if rc is not None and rc != 0:
                    raise c.BenchError(f"worker exit {rc}, log {log}:\n{c.tail(log)}")
                if rc == 0:
                    running.remove((log, proc))
            if time.perf_counter() - t0 > timeout:
                raise c.BenchError(f"worker timed out after {timeout:.0f} s\n{c.tail(running[0][0])}")
            now = sum(finished(j) for j in single)
            if now != done:
                done = now
                print(f"  {done}/{len(single)} runs finished ({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for job in (j for j in todo if j.world_size > 1):
        _torchrun(job, work, timeout)


def _torchrun(job: Job, work: Path, timeout: float) -> None:
    run_dir = Path(job.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    cmd = c.torchrun("-m", "dissect_ds.train", *job.overrides)
    cmd[1] = f"--nproc_per_node={job.world_size}"
    c.run(cmd, work / "logs" / f"{job.name}.log", timeout=timeout)
    _done(job, time.perf_counter() - t0)


def _done(job: Job, seconds: float) -> None:
    run_dir = Path(job.run_dir)
    c.prune_run(run_dir)
    (run_dir / "launch.json").write_text(json.dumps({"seconds": round(seconds, 1), "load_end": c.loadavg()}) + "\n")
    (run_dir / "job.json").write_text(json.dumps(_spec(job)))


def worker(jobs: list[Job]) -> None:
    """Run ``jobs`` one after another in this process (world size 1, one torch thread)."""
    import gc

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(c.free_port())
    import torch

    torch.set_num_threads(1)
    from dissect_ds import config as C
    from dissect_ds.engine import init_distributed
    from dissect_ds.train import Trainer

    info = init_distributed()
    code_version()  # the sources as imported above, not as they may be when the first run ends
    for job in jobs:
        run_dir = Path(job.run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.perf_counter()
        cfg = C.load(None, list(job.overrides))
        C.validate(cfg, 1)
        trainer = Trainer(cfg, info)
        final = trainer.fit()
        del trainer
        gc.collect()
        seconds = time.perf_counter() - t0
        _done(job, seconds)
        top1 = final.get("eval/zeroshot_top1", float("nan"))
        print(f"  {job.name}: {seconds:.0f} s, zero-shot top-1 {top1:.3f}, load {c.loadavg():.1f}", flush=True)


if __name__ == "__main__":
    worker([Job(**j) for j in json.loads(Path(sys.argv[1]).read_text())])
