"""Time to accuracy of every selection strategy on the noisy synthetic set (issue 5, item 1).

    .venv/bin/python -m benchmarks.accuracy            # full: ~45 min on 2 quiet CPU cores
    .venv/bin/python -m benchmarks.accuracy --quick    # smoke version, tiny sizes

All runs use the real trainer (torchrun, 2 gloo ranks, ZeRO-2, configs/demo.yaml's model
and optimizer); sizes in :data:`FULL`:

1. Probe (METHOD.md, memorisation regime): full-batch training (``none``) of the tiny CLIP
   on 512 pairs at 40% noise for 48 epochs with a *shadow* snapshot taken after epoch 16
   and, in a second run, after epoch 1. The trainer logs per epoch the clean-vs-noisy AUROC
   of the current score and of the differential; late in training the differential should
   beat the current score with the epoch-16 snapshot and not with the epoch-1 one.
2. Sweep: every strategy at rate 0.3 on the same data, same seed, same steps. Reported:
   final val R@1 (both directions), zero-shot top-1, clean precision of the selection,
   backward samples, training wall-clock, time to full-data's final R@1, and per-pair
   records (``selection.record``) for the score-history and difficulty analyses.
3. Noise 0% and 20% (each with its own full-data reference) and rate 0.5 at 40%.
4. Seeds 1 and 2 for ``none`` and ``dissect_warmup``: the spread of R@1 and wall-clock.
5. One-pass regime: 10,240 pairs, one epoch, where nothing can be memorised.

The probe run *is* the sweep's ``none`` run (the shadow forwards do not change training);
its wall-clock excludes the two diagnostic forwards (``time/score`` and
``time/score_hist``, measured per step), which full-batch training does not need.
Writes ``accuracy.md`` and ``accuracy_*.png`` (see :func:`main`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = (
    "none",
    "random",
    "big_loss",
    "small_loss",
    "clipscore",
    "dissect_warmup",
    "dissect_momentum",
    "dissect_model",
)
DISSECT = ("dissect_warmup", "dissect_momentum", "dissect_model")
PATH_KEYS = ("data.train", "data.val", "run.output_dir")
# METHOD.md's probe with selection on (one CPU process, rate 0.3, 40 epochs, warm-up 10):
# strategy -> (clean precision in the last epochs, val mean R@1 at epoch 40, backward samples).
METHOD_PROBE_SWEEP = {
    "none": ("0.60 (all)", 0.083, 76_800),
    "random": ("0.60", 0.033, 22_800),
    "clipscore": ("0.99", 0.157, 22_800),
    "dissect_warmup": ("0.60-0.69", 0.075, 36_300),
    "dissect_momentum": ("0.55-0.68", 0.060, 36_300),
}
# METHOD.md's probe without selection: epoch -> (AUROC current, AUROC differential vs epoch-10).
METHOD_PROBE_AUROC = {10: (0.985, None), 20: (0.848, 0.720), 30: (0.618, 0.928), 39: (0.575, 0.976)}


@dataclass(frozen=True)
class Scale:
    """Sizes of one version of the benchmark (all runs share them)."""

    train: int  # train pairs
    val: int  # val pairs (always clean)
    batch: int  # global batch, before selection
    epochs: int
    snapshot_epoch: int  # probe snapshot and DISSect warm-up length, in epochs
    early_epoch: int  # the probe's early snapshot; 0 skips that run
    eval_every: int  # steps between evaluations (the curves' resolution)
    lr_warmup: int  # learning-rate warm-up steps
    shard_size: int
    noise: float = 0.4
    rate: float = 0.3
    strategies: tuple[str, ...] = STRATEGIES
    last_epochs: int = 5  # "late in training": the window averaged for precision and AUROC
    # Beyond the main sweep (same sizes, steps and evaluation unless said otherwise):
    other_noises: tuple[float, ...] = (0.0, 0.2)
    noise_strategies: tuple[str, ...] = ("none", "small_loss", "clipscore", "dissect_warmup")
    rate2: float = 0.5
    rate2_strategies: tuple[str, ...] = ("random", "clipscore", "dissect_warmup", "dissect_momentum")
    seeds: tuple[int, ...] = (1, 2)  # extra seeds (seed 0 is the main sweep)
    seed_strategies: tuple[str, ...] = ("none", "dissect_warmup")
    onepass_train: int = 10_240  # one-pass regime: this many pairs, one epoch, same noise and batch
    onepass_strategies: tuple[str, ...] = ("none", "random", "clipscore", "dissect_model")

    @property
    def steps_per_epoch(self) -> int:
        return self.train // self.batch  # as the trainer counts epochs

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch


# A small set visited many times: noisy pairs get memorised within the step budget that
# `make bench` affords (192 steps a run).
FULL = Scale(
    train=512,
    val=500,
    batch=128,
    epochs=48,
    snapshot_epoch=16,
    early_epoch=1,
    eval_every=16,
    lr_warmup=16,
    shard_size=128,
    last_epochs=8,
)
# Smoke version: the whole path (probe run with a shadow, one DISSect run, tables, plots)
# on a few steps; the numbers mean nothing.
QUICK = Scale(
    train=128,
    val=64,
    batch=32,
    epochs=2,
    snapshot_epoch=1,
    early_epoch=0,
    eval_every=4,
    lr_warmup=2,
    shard_size=64,
    strategies=("none", "dissect_warmup"),
    last_epochs=1,
    other_noises=(0.0,),
    noise_strategies=("none",),
    rate2_strategies=("dissect_warmup",),
    seeds=(1,),
    seed_strategies=("dissect_warmup",),
    onepass_train=256,
    onepass_strategies=("dissect_model",),
)


# ----------------------------------------------------------------------------- running


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_overrides(
    scale: Scale,
    strategy: str,
    shadow_epoch: int | None,
    record: bool,
    evaluate: bool = True,
    seed: int = 0,
    rate: float | None = None,
) -> list[str]:
    """Config overrides of one run beyond data and output paths (every key we rely on is
    set here, so changes to configs/demo.yaml do not silently change the benchmark)."""
    spe = scale.steps_per_epoch
    dissect = strategy in DISSECT
    rate = scale.rate if rate is None else rate
    out = [
        f"run.seed={seed}",
        f"train.steps={scale.steps}",
        f"train.batch_size={scale.batch}",
        "train.lr=1.0e-3",
        f"train.warmup_steps={scale.lr_warmup}",
        f"eval.every_steps={scale.eval_every if evaluate else 0}",
        f"eval.batch_size={scale.val}",
        "checkpoint.every_steps=0",
        "log.progress=false",
        f"log.every_steps={spe * 5}",
        "log.tensorboard=false",
        "log.histograms_every_steps=0",
        "data.num_workers=1",
        f"selection.strategy={strategy}",
        f"selection.rate={1.0 if strategy == 'none' else rate}",
        "selection.warmup_mode=full",
        f"selection.record={str(record).lower()}",
    ]
    if scale.epochs == 1 and dissect:
        # One pass: no pair comes back, so the warm-up/momentum memories are never hit; the
        # live historical model (dissect_model) is snapshotted after a fifth of the steps
        # (full-batch warm-up) and refreshed every fifth.
        fifth = max(1, scale.steps // 5)
        out += ["selection.warmup_epochs=0", f"selection.warmup_steps={fifth}", f"selection.refresh_steps={fifth}"]
    else:
        # DISSect as in METHOD.md's better probe variant: full-batch warm-up, then select.
        # The other strategies select from step 0, as in that probe.
        out.append(f"selection.warmup_epochs={scale.snapshot_epoch if dissect else 0}")
    if shadow_epoch is not None:
        # after_step(s) snapshots the weights after s + 1 updates: the end of that epoch.
        out += ["selection.shadow=true", f"selection.shadow_step={shadow_epoch * spe - 1}"]
    return out


def finished_with(run_dir: Path, overrides: list[str]) -> bool:
    """Whether ``run_dir`` holds a finished run (eval.json) whose resolved config has these
    ``key=value`` overrides; paths are not compared (a moved work dir stays reusable)."""
    import yaml

    if not (run_dir / "eval.json").is_file() or not (run_dir / "config.yaml").is_file():
        return False
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    for item in overrides:
        key, value = item.split("=", 1)
        if key in PATH_KEYS:
            continue
        node = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node != yaml.safe_load(value):
            return False
    return True


def train(name: str, data: Path, work: Path, extra: list[str], reuse: bool = False) -> Path:
    """One 2-rank torchrun of the trainer with overrides ``extra`` beyond the data and
    output paths; returns its run directory. Output goes to
    ``work/<name>.log``, launch-to-exit seconds and the load average to
    ``work/<name>.launch.json``; a failure
    raises with the log's tail. ``reuse`` keeps a finished run of the same config."""
    overrides = [f"data.train={data}/train", f"data.val={data}/val", f"run.output_dir={work}", f"run.name={name}"]
    overrides += extra
    run_dir = work / name
    if reuse and finished_with(run_dir, overrides):
        print(f"  {name}: reused {run_dir}", flush=True)
        return run_dir
    # The trainer refuses a run directory that holds checkpoints (it would be a resume).
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2", f"--master_port={_free_port()}"]
    cmd += ["-m", "dissect_ds.train", "--config", str(ROOT / "configs" / "demo.yaml"), *overrides]
    # One OpenMP thread per rank: two ranks on two cores must not oversubscribe them.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    logfile = work / f"{name}.log"
    t0 = time.perf_counter()
    with logfile.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = logfile.read_text()[-4000:]
        raise RuntimeError(f"run {name} failed (exit {proc.returncode}), log {logfile}:\n{tail}")
    seconds = time.perf_counter() - t0
    # The machine may be shared: the load average says how much the timings are worth.
    launch = {"seconds": round(seconds, 1), "load_end": round(os.getloadavg()[0], 2)}
    (work / f"{name}.launch.json").write_text(json.dumps(launch) + "\n")
    print(f"  {name}: {seconds:.0f} s (load average {launch['load_end']})", flush=True)
    return run_dir


# ----------------------------------------------------------------------------- reading


@dataclass
class Run:
    """What one finished run measured (rank 0's metrics.jsonl, eval.json, per-pair records)."""

    name: str
    strategy: str
    steps: list[dict]  # metrics lines with a training loss, in step order
    evals: list[dict]  # metrics lines with eval/mean_R@1 (periodic and final)
    final: dict  # eval.json
    records: dict[str, np.ndarray] = field(default_factory=dict)  # per-pair columns, see read_records

    def wall(self, diagnostic_forwards: bool) -> np.ndarray:
        """Cumulative training wall-clock after each step, seconds (rank 0's time/step:
        data, scoring, selection, train; not evaluation, checkpoints or start-up).
        ``diagnostic_forwards=False`` removes the scoring forwards (for ``none`` + shadow)."""
        t = np.array([m["time/step"] for m in self.steps])
        if not diagnostic_forwards:
            t = t - np.array([m.get("time/score", 0.0) + m.get("time/score_hist", 0.0) for m in self.steps])
        return np.cumsum(t)


def read_run(run_dir: Path, strategy: str) -> Run:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [m for m in lines if "loss" in m]
    evals = [m for m in lines if "eval/mean_R@1" in m]
    final = json.loads((run_dir / "eval.json").read_text())
    return Run(run_dir.name, strategy, steps, evals, final, read_records(run_dir))


def read_records(run_dir: Path) -> dict[str, np.ndarray]:
    """Per-pair lines of selection/rank*.jsonl as columns: step, uid, current, historical,
    selected, noisy (NaN where a score is null); {} when the run did not record."""
    rows = []
    for path in sorted((run_dir / "selection").glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            rows.append(
                (
                    r["step"],
                    r["uid"],
                    math.nan if r["current"] is None else r["current"],
                    math.nan if r["historical"] is None else r["historical"],
                    r["selected"],
                    r.get("noisy", False),
                )
            )
    if not rows:
        return {}
    a = np.array(rows, dtype=np.float64)
    names = ("step", "uid", "current", "historical", "selected", "noisy")
    return {n: a[:, i] for i, n in enumerate(names)}


def read_difficulty(train_dir: Path) -> np.ndarray:
    """``[N]`` difficulty of every train uid from the shards' JSON (-1 if absent)."""
    meta = []
    for tar in sorted(train_dir.glob("*.tar")):
        with tarfile.open(tar) as t:
            for member in t:
                if member.name.endswith(".json"):
                    meta.append(json.loads(t.extractfile(member).read()))
    out = np.full(max(m["uid"] for m in meta) + 1, -1, dtype=np.int64)
    for m in meta:
        out[m["uid"]] = m.get("difficulty", -1)
    return out


# ----------------------------------------------------------------------------- analysis


def epoch_mean(run: Run, key: str, spe: int) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, mean of ``key`` over each epoch's steps) for steps that logged it."""
    by_epoch: dict[int, list[float]] = {}
    for m in run.steps:
        if key in m:
            by_epoch.setdefault((m["step"] - 1) // spe + 1, []).append(m[key])
    e = np.array(sorted(by_epoch))
    return e, np.array([np.mean(by_epoch[i]) for i in e])


def epoch_values(run: Run, key: str, spe: int) -> tuple[np.ndarray, np.ndarray]:
    """(epoch, value) of a per-epoch metric (logged on the epoch's last step)."""
    pts = [(m["step"] // spe, m[key]) for m in run.steps if key in m]
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def late_mean(run: Run, key: str, scale: Scale, per_epoch: bool = False) -> float:
    """Mean of ``key`` over the last ``scale.last_epochs`` epochs (NaN when never logged)."""
    e, v = (epoch_values if per_epoch else epoch_mean)(run, key, scale.steps_per_epoch)
    keep = e > scale.epochs - scale.last_epochs
    return float(v[keep].mean()) if keep.any() else math.nan


def first_step(run: Run, target: float) -> int | None:
    """The step of the first evaluation with mean R@1 >= target, or None."""
    return next((m["step"] for m in run.evals if m["eval/mean_R@1"] >= target), None)


def time_to(run: Run, target: float, wall: np.ndarray) -> tuple[float, int] | None:
    """(wall-clock s, backward samples) at the first evaluation with mean R@1 >= target."""
    step = first_step(run, target)
    return None if step is None else (float(wall[step - 1]), int(run.steps[step - 1]["selected_seen"]))


def score_history(run: Run, spe: int) -> dict[str, np.ndarray]:
    """Per epoch: mean current / historical score of clean and of noisy pairs (all scored
    pairs, selected or not), from the per-pair records."""
    r = run.records
    epoch = (r["step"] // spe + 1).astype(int)
    out = {"epoch": np.arange(1, epoch.max() + 1)}
    for name in ("current", "historical"):
        for label, mask in (("clean", r["noisy"] == 0), ("noisy", r["noisy"] == 1)):
            v = r[name]
            ok = mask & ~np.isnan(v)
            s = np.bincount(epoch[ok], weights=v[ok], minlength=epoch.max() + 1)[1:]
            n = np.bincount(epoch[ok], minlength=epoch.max() + 1)[1:]
            out[f"{name}/{label}"] = np.where(n > 0, s / np.maximum(n, 1), np.nan)
    return out


def _groups(run: Run, difficulty: np.ndarray) -> dict[str, np.ndarray]:
    """Masks over the records: noisy pairs, and clean pairs by difficulty 0, 1, 2, 3+."""
    r = run.records
    d = np.minimum(difficulty[r["uid"].astype(int)], 3)
    groups = {"noisy": r["noisy"] == 1}
    groups.update({f"clean d={k}{'+' if k == 3 else ''}": (r["noisy"] == 0) & (d == k) for k in range(4)})
    return groups


def selection_by_group(run: Run, difficulty: np.ndarray, scale: Scale) -> dict[str, float]:
    """Share of each group's scored pairs selected over the last epochs: does a strategy
    avoid the noisy pairs, or the hard clean ones?"""
    r = run.records
    late = r["step"] // scale.steps_per_epoch >= scale.epochs - scale.last_epochs
    return {
        g: float(r["selected"][late & m].mean()) if (late & m).any() else math.nan
        for g, m in _groups(run, difficulty).items()
    }


def score_by_group(run: Run, difficulty: np.ndarray, scale: Scale, epoch: int) -> dict[str, float]:
    """Mean current score of each group over the scoring passes of ``epoch`` (1-based):
    are the "hard" clean pairs hard for this model?"""
    r = run.records
    at = (r["step"] // scale.steps_per_epoch + 1 == epoch) & ~np.isnan(r["current"])
    return {
        g: float(r["current"][at & m].mean()) if (at & m).any() else math.nan
        for g, m in _groups(run, difficulty).items()
    }


# ----------------------------------------------------------------------------- plots

COLORS = {
    "none": "black",
    "random": "tab:gray",
    "big_loss": "tab:red",
    "small_loss": "tab:orange",
    "clipscore": "tab:blue",
    "dissect_warmup": "tab:green",
    "dissect_momentum": "tab:olive",
    "dissect_model": "tab:purple",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_probe(late: Run, early: Run | None, scale: Scale, path: Path) -> None:
    plt = _plt()
    spe = scale.steps_per_epoch
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    e, v = epoch_values(late, "selection/auroc_current", spe)
    ax.plot(e, v, "k-o", ms=3, label="current score")
    e, v = epoch_values(late, "selection/auroc_differential", spe)
    ax.plot(e, v, "-o", color="tab:green", ms=3, label=f"differential, snapshot after epoch {scale.snapshot_epoch}")
    if early is not None:
        e, v = epoch_values(early, "selection/auroc_differential", spe)
        ax.plot(e, v, "-o", color="tab:red", ms=3, label=f"differential, snapshot after epoch {scale.early_epoch}")
    pe = list(METHOD_PROBE_AUROC)
    ax.plot(pe, [METHOD_PROBE_AUROC[x][0] for x in pe], "kx", ms=8, label="METHOD.md probe: current")
    pd = [x for x in pe if METHOD_PROBE_AUROC[x][1] is not None]
    ax.plot(pd, [METHOD_PROBE_AUROC[x][1] for x in pd], "x", color="tab:green", ms=8, label="METHOD.md probe: diff.")
    ax.axhline(0.5, color="gray", lw=0.8, ls=":")
    ax.set(xlabel="epoch", ylabel="AUROC, clean vs noisy (higher score = clean)", ylim=(0, 1.02))
    ax.set_title(f"Full-batch training, {scale.train} pairs, {scale.noise:.0%} noise: which signal finds the noise?")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(runs: list[Run], walls: dict[str, np.ndarray], scale: Scale, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    target = runs[0].final["eval/mean_R@1"]
    for run in runs:
        steps = [m["step"] for m in run.evals]
        r1 = [m["eval/mean_R@1"] for m in run.evals]
        x_wall = [walls[run.name][s - 1] for s in steps]
        x_samples = [run.steps[s - 1]["selected_seen"] / 1000 for s in steps]
        for ax, x in zip(axes, (x_wall, x_samples)):
            ax.plot(x, r1, "-o", ms=3, color=COLORS.get(run.strategy), label=run.strategy)
    for ax, xlabel in zip(
        axes, ("training wall-clock (s, rank 0, 2 CPU ranks)", "samples trained (backward, thousands)")
    ):
        ax.axhline(target, color="black", ls="--", lw=0.8, label="full data (none), final")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("val R@1, mean of image->text and text->image")
    axes[1].legend(fontsize=8, ncol=2)
    fig.suptitle(
        f"{scale.train} pairs, {scale.noise:.0%} noise, rate {scale.rate}, {scale.epochs} epochs, batch {scale.batch}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scores(runs: list[Run], scale: Scale, path: Path) -> None:
    """Mean current (solid) and historical (dashed) scores of clean and noisy pairs."""
    plt = _plt()
    shown = [r for r in runs if r.records and not np.isnan(r.records["current"]).all()]
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows), sharey=True, squeeze=False)
    for ax, run in zip(axes.flat, shown):
        h = score_history(run, scale.steps_per_epoch)
        for label, color in (("clean", "tab:blue"), ("noisy", "tab:red")):
            ax.plot(h["epoch"], h[f"current/{label}"], "-o", ms=2, color=color, label=f"{label}: current")
            ax.plot(h["epoch"], h[f"historical/{label}"], "--o", ms=2, color=color, label=f"{label}: historical")
        title = f"{run.strategy} (+ shadow)" if run.strategy == "none" else run.strategy
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("mean score, 100 x cos (clipped at 0)")
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Scores of clean vs noisy pairs over training (every scored pair; historical = snapshot/memory)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_selection(runs: list[Run], groups: dict[str, dict[str, float]], scale: Scale, path: Path) -> None:
    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5))
    for run in runs:
        e, v = epoch_mean(run, "selection/clean_precision", scale.steps_per_epoch)
        if run.strategy != "none":
            ax.plot(e, v, "-", color=COLORS.get(run.strategy), label=run.strategy)
    ax.axhline(1 - scale.noise, color="black", ls="--", lw=0.8, label="random / full batch")
    ax.set(xlabel="epoch", ylabel="clean share of the selected pairs", ylim=(0, 1.02))
    ax.set_title("Clean precision of the selection (epoch means)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    names = [n for n in groups if n != "none"]
    labels = list(next(iter(groups.values()))) if groups else []
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        x = np.arange(len(labels)) + (i - (len(names) - 1) / 2) * width
        bx.bar(x, [groups[name][g] for g in labels], width, color=COLORS.get(name), label=name)
    bx.axhline(scale.rate, color="black", ls="--", lw=0.8, label=f"rate {scale.rate}")
    bx.set_xticks(np.arange(len(labels)), labels)
    bx.set(ylabel="share of scored pairs selected", ylim=(0, 1.02))
    bx.set_title(f"Who is selected, last {scale.last_epochs} epochs (clean pairs by difficulty)")
    bx.legend(fontsize=7, ncol=2)
    bx.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- report


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU used (CPU ranks, gloo)"
    return f"{os.cpu_count()} cores, {cpu}, {gpu}, torch {torch.__version__}"


def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _header(scale: Scale, meta: dict[str, str], command: str) -> list[str]:
    se = math.sqrt(0.03 * 0.97 / scale.val)  # binomial, at the R@1 level these runs reach
    return [
        "# Time to accuracy: selection strategies on noisy synthetic pairs",
        "",
        f"Generated by `benchmarks/accuracy.py` ({meta['kind']}) on {meta['date']}. Reproduce: `{command}`.",
        "",
        f"- Machine: {meta['machine']}. Training took {meta['runs_s']}; the 1-minute load average at the end of "
        f"each run was {meta['load']} (2 cores: above 2, other jobs were competing and wall-clock carries that).",
        f"- Data: `python -m dissect_ds.prepare synthetic --num-samples {scale.train} --noise-rate {scale.noise} "
        f"--seed 0 --val-samples {scale.val}` (clean pairs of graded difficulty; val clean, rare combinations "
        "uniform there).",
        f"- Training: model `dissect-tiny-vit` (32x32, 2-layer width-128 towers), 2 ranks (torchrun, gloo, ZeRO-2), "
        f"global batch {scale.batch}, {scale.epochs} epochs = {scale.steps} steps, AdamW lr 1e-3 "
        f"({scale.lr_warmup} warm-up steps, cosine), seed 0 for every run of sections 1-3 (same data order).",
        f"- Selection: rate {scale.rate} of each global batch. DISSect variants: {scale.snapshot_epoch} warm-up "
        "epochs on the full batch (`warmup_mode=full`), then select; the others select from step 0.",
        f"- Measured: val R@1 on {scale.val} clean pairs every {scale.eval_every} steps (binomial standard error "
        f"of one R@1 near 0.03: {se:.3f}; one seed, so differences within {2 * se:.3f} are not evidence). "
        "Wall-clock = sum of rank 0's `time/step` (data, scoring, selection, training; no evaluation or start-up).",
        "",
    ]


def _probe_section(scale: Scale, none: Run, early: Run | None, image: str) -> tuple[list[str], dict]:
    spe = scale.steps_per_epoch
    curves = {"current": epoch_values(none, "selection/auroc_current", spe)}
    curves[f"diff. (snapshot ep. {scale.snapshot_epoch})"] = epoch_values(none, "selection/auroc_differential", spe)
    if early is not None:
        curves[f"diff. (snapshot ep. {scale.early_epoch})"] = epoch_values(early, "selection/auroc_differential", spe)
    loss = dict(zip(*(x.tolist() for x in epoch_mean(none, "loss", spe))))
    rows = []
    for ep in sorted({1, *range(5, scale.epochs + 1, 5), scale.epochs}):
        rows.append(
            [str(ep), _f(loss.get(ep), 2)] + [_f(dict(zip(*(x.tolist() for x in c))).get(ep)) for c in curves.values()]
        )
    late = {k: late_mean(none, f"selection/auroc_{k}", scale, per_epoch=True) for k in ("current", "differential")}
    late["early_snapshot_differential"] = (
        late_mean(early, "selection/auroc_differential", scale, per_epoch=True) if early else math.nan
    )
    checks = {
        "late_snapshot_beats_current": late["differential"] > late["current"],
        "early_snapshot_beats_current": late["early_snapshot_differential"] > late["current"] if early else None,
    }
    verdict = "; ".join(
        f"differential ({name} snapshot) > current: **{'yes' if ok else 'no'}**"
        for name, ok in (
            ("late", checks["late_snapshot_beats_current"]),
            ("early", checks["early_snapshot_beats_current"]),
        )
        if ok is not None
    )
    lines = [
        "## 1. Probe: does the differential find the noise? (full-batch training, shadow snapshot)",
        "",
        f"`none` at rate 1, `selection.shadow=true`, snapshot after epoch {scale.snapshot_epoch} "
        f"(`selection.shadow_step={scale.snapshot_epoch * spe - 1}`)"
        + (f" and, in a second run, after epoch {scale.early_epoch}" if early else "")
        + ". AUROC of clean vs noisy over each epoch's scoring passes (higher score = clean).",
        "",
        f"![probe]({image})",
        "",
        *_table(["epoch", "train loss", *(f"AUROC {k}" for k in curves)], rows),
        "",
        f"Last {scale.last_epochs} epochs: AUROC current {_f(late['current'])}, differential vs epoch-"
        f"{scale.snapshot_epoch} snapshot {_f(late['differential'])}"
        + (f", vs epoch-{scale.early_epoch} snapshot {_f(late['early_snapshot_differential'])}" if early else "")
        + f". Check: {verdict}. METHOD.md's probe (one process, 40 epochs): current 0.985 / 0.848 / 0.618 / 0.575 "
        "at epochs 10 / 20 / 30 / 39, differential vs epoch 10: - / 0.720 / 0.928 / 0.976, vs epoch 1: 0.02-0.43.",
        "",
    ]
    return lines, {"late_epochs": late, "checks": checks}


def _strategy_row(run: Run, wall: np.ndarray, targets: dict[str, float], scale: Scale) -> dict:
    best = max(run.evals, key=lambda m: m["eval/mean_R@1"])
    reached = {k: time_to(run, v, wall) for k, v in targets.items()}
    selecting = run.strategy != "none"
    return {
        "i2t_R@1": run.final["eval/i2t_R@1"],
        "t2i_R@1": run.final["eval/t2i_R@1"],
        "mean_R@1": run.final["eval/mean_R@1"],
        "best_mean_R@1": best["eval/mean_R@1"],
        "best_epoch": best["step"] / scale.steps_per_epoch,
        "zeroshot_top1": run.final.get("eval/zeroshot_top1", math.nan),
        "clean_precision": late_mean(run, "selection/clean_precision", scale) if selecting else None,
        "noisy_recall": late_mean(run, "selection/noisy_recall", scale) if selecting else None,
        "auroc_current": late_mean(run, "selection/auroc_current", scale, per_epoch=True),
        "auroc_differential": late_mean(run, "selection/auroc_differential", scale, per_epoch=True),
        "backward_samples": int(run.steps[-1]["selected_seen"]),
        "wall_s": float(wall[-1]),
        "median_step_s": float(np.median(np.diff(wall, prepend=0.0))),
        **{f"time_to_full_{k}_s": r[0] if r else None for k, r in reached.items()},
    }


def _sweep_section(
    scale: Scale,
    runs: list[Run],
    walls: dict[str, np.ndarray],
    groups: dict[str, dict[str, float]],
    group_scores: dict[int, dict[str, float]],
    images: dict[str, str],
) -> tuple[list[str], dict]:
    spe, none = scale.steps_per_epoch, runs[0]
    none_wall = float(walls[none.name][-1])
    best_none = max(none.evals, key=lambda m: m["eval/mean_R@1"])
    targets = {"final": none.final["eval/mean_R@1"], "best": best_none["eval/mean_R@1"]}
    table = {r.strategy: _strategy_row(r, walls[r.name], targets, scale) for r in runs}

    def when(t: float | None) -> str:
        return "not reached" if t is None else f"{t:.0f} s ({t / none_wall:.2f}x)"

    main_rows = [
        [
            s,
            _f(r["i2t_R@1"]),
            _f(r["t2i_R@1"]),
            f"**{_f(r['mean_R@1'])}**",
            f"{_f(r['best_mean_R@1'])} ({r['best_epoch']:.1f})",
            _f(r["zeroshot_top1"]),
            f"{r['backward_samples']:,}",
            f"{r['wall_s']:.0f}",
            f"{r['median_step_s']:.2f}",
            when(r["time_to_full_final_s"]),
            when(r["time_to_full_best_s"]),
        ]
        for s, r in table.items()
    ]
    lines = [
        "## 2. Strategies with selection on (the feedback loop)",
        "",
        f"Full data (`none`) ends at mean R@1 **{targets['final']:.3f}** after {none_wall:.0f} s; its best "
        f"evaluation was **{targets['best']:.3f}** at epoch {best_none['step'] / spe:.1f} (its wall-clock excludes "
        "the shadow's diagnostic forwards). *Time to X* = wall-clock at the first evaluation at or above X "
        f"(resolution {scale.eval_every} steps), and its ratio to full data's total wall-clock. Median step = "
        "median of rank 0's `time/step` (less sensitive to the other jobs on this machine than the sum).",
        "",
        *_table(
            [
                "strategy",
                "i2t R@1",
                "t2i R@1",
                "mean R@1",
                "best mean R@1 (epoch)",
                "zero-shot top-1",
                "backward samples",
                "wall-clock (s)",
                "median step (s)",
                "time to full data's final",
                "time to full data's best",
            ],
            main_rows,
        ),
        "",
    ]
    warm = scale.snapshot_epoch * spe
    dissect = [r for r in runs if r.strategy in DISSECT]
    if dissect:
        reached = ", ".join(f"`{r.strategy}` {when(table[r.strategy]['time_to_full_final_s'])}" for r in dissect)
        lines.append(f"Wall-clock DISSect needs to reach full data's final R@1: {reached}.")
        during = [r for r in dissect if (first_step(r, targets["final"]) or warm + 1) <= warm]
        if during:
            after = {
                r.strategy: max((m["eval/mean_R@1"] for m in r.evals if m["step"] > warm), default=0.0) for r in during
            }
            lines[-1] += (
                f" Read that with care: the DISSect variants train on the full batch for their first "
                f"{scale.snapshot_epoch} epochs, the same computation as `none` (their curves coincide there), and "
                f"{', '.join(f'`{s}`' for s in after)} reach the target inside that warm-up (step <= {warm}), so the "
                "time measures the warm-up, not the selection. Their best evaluation after warm-up: "
                + ", ".join(f"`{s}` {_f(v)}" for s, v in after.items())
                + "."
            )
        lines.append("")
    quality = [
        [s, _f(r["clean_precision"]), _f(r["noisy_recall"]), _f(r["auroc_current"]), _f(r["auroc_differential"])]
        for s, r in table.items()
    ]
    probe = [
        [
            s,
            f"{p_prec} / {'1.00 (all)' if s == 'none' else _f(table[s]['clean_precision'], 2)}",
            f"{p_r1:.3f} / {table[s]['mean_R@1']:.3f}",
            f"{p_n:,} / {table[s]['backward_samples']:,}",
        ]
        for s, (p_prec, p_r1, p_n) in METHOD_PROBE_SWEEP.items()
        if s in table
    ]
    group_names = list(next(iter(groups.values())))
    lines += [
        f"Selection quality, mean over the last {scale.last_epochs} epochs (random selection's clean precision is "
        f"{1 - scale.noise:.2f}; AUROC over each epoch's scoring passes, higher score = clean; for `none` the "
        "differential is the shadow's):",
        "",
        *_table(["strategy", "clean precision", "noisy recall", "AUROC current", "AUROC differential"], quality),
        "",
        f"![R@1 vs wall-clock and samples]({images['curves']})",
        "",
        "Next to METHOD.md's probe (one process, 40 epochs, no graded difficulty; its R@1 is the mean of both "
        "directions on 500 clean val pairs):",
        "",
        *_table(
            [
                "strategy",
                "clean precision: probe / here",
                "val mean R@1: probe / here",
                "backward samples: probe / here",
            ],
            probe,
        ),
        "",
        "Who gets selected: share of scored pairs kept over the last epochs, noisy pairs and clean pairs by "
        "difficulty (number of hardness factors: small object, low contrast, extra objects, rare combination).",
        "",
        *_table(["strategy", *group_names], [[s, *(_f(v, 2) for v in g.values())] for s, g in groups.items()]),
        "",
        'Are the "hard" clean pairs hard for this model? Mean current score of each group under full-batch '
        "training (`none`), by epoch:",
        "",
        *_table(["epoch", *group_names], [[str(e), *(_f(v, 1) for v in g.values())] for e, g in group_scores.items()]),
        "",
        f"![selection]({images['selection']})",
        "",
        "Mean scores of clean and noisy pairs over training, from the per-pair records "
        "(`selection.record=true`); historical = the shadow snapshot (`none`), the warm-up or momentum "
        "memory, or the live snapshot (`dissect_model`):",
        "",
        f"![scores]({images['scores']})",
        "",
    ]
    return lines, {"full_data": targets, "strategies": table, "selected_share_by_group": groups}


def report(
    scale: Scale,
    runs: list[Run],
    early: Run | None,
    walls: dict[str, np.ndarray],
    groups: dict[str, dict[str, float]],
    group_scores: dict[int, dict[str, float]],
    images: dict[str, str],
    command: str,
    meta: dict[str, str],
    extra: dict[str, list[Run]],
) -> tuple[str, dict]:
    """The markdown page and its key numbers (written to the work dir as accuracy.json)."""
    probe_lines, probe = _probe_section(scale, runs[0], early, images["probe"])
    sweep_lines, sweep = _sweep_section(scale, runs, walls, groups, group_scores, images)
    extra_lines, more = _extra_sections(scale, runs, extra, images["noise"])
    lines = [
        *_header(scale, meta, command),
        *probe_lines,
        *sweep_lines,
        *extra_lines,
        "See `docs/method_findings.md` for what these numbers say, and `docs/bench/accuracy_large.md` for an "
        "archived larger run (2,000 pairs, 40 epochs) whose model learns more.",
        "",
    ]
    summary = {"scale": dataclasses.asdict(scale), "probe": probe, **sweep, **more, "meta": meta}
    return "\n".join(lines), summary


def make_data(work: Path, scale: Scale, noise: float, train: int | None = None) -> Path:
    """The synthetic set of this scale at ``noise`` (``train`` pairs if given); same
    arguments, same bytes, so rewriting keeps reused runs valid."""
    from dissect_ds.data.synthetic import write_synthetic

    n = train or scale.train
    data = work / f"data_n{round(noise * 100)}" if train is None else work / f"data_n{round(noise * 100)}_{n}"
    write_synthetic(
        str(data),
        num_samples=n,
        noise_rate=noise,
        seed=0,
        val_samples=scale.val,
        shard_size=scale.shard_size if train is None else max(scale.shard_size, n // 8),
        progress=False,
    )
    return data


def run_extra(scale: Scale, data: Path, work: Path, reuse: bool) -> dict[str, list[Run]]:
    """The runs beyond the main sweep, by group: ``noise`` (other noise levels, each with
    its own ``none``), ``rate2``, ``seeds`` and ``onepass`` (one epoch over a larger set)."""
    out: dict[str, list[Run]] = {"noise": [], "rate2": [], "seeds": [], "onepass": []}
    for noise in scale.other_noises:
        d = make_data(work, scale, noise)
        for strategy in scale.noise_strategies:
            name = f"n{round(noise * 100)}_{strategy}"
            out["noise"].append(
                read_run(train(name, d, work, run_overrides(scale, strategy, None, False), reuse), strategy)
            )
    for strategy in scale.rate2_strategies:
        name = f"rate{round(scale.rate2 * 100)}_{strategy}"
        overrides = run_overrides(scale, strategy, None, False, rate=scale.rate2)
        out["rate2"].append(read_run(train(name, data, work, overrides, reuse), strategy))
    for seed in scale.seeds:
        for strategy in scale.seed_strategies:
            overrides = run_overrides(scale, strategy, None, False, seed=seed)
            out["seeds"].append(read_run(train(f"seed{seed}_{strategy}", data, work, overrides, reuse), strategy))
    one = dataclasses.replace(scale, train=scale.onepass_train, epochs=1)
    d = make_data(work, scale, scale.noise, train=scale.onepass_train)
    for strategy in scale.onepass_strategies:
        overrides = run_overrides(one, strategy, None, False)
        out["onepass"].append(read_run(train(f"onepass_{strategy}", d, work, overrides, reuse), strategy))
    return out


def _row(run: Run, ref: Run | None, scale: Scale, label: str) -> tuple[list[str], dict]:
    """One line of the extra tables: :func:`_strategy_row`'s values, timed against ``ref``'s
    final mean R@1 (None: no reference)."""
    # `none` runs: without the shadow's diagnostic forwards (full-batch training needs none).
    wall = run.wall(diagnostic_forwards=run.strategy != "none")
    values = _strategy_row(run, wall, {} if ref is None else {"final": ref.final["eval/mean_R@1"]}, scale)
    reached = values.setdefault("time_to_full_final_s", None)  # no reference: None
    when = "-" if ref is None or ref is run else "not reached"
    if reached is not None and ref is not run:
        when = f"{reached:.0f} s ({reached / float(ref.wall(diagnostic_forwards=False)[-1]):.2f}x)"
    cells = [
        label,
        run.strategy,
        f"**{_f(values['mean_R@1'])}**",
        _f(values["best_mean_R@1"]),
        _f(values["zeroshot_top1"]),
        _f(values["clean_precision"]),
        f"{values['backward_samples']:,}",
        f"{values['wall_s']:.0f}",
        when,
    ]
    return cells, values


def _noise(run: Run) -> float:
    """The noise level of a section-3 run, from its name ``n<percent>_<strategy>``."""
    return float(run.name.split("_")[0][1:]) / 100


ROW_HEADER = [
    "setting",
    "strategy",
    "final mean R@1",
    "best mean R@1",
    "zero-shot top-1",
    "clean precision",
    "backward samples",
    "wall-clock (s)",
    "time to full data's final",
]


def _spread(values: list[float | None], digits: int = 3) -> str:
    """median [min-max] of the values that exist."""
    v = sorted(x for x in values if x is not None and not math.isnan(x))
    return "-" if not v else f"{np.median(v):.{digits}f} [{v[0]:.{digits}f}-{v[-1]:.{digits}f}]"


def _extra_sections(scale: Scale, runs: list[Run], extra: dict[str, list[Run]], image: str) -> tuple[list[str], dict]:
    """Sections 3-5: noise levels and rate 0.5, seeds, the one-pass regime."""
    main = {r.strategy: r for r in runs}
    pct = f"{scale.noise:.0%}"
    rows, summary = [], {"noise_levels": {}, "rate2": {}, "seeds": {}, "onepass": {}}
    by_noise: dict[float, dict[str, Run]] = {n: {} for n in scale.other_noises}
    for run in extra["noise"]:
        by_noise[_noise(run)][run.strategy] = run
    for noise, group in sorted(by_noise.items()):
        for strategy, run in group.items():
            cells, values = _row(run, group.get("none"), scale, f"noise {noise:.0%}, rate {scale.rate}")
            rows.append(cells)
            summary["noise_levels"][f"{noise:.0%}/{strategy}"] = values
    for strategy, run in main.items():
        if strategy in scale.noise_strategies:
            cells, _ = _row(run, main.get("none"), scale, f"noise {pct}, rate {scale.rate} (section 2)")
            rows.append(cells)
    for run in extra["rate2"]:
        cells, values = _row(run, main.get("none"), scale, f"noise {pct}, rate {scale.rate2}")
        rows.append(cells)
        summary["rate2"][run.strategy] = values
    lines = [
        f"## 3. Noise 0-{pct} and rate {scale.rate2}",
        "",
        f"Same sizes, steps, evaluations and seed as section 2; noise {', '.join(f'{n:.0%}' for n in scale.other_noises)}"
        f" for {', '.join(f'`{s}`' for s in scale.noise_strategies)} (each level has its own data set and its own "
        f"full-data reference), and rate {scale.rate2} at {pct} noise for "
        f"{', '.join(f'`{s}`' for s in scale.rate2_strategies)}. The {pct} rows at rate {scale.rate} repeat section 2. "
        "Time to full data's final = wall-clock to reach the final mean R@1 of `none` at the same noise level "
        "(ratio to its wall-clock).",
        "",
        *_table(ROW_HEADER, rows),
        "",
        f"![by noise level]({image})",
        "",
    ]
    # Seeds: seed 0 is the main sweep's run.
    seeded: dict[str, list[tuple[Run, Run | None]]] = {}
    for strategy in scale.seed_strategies:
        if strategy in main:
            seeded[strategy] = [(main[strategy], main.get("none"))]
    for run in extra["seeds"]:
        seed = run.name.split("_")[0]
        ref = next((r for r in extra["seeds"] if r.strategy == "none" and r.name.startswith(seed + "_")), None)
        seeded.setdefault(run.strategy, []).append((run, ref))
    seed_rows = []
    for strategy, pairs in seeded.items():
        vals = [_row(run, ref, scale, "")[1] for run, ref in pairs]
        summary["seeds"][strategy] = vals
        seed_rows.append(
            [
                strategy,
                str(len(vals)),
                _spread([v["mean_R@1"] for v in vals]),
                _spread([v["zeroshot_top1"] for v in vals]),
                _spread([v["clean_precision"] for v in vals]),
                _spread([v["wall_s"] for v in vals], 0),
                _spread([v["time_to_full_final_s"] for v in vals], 0),
            ]
        )
    lines += [
        f"## 4. Repeats over seeds ({pct} noise, rate {scale.rate})",
        "",
        f"Seeds 0 (section 2) and {', '.join(map(str, scale.seeds))}: the seed sets the initial weights, the data "
        "order and the selection's random tie-breaks; the data set is the same. Median [min-max] over the seeds; "
        "time to full data's final uses the `none` run of the same seed as reference (seconds).",
        "",
        *_table(
            [
                "strategy",
                "runs",
                "final mean R@1",
                "zero-shot top-1",
                "clean precision",
                "wall-clock (s)",
                "time to full data's final (s)",
            ],
            seed_rows,
        ),
        "",
    ]
    one_ref = next((r for r in extra["onepass"] if r.strategy == "none"), None)
    one = dataclasses.replace(scale, train=scale.onepass_train, epochs=1, last_epochs=1)
    one_rows = []
    for run in extra["onepass"]:
        cells, values = _row(run, one_ref, one, "one pass")
        one_rows.append(cells)
        summary["onepass"][run.strategy] = values
    lines += [
        "## 5. One-pass regime",
        "",
        f"{scale.onepass_train:,} pairs at {pct} noise, one epoch ({scale.onepass_train // scale.batch} steps, batch "
        f"{scale.batch}), rate {scale.rate}: no pair is seen twice, so noisy pairs cannot be memorised and the "
        "warm-up/momentum memories are never hit (those variants are left out). `dissect_model` trains on the full "
        f"batch for the first fifth of the steps, then compares against a live snapshot refreshed every fifth.",
        "",
        *_table(ROW_HEADER, one_rows),
        "",
    ]
    return lines, summary


def plot_noise(runs: list[Run], extra: dict[str, list[Run]], scale: Scale, path: Path) -> None:
    """Final mean R@1 and clean precision against the noise level, per strategy."""
    plt = _plt()
    points: dict[str, list[tuple[float, Run]]] = {}
    for run in runs:
        if run.strategy in scale.noise_strategies:
            points.setdefault(run.strategy, []).append((scale.noise, run))
    for run in extra["noise"]:
        points.setdefault(run.strategy, []).append((_noise(run), run))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.3))
    for strategy, pts in points.items():
        pts.sort(key=lambda p: p[0])
        x = [100 * n for n, _ in pts]
        ax.plot(x, [r.final["eval/mean_R@1"] for _, r in pts], "-o", color=COLORS.get(strategy), label=strategy)
        if strategy != "none":
            prec = [late_mean(r, "selection/clean_precision", scale) for _, r in pts]
            bx.plot(x, prec, "-o", color=COLORS.get(strategy), label=strategy)
    noises = sorted({100 * n for pts in points.values() for n, _ in pts})
    bx.plot(noises, [1 - n / 100 for n in noises], "k--", lw=0.8, label="random / full batch")
    ax.set(xlabel="noise (% of train pairs with a wrong caption)", ylabel="final val R@1 (mean of both directions)")
    bx.set(
        xlabel="noise (% of train pairs with a wrong caption)", ylabel="clean share of selected pairs", ylim=(0, 1.02)
    )
    ax.set_title(f"Final accuracy, rate {scale.rate}, {scale.epochs} epochs")
    bx.set_title(f"Clean precision, last {scale.last_epochs} epochs")
    for a in (ax, bx):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark; write ``accuracy.md`` and ``accuracy_*.png`` (and the key numbers to ``WORK/accuracy.json``).

    ``--out DIR`` puts everything in DIR (images under DIR/img); by default the page goes
    to docs/bench/ and the images to docs/img/. Training runs go to ``--work``
    (default: runs/bench_accuracy, or DIR/work with --out).
    """
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke version (a few steps; numbers mean nothing)")
    p.add_argument("--out", type=Path, help="output directory (default: docs/bench + docs/img)")
    p.add_argument("--work", type=Path, help="where data and training runs go")
    p.add_argument("--reuse", action="store_true", help="keep finished runs of the same config in the work dir")
    p.add_argument("--epochs", type=int, help=f"training epochs of every run (default {FULL.epochs})")
    p.add_argument(
        "--all-strategies",
        action="store_true",
        help="every strategy at every noise level and rate, seeds and one pass included (54 runs against the "
        "default's 29, which fit make bench's hour)",
    )
    args = p.parse_args(argv)
    scale = QUICK if args.quick else FULL
    if args.epochs:
        scale = dataclasses.replace(scale, epochs=args.epochs)
    if args.all_strategies:
        chosen = scale.strategies
        scale = dataclasses.replace(
            scale,
            noise_strategies=chosen,
            rate2_strategies=tuple(s for s in chosen if s != "none"),
            seed_strategies=chosen,
            onepass_strategies=tuple(s for s in chosen if s not in ("dissect_warmup", "dissect_momentum")),
        )
    md_dir, img_dir = (args.out, args.out / "img") if args.out else (ROOT / "docs/bench", ROOT / "docs/img")
    work = args.work or (args.out / "work" if args.out else ROOT / "runs" / "bench_accuracy")
    for d in (md_dir, img_dir, work):
        d.mkdir(parents=True, exist_ok=True)
    command = ".venv/bin/python -m benchmarks.accuracy" + (" --quick" if args.quick else "")
    command += f" --epochs {args.epochs}" if args.epochs else ""
    command += " --all-strategies" if args.all_strategies else ""

    data = make_data(work, scale, scale.noise)
    print(f"accuracy benchmark ({'quick' if args.quick else 'full'}): {scale.steps} steps per run, work dir {work}")
    runs = []
    for strategy in scale.strategies:
        shadow = scale.snapshot_epoch if strategy == "none" else None
        run_dir = train(strategy, data, work, run_overrides(scale, strategy, shadow, record=True), args.reuse)
        runs.append(read_run(run_dir, strategy))
    early = None
    if scale.early_epoch:
        overrides = run_overrides(scale, "none", scale.early_epoch, record=False, evaluate=False)
        early = read_run(train("none_early_snapshot", data, work, overrides, args.reuse), "none")

    extra = run_extra(scale, data, work, args.reuse)

    walls = {r.name: r.wall(diagnostic_forwards=r.strategy != "none") for r in runs}
    difficulty = read_difficulty(data / "train")
    groups = {r.strategy: selection_by_group(r, difficulty, scale) for r in runs}
    images = {}
    for key, plot in (
        ("probe", lambda path: plot_probe(runs[0], early, scale, path)),
        ("curves", lambda path: plot_curves(runs, walls, scale, path)),
        ("selection", lambda path: plot_selection(runs, groups, scale, path)),
        ("scores", lambda path: plot_scores(runs, scale, path)),
        ("noise", lambda path: plot_noise(runs, extra, scale, path)),
    ):
        path = img_dir / f"accuracy_{key}.png"
        plot(path)
        images[key] = os.path.relpath(path, md_dir)
    names = (
        [r.name for r in runs]
        + (["none_early_snapshot"] if early else [])
        + [r.name for g in extra.values() for r in g]
    )
    launches = [json.loads(f.read_text()) for n in names if (f := work / f"{n}.launch.json").is_file()]
    loads = [x["load_end"] for x in launches if x.get("load_end") is not None]
    meta = {
        "kind": "quick smoke version: numbers mean nothing" if args.quick else "full version",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "runs_s": f"{sum(x['seconds'] for x in launches):.0f} s over {len(launches)} runs (launch to exit)",
        "load": f"{min(loads):.1f}-{max(loads):.1f}" if loads else "not recorded",
    }
    epochs = sorted({1, scale.snapshot_epoch, scale.epochs})
    group_scores = {e: score_by_group(runs[0], difficulty, scale, e) for e in epochs}
    text, summary = report(scale, runs, early, walls, groups, group_scores, images, command, meta, extra)
    (md_dir / "accuracy.md").write_text(text)
    (work / "accuracy.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"wrote {md_dir / 'accuracy.md'} and {len(images)} plots in {img_dir}")


if __name__ == "__main__":
    main()
