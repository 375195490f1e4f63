"""The performance benchmarks' smoke version end to end (``run_all --quick``): real 2-rank
runs of both trainers, every selection strategy and the memory probes, with finite
positive numbers, the ratios computed, and the markdown written where --out says (the
values themselves mean little at this size)."""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.slow


def _finite_positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def test_quick_perf_benchmarks(tmp_path):
    from benchmarks import loader, memory, overhead, run_all, throughput

    out, work = tmp_path / "docs", tmp_path / "work"
    results = run_all.run(quick=True, only=("throughput", "overhead", "memory", "loader"), out=out, work=work)

    tp = results["throughput"]
    assert {r.trainer for r in tp.runs} == {"ours", "open_clip"}
    assert all(_finite_positive(r.samples_per_s) and _finite_positive(r.wall_s) for r in tp.runs)
    assert tp.spread("ours", "in_step_samples_per_s").finite_positive()
    assert all(_finite_positive(r.cpu_per_step) for r in tp.runs) and tp.cpu_ratio().finite_positive()
    assert len(tp.ratios()) == throughput.QUICK.repeats and tp.ratio().finite_positive()

    ov = results["overhead"]
    for name in overhead.STRATEGIES:
        assert ov.time(name, "time/step").finite_positive(), name
        assert ov.ratio(name).finite_positive() and ov.loop_ratio(name).finite_positive(), name
        share = ov.select_share(name)
        assert 0 < share.lo and share.hi < 1, name  # bookkeeping is a part of the step
    for name in ("clipscore", "dissect_warmup", "big_loss"):  # strategies with a scoring forward
        assert ov.time(name, "time/score").finite_positive(), name
    assert ov.time("dissect_model", "time/score_hist").finite_positive()
    for name in overhead.REFERENCE_FORWARDS:  # the reference's forward is timed apart
        assert ov.time(name, "time/score_ref").finite_positive(), name
    assert ov.time("random", "time/score").mid == 0  # no forward: the split is honest

    mem = results["memory"]
    fp16 = {h.world: h for h in mem.history if h.dtype == "float16"}
    assert sorted(fp16) == list(memory.WORLDS)
    for w, h in fp16.items():
        assert h.table_bytes == h.target_bytes == 2 * math.ceil(memory.CC12M / w)
    assert fp16[1].rss_bytes >= 0.9 * fp16[1].table_bytes  # the table is really resident
    assert mem.params > 0
    [rss] = mem.rss
    assert sorted(rss.rank_peak_mib) == [0, 1] and all(_finite_positive(v) for v in rss.rank_peak_mib.values())
    switches = {x.setting: x for x in mem.switches}
    assert list(switches) == list(memory.SWITCHES) and all(_finite_positive(x.step_s) for x in mem.switches)
    # Gradient checkpointing keeps fewer activations, even for the tiny model.
    ckpt = switches["model.grad_checkpointing=true"].step_peak_mib
    assert ckpt is None or ckpt < switches["plain"].step_peak_mib

    rows = {(x.side, x.pipeline, x.workers): x for x in results["loader"].rows}
    assert {("dissect_ds", 1), ("dissect_ds", 2), ("open_clip_train", 1), ("raw PIL decode", 0)} <= {
        k[1:] for k in rows
    }
    assert all(_finite_positive(v) for x in rows.values() for v in x.pairs_per_cpu_s)
    assert loader.GPU_PAIRS_PER_S

    perf = (out / "bench" / "perf.md").read_text()
    for section in ("throughput", "overhead", "memory", "loader"):
        assert f"<!-- bench:{section} -->" in perf and f"<!-- bench:/{section} -->" in perf
    assert "python -m benchmarks.throughput" in perf and "Machine:" in perf  # how to reproduce, where
    page = (out / "benchmarks.md").read_text()
    assert (
        page.startswith("# Benchmarks")
        and "make bench" in page
        and "ratio dissect_ds, ZeRO-2 / open_clip_train" in page
    )
