"""Label-free selection signals and the early-snapshot warning, on controlled scores.

Two regimes of the same noisy set (40% noisy pairs), scored by a stand-in model whose
per-pair score is a chosen function of the training step:
- early snapshot: clean pairs are still being learned (their scores rise fast), noisy ones
  barely move; a snapshot taken after one step makes "rose least" mean "noisy".
- late snapshot: clean pairs have settled, noisy ones are being memorised (rising).
The warning and the label-free metrics must agree with the labelled clean precision.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from scipy.stats import spearmanr

from dissect_ds.model import Features
from dissect_ds.selection import SelectionConfig, Selector
from dissect_ds.selection.diagnostics import EarlySnapshotAlarm
from dissect_ds.selection.scoring import clip_score
from dissect_ds.selection.testing import FakeBatch, FakeHistorical, scores_as_features

N, B, STEPS = 200, 40, 75
NOISY = torch.arange(N) % 5 < 2  # 40% noisy: random selection's clean precision is 0.6


class ScoreModel:
    """A FakeClip-like model: pair u scores min(base + rise * version, cap) + offset_u, with
    (base, rise, cap) per class (clean/noisy) and a fixed per-pair offset in [0, 10)."""

    def __init__(self, clean: tuple[float, float, float], noisy: tuple[float, float, float]) -> None:
        self.offset = 10.0 * torch.rand(N, generator=torch.Generator().manual_seed(0))
        self.base = torch.where(NOISY, noisy[0], clean[0])
        self.rise = torch.where(NOISY, noisy[1], clean[1])
        self.cap = torch.where(NOISY, noisy[2], clean[2])
        self.version = 0.0

    def features(self, uids: torch.Tensor, version: float) -> Features:
        s = torch.minimum(self.base[uids] + self.rise[uids] * version, self.cap[uids]) + self.offset[uids]
        return scores_as_features(s)

    def encode(self, batch: FakeBatch) -> Features:
        return self.features(batch.uids, self.version)


def train(model: ScoreModel, warmup_steps: int) -> list[dict]:
    hists: list[FakeHistorical] = []

    def make_historical() -> FakeHistorical:
        hists.append(FakeHistorical(model))
        return hists[-1]

    cfg = SelectionConfig(strategy="dissect_model", rate=0.3, warmup_steps=warmup_steps)
    selector = Selector(
        cfg,
        num_uids=N,
        rank=0,
        world_size=1,
        device="cpu",
        seed=0,
        steps_per_epoch=N // B,
        run_dir=None,
        make_historical=make_historical,
    )
    g = torch.Generator().manual_seed(1)
    out = []
    for step in range(STEPS):
        uids = torch.randperm(N, generator=g)[:B]
        sel = selector.select(step, FakeBatch(uids, NOISY[uids]), model.encode)
        out.append({**sel.metrics, "mask": sel.mask, "uids": uids, "model_version": model.version})
        model.version += 1
        selector.after_step(step)
    return out


def after(metrics: list[dict], key: str, start: int) -> float:
    vals = [m[key] for m in metrics[start:] if key in m]
    return sum(vals) / len(vals)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "differential ranks against" in r.getMessage()]


def test_early_snapshot_warns_and_signals_agree_with_clean_precision(caplog):
    # Clean pairs are learned fast (score +2 per step up to 90); noisy ones barely move.
    with caplog.at_level(logging.WARNING, logger="dissect_ds.selection.diagnostics"):
        metrics = train(ScoreModel(clean=(20.0, 2.0, 90.0), noisy=(15.0, 0.05, 30.0)), warmup_steps=1)
    assert after(metrics, "selection/clean_precision", 2) < 0.6  # worse than random: noisy pairs kept
    assert after(metrics, "selection/kept_score_gap", 2) < 0
    assert after(metrics, "selection/rank_corr_d_c", 2) < EarlySnapshotAlarm().threshold
    found = warnings_of(caplog)
    assert len(found) == 1 and "step 51" in found[0], found  # 50 selections after warm-up; once per 500 steps


def test_late_snapshot_does_not_warn(caplog):
    # Clean pairs have settled (score 80); noisy ones are memorised (+0.8 per step).
    with caplog.at_level(logging.WARNING, logger="dissect_ds.selection.diagnostics"):
        metrics = train(ScoreModel(clean=(80.0, 0.0, 80.0), noisy=(15.0, 0.8, 95.0)), warmup_steps=10)
    assert after(metrics, "selection/clean_precision", 12) > 0.6  # better than random
    assert after(metrics, "selection/kept_score_gap", 12) > 0
    assert after(metrics, "selection/rank_corr_d_c", 12) > 0
    assert warnings_of(caplog) == []


def test_signals_match_a_plain_reimplementation():
    model = ScoreModel(clean=(20.0, 2.0, 90.0), noisy=(15.0, 0.05, 30.0))
    metrics = train(model, warmup_steps=2)
    assert "selection/rank_corr_d_c" not in metrics[0]  # warm-up: no differential
    assert "selection/rank_corr_d_c" not in metrics[2]  # first step on a fresh snapshot: d is flat
    for m in metrics[3:6]:
        uids, mask = m["uids"], m["mask"]
        c = clip_score(model.features(uids, m["model_version"])).double()
        h = clip_score(model.features(uids, 2.0)).double()  # the snapshot after step 1
        d = (h - h.mean()) - (c - c.mean())
        assert m["selection/kept_score_gap"] == pytest.approx((c[mask].mean() - c.mean()).item(), abs=1e-4)
        assert m["selection/rank_corr_d_c"] == pytest.approx(spearmanr(d.numpy(), c.numpy()).statistic, abs=1e-6)
        assert not math.isnan(m["selection/rank_corr_d_c"])
