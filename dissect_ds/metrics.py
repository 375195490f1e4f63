"""Rank-0 metrics: ``metrics.jsonl`` (one JSON object per step) and TensorBoard scalars."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch


def read_metrics(run_dir: Path | str) -> list[dict]:
    """Every row of ``<run_dir>/metrics.jsonl`` in file order (steps and evaluations alike)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


class MetricsWriter:
    """Appends to ``<run_dir>/metrics.jsonl`` and ``<run_dir>/tensorboard/``.

    A no-op on ranks other than 0. Keys are the contract names of docs/design.md; TensorBoard
    groups them by the part before '/'. On resume, lines after the checkpointed step are
    dropped first so the file never holds a step twice.
    """

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [
                ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", -1) <= resume_step
            ]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.file = self.path.open("a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(
                str(run_dir / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1
            )

    def log(self, step: int, values: dict[str, float | int | None]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "step":
                    self.tb.add_scalar(k, v, step)

    def histogram(self, step: int, name: str, values: torch.Tensor) -> None:
        if self.enabled and self.tb is not None and values.numel() > 0:
            self.tb.add_histogram(name, values.float().cpu(), step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


class StepTimer:
    """Wall-clock sections of a step, e.g. ``with timer("data"): ...`` -> ``time/data``."""

    def __init__(self):
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Section:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.times[f"time/{name}"] = timer.times.get(f"time/{name}", 0.0) + time.perf_counter() - self.t0

        return _Section()

    def pop(self) -> dict[str, float]:
        out, self.times = self.times, {}
        return out
