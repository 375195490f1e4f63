"""The accuracy benchmark's smoke version end to end (real training runs in the
benchmark's workers, a 2-rank check run, tables and plots), and scripts/gpu_bench.sh
with its tiny CPU setting. The numbers mean nothing; the structure and the budgets do."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.accuracy import IMAGES, plan, run
from benchmarks.common import BenchError

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _check_page(out: Path, work: Path, world2: bool = True) -> dict:
    page = (out / "accuracy.md").read_text()
    for key in IMAGES:
        png = out / "img" / f"accuracy_{key}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", key
        assert f"](img/accuracy_{key}.png)" in page, key  # linked relative to the page
    assert "python -m benchmarks.accuracy --quick" in page  # says how to reproduce it
    assert "Gate passed" in page or "Gate FAILED" in page
    assert "retrieval ceiling is 1.0" in page and ("## World-size check" in page) == world2
    assert "## DISSect against the other rules" in page and "label-free warning (seeds)" in page
    summary = json.loads((work / "accuracy.json").read_text())
    settings = summary["settings"]
    assert set(settings) == {
        "memorisation, 0% noise, rate 0.3",
        "memorisation, 40% noise, rate 0.3",
        "one pass, 40% noise, rate 0.3",
    }
    for label, arms in settings.items():
        # Equal budgets: every selecting arm trains on the same number of pairs, fewer than full data.
        budgets = {arm: r["backward"] for arm, r in arms.items()}
        selecting = {b for arm, b in budgets.items() if arm != "none"}
        assert len(selecting) == 1 and selecting.pop() < budgets["none"], (label, budgets)
        for arm, r in arms.items():
            assert r["top1"]["n"] == 2 and 0 <= r["top1"]["mean"] <= 1, (label, arm)
            assert math.isfinite(r["r1"]["mean"])
    # Where the gate's seeds differ: the exports re-scored per val image give the trainer's
    # own top-1 (to an image or two of the 48-96), and an answer right on the class is right on colour and shape.
    gate = summary["gate"]
    where, n = gate["anatomy"], summary["settings"]["memorisation, 0% noise, rate 0.3"]["none"]["top1"]["n"]
    assert where and len(where["top1"]) == n and "colour right" in page
    for seed, top1 in gate["values"].items():
        assert (
            abs(where["top1"][seed] - top1) <= 1 / 48
            and min(where["colour"][seed], where["shape"][seed]) >= where["top1"][seed]
        )
    assert 0 < where["item_sd"] < 0.1
    verdicts = summary["verdicts"]
    assert verdicts and all(row[2].strip("*") in {"win", "tie", "loss", "(reference)"} for row in verdicts)
    return summary


def test_quick_accuracy_benchmark_writes_page_verdicts_and_plots(tmp_path):
    from benchmarks import accuracy

    first = accuracy.main(["--quick", "--out", str(tmp_path)])
    _check_page(tmp_path, tmp_path / "work")
    first_page = (tmp_path / "accuracy.md").read_text()
    # Run again from scratch: fixed seeds, the same accuracies, so the same verdicts and
    # differences (only the wall-clock column may differ; the 2-rank check is not in them).
    # Redone: one run of each kind (full data with the shadow, random, DISSect's history,
    # the one-pass snapshot model); the others are reused (--reuse), so the whole matrix is
    # not paid twice.
    work = tmp_path / "work"
    jobs = {j.name: j for j in plan.jobs(plan.QUICK, plan.QUICK_MATRIX, work)}
    redo = (
        "mem_n40_r30_none_s0",
        "mem_n40_r30_random_s1",
        "mem_n40_r30_dissect_warmup_s0",
        "onepass_n40_r30_dissect_model_s1",
    )
    before = {name: (Path(jobs[name].run_dir) / "eval.json").read_text() for name in redo}
    for name in redo:
        (Path(jobs[name].run_dir) / "eval.json").unlink()
    again = accuracy.main(
        ["--quick", "--no-world2-check", "--reuse", "--work", str(work), "--out", str(tmp_path / "again")]
    )
    assert {name: (Path(jobs[name].run_dir) / "eval.json").read_text() for name in redo} == before
    assert [row[:6] for row in again["verdicts"]] == [row[:6] for row in first["verdicts"]]
    assert again["gate"] == first["gate"]
    # --reuse keeps every finished run of the same job by the same trainer code, no other.
    assert jobs and all(run.finished(j) for j in jobs.values())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run, "code_version", lambda: "another version of dissect_ds")
        assert not any(run.finished(j) for j in jobs.values())
    # A page without noisy pairs (all its runs reused) says it has no diagnostics, and shows none.
    accuracy.main(
        ["--quick", "--noises", "0", "--no-world2-check", "--reuse", "--work", str(work), "--out", str(tmp_path / "n0")]
    )
    page = (tmp_path / "n0" / "accuracy.md").read_text()
    assert "## Diagnostics\n\nNone: runs record them on seeds 0, 5, 10, ..." in page and "AUROC](" not in page
    assert not (tmp_path / "n0" / "img" / "accuracy_auroc.png").exists()
    # --gate-only runs the gate's runs alone (here reusing seeds 0-1) and writes no page.
    gate = accuracy.main(
        ["--quick", "--gate-only", "--reuse", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "g")]
    )
    assert sorted(gate["gate"]["values"]) == list(plan.SEEDS)
    assert {s: gate["gate"]["values"][s] for s in first["gate"]["values"]} == first["gate"]["values"]
    assert not (tmp_path / "g" / "accuracy.md").exists()
    # --long-onepass at the quick sizes: the one-pass regime alone, its gate on its own
    # full-data runs at 0% noise. Its 40%-noise runs of full data, random and dissect_model
    # are the quick matrix's own (the same jobs: reused); the rest are new.
    quick = json.dumps({f: getattr(plan.QUICK, f) for f in ("train", "epochs", "batch", "warmup_epochs", "val")})
    quick = quick[:-1] + f', "eval_points": 2, "onepass_train": {plan.QUICK.onepass_train}, "shard": 64}}'
    argv = ["--long-onepass", "--seeds", "0,1", "--scale", quick, "--reuse", "--work", str(work)]
    long = accuracy.main([*argv, "--out", str(tmp_path / "long")])
    page = (tmp_path / "long" / "accuracy.md").read_text()
    assert set(long["settings"]) == {"one pass, 0% noise, rate 0.3", "one pass, 40% noise, rate 0.3"}
    assert set(long["settings"]["one pass, 0% noise, rate 0.3"]) == set(plan.ONEPASS_ARMS)
    full = long["settings"]["one pass, 0% noise, rate 0.3"]["none"]["top1"]
    assert math.isclose(sum(long["gate"]["values"].values()) / 2, full["mean"]) and long["gate"]["anatomy"]
    assert "Full data at 0% noise (one-pass regime) must reach" in page and "6 finished runs were reused" in page
    assert "None: they are drawn for the memorisation regime, which this page does not have." in page
    pointer = "`python -m benchmarks.accuracy --long-onepass` runs the one-pass regime"  # under a failed mem gate
    assert pointer not in page and ("Gate FAILED" in first_page) == (pointer in first_page)
    assert f"python -m benchmarks.accuracy --long-onepass --seeds 0,1 --scale '{quick}'" in page
    # Its --gate-only runs the same full-data runs (reused) and prints the same gate.
    gate = accuracy.main([*argv, "--gate-only"])
    assert gate["gate"]["values"] == long["gate"]["values"]


def test_gpu_bench_script_runs_with_its_tiny_setting(tmp_path):
    env = dict(os.environ, TINY="1", GPU_BENCH_DIR=str(tmp_path), PY=sys.executable)
    proc = subprocess.run(["bash", "scripts/gpu_bench.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check_page(tmp_path, tmp_path / "work", world2=False)  # one GPU: no 2-rank check, as at GPU scale


def test_paired_interval_matches_scipys_paired_t_test():
    from scipy import stats

    from benchmarks.accuracy.analyse import Interval, paired

    a = {0: 0.61, 1: 0.58, 2: 0.64, 3: 0.60, 4: 0.63}
    for shift, expected in ((0.05, "win"), (-0.05, "loss"), (0.0, "tie")):
        b = {s: v - shift + 0.01 * (-1) ** s for s, v in a.items()}
        d = paired(a, b)
        test = stats.ttest_rel(list(a.values()), list(b.values()))
        ci = test.confidence_interval(0.95)
        assert math.isclose(d.lo, ci.low, abs_tol=1e-12) and math.isclose(d.hi, ci.high, abs_tol=1e-12)
        assert d.verdict() == expected and (test.pvalue < 0.05) == (expected != "tie")
    assert paired(a, {9: 0.5}).verdict() == "n/a" and Interval.of([0.5]).fmt() == "0.500"


def test_a_matrix_without_the_gate_runs_says_the_gate_was_not_run():
    from benchmarks.accuracy.analyse import Gate
    from benchmarks.accuracy.report import _not_evidence

    gates = {
        "passed": Gate({0: 0.60, 1: 0.62}, 0.5, 0.03),
        "FAILED": Gate({0: 0.60, 1: 0.66}, 0.5, 0.03),
        "not run": Gate({}, 0.5, 0.03),  # e.g. --noises 0.2,0.6
    }
    assert {v: g.verdict for v, g in gates.items()} == {v: v for v in gates}
    assert [_not_evidence(g) for g in gates.values()] == [
        "",
        "**Not evidence: the gate failed.**",
        "**Not evidence: the gate was not run.**",
    ]


def test_the_gate_anatomy_splits_each_answer_into_colour_and_shape(monkeypatch):
    """A plain recount of made-up answers (label = colour x 6 + shape) against ``anatomy``."""
    import numpy as np

    from benchmarks.accuracy import analyse

    label = np.array([0, 7, 13, 47, 20, 30])  # (colour, shape): (0,0) (1,1) (2,1) (7,5) (3,2) (5,0)
    answers = {
        0: np.array([0, 7, 14, 41, 20, 31]),  # right, right, colour only, shape only, right, colour only
        1: np.array([6, 7, 13, 47, 26, 30]),  # shape only, right, right, right, shape only, right
    }
    monkeypatch.setattr(analyse, "zeroshot_answers", lambda export, val: (answers[int(export.parent.name)], label))
    sizes = ["small", "large", "small", "small", "large", "large"]  # no medium object among the six
    meta = [{"label": int(y), "attrs": ["c", "s", z, "p", "b"]} for y, z in zip(label, sizes)]
    monkeypatch.setattr(analyse, "read_meta", lambda val: meta)
    runs = [
        analyse.Run(plan.Job("x", "mem", 0.0, 0.3, "none", s, 1, f"/r/{s}", (), 0.0), [], [], {}, 0.0) for s in (0, 1)
    ]
    a = analyse.anatomy(runs, Path("val"))
    assert a.top1 == {0: 3 / 6, 1: 4 / 6} and a.colour == {0: 5 / 6, 1: 4 / 6} and a.shape == {0: 4 / 6, 1: 6 / 6}
    # shape right: seed 0 [1 1 0 1 1 0] -> small 2/3, large 2/3; seed 1 all right.
    assert a.shape_by_size == {"small": {0: 2 / 3, 1: 1.0}, "large": {0: 2 / 3, 1: 1.0}}
    assert "on small / large objects: 0.667-1.000 / 0.667-1.000" in a.line()
    # right:  seed 0 [1 1 0 0 1 0], seed 1 [0 1 1 1 0 1]: they disagree on 5 of 6 images.
    assert math.isclose(a.item_sd, math.sqrt(5 / 6 / (2 * 6)))
    assert analyse.anatomy(runs[:1], Path("val")) is None
    meta.reverse()  # metadata out of the evaluated images' order: a clear stop, not a wrong split
    with pytest.raises(BenchError, match="not in the same order"):
        analyse.anatomy(runs, Path("val"))


def test_reference_arms_read_a_reference_trained_first_on_held_out_clean_pairs(tmp_path):
    """``--reference``: one extra run, ``reference`` (full data on a clean split of another
    seed), planned first; every reference arm points at its export and keeps the budget of
    the other selecting arms."""
    matrix = dataclasses.replace(plan.DEFAULT, arms=(*plan.DEFAULT.arms, *plan.REFERENCE_ARMS), world2_check=False)
    jobs = plan.jobs(plan.CPU, matrix, tmp_path)
    first, rest = jobs[0], jobs[1:]
    assert first.name == plan.REFERENCE_RUN and first.regime == "ref" and first.arm == "none"
    assert f"data.train={tmp_path}/data/ref_n0/train" in first.overrides
    assert all(j.regime != "ref" for j in rest)
    export = f"selection.reference.model=local-dir:{plan.reference_export(tmp_path)}"
    for job in rest:
        assert (export in job.overrides) == (job.arm in plan.REFERENCE_ARMS), job.name
    budget = {
        o for j in rest if j.arm != "none" for o in j.overrides if o.startswith(("selection.rate", "selection.warmup"))
    }
    assert budget == {"selection.rate=0.3", "selection.warmup_mode=random", f"selection.warmup_steps={15 * 16}"}
    jest = plan.overrides(plan.CPU, "mem", "jest", 0, 0.3, tmp_path, tmp_path / "r", False, tmp_path / "ref")
    assert "selection.jest_chunks=2" in jest  # the most chunks up to 16 that divide k = 38


def test_a_failing_run_stops_the_benchmark_before_the_others_finish(tmp_path):
    """A worker that fails ends the whole benchmark at once with its log, and the workers
    still running are stopped (not waited for: at GPU scale that is minutes)."""
    from benchmarks.common import BenchError

    work = tmp_path / "work"
    jobs = {j.name: j for j in plan.jobs(plan.QUICK, plan.QUICK_MATRIX, work)}
    bad, long = jobs["mem_n0_r30_none_s0"], jobs["mem_n0_r30_random_s0"]
    bad = dataclasses.replace(bad, overrides=(*bad.overrides, "train.steps=-1"))  # fails its config check
    long = dataclasses.replace(long, overrides=(*long.overrides, "train.steps=100000"), cost=0.0)
    run.prepare_data(work / "data" / "mem_n0", 256, 0.0, 96, plan.QUICK.image_size, plan.QUICK.shard, 0)
    with pytest.raises(BenchError, match="worker exit") as err:
        run.run_jobs([bad, long], work, reuse=False, timeout=600)
    assert "train.steps" in str(err.value)  # the failing worker's own message
    assert not run.finished(long) and not (Path(long.run_dir) / "eval.json").exists()


def test_an_arm_at_epoch_e_moves_only_its_warm_up_and_bad_arms_or_noises_stop_the_cli(tmp_path, capsys):
    """``--arms dissect_warmup@30``: the same strategy and budget, the warm-up ending after
    epoch 30; ``--arms``/``--noises`` mistakes end argparse before anything runs."""
    from benchmarks import accuracy

    arms = ("dissect_warmup", "dissect_warmup@30")
    matrix = dataclasses.replace(plan.DEFAULT, noises=(0.4,), arms=arms, seeds=(0,), world2_check=False)
    jobs = {j.arm: j for j in plan.jobs(plan.CPU, matrix, tmp_path)}
    base, late = (set(jobs[a].overrides) for a in ("dissect_warmup", "dissect_warmup@30"))
    spe = plan.CPU.steps_per_epoch
    assert base - late == {f"selection.warmup_steps={15 * spe}"} | {o for o in base if o.startswith("run.name")}
    assert f"selection.warmup_steps={30 * spe}" in late and "selection.strategy=dissect_warmup" in late
    with pytest.raises(ValueError, match="must end before"):
        plan.overrides(plan.CPU, "mem", "dissect_model@60", 0, 0.3, tmp_path, tmp_path / "r", False)
    for argv in (["--arms", "random@30"], ["--arms", "dissect_warmup@x"], ["--noises", "0.3"], ["--seeds", "5,5"]):
        with pytest.raises(SystemExit):
            accuracy.main(argv)
        assert "error:" in capsys.readouterr().err


def test_scale_overrides_reach_every_run_and_the_calibration_model_builds(tmp_path):
    """``--scale '{"weight_decay": 1.0, "model": "dissect-bench-vit-w128"}'`` (the gate
    calibration in docs/method_findings.md) changes every run's trainer keys, the default
    keeps the trainer's own weight decay, and the wider model exists and is wider."""
    from dissect_ds.config import TrainConfig
    from dissect_ds.model import build_model

    wide = dataclasses.replace(plan.CPU, weight_decay=1.0, model="dissect-bench-vit-w128")
    for job in plan.jobs(wide, plan.GATE_ONLY, tmp_path):
        assert {"train.weight_decay=1.0", "model.name=dissect-bench-vit-w128"} <= set(job.overrides), job.name
    default = plan.jobs(plan.CPU, plan.GATE_ONLY, tmp_path)[0].overrides
    assert f"train.weight_decay={TrainConfig().weight_decay}" in default
    widths = {name: build_model(name)[0].visual.transformer.width for name in ("dissect-bench-vit", wide.model)}
    assert widths == {"dissect-bench-vit": 64, "dissect-bench-vit-w128": 128}


def test_the_code_version_changes_with_any_trainer_source(tmp_path):
    import shutil

    src = tmp_path / "dissect_ds"
    shutil.copytree(ROOT / "dissect_ds", src, ignore=shutil.ignore_patterns("__pycache__"))
    assert run.source_hash(src) == run.code_version()
    config = src / "selection" / "config.py"
    config.write_text(config.read_text() + "\n")
    assert run.source_hash(src) != run.code_version()


def test_dissect_is_compared_with_every_other_selecting_rule_paired():
    from scipy import stats

    from benchmarks.accuracy.analyse import ArmResult, Interval, against_rules
    from benchmarks.accuracy.report import rule_rows

    blank = {f.name: Interval.of([]) for f in dataclasses.fields(ArmResult)}
    finals = {
        "none": [0.70, 0.72, 0.69, 0.71, 0.70],
        "random": [0.50, 0.52, 0.49, 0.53, 0.50],
        "small_loss": [0.40, 0.45, 0.41, 0.44, 0.42],
        "dissect_warmup": [0.55, 0.56, 0.50, 0.57, 0.52],
        "current_score": [0.56, 0.55, 0.52, 0.55, 0.54],
        "dissect_model@30": [0.52, 0.50, 0.51, 0.53, 0.49],
    }
    res = {a: ArmResult(**{**blank, "arm": a, "by_seed": dict(enumerate(v))}) for a, v in finals.items()}
    against = against_rules(res)
    # Every DISSect variant (the registry's differential strategies, NAME@E arms too) against
    # every other selecting rule; random and full data have their own columns.
    assert {d: list(r) for d, r in against.items()} == {
        "dissect_warmup": ["small_loss", "current_score"],
        "dissect_model@30": ["small_loss", "current_score"],
    }
    for d, diffs in against.items():
        for rule, diff in diffs.items():
            ci = stats.ttest_rel(finals[d], finals[rule]).confidence_interval(0.95)
            assert math.isclose(diff.lo, ci.low, abs_tol=1e-12) and math.isclose(diff.hi, ci.high, abs_tol=1e-12)
    assert against["dissect_warmup"]["small_loss"].verdict() == "win"
    assert against["dissect_model@30"]["current_score"].verdict() == "loss"
    head, rows = rule_rows({"memorisation, 40% noise, rate 0.3": res})
    assert head == ["setting", "DISSect arm", "- small_loss (paired)", "- current_score (paired)"]
    assert rows[0][:2] == ["memorisation, 40% noise, rate 0.3", "dissect_warmup"] and rows[0][2].startswith("**win** +")


def test_onepass_and_rate2_add_their_parts_of_the_whole_matrix_with_equal_budgets(tmp_path):
    from benchmarks import accuracy

    argv = ["--rate2", "--onepass", "--reference", "--seeds", "5,6,7,8,9"]
    scale, matrix, name, command = accuracy.configure(accuracy.parse(argv))
    assert matrix.onepass_noises == (0.4,) and "(--onepass)" in name and matrix.seeds == (5, 6, 7, 8, 9)
    assert command.endswith("--reference --onepass --rate2 --seeds 5,6,7,8,9")
    rate2 = [j for j in plan.jobs(scale, matrix, tmp_path) if j.rate == scale.rate2]
    assert sorted({(j.noise, j.arm) for j in rate2}) == sorted((0.4, a) for a in plan.RATE2_ARMS)
    assert all(f"selection.rate={scale.rate2}" in j.overrides and j.regime == "mem" for j in rate2)
    onepass = [j for j in plan.jobs(scale, matrix, tmp_path) if j.regime == "onepass"]
    assert sorted({j.arm for j in onepass}) == sorted(plan.ONEPASS_ARMS) and len(onepass) == 5 * 5
    assert {j.seed for j in plan.jobs(scale, matrix, tmp_path) if j.regime != "ref"} == {5, 6, 7, 8, 9}
    for job in onepass:  # one epoch over the larger set; every selecting arm at the same rate
        assert f"train.steps={scale.steps('onepass')}" in job.overrides
        assert f"selection.rate={1.0 if job.arm == 'none' else scale.rate}" in job.overrides
    # At the noise rates given (the command says which), with the same arms.
    _, matrix, name, command = accuracy.configure(accuracy.parse(["--onepass", "0,0.4", "--seeds", "0,1"]))
    assert matrix.onepass_noises == (0.0, 0.4) and "at 0%, 40% noise (--onepass)" in name
    assert command == "python -m benchmarks.accuracy --onepass 0,0.4 --seeds 0,1"
    argv = ["--noises", "0", "--onepass", "0", "--no-world2-check", "--out", "x"]  # the page says all that changes runs
    assert accuracy.configure(accuracy.parse(argv))[3].endswith("--onepass 0 --noises 0 --no-world2-check")
    onepass = [j for j in plan.jobs(scale, matrix, tmp_path) if j.regime == "onepass"]
    assert sorted({(j.noise, j.arm) for j in onepass}) == sorted((n, a) for n in (0.0, 0.4) for a in plan.ONEPASS_ARMS)
    # The default and --all: no flag in the command, the regime as their matrices say.
    assert accuracy.configure(accuracy.parse([]))[1].onepass_noises == ()
    assert (
        accuracy.configure(accuracy.parse(["--all", "--onepass", "--rate2"]))[3]
        == "python -m benchmarks.accuracy --all"
    )


def test_long_onepass_runs_the_one_pass_regime_alone_with_its_own_gate_and_page(tmp_path, capsys):
    from benchmarks import accuracy

    args = accuracy.parse(["--long-onepass"])
    scale, matrix, name, command = accuracy.configure(args)
    assert command == "python -m benchmarks.accuracy --long-onepass" and "(--long-onepass)" in name
    assert scale.steps("onepass") == 1920 == 2 * plan.CPU.steps("onepass") and scale.train == plan.CPU.train
    assert args.out == accuracy.LONG_ONEPASS_OUT != accuracy.c.DOCS / "bench"  # make bench's page stays
    assert matrix.gate_regime == "onepass" and plan.DEFAULT.gate_regime == "mem"
    jobs = plan.jobs(scale, matrix, tmp_path)
    assert {j.regime for j in jobs} == {"onepass"} and len(jobs) == 2 * len(plan.ONEPASS_ARMS) * len(plan.SEEDS)
    # Its gate: full data at 0% noise in one pass, every seed; make bench's: in the memorisation regime.
    gate = plan.jobs(scale, matrix.gate_only((3, 4)), tmp_path)
    assert [(j.regime, j.noise, j.arm, j.seed) for j in gate] == [("onepass", 0.0, "none", s) for s in (3, 4)]
    assert {j.name: j.overrides for j in gate} == {
        j.name: j.overrides for j in jobs if j.name in {g.name for g in gate}
    }
    assert [(j.regime, j.arm) for j in plan.jobs(plan.CPU, plan.GATE_ONLY, tmp_path)] == [("mem", "none")] * 5
    for bad in (["--arms", "random"], ["--noises", "0"], ["--onepass"], ["--quick"]):
        with pytest.raises(SystemExit):
            accuracy.parse(["--long-onepass", *bad])
    assert "--long-onepass runs its own matrix: drop --arms" in capsys.readouterr().err


def test_a_data_set_of_another_size_is_written_again(tmp_path):
    out, written = tmp_path / "onepass_n0", []
    for n in (32, 48, 48):  # the second call writes the set again with 48 pairs; the third keeps it
        run.prepare_data(out, n, 0.0, 16, 24, 16, seed=0)
        assert run._pairs(out / "train") == n and run._pairs(out / "val") == 16
        written.append((out / "train" / "sizes.json").stat().st_mtime_ns)
    assert written[0] != written[1] == written[2]


def test_a_setting_at_rate_two_is_compared_with_the_same_full_data_runs(tmp_path):
    from benchmarks.accuracy import analyse

    scale = plan.CPU
    matrix = plan.Matrix(noises=(0.4,), arms=("none", "random"), seeds=(0, 1), rate2_noises=(0.4,), world2_check=False)
    runs = [analyse.Run(j, [], [], {}, 0.0) for j in plan.jobs(scale, matrix, tmp_path)]
    groups = analyse.by_setting(runs, scale.rate)
    at_rate2 = groups[("mem", 0.4, scale.rate2)]
    full = [r for r in groups[("mem", 0.4, scale.rate)] if r.job.arm == "none"]
    assert len(full) == 2 and [r for r in at_rate2 if r.job.arm == "none"] == full
    assert {r.job.arm for r in at_rate2} == {"none", *plan.RATE2_ARMS}


def test_the_label_free_warning_is_replayed_after_the_warm_up_only(tmp_path):
    from benchmarks.accuracy import analyse

    matrix = plan.Matrix(noises=(0.4,), arms=("dissect_warmup",), seeds=(0,), world2_check=False)
    job = plan.jobs(plan.QUICK, matrix, tmp_path)[0]
    warm = analyse.warmup_steps(job)

    def run(corr: float, start: int, steps: int = 60) -> analyse.Run:
        lines = [{"step": s, "loss": 1.0, "selection/rank_corr_d_c": corr} for s in range(start, start + steps)]
        return analyse.Run(job, lines, [], {}, 0.0)

    assert analyse.warned(run(-0.9, warm + 1))  # 50 selections after the warm-up below -0.6
    assert not analyse.warned(run(-0.3, warm + 1))
    assert not analyse.warned(run(-0.9, warm - 49))  # only 10 of them after the warm-up
    logging.disable(logging.INFO)  # a caller's own setting survives the replay
    try:
        analyse.warned(run(-0.9, warm + 1))
        assert logging.root.manager.disable == logging.INFO
    finally:
        logging.disable(logging.NOTSET)


def test_a_relative_work_dir_names_the_same_runs_as_its_absolute_path(tmp_path, monkeypatch):
    # The job specs --reuse compares hold the work dir's path: a relative --work (or --out)
    # must give the specs of its absolute form, or every run is redone.
    from benchmarks import accuracy

    monkeypatch.chdir(tmp_path)
    rel, absolute = (accuracy.parse(["--work", w]) for w in ("w", str(tmp_path / "w")))
    assert accuracy.work_dir(rel) == accuracy.work_dir(absolute) == tmp_path / "w"
    assert accuracy.work_dir(accuracy.parse(["--out", "page"])) == tmp_path / "page" / "work"
    scale, matrix = accuracy.configure(rel)[:2]
    specs = [[run._spec(j) for j in plan.jobs(scale, matrix, accuracy.work_dir(a))] for a in (rel, absolute)]
    assert specs[0] == specs[1] and all(Path(s["run_dir"]).is_absolute() for s in specs[0])


def test_a_runs_diagnostics_do_not_depend_on_the_other_seeds_of_its_invocation(tmp_path):
    """--reuse compares job specs: a seed's runs must be the same jobs whichever seeds
    the invocation that made them ran (seed 5 in a 0-9 and in a 5-9 invocation)."""
    specs: dict[str, set] = {}
    for seeds in (tuple(range(10)), (5, 6, 7, 8, 9), (3, 4, 5), (0, 1)):
        matrix = dataclasses.replace(plan.DEFAULT, seeds=seeds, world2_check=False)
        for job in plan.jobs(plan.CPU, matrix, tmp_path):
            specs.setdefault(job.name, set()).add(job.overrides)
    assert all(len(v) == 1 for v in specs.values())
    ten = dataclasses.replace(plan.DEFAULT, seeds=tuple(range(10)), world2_check=False)
    recorded = {(j.seed, j.noise) for j in plan.jobs(plan.CPU, ten, tmp_path) if "selection.record=true" in j.overrides}
    assert recorded == {(0, 0.4), (5, 0.4)}  # the first seed of each five, with noisy pairs
    assert plan.diagnostic_seed(dataclasses.replace(ten, seeds=(3, 4, 5))) == 5
