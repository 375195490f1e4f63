"""What the accuracy benchmark runs: sizes, regimes, arms, seeds, and each run's config.

Two regimes on the synthetic set (``dissect_ds.prepare synthetic``):

- *memorisation*: many epochs over a train set that is small for the model, so noisy
  pairs get memorised late in training (where the differential can tell them apart);
- *one pass*: a larger train set seen once, so nothing can be memorised.

Every selecting arm trains on the same number of backward samples: the same warm-up
(a random ``rate`` share of each batch, the authors' choice, ``warmup_mode=random``)
then ``rate`` of each batch by its own rule; ``none`` (full data) is the reference.
Seeds are paired: seed s gives every arm the same initial weights and data order.

The reference-model arms (``oracle_clipscore``, ``learnability``, ``jest``) score with a
reference trained by dissect_ds itself on a clean, held-out split (another seed of the
synthetic set, the size of the train set, full data, the same model and budget): the
protocol of RHO-LOSS. It is one more run, ``reference``, done before the arms that read it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import jest_chunks

NOISES = (0.0, 0.2, 0.4, 0.6)
SEEDS = (0, 1, 2, 3, 4)
# Registry names, old name accepted: the current-score (CLIPScore) strategy was renamed.
ALIASES = {"current_score": "clipscore", "clipscore": "current_score"}
ARMS = (
    "none",
    "random",
    "small_loss",
    "big_loss",
    "current_score",
    "dissect_warmup",
    "dissect_momentum",
    "dissect_model",
    "oracle_clipscore",
    "learnability",
    "jest",
)
REFERENCE_ARMS = ("oracle_clipscore", "learnability")
"""The reference arms ``--reference`` adds to the default matrix (``--all`` also runs ``jest``)."""
REFERENCE_RUN = "reference"
REFERENCE_DATA_SEED = 1  # the arms' data sets use seed 0: the reference never sees their images
DEFAULT_ARMS = ("none", "random", "small_loss", "current_score", "dissect_warmup")
ONEPASS_ARMS = ("none", "random", "small_loss", "current_score", "dissect_model")  # the memories never hit in one pass
RATE2_ARMS = ("random", "small_loss", "current_score", "dissect_warmup")


def split_arm(arm: str) -> tuple[str, int | None]:
    """``NAME@E`` -> (NAME, E): strategy NAME with its warm-up ending after epoch E instead
    of the scale's ``warmup_epochs`` (memorisation regime); a plain NAME -> (NAME, None)."""
    name, at, epoch = arm.partition("@")
    if not at:
        return name, None
    if not epoch.isdigit() or int(epoch) < 1 or name in ("none", "random"):
        raise ValueError(f"arm {arm!r}: NAME@E wants a selecting strategy and a warm-up of E >= 1 epochs")
    return name, int(epoch)


def strategy(arm: str) -> str:
    """The registry name of ``arm`` (``current_score`` or its old name ``clipscore``; a
    ``NAME@E`` arm's NAME)."""
    from dissect_ds.selection.strategies import STRATEGIES

    arm = split_arm(arm)[0]
    if arm in STRATEGIES:
        return arm
    if ALIASES.get(arm) in STRATEGIES:
        return ALIASES[arm]
    raise ValueError(f"strategy {arm!r} is not in the registry ({', '.join(STRATEGIES)})")


def is_dissect(arm: str) -> bool:
    """Whether ``arm`` is a DISSect variant (a differential strategy of the registry)."""
    from dissect_ds.selection.strategies import STRATEGIES, Differential

    return issubclass(STRATEGIES[strategy(arm)], Differential)


def reads_reference(arm: str) -> bool:
    """Whether ``arm`` scores with the reference run's model (the registry says)."""
    from dissect_ds.selection.strategies import STRATEGIES

    return STRATEGIES[strategy(arm)].reference_based


@dataclass(frozen=True)
class Scale:
    """Sizes of one version of the benchmark."""

    model: str
    image_size: int
    train: int  # memorisation regime: train pairs
    epochs: int
    batch: int
    lr: float
    warmup_epochs: int  # selection warm-up (every selecting arm), and the shadow snapshot of `none`
    val: int
    eval_points: int  # evaluations per run (the curves' resolution)
    onepass_train: int
    onepass_warmup_frac: float = 0.2  # one pass: warm-up share of the steps; dissect_model refreshes as often
    weight_decay: float = 0.1  # the trainer's default
    rate: float = 0.3
    rate2: float = 0.5
    shard: int = 256
    gate: float = 0.5  # full data at 0% noise must reach this zero-shot top-1 on every seed ...
    gate_spread: float = 0.03  # ... with seeds within this of each other (max - min)

    @property
    def steps_per_epoch(self) -> int:
        """Memorisation regime."""
        return self.train // self.batch

    def pairs(self, regime: str) -> int:
        """Train pairs of ``regime`` ("mem", "onepass", or "ref": the reference's split, the
        memorisation regime's size)."""
        return self.onepass_train if regime == "onepass" else self.train

    def steps(self, regime: str) -> int:
        """Training steps of a run in ``regime``: one epoch in one pass, ``epochs`` otherwise."""
        return self.pairs(regime) // self.batch * (1 if regime == "onepass" else self.epochs)


# Calibrated on the 2-core machine with one torch thread per run: 60 epochs is the longest schedule
# whose default matrix fits make bench's hour (53 minutes whole on 2026-12-04, 35 of them accuracy;
# 80 epochs take a third longer). No setting tried that fits the hour brings full data's seeds within
# the gate's 0.03; docs/method_findings.md ("What narrows the spread") has every candidate tried
# and where the spread sits.
CPU = Scale(
    model="dissect-bench-vit",
    image_size=24,
    train=2048,
    epochs=60,
    batch=128,
    lr=2e-3,
    warmup_epochs=15,
    val=2592,
    eval_points=6,
    # One pass over as many new pairs as the memorisation regime's 960 steps train on: at 8,192 pairs
    # (64 steps) full data stayed near chance (0.047 at 40% noise); here it reaches 0.80 at 0% noise and
    # 0.17 at 40% (docs/method_findings.md, "One pass").
    onepass_train=122_880,
)
LONG_ONEPASS_SCALE = dataclasses.replace(CPU, onepass_train=245_760)
"""One pass over twice the pairs (1,920 steps): the setting where full data's seeds agree within
the gate's 0.03 (docs/method_findings.md, "The gate passes: one pass, twice as long"); a run costs
twice a page run, so it stays outside make bench's hour (``--long-onepass``)."""
QUICK = dataclasses.replace(
    CPU, train=256, epochs=3, batch=64, warmup_epochs=1, val=96, eval_points=2, onepass_train=256, shard=64
)


@dataclass(frozen=True)
class Matrix:
    """Which runs: (regime, noise, rate, arm, seed) combinations."""

    noises: tuple[float, ...]
    arms: tuple[str, ...]
    seeds: tuple[int, ...]
    rate2_noises: tuple[float, ...] = ()
    rate2_arms: tuple[str, ...] = RATE2_ARMS
    onepass_noises: tuple[float, ...] = ()
    onepass_arms: tuple[str, ...] = ONEPASS_ARMS
    world2_check: bool = True  # one run repeated with 2 ranks

    @property
    def gate_regime(self) -> str:
        """Where the gate's full-data runs are: the memorisation regime, or one pass when the
        matrix has only that."""
        return "mem" if self.noises else "onepass"

    def gate_only(self, seeds: tuple[int, ...] = SEEDS) -> Matrix:
        """Only the gate's runs of this matrix (full data at 0% noise in its gate regime), on ``seeds``."""
        mem = self.gate_regime == "mem"
        return Matrix(
            noises=(0.0,) if mem else (),
            arms=("none",) if mem else (),
            seeds=seeds,
            onepass_noises=() if mem else (0.0,),
            onepass_arms=("none",),
            world2_check=False,
        )


# The one-pass regime does not fit make bench's hour on 2 cores: --all runs it.
DEFAULT = Matrix(noises=(0.0, 0.4), arms=DEFAULT_ARMS, seeds=SEEDS)
ALL = Matrix(noises=NOISES, arms=ARMS, seeds=SEEDS, rate2_noises=(0.4,), onepass_noises=(0.4,))
LONG_ONEPASS = Matrix(noises=(), arms=(), seeds=SEEDS, onepass_noises=(0.0, 0.4), world2_check=False)
"""``--long-onepass``: the one-pass regime alone at ``LONG_ONEPASS_SCALE``, its gate on its own
full-data runs at 0% noise."""
GATE_ONLY = DEFAULT.gate_only()
"""Only the gate's runs: full data at 0% noise, every seed (checking a scale before the comparison)."""
QUICK_MATRIX = Matrix(
    noises=(0.0, 0.4),
    arms=("none", "random", "dissect_warmup"),
    seeds=(0, 1),
    onepass_noises=(0.4,),
    onepass_arms=("none", "random", "dissect_model"),
)


@dataclass(frozen=True)
class Job:
    """One training run: its trainer overrides and where it writes."""

    name: str
    regime: str  # "mem" | "onepass"
    noise: float
    rate: float
    arm: str
    seed: int
    world_size: int
    run_dir: str
    overrides: tuple[str, ...]
    cost: float  # relative cost (backward + scoring samples), for ordering

    @property
    def setting(self) -> tuple[str, float, float]:
        return (self.regime, self.noise, self.rate)


DIAGNOSTIC_EVERY = 5


def records_diagnostics(seed: int) -> bool:
    """Whether seed ``seed``'s runs keep diagnostics (per-pair records; the shadow of
    ``none``): the first seed of each five (0, 5, ...). A rule of the seed alone, not of the
    other seeds an invocation runs, so a run's job spec, which ``--reuse`` compares, is the
    same in every invocation that has it."""
    return seed % DIAGNOSTIC_EVERY == 0


def diagnostic_seed(matrix: Matrix) -> int:
    """The seed whose diagnostics the page shows: the matrix's first seed that records them
    (its first seed when none does: the page then has no records to show)."""
    return next((s for s in matrix.seeds if records_diagnostics(s)), matrix.seeds[0])


def data_name(regime: str, noise: float) -> str:
    return f"{regime}_n{round(noise * 100)}"


def reference_export(work: Path) -> Path:
    """The reference run's export directory (``local-dir:`` for open_clip)."""
    return work / "runs" / REFERENCE_RUN / "open_clip"


def overrides(
    scale: Scale,
    regime: str,
    arm: str,
    seed: int,
    rate: float,
    data: Path,
    run_dir: Path,
    record: bool,
    reference: Path | None = None,
) -> list[str]:
    """Every trainer key the benchmark relies on (no config file: nothing else changes it)."""
    onepass = regime == "onepass"
    steps = scale.steps(regime)
    spe = steps if onepass else scale.steps_per_epoch
    warm_epochs = split_arm(arm)[1] or scale.warmup_epochs
    if not onepass and warm_epochs >= scale.epochs:
        raise ValueError(f"arm {arm!r}: the warm-up must end before the last of {scale.epochs} epochs")
    warm = max(1, round(scale.onepass_warmup_frac * steps)) if onepass else warm_epochs * spe
    name = strategy(arm)
    out = [
        f"run.name={run_dir.name}",
        f"run.output_dir={run_dir.parent}",
        f"run.seed={seed}",
        f"model.name={scale.model}",
        f"data.train={data}/train",
        f"data.val={data}/val",
        "data.num_workers=0",
        "data.shuffle_buffer=1000",
        "data.augment=false",
        "data.cache_decoded=true",  # 60 epochs over 2048 pairs: decode each once
        f"train.steps={steps}",
        f"train.batch_size={scale.batch}",
        f"train.lr={scale.lr}",
        f"train.weight_decay={scale.weight_decay}",
        f"train.warmup_steps={max(1, steps // 20)}",
        "deepspeed.zero_stage=0",
        f"eval.every_steps={max(1, steps // scale.eval_points)}",
        "eval.batch_size=512",
        "checkpoint.every_steps=0",
        "checkpoint.keep=1",
        "log.progress=false",
        f"log.every_steps={steps}",
        "log.tensorboard=false",
        "log.histograms_every_steps=0",
        f"selection.strategy={name}",
        f"selection.rate={1.0 if arm == 'none' else rate}",
        f"selection.record={str(record).lower()}",
    ]
    if arm == "none" and record:
        # Full data with a shadow snapshot at the end of the others' warm-up: the
        # differential's AUROC without the feedback loop (diagnostic forwards, not trained on).
        out += ["selection.shadow=true", f"selection.shadow_step={warm - 1}"]
    elif arm != "none":
        out += ["selection.warmup_mode=random", f"selection.warmup_steps={warm}"]
        if name == "dissect_model" and onepass:
            out.append(f"selection.refresh_steps={warm}")
        if reads_reference(arm):
            out.append(f"selection.reference.model=local-dir:{reference}")
        if name == "jest":
            from dissect_ds.selection.selector import kept_count

            out.append(f"selection.jest_chunks={jest_chunks(kept_count(rate, scale.batch))}")
    return out


def jobs(scale: Scale, matrix: Matrix, work: Path) -> list[Job]:
    """The runs of ``matrix``, named ``<regime>_n<noise%>_r<rate%>_<arm>_s<seed>``."""
    out: list[Job] = []

    def add(regime: str, noise: float, rate: float, arm: str, seed: int, world: int = 1) -> None:
        tag = f"{regime}_n{round(noise * 100)}_r{round(rate * 100)}_{arm}_s{seed}" + ("_w2" if world > 1 else "")
        run_dir = work / "runs" / tag
        data = work / "data" / data_name(regime, noise)
        record = records_diagnostics(seed) and world == 1 and noise > 0  # clean vs noisy is all they show
        ov = overrides(scale, regime, arm, seed, rate, data, run_dir, record, reference_export(work))
        cost = scale.steps(regime) * scale.batch * (1.0 if arm == "none" else rate + 0.35)
        out.append(Job(tag, regime, noise, rate, arm, seed, world, str(run_dir), tuple(ov), cost))

    for noise in matrix.noises:
        for arm in matrix.arms:
            for seed in matrix.seeds:
                add("mem", noise, scale.rate, arm, seed)
    for noise in matrix.rate2_noises:
        for arm in matrix.rate2_arms:
            for seed in matrix.seeds:
                add("mem", noise, scale.rate2, arm, seed)
    for noise in matrix.onepass_noises:
        for arm in matrix.onepass_arms:
            for seed in matrix.seeds:
                add("onepass", noise, scale.rate, arm, seed)
    if any(reads_reference(a) for a in (*matrix.arms, *matrix.onepass_arms)):
        data = work / "data" / data_name("ref", 0.0)
        run_dir = work / "runs" / REFERENCE_RUN
        ov = overrides(scale, "mem", "none", 0, 1.0, data, run_dir, record=False)
        out.insert(0, Job(REFERENCE_RUN, "ref", 0.0, 1.0, "none", 0, 1, str(run_dir), tuple(ov), 0.0))
    if matrix.world2_check:
        arm = "dissect_warmup" if "dissect_warmup" in matrix.arms else matrix.arms[-1]
        add("mem", max(matrix.noises), scale.rate, arm, matrix.seeds[0], world=2)
    return out
