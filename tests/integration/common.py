"""Run the real trainer as users do (torchrun with gloo on CPU) and read its outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dissect_ds.distributed import free_port
from dissect_ds.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def tiny_overrides(data: Path, out: Path, name: str) -> list[str]:
    """The debug config shrunk for tests: a few steps of a tiny model on 2 ranks."""
    return [
        f"data.train={data}/train",
        f"data.val={data}/val",
        f"run.output_dir={out}",
        f"run.name={name}",
        "train.batch_size=16",
        "train.warmup_steps=2",
        "log.progress=false",
        "log.every_steps=4",
        "eval.batch_size=64",
        "data.num_workers=0",
    ]


def env() -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = f"{ROOT}:{e.get('PYTHONPATH', '')}"
    return e


def torchrun(
    nproc: int, overrides: list[str], timeout: float = 600, check: bool = True, **kw
) -> subprocess.CompletedProcess:
    cmd = [
        str(BIN / "torchrun"),
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        "-m",
        "dissect_ds.train",
        "--config",
        str(ROOT / "configs/debug.yaml"),
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir)


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}
