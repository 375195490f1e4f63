"""Full-data throughput: our trainer against open_clip_train on the same model and data.

Both trainers train ``dissect-tiny-vit`` in fp32 on the same synthetic shards, the same
global batch, 2 ranks under ``torchrun`` (gloo on CPU), one data worker per rank, the
same optimizer settings; ours with ``selection.strategy=none`` and the demo's ZeRO-2
config, open_clip_train with DDP and ``--local-loss --gather-with-grad`` (the same loss
our trainer computes). Each repeat runs both back to back, alternating which goes first.
Throughput is steady state: the median step interval after ``skip`` warm-up steps, per
run. Ours is measured loop to loop (TensorBoard wall times), like open_clip_train's
``batch_time``; the in-step ``time/step`` of ``metrics.jsonl`` is reported beside it.

``python -m benchmarks.throughput [--quick]`` prints the table and writes its section
of ``docs/bench/perf.md``.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import common as c

MODEL = "dissect-tiny-vit"
COMMAND = ".venv/bin/python -m benchmarks.throughput"


@dataclass(frozen=True)
class Setup:
    samples: int  # training pairs, >= steps x batch (open_clip_train runs one epoch of that many)
    shard_size: int
    batch: int  # global
    steps: int
    skip: int  # warm-up steps left out of the steady state
    repeats: int
    trainers: tuple[str, ...]  # keys of TRAINERS


PARTS = ("time/train", "time/select", "time/select_wait", "time/data")  # of our loop, from metrics.jsonl
TRAINERS = {
    "ours": "dissect_ds, ZeRO-2 (configs/demo.yaml)",
    "ours_zero0": "dissect_ds, ZeRO-0",
    "open_clip": "open_clip_train, DDP",
}
"""What is compared. ZeRO-0 (no partitioning, one gradient all-reduce) is DeepSpeed's
counterpart of open_clip_train's DDP; ZeRO-2 (the demo config) adds the partitioned
gradient reduction and parameter all-gather, which cost time on a model this small."""
FULL = Setup(samples=4096, shard_size=512, batch=128, steps=30, skip=5, repeats=5, trainers=tuple(TRAINERS))
QUICK = Setup(samples=512, shard_size=128, batch=32, steps=6, skip=2, repeats=1, trainers=("ours", "open_clip"))


@dataclass
class Run:
    trainer: str  # a key of TRAINERS
    repeat: int
    samples_per_s: float  # batch / median loop interval after warm-up
    in_step_samples_per_s: float | None  # ours only: batch / median time/step
    wall_s: float  # launch to exit, start-up included
    cpu_per_step: float  # CPU seconds of all ranks and data workers per steady-state step
    parts: dict[str, float] = field(default_factory=dict)  # steady-state medians (s): loop and its parts


@dataclass
class Result:
    setup: Setup
    runs: list[Run] = field(default_factory=list)
    load: tuple[float, float] = (float("nan"), float("nan"))
    seconds: float = 0.0

    def spread(self, trainer: str, attr: str = "samples_per_s") -> c.Spread:
        return c.Spread.of(getattr(r, attr) for r in self.runs if r.trainer == trainer)

    def ratios(self, trainer: str = "ours", attr: str = "samples_per_s") -> list[float]:
        """``trainer``'s ``attr`` / open_clip's, per repeat (runs of a repeat ran back to back)."""
        by = {(r.trainer, r.repeat): getattr(r, attr) for r in self.runs}
        reps = sorted({r.repeat for r in self.runs})
        return [by[trainer, i] / by["open_clip", i] for i in reps if (trainer, i) in by and ("open_clip", i) in by]

    def ratio(self, trainer: str = "ours") -> c.Spread:
        """Throughput ratio ``trainer`` / open_clip_train over repeats (target >= 1 for ours)."""
        return c.Spread.of(self.ratios(trainer))

    def cpu_ratio(self, trainer: str = "ours") -> c.Spread:
        """open_clip's CPU seconds per step / ``trainer``'s (> 1: ``trainer`` needs less CPU)."""
        return c.Spread.of(1.0 / x for x in self.ratios(trainer, "cpu_per_step"))


# ------------------------------------------------------------------ the two trainers


def _ours(data: Path, s: Setup, out: Path, name: str, extra: tuple[str, ...] = ()) -> list[str]:
    overrides = [
        f"data.train={data}/train",
        "data.val=null",
        f"run.output_dir={out}",
        f"run.name={name}",
        "selection.strategy=none",
        "selection.rate=1.0",
        "selection.warmup_epochs=0",
        f"train.batch_size={s.batch}",
        f"train.steps={s.steps}",
        "checkpoint.every_steps=0",
        "eval.every_steps=0",
        "log.progress=false",
        *extra,
    ]
    return c.torchrun("-m", "dissect_ds.train", "--config", str(c.ROOT / "configs/demo.yaml"), *overrides)


def _open_clip(data: Path, s: Setup, out: Path, name: str) -> list[str]:
    """open_clip_train with the hyper-parameters of configs/demo.yaml (lr, betas, eps,
    weight decay, clipping; the LR warm-up length does not change the step cost)."""
    shards = "::".join(str(p) for p in c.shard_paths(data / "train"))
    args = ["--train-data", shards, "--dataset-type", "webdataset", "--train-num-samples", str(s.steps * s.batch)]
    args += ["--batch-size", str(s.batch // c.NPROC), "--workers", "1", "--epochs", "1", "--model", MODEL]
    args += ["--precision", "fp32", "--device", "cpu", "--local-loss", "--gather-with-grad"]
    args += ["--lr", "1e-3", "--wd", "0.1", "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6"]
    args += ["--warmup", "50", "--grad-clip-norm", "1.0", "--seed", "0", "--log-every-n-steps", "1"]
    args += ["--save-frequency", "0", "--logs", str(out), "--name", name]
    # `--` keeps torchrun from reading open_clip's --logs as its own --logs-specs.
    return c.torchrun("-m", "--", "benchmarks.throughput", "open_clip_worker", *args)


def open_clip_worker(argv: list[str]) -> None:
    """One open_clip_train rank (run under torchrun), after compatibility shims: those of
    :func:`benchmarks.common.open_clip_train_data`, plus

    - ``dissect-tiny-vit`` lives in dissect_ds/model_configs: registered here.
    - open_clip_train wraps the model in DDP with ``device_ids=[device]``, which torch
      rejects for CPU modules; CPU DDP needs ``device_ids=None``.
    """
    import open_clip
    import torch

    c.open_clip_train_data()
    from open_clip_train.main import main as open_clip_main

    ddp = torch.nn.parallel.DistributedDataParallel

    class CpuDDP(ddp):
        def __init__(self, module, device_ids=None, **kwargs):
            if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids=device_ids, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CpuDDP
    open_clip.add_model_config(c.ROOT / "dissect_ds" / "model_configs")
    open_clip_main(argv)


_OC_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+.*?Batch \(t\): ([0-9.]+)")


def open_clip_step_seconds(log: Path, global_batch: int) -> dict[int, float]:
    """Step -> seconds from open_clip_train's per-step log line (``--log-every-n-steps 1``
    resets its meters every step, so ``Batch (t)`` is that step's loop-to-loop time)."""
    out = {}
    for m in _OC_LINE.finditer(log.read_text()):
        out[int(m.group(1)) // global_batch] = float(m.group(2))
    return out


# ------------------------------------------------------------------ measurement


class CpuProbe:
    """Polled while a run goes: completed steps (``count()``, from the file the trainer
    appends each step) and the CPU seconds its process tree (ranks and data workers) has
    used. CPU per step barely depends on what else the shared machine runs, unlike wall
    time, so it is the steadier of the two comparisons."""

    def __init__(self, count: Callable[[], int]) -> None:
        self.count = count
        self.polls: list[tuple[int, float]] = []  # (steps done, tree CPU seconds)

    def __call__(self, root: int) -> None:
        self.polls.append((self.count(), c.tree_cpu_seconds(root)))

    def per_step(self, first: int, last: int) -> float:
        """CPU seconds per step between the first polls that saw ``first`` and ``last`` steps."""
        a = next(p for p in self.polls if p[0] >= first)
        b = next(p for p in self.polls if p[0] >= last)
        if b[0] <= a[0]:
            raise c.BenchError(f"CpuProbe: no steps between polls ({a}, {b}); is the run too short?")
        return (b[1] - a[1]) / (b[0] - a[0])


def _lines(path: Path, needle: str | None = None) -> int:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return 0
    return text.count(needle) if needle else text.count("\n")


def _steady(seconds: dict[int, float], skip: int) -> float:
    return c.median(v for step, v in seconds.items() if step > skip)


def measure_ours(data: Path, s: Setup, work: Path, repeat: int, trainer: str) -> Run:
    out, name = work / "throughput", f"{trainer}_r{repeat}"
    shutil.rmtree(out / name, ignore_errors=True)
    extra = ("deepspeed.zero_stage=0",) if trainer == "ours_zero0" else ()
    probe = CpuProbe(lambda: _lines(out / name / "metrics.jsonl"))  # one line per step
    cmd = _ours(data, s, out, name, extra)
    wall = c.run(cmd, work / "logs" / f"throughput_{name}.log", timeout=1200, poll=probe)
    loop = c.loop_seconds(out / name)
    rows = c.step_metrics(out / name)
    in_step = {m["step"]: m["time/step"] for m in rows}
    cpu = probe.per_step(s.skip, s.steps - 1)
    parts = {k: _steady({m["step"]: m[k] for m in rows}, s.skip) for k in PARTS}
    parts["loop"] = _steady(loop, s.skip)
    c.prune_run(out / name)
    return Run(trainer, repeat, s.batch / parts["loop"], s.batch / _steady(in_step, s.skip), wall, cpu, parts)


def measure_open_clip(data: Path, s: Setup, work: Path, repeat: int) -> Run:
    out, name = work / "throughput", f"open_clip_r{repeat}"
    shutil.rmtree(out / name, ignore_errors=True)
    probe = CpuProbe(lambda: _lines(out / name / "out.log", "Train Epoch"))
    wall = c.run(_open_clip(data, s, out, name), work / "logs" / f"throughput_{name}.log", timeout=1200, poll=probe)
    seconds = open_clip_step_seconds(out / name / "out.log", s.batch)
    if len(seconds) < s.steps:
        raise c.BenchError(f"open_clip_train logged {len(seconds)} of {s.steps} steps; see {out / name / 'out.log'}")
    cpu = probe.per_step(s.skip, s.steps - 1)
    loop = _steady(seconds, s.skip)
    c.prune_run(out / name)
    return Run("open_clip", repeat, s.batch / loop, None, wall, cpu, {"loop": loop})


def run(quick: bool, work: Path) -> Result:
    """Measure every trainer ``repeats`` times, back to back; the order rotates per repeat."""
    s = QUICK if quick else FULL
    t0, load0 = time.perf_counter(), c.loadavg()
    data = c.timed_setup(work, s.samples, s.shard_size)
    result = Result(s)
    for i in range(s.repeats):
        shift = i % len(s.trainers)
        for trainer in s.trainers[shift:] + s.trainers[:shift]:
            if trainer == "open_clip":
                r = measure_open_clip(data, s, work, i)
            else:
                r = measure_ours(data, s, work, i, trainer)
            result.runs.append(r)
            print(
                f"throughput repeat {i}: {r.trainer} {r.samples_per_s:.1f} samples/s, "
                f"{r.cpu_per_step:.2f} CPU s/step ({r.wall_s:.0f} s)",
                flush=True,
            )
    result.load, result.seconds = (load0, c.loadavg()), time.perf_counter() - t0
    return result


def breakdown(r: Result, trainer: str = "ours") -> str:
    """Where ``trainer``'s loop time goes, against open_clip_train's whole step (medians
    over repeats of per-run medians, ms)."""

    def part(t: str, key: str) -> float:
        return c.median(x.parts[key] for x in r.runs if x.trainer == t) * 1000

    loop, train = part(trainer, "loop"), part(trainer, "time/train")
    sel, wait, data = part(trainer, "time/select"), part(trainer, "time/select_wait"), part(trainer, "time/data")
    rest = loop - train - sel - wait - data
    return (
        f"Where the time goes ({TRAINERS[trainer].split(' (')[0]}, medians, ms): loop {loop:.0f} = engine "
        f"train step {train:.0f} + selection pass {sel:.0f} (`time/select`; `none` still gathers uids and noise "
        f"flags for the batch statistics) + first-collective wait {wait:.0f} + data {data:.0f} + the rest "
        f"{rest:.0f} (grad norm, metrics.jsonl and TensorBoard, the preemption all-reduce); open_clip_train's "
        f"whole step {part('open_clip', 'loop'):.0f}."
    )


def render(r: Result) -> str:
    s = r.setup
    rows = []
    for t in s.trainers:
        wall = c.Spread.of(x.wall_s for x in r.runs if x.trainer == t).fmt(0)
        rows.append([TRAINERS[t], r.spread(t).fmt(1), r.spread(t, "cpu_per_step").fmt(2), wall])
    rows.insert(
        1, ["dissect_ds, ZeRO-2, in-step `time/step`", r.spread("ours", "in_step_samples_per_s").fmt(1), "", ""]
    )
    for t in (t for t in s.trainers if t != "open_clip"):
        ratio = r.ratio(t)
        label, value = f"ratio {TRAINERS[t].split(' (')[0]} / open_clip_train", f"{ratio.fmt(3)}"
        label, value = f"**{label}**", f"**{value}** (target ≥ 1.0: {'met' if ratio.mid >= 1.0 else '**not met**'})"
        rows.append([label, value, f"{r.cpu_ratio(t).fmt(3)} (open_clip / ours)", ""])
    headers = ["trainer", "samples/s, median [min–max]", "CPU s per step", "run wall-clock s (with start-up)"]
    return "\n".join(
        [
            "### Throughput against open_clip_train (full data)",
            "",
            f"Reproduce: `{COMMAND}`. {c.machine_line(r.load)}",
            "",
            f"`{MODEL}`, fp32, {c.NPROC} ranks via torchrun (gloo), global batch {s.batch}, {s.samples} synthetic "
            f"pairs, 1 data worker per rank, {s.steps} steps per run of which the first {s.skip} are left out; "
            f"{s.repeats} repeats, the trainers back to back in each, in rotating order. "
            "dissect_ds: `selection.strategy=none`, configs/demo.yaml. open_clip_train: DDP, "
            "`--local-loss --gather-with-grad`, same optimizer settings (AdamW; ours runs torch's fused "
            "kernel, open_clip_train torch's default). samples/s = global batch / median "
            "step interval of a run (loop to loop for both); ratios pair the runs of each repeat. CPU s per "
            "step = CPU time of all ranks and data workers (from /proc) from the end of the last left-out "
            "step to the end of the last but one, per step: the work done rather than the share of the "
            "cores a run got, though on a shared machine it varies too.",
            "",
            c.md_table(headers, rows),
            "",
            breakdown(r),
            "",
            c.NOISE_NOTE + f" Produced in {r.seconds / 60:.1f} min.",
        ]
    )


def main(argv: list[str] | None = None) -> Result:
    return c.part_main("throughput", run, render, argv, __doc__, "tiny sizes, 1 repeat (smoke test)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["open_clip_worker"]:
        open_clip_worker(sys.argv[2:])
    else:
        main()
