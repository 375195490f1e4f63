"""Selection schedules count optimizer steps under gradient accumulation.

Drives the real ``Trainer.train_step`` with a fake engine (the optimizer update happens at
the last micro-batch of a step, as DeepSpeed's ``step()`` does at the accumulation
boundary) and the deterministic fakes of ``dissect_ds.selection.testing``: the same
global batches split into 1 or 2 micro-batches must take the snapshot after the same
optimizer step, EMA-update it once per optimizer step and keep warm-up whole steps.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dissect_ds import config as C
from dissect_ds.metrics import StepTimer
from dissect_ds.selection import SelectionConfig, Selector
from dissect_ds.selection.scoring import random_priority
from dissect_ds.selection.testing import FakeBatch, FakeClip, FakeHistorical
from dissect_ds.train import Trainer, TrainState

N = 48
B = 12  # global batch (one optimizer step)
STEPS = 6


class SelectableBatch(FakeBatch):
    def select(self, mask: torch.Tensor) -> SelectableBatch:
        return SelectableBatch(self.uids[mask], None if self.noisy is None else self.noisy[mask])


class FakeEngine:
    """``train_step`` "updates" the model (version += 1) at each accumulation boundary."""

    def __init__(self, model: FakeClip, grad_accum: int) -> None:
        self.model, self.grad_accum, self.calls = model, grad_accum, 0
        self.encode = model.encode

    def train_step(self, batch, fallback, sizes: list[int]) -> dict[str, float]:
        assert sizes == [len(batch)]
        self.calls += 1
        if self.calls % self.grad_accum == 0:
            self.model.version += 1
        return {"loss": 0.0, "lr": 0.0}

    def grad_norm(self) -> float:
        return 0.0

    def check_finite_step(self, grad_norm: float | None) -> None:
        pass


class HistogramLog:
    def __init__(self) -> None:
        self.calls: list[tuple[int, str]] = []

    def histogram(self, step: int, name: str, values: torch.Tensor) -> None:
        self.calls.append((step, name))


def train(sel_cfg: SelectionConfig, grad_accum: int) -> tuple[list, list[dict], list[FakeHistorical], list]:
    """STEPS optimizer steps of the real train_step: the historical version after each,
    the metrics, the historical models, the histograms written as (step, name)."""
    model = FakeClip(N)
    hists: list[FakeHistorical] = []

    def make_historical() -> FakeHistorical:
        hists.append(FakeHistorical(model))
        return hists[-1]

    steps_per_epoch = 4  # optimizer steps
    trainer = Trainer.__new__(Trainer)  # no engine, data or writer: only what train_step uses
    trainer.cfg = C.Config(
        train=C.TrainConfig(batch_size=B, grad_accum=grad_accum),
        selection=sel_cfg,
        log=C.LogConfig(histograms_every_steps=2),
    )
    trainer.writer = HistogramLog()
    trainer.info = SimpleNamespace(is_main=True, rank=0, world_size=1)
    trainer.state, trainer.timer, trainer.steps_per_epoch = TrainState(), StepTimer(), steps_per_epoch
    trainer.engine = FakeEngine(model, grad_accum)
    trainer.selector = Selector(
        sel_cfg,
        num_uids=N,
        rank=0,
        world_size=1,
        device="cpu",
        seed=5,
        steps_per_epoch=steps_per_epoch,
        run_dir=None,
        make_historical=make_historical,
    )
    g = torch.Generator().manual_seed(0)
    micro = [
        SelectableBatch(part) for _ in range(STEPS) for part in torch.randperm(N, generator=g)[:B].chunk(grad_accum)
    ]
    batches = iter(micro)
    versions, metrics = [], []
    for _ in range(STEPS):
        metrics.append(trainer.train_step(batches))
        trainer.state.step += 1
        versions.append(None if not hists else hists[-1].version)
    return versions, metrics, hists, trainer.writer.calls


@pytest.mark.parametrize(
    "cfg,expected",
    [
        # Snapshot after optimizer step 1 (2 updates), then w_h <- 0.5 w_h + 0.5 w once per step.
        (SelectionConfig(strategy="dissect_model", rate=0.5, warmup_steps=2, ema_decay=0.5), [None, 2, 2.5, 3.25]),
        # Snapshot after step 1, refreshed after step 3 and step 5 (every 2 optimizer steps).
        (SelectionConfig(strategy="dissect_model", rate=0.5, warmup_epochs=0.5, refresh_steps=2), [None, 2, 2, 4]),
        (SelectionConfig(strategy="none", shadow=True, shadow_step=2), [None, None, 3, 3]),
    ],
    ids=["ema", "refresh", "shadow"],
)
def test_schedules_count_optimizer_steps(cfg, expected):
    one, m1, h1, w1 = train(cfg, grad_accum=1)
    two, m2, h2, w2 = train(cfg, grad_accum=2)
    # Histograms: once per logged optimizer step (every 2), not once per micro-batch.
    assert w1 == w2 and w1 and {step for step, _ in w1} <= {0, 2, 4}
    assert one[:4] == two[:4] == expected
    assert one == two and len(h1) == len(h2) == 1
    assert h1[0].refresh_calls == h2[0].refresh_calls
    # Warm-up (or the shadow's wait) covers whole optimizer steps: no historical score before.
    first = expected.index(next(v for v in expected if v is not None)) + 1
    for m in (m1, m2):
        assert ["selection/historical_sel" in x for x in m] == [i >= first for i in range(STEPS)]


def test_micro_batches_of_one_step_draw_different_priorities():
    uids = torch.arange(10)
    assert torch.equal(random_priority(3, 4, uids, micro=0), random_priority(3, 4, uids))
    assert not torch.equal(random_priority(3, 4, uids, micro=1), random_priority(3, 4, uids))
    assert not torch.equal(random_priority(3, 4, uids, micro=1), random_priority(3, 5, uids))


def test_metrics_under_accumulation_sum_times_and_counts_and_average_rates(monkeypatch):
    """Each micro-batch reports 1 s of scoring and a rate of 0.25: the step reports grad_accum
    seconds (so the time split adds up to the step) and the rate 0.25."""
    real = Selector.select

    def select(self, *args, **kw):
        out = real(self, *args, **kw)
        out.metrics.update({"time/score": 1.0, "selection/probe_rate": 0.25})
        return out

    monkeypatch.setattr(Selector, "select", select)
    cfg = SelectionConfig(strategy="current_score", rate=0.5)
    for accum in (1, 2, 3):
        _, metrics, _, _ = train(cfg, grad_accum=accum) if B % accum == 0 else (None, [], None, None)
        for m in metrics:
            assert m["time/score"] == pytest.approx(accum)
            assert m["selection/probe_rate"] == pytest.approx(0.25)
            assert m["selected"] == B // 2  # a count: summed over the micro-batches
