"""Accuracy benchmark: selection strategies against random selection and full data on the
noisy synthetic set, with paired seeds, 95% intervals, a gate and one verdict table.

Modules: :mod:`.plan` (what runs), :mod:`.run` (data, workers), :mod:`.analyse`
(statistics, diagnostics), :mod:`.plot`, :mod:`.report`; :func:`main` ties them together
(``python -m benchmarks.accuracy``, and ``benchmarks.run_all``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import common as c
from benchmarks.accuracy import analyse, plan, plot, report, run

IMAGES = ("arms", "curves", "auroc", "selection", "scores")
LONG_ONEPASS_OUT = c.DOCS / "bench" / "long_onepass"


def _data(scale: plan.Scale, jobs: list[plan.Job], work: Path) -> None:
    """Write the data sets the jobs read (one per regime and noise level; seed 0; the
    reference's clean held-out split: another seed)."""
    for regime, noise in sorted({(j.regime, j.noise) for j in jobs}):
        seed = plan.REFERENCE_DATA_SEED if regime == "ref" else 0
        out = work / "data" / plan.data_name(regime, noise)
        run.prepare_data(out, scale.pairs(regime), noise, scale.val, scale.image_size, scale.shard, seed=seed)


def _gate_val(work: Path, regime: str) -> Path:
    """The val split the gate's runs (full data, 0% noise) were evaluated on."""
    return work / "data" / plan.data_name(regime, 0.0) / "val"


def _gate_summary(gate: analyse.Gate) -> dict:
    where = dataclasses.asdict(gate.anatomy) if gate.anatomy else None
    return {"values": gate.values, "passed": gate.passed, "anatomy": where}


def execute(
    scale: plan.Scale, matrix: plan.Matrix, work: Path, reuse: bool, parallel: int = run.PARALLEL
) -> tuple[list[plan.Job], float, int]:
    """Prepare data and run every job; returns (jobs, seconds, how many were reused)."""
    jobs = plan.jobs(scale, matrix, work)
    reused = sum(reuse and run.finished(j) for j in jobs)
    t0 = time.perf_counter()
    _data(scale, jobs, work)
    print(f"accuracy: {len(jobs)} runs, work dir {work}", flush=True)
    # The reference model first: the reference arms read its export.
    for phase in ([j for j in jobs if j.regime == "ref"], [j for j in jobs if j.regime != "ref"]):
        run.run_jobs(phase, work, reuse=reuse, timeout=6 * 3600, parallel=parallel)
    return jobs, time.perf_counter() - t0, reused


def analyse_and_write(
    scale: plan.Scale,
    matrix: plan.Matrix,
    matrix_name: str,
    jobs: list[plan.Job],
    work: Path,
    md_dir: Path,
    img_dir: Path,
    command: str,
    took_s: float,
    reused: int = 0,
    parallel: int = run.PARALLEL,
) -> dict:
    runs = [analyse.read_run(j) for j in jobs if j.regime != "ref"]
    launches = [json.loads((Path(j.run_dir) / "launch.json").read_text()) for j in jobs]
    loads = [x["load_end"] for x in launches]
    single = [r for r in runs if r.job.world_size == 1]
    reference = next((analyse.read_run(j) for j in jobs if j.regime == "ref"), None)
    by_setting = analyse.by_setting(single, scale.rate)
    order = sorted(by_setting, key=lambda s: (s[0] != "mem", s[2], s[1]))
    labels = {s: report.setting_label(*s) for s in order}
    results = {labels[s]: analyse.setting_results(by_setting[s]) for s in order}
    regime = matrix.gate_regime  # the page's main regime: the gate's and the curves'
    gate = analyse.gate(single, scale, regime, _gate_val(work, regime))
    val = analyse.val_facts(work / "data" / plan.data_name(regime, (matrix.noises or matrix.onepass_noises)[0]) / "val")

    # Diagnostics on the noisiest memorisation setting at rate 0.3 (none without that regime).
    noise, seed = max(matrix.noises, default=None), plan.diagnostic_seed(matrix)
    diag_runs = [r for r in by_setting.get(("mem", noise, scale.rate), []) if r.job.seed == seed]
    recorded = any(r.records for r in diag_runs)  # not at 0% noise, nor on seeds that do not record
    shares = {}
    if recorded:
        import numpy as np

        meta = analyse.read_meta(work / "data" / plan.data_name("mem", noise) / "train")
        difficulty = np.array([m.get("difficulty", 0) for m in meta])
        shares = {
            r.job.arm: analyse.selection_share(r, difficulty) for r in diag_runs if r.records and r.job.arm != "none"
        }
    groups = list(next(iter(shares.values()))) if shares else []
    spe = scale.steps_per_epoch
    images = {k: os.path.relpath(img_dir / f"accuracy_{k}.png", md_dir) for k in IMAGES}
    plot.arms(results, img_dir / "accuracy_arms.png")
    curve_settings = {labels[s]: by_setting[s] for s in order if s[0] == regime and s[2] == scale.rate}
    plot.curves(curve_settings, img_dir / "accuracy_curves.png")
    if recorded:
        full = next((r for r in diag_runs if r.job.arm == "none"), None)
        loop = [r for r in diag_runs if r.job.arm.startswith("dissect")]
        plot.auroc(full, loop, spe, img_dir / "accuracy_auroc.png")
        plot.selection(diag_runs, shares, scale.rate, noise, spe, img_dir / "accuracy_selection.png")
        plot.scores(diag_runs, spe, img_dir / "accuracy_scores.png")

    took = f"{took_s / 60:.1f} min"
    if reused:
        own = f"all {len(jobs)} runs' own durations sum to {sum(x['seconds'] for x in launches) / 60:.0f} min"
        which = (
            f" for {len(jobs) - reused} new runs; {reused} finished runs were"
            if reused < len(jobs)
            else ": all its runs were"
        )
        took += f"{which} reused (--reuse) from earlier invocations; {own} ({parallel} side by side)"
    else:
        took += f" ({len(jobs)} runs)"
    meta_line = {
        "date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "took": took,
        "machine": c.machine_line(),
        "cores": c.cores(),
        "gpu": c.gpu_names() != "none",
        "parallel": parallel,
        "load": f"{min(loads):.1f}-{max(loads):.1f}" if loads else "not recorded",
        "runs": len(jobs),
    }
    text = report.page(
        scale,
        matrix,
        matrix_name,
        command,
        meta_line,
        gate,
        results,
        val,
        analyse.world2_check(runs),
        {"noise": noise, "seed": seed, "recorded": recorded, "groups": groups, "shares": shares},
        images,
        reference,
    )
    (md_dir / "accuracy.md").write_text(text)
    summary = {
        "gate": _gate_summary(gate),
        "settings": {label: {arm: dataclasses.asdict(r) for arm, r in res.items()} for label, res in results.items()},
        "verdicts": report.verdict_rows(results),
        "dissect_vs_rules": report.rule_rows(results)[1],
        "took_s": took_s,
    }
    (work / "accuracy.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _arms(text: str) -> tuple[str, ...]:
    """``--arms A,B``: registry strategy names, each optionally ``NAME@E`` (checked before
    any run starts)."""
    names = tuple(a.strip() for a in text.split(",") if a.strip())
    for name in names:
        try:
            plan.strategy(name)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return names


def _seeds(text: str) -> tuple[int, ...]:
    """``--seeds 5,6,7,8,9``: at least two distinct seeds (an interval needs two)."""
    parts = [n.strip() for n in text.split(",") if n.strip()]
    values = tuple(int(n) for n in parts if n.isdigit())
    if len(values) != len(parts) or len(set(values)) != len(values) or len(values) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: give two or more distinct seeds >= 0, e.g. 5,6,7,8,9")
    return values


def _noises(text: str) -> tuple[float, ...]:
    """``--noises 0,0.4`` (or ``--onepass 0,0.4``): noise rates, each one ``plan.NOISES`` has."""
    try:
        values = tuple(float(n) for n in text.split(",") if n.strip())
    except ValueError:
        values = ()
    if not values or any(n not in plan.NOISES for n in values):
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(f'{n:g}' for n in plan.NOISES)}")
    return values


def _csv(noises: tuple[float, ...]) -> str:
    return ",".join(f"{n:g}" for n in noises)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.accuracy", description=" ".join(__doc__.split("\n\n")[0].split())
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--quick", action="store_true", help="smoke version: tiny sizes, a minute or two; numbers mean nothing"
    )
    g.add_argument("--all", action="store_true", help="the whole matrix (every arm, noise 0-60%%, rate 0.5; hours)")
    g.add_argument(
        "--long-onepass",
        action="store_true",
        help="only the one-pass regime, over twice the pairs (245,760 seen once, 1,920 steps), at 0%% and 40%% noise "
        f"for {', '.join(plan.ONEPASS_ARMS)}, its gate on its own full-data runs: the setting where full data's seeds "
        "agree (about 115 minutes on 2 cores, outside make bench's hour)",
    )
    p.add_argument(
        "--reference",
        action="store_true",
        help=f"add the reference-model arms ({', '.join(plan.REFERENCE_ARMS)}) to the default matrix, and their "
        "reference run (about 25 more minutes on 2 cores)",
    )
    p.add_argument(
        "--arms",
        type=_arms,
        default=(),
        metavar="A,B",
        help="add these strategies (registry names) to the default matrix, e.g. dissect_momentum,dissect_model; "
        "NAME@E: NAME with its warm-up ending after epoch E instead of the default (about 15 minutes per arm "
        "on 2 cores)",
    )
    p.add_argument(
        "--onepass",
        nargs="?",
        type=_noises,
        const=plan.ALL.onepass_noises,
        metavar="N,M",
        help="add the one-pass regime at 40%% noise, or at the noise rates given (122,880 pairs seen once, the "
        "memorisation regime's 960 steps; full data, random, small-loss, current-score, dissect_model; about 30 "
        "more minutes per noise rate on 2 cores)",
    )
    p.add_argument(
        "--rate2",
        action="store_true",
        help=f"add rate {plan.CPU.rate2:g} at 40%% noise for {', '.join(plan.RATE2_ARMS)} (about 15 more minutes on "
        "2 cores)",
    )
    p.add_argument(
        "--seeds",
        type=_seeds,
        metavar="S,T",
        help="these seeds instead of 0-4, e.g. 5,6,7,8,9 to replicate a result on fresh seeds (every arm, the gate "
        "too)",
    )
    p.add_argument(
        "--noises",
        type=_noises,
        metavar="N,M",
        help="the memorisation regime's noise rates instead of the default 0,0.4 (without 0 there is no gate: "
        "the page says so)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="page directory (default docs/bench, docs/bench/long_onepass with --long-onepass; plots go to OUT/img, default docs/img)",
    )
    p.add_argument("--work", type=Path, help="data and runs (default runs/bench/accuracy, or OUT/work with --out)")
    p.add_argument("--reuse", action="store_true", help="keep finished runs of the same job in the work dir")
    p.add_argument("--scale", help=argparse.SUPPRESS)  # JSON overrides of the Scale (scripts/gpu_bench.sh)
    p.add_argument("--parallel", type=int, default=run.PARALLEL, help="runs side by side (default: %(default)s)")
    p.add_argument(
        "--gate-only",
        action="store_true",
        help="run only the gate (full data at 0%% noise, every seed), print it and write no page",
    )
    p.add_argument("--no-world2-check", action="store_true", help="skip the 2-rank repeat of one run (one GPU)")
    args = p.parse_args(argv)
    if args.long_onepass and not args.out:  # its own page: make bench's stays as it is
        args.out = LONG_ONEPASS_OUT
    if args.long_onepass:
        clash = [f for f in ("arms", "onepass", "rate2", "noises", "reference") if getattr(args, f)]
        if clash:
            p.error(
                f"--long-onepass runs its own matrix: drop --{clash[0]} (only --seeds, --out, --work, --reuse, "
                "--parallel and --gate-only go with it)"
            )
    return args


def configure(args: argparse.Namespace) -> tuple[plan.Scale, plan.Matrix, str, str]:
    """(scale, matrix, its description for the page, the command that reproduces it)."""
    scale = plan.QUICK if args.quick else plan.LONG_ONEPASS_SCALE if args.long_onepass else plan.CPU
    if args.scale:
        scale = dataclasses.replace(scale, **json.loads(args.scale))
    matrix, name = (
        (plan.QUICK_MATRIX, "quick smoke version: numbers mean nothing")
        if args.quick
        else (plan.ALL, "whole matrix (--all)")
        if args.all
        else (plan.LONG_ONEPASS, "the one-pass regime over twice the pairs (--long-onepass)")
        if args.long_onepass
        else (plan.DEFAULT, "default matrix (make bench)")
    )
    if args.no_world2_check:
        matrix = dataclasses.replace(matrix, world2_check=False)
    if args.reference and not args.all:
        matrix = dataclasses.replace(matrix, arms=(*matrix.arms, *plan.REFERENCE_ARMS))
        name += ", with the reference-model arms (--reference)"
    extra = tuple(a for a in args.arms if a not in matrix.arms)
    if extra:
        matrix = dataclasses.replace(matrix, arms=(*matrix.arms, *extra))
        name += f", with {', '.join(extra)} (--arms)"
    onepass = args.onepass and not matrix.onepass_noises  # --all and --quick have it already
    if onepass:
        matrix = dataclasses.replace(matrix, onepass_noises=args.onepass)
        name += f", with the one-pass regime at {', '.join(f'{n:.0%}' for n in args.onepass)} noise (--onepass)"
    rate2 = args.rate2 and not matrix.rate2_noises  # --all has it already
    if rate2:
        matrix = dataclasses.replace(matrix, rate2_noises=plan.ALL.rate2_noises)
        name += f", with rate {scale.rate2:g} (--rate2)"
    if args.seeds:
        matrix = dataclasses.replace(matrix, seeds=args.seeds)
        name += f", seeds {','.join(map(str, args.seeds))} (--seeds)"
    if args.noises:
        matrix = dataclasses.replace(matrix, noises=args.noises)
        name += f", noise {','.join(f'{n:.0%}' for n in args.noises)} only (--noises)"
    command = "python -m benchmarks.accuracy" + next(
        (f" --{f.replace('_', '-')}" for f in ("quick", "all", "long_onepass") if getattr(args, f)), ""
    )
    command += " --reference" if args.reference and not args.all else ""
    command += f" --arms {','.join(extra)}" if extra else ""
    if onepass:
        command += " --onepass" + ("" if args.onepass == plan.ALL.onepass_noises else f" {_csv(args.onepass)}")
    command += " --rate2" if rate2 else ""
    command += f" --seeds {','.join(map(str, args.seeds))}" if args.seeds else ""
    command += f" --noises {_csv(args.noises)}" if args.noises else ""
    command += " --no-world2-check" if args.no_world2_check else ""
    if args.scale:
        command += f" --scale '{args.scale}'"
    return scale, matrix, name, command


def work_dir(args: argparse.Namespace) -> Path:
    """Where data and runs go, as an absolute path: the runs' job specs (what --reuse
    compares) name it, so ``--work w`` and ``--work $PWD/w`` are the same work dir."""
    if args.work:
        work = args.work
    elif args.gate_only:  # the gate writes no page: --out does not place its runs
        work = c.WORK / "accuracy_gate"
    else:
        work = args.out / "work" if args.out else c.WORK / "accuracy"
    return work.resolve()


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    scale, matrix, name, command = configure(args)
    if args.gate_only:
        work = work_dir(args)
        gate_matrix = matrix.gate_only(args.seeds or plan.SEEDS)
        jobs, took, _ = execute(scale, gate_matrix, work, args.reuse, args.parallel)
        regime = gate_matrix.gate_regime
        gate = analyse.gate([analyse.read_run(j) for j in jobs], scale, regime, _gate_val(work, regime))
        where = f"; {gate.anatomy.line()}" if gate.anatomy else ""
        print(
            f"accuracy gate: {gate.line()}; {gate.verdict} ({took / 60:.1f} min){where}",
            flush=True,
        )
        return {"gate": _gate_summary(gate), "took_s": took}
    md_dir, img_dir = (args.out, args.out / "img") if args.out else (c.DOCS / "bench", c.DOCS / "img")
    work = work_dir(args)
    for d in (md_dir, img_dir, work):
        d.mkdir(parents=True, exist_ok=True)
    jobs, took, reused = execute(scale, matrix, work, args.reuse, args.parallel)
    summary = analyse_and_write(scale, matrix, name, jobs, work, md_dir, img_dir, command, took, reused, args.parallel)
    print(f"accuracy: wrote {md_dir / 'accuracy.md'} ({took / 60:.1f} min)", flush=True)
    if md_dir.resolve() == (c.DOCS / "bench").resolve() and not args.scale:  # the repository's page
        from benchmarks import run_all

        part = "accuracy" + (f"; {reused} of its {len(jobs)} runs reused from earlier invocations" if reused else "")
        page = run_all.assemble(c.DOCS, f"{took / 60:.1f} min ({part})", ("accuracy",), command)
        print(f"accuracy: updated {page}", flush=True)
    return summary
