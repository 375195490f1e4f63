"""The accuracy benchmark's smoke version end to end: real 2-rank training runs, the
markdown tables and the plots, with finite numbers (the values themselves mean nothing)."""

from __future__ import annotations

import json
import math
import re

import pytest

pytestmark = pytest.mark.slow

IMAGES = ("probe", "curves", "selection", "scores", "noise")


def test_quick_accuracy_benchmark_writes_tables_and_plots(tmp_path):
    from benchmarks import accuracy

    accuracy.main(["--quick", "--out", str(tmp_path)])

    page = (tmp_path / "accuracy.md").read_text()
    for key in IMAGES:
        png = tmp_path / "img" / f"accuracy_{key}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", key
        assert f"](img/accuracy_{key}.png)" in page, key  # linked relative to the page
    assert "python -m benchmarks.accuracy --quick" in page  # says how to reproduce it
    rows = {ln.split("|")[1].strip(): ln for ln in page.splitlines() if ln.startswith(("| none", "| dissect"))}
    assert "none" in rows and "dissect_warmup" in rows

    summary = json.loads((tmp_path / "work" / "accuracy.json").read_text())
    for strategy in ("none", "dissect_warmup"):
        row = summary["strategies"][strategy]
        for key in ("i2t_R@1", "t2i_R@1", "mean_R@1", "zeroshot_top1", "wall_s"):
            assert math.isfinite(row[key]) and row[key] >= 0, (strategy, key, row[key])
        assert row["backward_samples"] > 0
    assert 0 <= summary["strategies"]["dissect_warmup"]["clean_precision"] <= 1
    # Full batch trains on every pair; selection at rate 0.3 after warm-up on fewer.
    full, selected = (summary["strategies"][s]["backward_samples"] for s in ("none", "dissect_warmup"))
    assert selected < full
    # Sections 3-5: another noise level with its own reference, rate 0.5, a second seed, one pass.
    for title in ("## 3. Noise", "## 4. Repeats over seeds", "## 5. One-pass regime"):
        assert title in page
    assert set(summary["noise_levels"]) == {"0%/none"}
    assert set(summary["rate2"]) == {"dissect_warmup"} and set(summary["onepass"]) == {"dissect_model"}
    assert len(summary["seeds"]["dissect_warmup"]) == 2  # seed 0 (the sweep) and seed 1
    one = summary["onepass"]["dissect_model"]
    # One epoch of 256 pairs, batch 32: a fifth of the steps on the full batch, then rate 0.3.
    assert 0 < one["backward_samples"] < 256 and math.isfinite(one["mean_R@1"])
    rate2 = summary["rate2"]["dissect_warmup"]["backward_samples"]
    assert selected < rate2 < full  # rate 0.5 trains on more pairs than 0.3, fewer than all
    # The probe's AUROC rows are numbers in [0, 1].
    aurocs = [float(x) for x in re.findall(r"\| (0\.\d{3}|1\.000) ", page.split("## 2.")[0])]
    assert aurocs and all(0 <= x <= 1 for x in aurocs)
