"""The markdown page ``accuracy.md``: design, gate, verdict table, per-setting tables,
diagnostics, and what was run."""

from __future__ import annotations

import math
import statistics

from benchmarks.accuracy.analyse import TOP1, ArmResult, Gate, Interval, Run, against_rules
from benchmarks.accuracy.plan import DIAGNOSTIC_EVERY, Matrix, Scale, is_dissect
from benchmarks.common import md_table


def setting_label(regime: str, noise: float, rate: float) -> str:
    name = "memorisation" if regime == "mem" else "one pass"
    return f"{name}, {noise:.0%} noise, rate {rate:g}"


def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _v(i: Interval | None) -> str:
    return "-" if i is None else i.verdict()


def verdict_rows(results: dict[str, dict[str, ArmResult]]) -> list[list[str]]:
    rows = []
    for label, res in results.items():
        full = res.get("none")
        full_wall = full.wall.mean if full else math.nan
        for arm, r in res.items():
            if arm == "none":
                continue
            if full is None:
                when = "-"
            elif r.time_to_full is None:
                when = f"not reached (0/{r.top1.n})"
            else:
                when = f"{r.time_to_full:.0f} s = {r.time_to_full / full_wall:.2f}x ({r.reached}/{r.top1.n} seeds)"
            rows.append(
                [
                    label,
                    arm,
                    "(reference)" if arm == "random" else f"**{_v(r.vs_random)}**" if r.vs_random else "-",
                    r.vs_random.fmt(signed=True) if r.vs_random else "-",
                    f"**{_v(r.vs_full)}**",
                    r.vs_full.fmt(signed=True) if r.vs_full else "-",
                    when,
                ]
            )
    return rows


def rule_rows(results: dict[str, dict[str, ArmResult]]) -> tuple[list[str], list[list[str]]]:
    """(head, rows): each DISSect arm against each other selecting rule of its setting."""
    against = {label: against_rules(res) for label, res in results.items()}
    rules = list(dict.fromkeys(r for by_arm in against.values() for diffs in by_arm.values() for r in diffs))
    rows = [
        [label, arm, *(f"**{_v(diffs[r])}** {diffs[r].fmt(signed=True)}" if r in diffs else "-" for r in rules)]
        for label, by_arm in against.items()
        for arm, diffs in by_arm.items()
    ]
    return ["setting", "DISSect arm", *(f"- {r} (paired)" for r in rules)], rows


def rule_table(results: dict[str, dict[str, ArmResult]]) -> str:
    head, rows = rule_rows(results)
    return md_table(head, rows) if len(head) > 2 and rows else "No DISSect arm ran beside another selecting rule."


def setting_table(res: dict[str, ArmResult]) -> str:
    rows = []
    for arm, r in res.items():
        rows.append(
            [
                arm,
                f"{r.top1.n}",
                r.top1.fmt(),
                r.vs_random.fmt(signed=True) if r.vs_random else "-",
                r.vs_full.fmt(signed=True) if r.vs_full else "-",
                r.r1.fmt(),
                r.r1_vs_random.fmt(signed=True) if r.r1_vs_random else "-",
                f"{r.backward:,}",
                f"{r.wall.mean:.0f}",
                r.clean_precision.fmt(2) if arm != "none" else "-",
                r.noisy_recall.fmt(2) if arm != "none" else "-",
                r.auroc_current.fmt(2),
                r.auroc_differential.fmt(2),
                f"{r.warned}/{r.top1.n}; {r.rank_corr.fmt(2, signed=True)}" if is_dissect(arm) else "-",
            ]
        )
    head = [
        "arm",
        "seeds",
        "zero-shot top-1",
        "- random (paired)",
        "- full data (paired)",
        "retrieval mean R@1",
        "R@1 - random",
        "backward samples / run",
        "train wall-clock (s, mean)",
        "clean precision (late)",
        "noisy recall (late)",
        "AUROC current (late)",
        "AUROC differential (late)",
        "label-free warning (seeds); Spearman d, c (late)",
    ]
    return md_table(head, rows)


def _not_evidence(gate: Gate) -> str:
    why = {"passed": "", "FAILED": "failed", "not run": "was not run"}[gate.verdict]
    return f"**Not evidence: the gate {why}.**" if why else ""


def _anatomy(gate: Gate) -> list[str]:
    """Where full data's seeds differ: colour or shape (lines of the gate section)."""
    a = gate.anatomy
    if a is None:
        return []
    rows = [
        [str(s), _f(gate.values[s]), _f(a.colour[s]), _f(a.shape[s]), *(_f(v[s]) for v in a.shape_by_size.values())]
        for s in sorted(a.colour)
    ]
    return [
        "Where the seeds differ: each run's export re-scored per val image (the class is colour and shape; top-1 "
        f"needs both): {a.line()}, against a standard deviation of {statistics.stdev(gate.values.values()):.4f} "
        "between the seeds.",
        "",
        md_table(
            [
                "seed",
                "zero-shot top-1",
                "colour right",
                "shape right",
                *(f"shape right, {z} objects" for z in a.shape_by_size),
            ],
            rows,
        ),
        "",
    ]


def page(
    scale: Scale,
    matrix: Matrix,
    matrix_name: str,
    command: str,
    meta: dict,
    gate: Gate,
    results: dict[str, dict[str, ArmResult]],
    val: dict,
    world2: tuple[Run, Run] | None,
    diag: dict,
    images: dict[str, str],
    reference: Run | None = None,
) -> str:
    spe = scale.steps_per_epoch
    mem = matrix.gate_regime == "mem"  # the memorisation regime is on the page (--long-onepass: only one pass)
    se = math.sqrt(0.25 / val["n"])
    gate_line = gate.line()
    spread = (max(gate.values.values()) - min(gate.values.values())) if gate.values else math.nan
    lines = [
        "# Accuracy: selection strategies on noisy synthetic pairs",
        "",
        f"Generated by `{command}` ({matrix_name}) on {meta['date']}; the accuracy part took {meta['took']}. "
        f"{meta['machine']} 1-minute load average {meta['load']} during the runs ({meta['cores']} cores: above "
        f"{meta['cores']}, other jobs competed, and wall-clock numbers carry that). "
        + (
            "GPU kernels are not bit-for-bit deterministic, so a rerun can differ slightly."
            if meta["gpu"]
            else "Accuracy does not depend on the load: every run is deterministic for its seed on one machine "
            "(not across CPU models: float rounding differs, and training amplifies it; see docs/method_findings.md)."
        ),
        "",
        "## Design",
        "",
        f"- **Task.** `python -m dissect_ds.prepare synthetic --num-samples "
        f"{scale.pairs(matrix.gate_regime)} --noise-rate {max(matrix.noises or matrix.onepass_noises):g} --seed 0 --val-samples {scale.val} --image-size {scale.image_size} --shard-size "
        f"{scale.shard} --output DIR` (one set per regime and noise rate; the one-pass set has "
        f"{scale.onepass_train:,} pairs): one coloured shape per "
        "image (8 colours x 6 shapes = 48 classes, 3 sizes, 9 positions, dark/grey/light background, sometimes grey "
        "clutter strokes no caption names). Clean pairs of graded difficulty: small objects, low contrast, clutter, "
        "and 6 colour-shape combinations that are rare in train (weight 0.08) but as common as the others in val. "
        "Three train captions in four name only the class (`a photo of a red circle`), the rest add size and "
        "position or every attribute. A noisy pair carries another noisy pair's caption.",
        f"- **Val** ({val['n']:,} clean pairs, {val['classes']} classes, {val['min']}-{val['max']} per class): "
        "every image has one label (its only object). Zero-shot top-1 (prompt `a photo of a {class}.`, the wording of "
        "the class-only captions, read from the set's `zeroshot_classification_templates.txt`) "
        f"is the decision metric; its binomial standard error is at most {se:.4f} per run. Retrieval: each val "
        "caption names colour, size, shape, position and background, no two val images share them, so every "
        "caption is distinct and true of its own image only (checked when the page is made: "
        "`dissect_ds.data.synthetic.check_val_captions`); the retrieval ceiling is 1.0.",
        f"- **Model and training.** `{scale.model}` (open_clip ViT, {scale.image_size}px images), world size 1, "
        + ("on the GPU (fp32 weights, TF32 products), " if meta["gpu"] else "one torch thread, ")
        + f"ZeRO-0, global batch {scale.batch}, AdamW lr {scale.lr:g} (cosine, 5% warm-up), no random "
        "crop (`data.augment=false`: its aspect-ratio jitter changes the shapes that carry the label), "
        f"{meta['parallel']} runs side by side"
        + ("" if meta["gpu"] else " (one per core)")
        + ", each in a long-lived worker process that runs its share of the runs through the trainer (start-up "
        "is paid once per worker).",
        f"- **Memorisation regime:** {scale.train:,} train pairs x {scale.epochs} epochs = {scale.steps('mem')} steps "
        f"({spe} per epoch): noisy pairs get memorised late. **One-pass regime:** {scale.onepass_train:,} pairs, one "
        f"epoch ({scale.steps('onepass')} steps): no pair is seen twice.",
        f"- **Equal budgets.** Every selecting arm trains on rate x batch pairs at every step, the warm-up included: "
        f"the first {scale.warmup_epochs} epochs (one pass: the first {scale.onepass_warmup_frac:.0%} of the steps) "
        "select a random `rate` share for every arm (`selection.warmup_mode=random`, the authors' warm-up), then each "
        "arm applies its own rule. `dissect_warmup` freezes each pair's score at its last warm-up visit; "
        "`dissect_momentum` keeps an EMA (beta 0.9); `dissect_model` compares with a snapshot taken at the end of "
        "warm-up (one pass: refreshed every warm-up length). `none` (full data) trains on every pair: the reference."
        + (
            " The reference-model arms (`oracle_clipscore`: the reference's top scores; `learnability`: learner loss "
            "minus reference loss; `jest`: joint chunks) score with a reference trained by dissect_ds on a clean "
            f"held-out split ({scale.train:,} pairs of another seed, full data, the same model and budget, seed 0; "
            f"RHO-LOSS's protocol), which reached zero-shot top-1 {reference.final.get(TOP1, math.nan):.3f}."
            if reference is not None
            else ""
        ),
        f"- **Seeds and statistics.** Seeds {', '.join(map(str, matrix.seeds))}, the same for every arm and paired "
        "(seed s: the same initial weights and data order in every arm; the data set of a noise level is fixed). "
        "Each arm: mean with a two-sided 95% t interval over seeds. Differences: mean of the per-seed differences "
        "with its 95% t interval. **win** = the interval lies above 0, **loss** = below 0, **tie** = it contains 0.",
        "- **Time to full data's accuracy:** training wall-clock (the trainer's `time/step`: data, scoring, "
        "selection, training; no evaluation or start-up) at the first evaluation *after the warm-up* whose "
        "zero-shot top-1 reaches the final top-1 of `none` with the same seed; median over the seeds that reach it, "
        f"and its ratio to full data's mean wall-clock. Evaluations every "
        f"{max(1, scale.steps(matrix.gate_regime) // scale.eval_points)} steps.",
        "",
        "## Gate: can full data learn the task?",
        "",
        f"Full data at 0% noise ({'memorisation' if gate.regime == 'mem' else 'one-pass'} regime) must reach zero-shot top-1 >= {scale.gate} on every seed, with "
        f"the seeds within {scale.gate_spread} of each other (max - min). Measured: "
        + (f"{gate_line} (spread {_f(spread)})." if gate_line else "nothing (no full-data run at 0% noise)."),
        "",
        *_anatomy(gate),
        f"**Gate {gate.verdict}.**"
        + {
            "passed": "",
            "FAILED": " The comparison below is printed for inspection only and is **not evidence**: full data does "
            "not learn the task well or reproducibly enough here."
            + (
                " `python -m benchmarks.accuracy --long-onepass` runs the one-pass regime over twice the pairs, where "
                "full data's seeds agree (outside make bench's hour)."
                if gate.regime == "mem"
                else ""
            ),
            "not run": " This matrix has no full-data runs at 0% noise (`--noises` without 0): the comparison below is "
            "printed for inspection only and is **not evidence**.",
        }[gate.verdict],
        "",
        "## Verdicts",
        "",
        "Final zero-shot top-1, paired differences over seeds with 95% intervals (win / tie / loss as defined "
        "above). " + _not_evidence(gate),
        "",
        md_table(
            [
                "setting",
                "strategy",
                "vs random",
                "difference (95% CI)",
                "vs full data",
                "difference (95% CI)",
                "time to full data's final top-1 (after warm-up)",
            ],
            verdict_rows(results),
        ),
        "",
        f"![arm means]({images['arms']})",
        "",
        "## DISSect against the other rules",
        "",
        "Final zero-shot top-1 of each DISSect variant minus that of each other selecting rule of the same setting, "
        "paired over seeds, 95% intervals (**win**: DISSect above the rule). " + _not_evidence(gate),
        "",
        rule_table(results),
        "",
        "## Per setting",
        "",
        "Zero-shot top-1 and retrieval mean R@1 (both directions) at the end of training, mean [95% CI] over seeds; "
        "paired differences; clean precision (clean share of the selected pairs) and noisy recall (share of the "
        "noisy pairs left out) averaged over the last 20% of the steps; AUROC of clean vs noisy for the current "
        "score and for the differential over the last 20% of the epochs (for `none`: the differential against a "
        "shadow snapshot taken at the end of the others' warm-up, seed "
        f"{diag['seed']} only; for the DISSect arms: their own history, under the feedback loop). DISSect "
        "arms also: how many seeds raised the trainer's label-free warning (the differential ranks against the "
        "current score while the kept pairs score below the batch mean; replayed from each run's metrics by "
        "`EarlySnapshotAlarm`, over the steps after the warm-up) and the Spearman correlation of the differential "
        "with the current score over the last 20% of the steps (needs no noise labels).",
        "",
    ]
    for label, res in results.items():
        lines += [f"### {label}", "", setting_table(res), ""]
    lines += [
        f"![accuracy curves]({images['curves']})",
        "",
        "## Diagnostics",
        "",
    ]
    if not mem:
        lines += ["None: they are drawn for the memorisation regime, which this page does not have.", ""]
    elif not diag["recorded"]:
        lines += [
            f"None: runs record them on seeds {', '.join(str(k * DIAGNOSTIC_EVERY) for k in range(3))}, ... "
            "where there are noisy pairs (clean against noisy is what they show); this page's noisiest "
            f"memorisation setting has {diag['noise']:.0%} noise, seeds {', '.join(map(str, matrix.seeds))}.",
            "",
        ]
    else:
        lines += _diagnostics(diag, images)
    if world2 is not None:
        two, one = world2
        d_top = two.final["eval/zeroshot_top1"] - one.final["eval/zeroshot_top1"]
        lines += [
            "## World-size check",
            "",
            f"`{one.job.name}` repeated with 2 ranks (torchrun, gloo): zero-shot top-1 {_f(two.final['eval/zeroshot_top1'])}"
            f" vs {_f(one.final['eval/zeroshot_top1'])} with 1 rank (difference {d_top:+.3f}); backward samples "
            f"{int(two.steps[-1]['selected_seen']):,} vs {int(one.steps[-1]['selected_seen']):,}. The selection is "
            "the same at any world size; the data order is not (each rank streams its own shards), so the runs "
            "differ like two seeds.",
            "",
        ]
    lines += [
        "## What was run",
        "",
        f"{matrix_name}: "
        + (
            f"memorisation regime at noise {', '.join(f'{n:.0%}' for n in matrix.noises)} with arms "
            f"{', '.join(f'`{a}`' for a in matrix.arms)} at rate {scale.rate:g}"
            if mem
            else f"no memorisation regime (rate {scale.rate:g})"
        )
        + (
            f"; rate {scale.rate2:g} at noise {', '.join(f'{n:.0%}' for n in matrix.rate2_noises)} for "
            f"{', '.join(f'`{a}`' for a in matrix.rate2_arms)}"
            if matrix.rate2_noises
            else ""
        )
        + (
            f"; one pass at noise {', '.join(f'{n:.0%}' for n in matrix.onepass_noises)} for "
            f"{', '.join(f'`{a}`' for a in matrix.onepass_arms)}"
            if matrix.onepass_noises
            else ""
        )
        + f"; {len(matrix.seeds)} seeds each ({meta['runs']} runs). `--all` runs every arm at noise 0/20/40/60%, "
        "rate 0.5 for a subset and the one-pass regime (outside make bench's hour).",
        "",
    ]
    return "\n".join(lines)


def _diagnostics(diag: dict, images: dict[str, str]) -> list[str]:
    """The diagnostics section's plots and table (seed diag["seed"], the noisiest memorisation setting)."""
    return [
        "AUROC per epoch (clean vs noisy, higher score = clean): full-batch training with a shadow snapshot at the "
        "end of warm-up, and the DISSect arm under its own selection (seed "
        f"{diag['seed']}, {diag['noise']:.0%} noise, memorisation regime).",
        "",
        f"![AUROC]({images['auroc']})",
        "",
        "Clean precision per epoch and the share of each group selected over the last 20% of the steps (seed "
        f"{diag['seed']}, {diag['noise']:.0%} noise): does an arm avoid the noisy pairs, or the hard clean ones? "
        "Difficulty = number of hardness factors (small, low contrast, clutter, rare combination).",
        "",
        f"![selection]({images['selection']})",
        "",
        md_table(["arm", *diag["groups"]], [[a, *(_f(v, 2) for v in g.values())] for a, g in diag["shares"].items()]),
        "",
        "Mean current and historical scores of clean and noisy pairs per epoch (every scored pair, seed "
        f"{diag['seed']}):",
        "",
        f"![scores]({images['scores']})",
        "",
    ]
