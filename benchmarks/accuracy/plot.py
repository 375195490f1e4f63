"""The accuracy benchmark's figures (PNG, small): arm means with 95% intervals, accuracy
curves, AUROC of the selection signals, who gets selected, score histories."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from benchmarks.accuracy.analyse import TOP1, ArmResult, Run, epoch_series, score_history

COLORS = {
    "none": "black",
    "random": "tab:gray",
    "big_loss": "tab:red",
    "small_loss": "tab:orange",
    "current_score": "tab:blue",
    "dissect_warmup": "tab:green",
    "dissect_momentum": "tab:olive",
    "dissect_model": "tab:purple",
    "oracle_clipscore": "tab:cyan",
    "learnability": "tab:brown",
    "jest": "tab:pink",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)


def arms(results: dict[str, dict[str, ArmResult]], path: Path) -> None:
    """One panel per setting: each arm's mean final zero-shot top-1 with its 95% t interval."""
    plt = _plt()
    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n + 1, 3.8), sharey=True, squeeze=False)
    for ax, (label, res) in zip(axes[0], results.items()):
        names = list(res)
        for i, a in enumerate(names):
            r = res[a].top1
            err = None if math.isnan(r.lo) else [[r.mean - r.lo], [r.hi - r.mean]]
            ax.errorbar(i, r.mean, yerr=err, fmt="o", color=COLORS.get(a, "k"), capsize=4)
        if "none" in res:
            ax.axhline(res["none"].top1.mean, color="black", ls="--", lw=0.8)
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("final val zero-shot top-1 (mean, 95% CI)")
    _save(fig, path)


def curves(settings: dict[str, list[Run]], path: Path) -> None:
    """Zero-shot top-1 against training wall-clock and against backward samples, the mean
    over seeds at each evaluation, per arm; one row per setting."""
    plt = _plt()
    fig, axes = plt.subplots(len(settings), 2, figsize=(11, 3.4 * len(settings)), squeeze=False)
    for row, (label, runs) in zip(axes, settings.items()):
        by_arm: dict[str, list[Run]] = {}
        for r in runs:
            by_arm.setdefault(r.job.arm, []).append(r)
        for arm, rs in by_arm.items():
            steps = [m["step"] for m in rs[0].evals]
            y = np.array([[m[TOP1] for m in r.evals] for r in rs if len(r.evals) == len(steps)])
            wall = np.mean([[r.wall[s - 1] for s in steps] for r in rs], axis=0)
            seen = [rs[0].steps[s - 1]["selected_seen"] / 1000 for s in steps]
            for ax, x in zip(row, (wall, seen)):
                ax.plot(x, y.mean(0), "-o", ms=3, color=COLORS.get(arm), label=f"{arm} ({len(y)} seeds)")
        row[0].set_xlabel("training wall-clock (s, mean over seeds; one CPU thread)")
        row[1].set_xlabel("samples trained (backward, thousands)")
        for ax in row:
            ax.set_ylabel("val zero-shot top-1")
            ax.grid(alpha=0.3)
            ax.set_title(label, fontsize=9)
        row[1].legend(fontsize=7)
    _save(fig, path)


def auroc(full: Run | None, loop: list[Run], steps_per_epoch: int, path: Path) -> None:
    """AUROC of clean vs noisy per epoch: full-batch training with a shadow snapshot
    (``full``), and the DISSect arms under their own selection (the feedback loop)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    if full is not None:
        for key, style, name in (("current", "k-o", "current score"), ("differential", "g-o", "differential (shadow)")):
            e, v = epoch_series(full, f"selection/auroc_{key}", steps_per_epoch)
            ax.plot(e, v, style, ms=3, label=f"full data: {name}")
    for run in loop:
        e, v = epoch_series(run, "selection/auroc_differential", steps_per_epoch)
        ax.plot(e, v, "--", color=COLORS.get(run.job.arm), label=f"{run.job.arm}: differential (feedback loop)")
    ax.axhline(0.5, color="gray", lw=0.8, ls=":")
    ax.set(xlabel="epoch", ylabel="AUROC, clean vs noisy (high score = clean)", ylim=(0, 1.02))
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    _save(fig, path)


def selection(
    runs: list[Run], shares: dict[str, dict[str, float]], rate: float, noise: float, spe: int, path: Path
) -> None:
    """Clean precision per epoch, and the share of each group selected late in training."""
    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
    for run in runs:
        if run.job.arm != "none":
            e, v = epoch_series(run, "selection/clean_precision", spe)
            ax.plot(e, v, "-", color=COLORS.get(run.job.arm), label=run.job.arm)
    ax.axhline(1 - noise, color="black", ls="--", lw=0.8, label="random / full batch")
    ax.set(xlabel="epoch", ylabel="clean share of the selected pairs", ylim=(0, 1.02))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    names = [n for n in shares if n != "none"]
    groups = list(next(iter(shares.values()))) if shares else []
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        x = np.arange(len(groups)) + (i - (len(names) - 1) / 2) * width
        bx.bar(x, [shares[name][g] for g in groups], width, color=COLORS.get(name), label=name)
    bx.axhline(rate, color="black", ls="--", lw=0.8, label=f"rate {rate}")
    bx.set_xticks(np.arange(len(groups)), groups, fontsize=8)
    bx.set(ylabel="share of scored pairs selected (last 20% of steps)", ylim=(0, 1.02))
    bx.legend(fontsize=7)
    bx.grid(alpha=0.3, axis="y")
    _save(fig, path)


def scores(runs: list[Run], spe: int, path: Path) -> None:
    """Mean current (solid) and historical (dashed) score of clean and noisy pairs."""
    plt = _plt()
    shown = [r for r in runs if r.records and not np.isnan(r.records["current"]).all()]
    if not shown:
        shown = runs[:1]
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), sharey=True, squeeze=False)
    for ax, run in zip(axes.flat, shown):
        if run.records:
            h = score_history(run, spe)
            for label, color in (("clean", "tab:blue"), ("noisy", "tab:red")):
                ax.plot(h["epoch"], h[f"current/{label}"], "-", color=color, label=f"{label}: current")
                ax.plot(h["epoch"], h[f"historical/{label}"], "--", color=color, label=f"{label}: historical")
        ax.set_title(run.job.arm + (" (+ shadow)" if run.job.arm == "none" else ""), fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("mean score (100 x cos, clipped at 0)")
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    _save(fig, path)
