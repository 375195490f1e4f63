"""From finished runs to numbers: per-arm means with t intervals, paired differences,
verdicts, the gate, time to full data's accuracy, and the selection diagnostics.

The decision metric is the final zero-shot top-1 on the balanced val split (one label
per image); retrieval (mean R@1 of both directions, ceiling 1.0) is reported beside it.
Seeds are paired: seed s of every arm shares the initial weights and the data order, so
an arm is compared with a reference through the per-seed differences.
"""

from __future__ import annotations

import json
import logging
import math
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from benchmarks import common as c
from benchmarks.accuracy.plan import Job, Scale, is_dissect
from dissect_ds.metrics import read_metrics

TOP1, R1 = "eval/zeroshot_top1", "eval/mean_R@1"


@dataclass
class Run:
    """What one finished run measured (metrics.jsonl, eval.json, per-pair records)."""

    job: Job
    steps: list[dict]  # metrics lines with a training loss, in step order
    evals: list[dict]  # lines with an evaluation (periodic and final)
    final: dict
    seconds: float  # launch to exit (start-up, training, evaluations)
    records: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def wall(self) -> np.ndarray:
        """Cumulative training wall-clock after each step (s): the trainer's time/step (data,
        scoring, selection, training) less the shadow's diagnostic forwards of ``none``."""
        t = np.array([m["time/step"] for m in self.steps])
        if self.job.arm == "none":
            t = t - np.array([m.get("time/score", 0.0) + m.get("time/score_hist", 0.0) for m in self.steps])
        return np.cumsum(t)


def read_run(job: Job) -> Run:
    d = Path(job.run_dir)
    steps = c.step_metrics(d)
    evals = [m for m in read_metrics(d) if R1 in m]
    final = json.loads((d / "eval.json").read_text())
    launch = json.loads((d / "launch.json").read_text())
    return Run(job, steps, evals, final, launch["seconds"], read_records(d))


def read_records(run_dir: Path) -> dict[str, np.ndarray]:
    """Per-pair lines of selection/rank*.jsonl as columns: step, uid, current, historical,
    selected, noisy (NaN where a score is null); {} when the run did not record."""
    rows = []
    for path in sorted((run_dir / "selection").glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            cur, hist = r["current"], r["historical"]
            rows.append(
                (
                    r["step"],
                    r["uid"],
                    math.nan if cur is None else cur,
                    math.nan if hist is None else hist,
                    r["selected"],
                    r.get("noisy", False),
                )
            )
    if not rows:
        return {}
    a = np.array(rows, dtype=np.float64)
    return {n: a[:, i] for i, n in enumerate(("step", "uid", "current", "historical", "selected", "noisy"))}


def read_meta(split_dir: Path) -> list[dict]:
    """The JSON of every pair of a prepared split, in uid order."""
    meta = []
    for tar in sorted(split_dir.glob("*.tar")):
        with tarfile.open(tar) as t:
            for member in t:
                if member.name.endswith(".json"):
                    meta.append(json.loads(t.extractfile(member).read()))
    return sorted(meta, key=lambda m: m["uid"])


def val_facts(val_dir: Path) -> dict:
    """Check the val split is well posed (every caption distinct and true of its own image
    only, so retrieval's ceiling is 1.0) and describe it (size, classes, balance)."""
    from dissect_ds.data.shards import read_shard
    from dissect_ds.data.synthetic import check_val_captions

    samples = [s for tar in sorted(val_dir.glob("*.tar")) for s in read_shard(str(tar))]
    metas = [json.loads(s["json"]) for s in samples]
    check_val_captions([s["txt"].decode() for s in samples], [m["attrs"] for m in metas])
    counts = np.bincount([m["label"] for m in metas])
    return {"n": len(metas), "classes": int((counts > 0).sum()), "min": int(counts.min()), "max": int(counts.max())}


# ----------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with its two-sided 95% t interval (NaN bounds for n < 2)."""

    mean: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Interval:
        v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
        if v.size == 0:
            return cls(math.nan, math.nan, math.nan, 0)
        m = float(v.mean())
        if v.size < 2:
            return cls(m, math.nan, math.nan, 1)
        half = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
        return cls(m, m - half, m + half, int(v.size))

    def verdict(self) -> str:
        """For a difference: win (interval above 0), loss (below), tie (contains 0)."""
        if self.n < 2 or math.isnan(self.lo):
            return "n/a"
        return "win" if self.lo > 0 else "loss" if self.hi < 0 else "tie"

    def fmt(self, digits: int = 3, signed: bool = False) -> str:
        if self.n == 0:
            return "-"
        s = "+" if signed else ""
        if self.n < 2:
            return f"{self.mean:{s}.{digits}f}"
        return f"{self.mean:{s}.{digits}f} [{self.lo:{s}.{digits}f}, {self.hi:{s}.{digits}f}]"


def paired(a: dict[int, float], b: dict[int, float]) -> Interval:
    """Interval of the per-seed differences a[s] - b[s] over the seeds both have."""
    return Interval.of([a[s] - b[s] for s in sorted(a) if s in b])


def final_by_seed(runs: list[Run], key: str = TOP1) -> dict[int, float]:
    return {r.job.seed: float(r.final.get(key, math.nan)) for r in runs}


# ----------------------------------------------------------------------------- per setting


def warmup_steps(job: Job) -> int:
    """The run's selection warm-up length in steps (0 for ``none``)."""
    for o in job.overrides:
        if o.startswith("selection.warmup_steps="):
            return int(o.split("=", 1)[1])
    return 0


def time_to(run: Run, target: float, key: str = TOP1) -> float | None:
    """Training wall-clock (s) at the first evaluation after the warm-up with ``key`` >=
    ``target``; None if never. Evaluations inside the warm-up do not count: there the
    arm is the random warm-up, not its own rule."""
    after = warmup_steps(run.job)
    step = next((m["step"] for m in run.evals if m["step"] > after and m[key] >= target - 1e-12), None)
    return None if step is None else float(run.wall[step - 1])


def warned(run: Run) -> bool:
    """Whether the trainer's label-free warning (:class:`EarlySnapshotAlarm`, fed the steps
    after the warm-up, as in training) fired in this run: replayed from its metrics."""
    from dissect_ds.selection.diagnostics import EarlySnapshotAlarm

    alarm, after = EarlySnapshotAlarm(), warmup_steps(run.job)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # the run logged it already
    try:
        return any(alarm.add(m["step"], m) for m in run.steps if m["step"] > after)
    finally:
        logging.disable(previous)


def late_mean(run: Run, key: str, last_frac: float = 0.2, per_epoch: bool = False) -> float:
    """Mean of ``key`` over the last ``last_frac`` of the steps (NaN when never logged)."""
    total = run.steps[-1]["step"]
    v = [m[key] for m in run.steps if key in m and m["step"] > (1 - last_frac) * total and m[key] is not None]
    return float(np.mean(v)) if v else math.nan


@dataclass
class ArmResult:
    arm: str
    by_seed: dict[int, float]  # final zero-shot top-1 of each seed
    top1: Interval
    r1: Interval
    vs_random: Interval | None
    vs_full: Interval | None
    r1_vs_random: Interval | None
    r1_vs_full: Interval | None
    reached: int  # seeds reaching full data's final top-1 (same seed) after warm-up
    time_to_full: float | None  # median over those seeds, s
    wall: Interval  # training wall-clock, s
    backward: int  # backward samples of one run
    clean_precision: Interval
    noisy_recall: Interval
    auroc_current: Interval
    auroc_differential: Interval
    rank_corr: Interval  # Spearman of the differential with the current score (late)
    warned: int  # seeds whose run raised the label-free warning


def by_setting(runs: list[Run], rate: float) -> dict[tuple[str, float, float], list[Run]]:
    """(regime, noise, rate) -> its runs. Full data does not depend on the rate: a setting at
    another rate without its own ``none`` runs shares those of ``rate`` (same regime and noise)."""
    out: dict[tuple[str, float, float], list[Run]] = {}
    for r in runs:
        out.setdefault(r.job.setting, []).append(r)
    for (regime, noise, other), rs in out.items():
        if other != rate and not any(r.job.arm == "none" for r in rs):
            rs[:0] = [r for r in out.get((regime, noise, rate), []) if r.job.arm == "none"]
    return out


def setting_results(runs: list[Run]) -> dict[str, ArmResult]:
    """Arm -> result for the runs of one setting (same regime, noise and rate)."""
    by_arm: dict[str, list[Run]] = {}
    for r in runs:
        by_arm.setdefault(r.job.arm, []).append(r)
    full = {r.job.seed: r for r in by_arm.get("none", [])}
    rnd = by_arm.get("random", [])
    out = {}
    for arm, rs in by_arm.items():
        rs.sort(key=lambda r: r.job.seed)
        top, r1 = final_by_seed(rs), final_by_seed(rs, R1)
        times = []
        for r in rs:
            ref = full.get(r.job.seed)
            if ref is not None and arm != "none":
                t = time_to(r, float(ref.final[TOP1]))
                if t is not None:
                    times.append(t)
        out[arm] = ArmResult(
            arm=arm,
            by_seed=top,
            top1=Interval.of(list(top.values())),
            r1=Interval.of(list(r1.values())),
            vs_random=paired(top, final_by_seed(rnd)) if rnd and arm != "random" else None,
            vs_full=paired(top, final_by_seed(list(full.values()))) if full and arm != "none" else None,
            r1_vs_random=paired(r1, final_by_seed(rnd, R1)) if rnd and arm != "random" else None,
            r1_vs_full=paired(r1, final_by_seed(list(full.values()), R1)) if full and arm != "none" else None,
            reached=len(times),
            time_to_full=float(np.median(times)) if times else None,
            wall=Interval.of([float(r.wall[-1]) for r in rs]),
            backward=int(rs[0].steps[-1]["selected_seen"]),
            clean_precision=Interval.of([late_mean(r, "selection/clean_precision") for r in rs]),
            noisy_recall=Interval.of([late_mean(r, "selection/noisy_recall") for r in rs]),
            auroc_current=Interval.of([late_mean(r, "selection/auroc_current") for r in rs]),
            auroc_differential=Interval.of([late_mean(r, "selection/auroc_differential") for r in rs]),
            rank_corr=Interval.of([late_mean(r, "selection/rank_corr_d_c") for r in rs]),
            warned=sum(warned(r) for r in rs if is_dissect(arm)),
        )
    return out


def against_rules(res: dict[str, ArmResult]) -> dict[str, dict[str, Interval]]:
    """DISSect arm -> other selecting rule -> paired difference of final zero-shot top-1
    (DISSect minus the rule) in one setting; the rules are the arms that are neither a
    DISSect variant, ``random`` nor full data (those two have their own columns)."""
    rules = [a for a in res if a not in ("none", "random") and not is_dissect(a)]
    return {d: {r: paired(res[d].by_seed, res[r].by_seed) for r in rules} for d in res if is_dissect(d)}


@dataclass(frozen=True)
class Anatomy:
    """Where full data's seeds differ: each gate run's export re-scored per val image. The
    class is "<colour> <shape>", so a zero-shot answer can name the colour, the shape, both
    or neither; ``item_sd`` is the standard deviation that drawing the val images alone
    would give one seed's top-1 (the square root of the seeds' mean pairwise disagreement
    over twice the images)."""

    top1: dict[int, float]
    colour: dict[int, float]
    shape: dict[int, float]
    shape_by_size: dict[str, dict[int, float]]  # object size -> seed -> shape right on those val images
    item_sd: float

    def line(self) -> str:
        """``colour right on 0.936-0.973 of the val images, shape on ...``"""

        def span(v: dict[int, float]) -> str:
            return f"{min(v.values()):.3f}-{max(v.values()):.3f}"

        sizes = " / ".join(self.shape_by_size)
        return (
            f"colour right on {span(self.colour)} of the val images, shape on {span(self.shape)} (on {sizes} objects: "
            f"{' / '.join(span(v) for v in self.shape_by_size.values())}); drawing the val images alone would move "
            f"one seed's top-1 by {self.item_sd:.4f} (SD)"
        )


def zeroshot_answers(export: Path, val_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(zero-shot class, label) of every val image, by ``export`` (an open_clip directory)
    with the trainer's classifier and the set's own class names and prompts."""
    import open_clip
    import torch

    from dissect_ds.data import DataConfig, iter_val, read_classnames, read_templates
    from dissect_ds.evaluate import TEMPLATES
    from dissect_ds.evaluation import ModelEncoder
    from dissect_ds.evaluation.run import zeroshot_classifier

    spec, device = f"local-dir:{export}", "cuda" if torch.cuda.is_available() else "cpu"
    model, _, preprocess = open_clip.create_model_and_transforms(spec, device=device)
    encoder = ModelEncoder(model, preprocess, open_clip.get_tokenizer(spec), device)
    data = DataConfig(val=str(val_dir))
    classifier = zeroshot_classifier(encoder, read_classnames(data), read_templates(data) or TEMPLATES)
    answers, labels = [], []
    for b in iter_val(data, rank=0, world_size=1, batch_size=512, preprocess=preprocess, tokenizer=encoder.tokenizer):
        answers.append((encoder.encode_image(b.images) @ classifier).argmax(1))
        labels.append(b.labels)
    return torch.cat(answers).numpy(), torch.cat(labels).numpy()


def anatomy(none: list[Run], val_dir: Path) -> Anatomy | None:
    """The gate runs' (full data, 0% noise) answers split into colour and shape; None
    without two seeds to compare."""
    from dissect_ds.data.synthetic import SHAPES, SIZES

    if len(none) < 2:
        return None
    n = len(SHAPES)  # label = colour index * n + shape index
    answers = {r.job.seed: zeroshot_answers(Path(r.job.run_dir) / "open_clip", val_dir) for r in none}
    meta = read_meta(val_dir)
    if any(not np.array_equal([m["label"] for m in meta], y) for _, y in answers.values()):
        raise c.BenchError(f"{val_dir}: the val metadata and the evaluated images are not in the same order")
    size = np.array([m["attrs"][2] for m in meta])
    right = {s: a == y for s, (a, y) in answers.items()}
    shape = {s: a % n == y % n for s, (a, y) in sorted(answers.items())}
    seeds = sorted(right)
    disagree = [np.mean(right[a] != right[b]) for i, a in enumerate(seeds) for b in seeds[i + 1 :]]
    return Anatomy(
        top1={s: float(right[s].mean()) for s in seeds},
        colour={s: float(np.mean(a // n == y // n)) for s, (a, y) in sorted(answers.items())},
        shape={s: float(r.mean()) for s, r in shape.items()},
        shape_by_size={
            z: {s: float(r[size == z].mean()) for s, r in shape.items()} for z in SIZES if (size == z).any()
        },
        item_sd=float(np.sqrt(np.mean(disagree) / (2 * len(right[seeds[0]])))),
    )


@dataclass
class Gate:
    values: dict[int, float]
    threshold: float
    spread: float
    anatomy: Anatomy | None = None
    regime: str = "mem"  # where the full-data runs are

    @property
    def passed(self) -> bool:
        v = list(self.values.values())
        return bool(v) and min(v) >= self.threshold and max(v) - min(v) <= self.spread

    @property
    def verdict(self) -> str:
        """``passed``, ``FAILED``, or ``not run`` (no full-data run at 0% noise in the matrix)."""
        return "not run" if not self.values else "passed" if self.passed else "FAILED"

    def line(self) -> str:
        """``seed 0: 0.580, seed 1: 0.554, ...``"""
        return ", ".join(f"seed {s}: {v:.3f}" for s, v in sorted(self.values.items()))


def gate(runs: list[Run], scale: Scale, regime: str = "mem", val_dir: Path | None = None) -> Gate:
    """Full data at 0% noise in ``regime``: every seed's final top-1 (and, given its val
    split, where the seeds differ)."""
    none = [r for r in runs if r.job.arm == "none" and r.job.noise == 0.0 and r.job.regime == regime]
    where = anatomy(none, val_dir) if val_dir is not None else None
    return Gate(final_by_seed(none), scale.gate, scale.gate_spread, where, regime)


def world2_check(runs: list[Run]) -> tuple[Run, Run] | None:
    """(2-rank run, the same job with 1 rank), when the plan has the check."""
    two = next((r for r in runs if r.job.world_size == 2), None)
    if two is None:
        return None
    one = next(
        (
            r
            for r in runs
            if r.job.world_size == 1
            and (r.job.setting, r.job.arm, r.job.seed) == (two.job.setting, two.job.arm, two.job.seed)
        ),
        None,
    )
    return None if one is None else (two, one)


# ----------------------------------------------------------------------------- diagnostics


def difficulty_groups(run: Run, difficulty: np.ndarray) -> dict[str, np.ndarray]:
    """Masks over the records: noisy pairs, and clean pairs by difficulty 0, 1, 2+."""
    r = run.records
    d = np.minimum(difficulty[r["uid"].astype(int)], 2)
    groups = {"noisy": r["noisy"] == 1}
    groups.update({f"clean, difficulty {k}{'+' if k == 2 else ''}": (r["noisy"] == 0) & (d == k) for k in range(3)})
    return groups


def selection_share(run: Run, difficulty: np.ndarray, last_frac: float = 0.2) -> dict[str, float]:
    """Share of each group's scored pairs that were selected over the last steps."""
    r = run.records
    late = r["step"] >= (1 - last_frac) * r["step"].max()
    return {
        g: float(r["selected"][late & m].mean()) if (late & m).any() else math.nan
        for g, m in difficulty_groups(run, difficulty).items()
    }


def score_history(run: Run, steps_per_epoch: int) -> dict[str, np.ndarray]:
    """Per epoch: mean current / historical score of clean and of noisy pairs."""
    r = run.records
    epoch = (r["step"] // steps_per_epoch + 1).astype(int)
    out = {"epoch": np.arange(1, epoch.max() + 1)}
    for name in ("current", "historical"):
        for label, mask in (("clean", r["noisy"] == 0), ("noisy", r["noisy"] == 1)):
            v = r[name]
            ok = mask & ~np.isnan(v)
            s = np.bincount(epoch[ok], weights=v[ok], minlength=epoch.max() + 1)[1:]
            n = np.bincount(epoch[ok], minlength=epoch.max() + 1)[1:]
            out[f"{name}/{label}"] = np.where(n > 0, s / np.maximum(n, 1), np.nan)
    return out


def epoch_series(run: Run, key: str, steps_per_epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(epoch, value) of a metric: per-epoch ones as logged, per-step ones averaged."""
    by: dict[int, list[float]] = {}
    for m in run.steps:
        if m.get(key) is not None:
            by.setdefault((m["step"] - 1) // steps_per_epoch + 1, []).append(m[key])
    e = np.array(sorted(by))
    return e, np.array([np.mean(by[i]) for i in e])
