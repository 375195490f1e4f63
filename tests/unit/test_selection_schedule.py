"""Selection under gradient accumulation: one top-k over the whole step, schedules in
optimizer steps.

Drives the real ``Trainer.train_step`` with a fake engine (the optimizer update happens at
the last micro-batch of a step, as DeepSpeed's ``step()`` does at the accumulation
boundary) and the deterministic fakes of ``dissect_ds.selection.testing``: the same
global batches split into 1, 2 or 3 micro-batches must select the same pairs, take the
snapshot after the same optimizer step, EMA-update it once per optimizer step and keep
warm-up whole steps.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dissect_ds import config as C
from dissect_ds.metrics import StepTimer
from dissect_ds.selection import SelectionConfig, Selector
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
        self.trained: list[list[int]] = []  # uids of each train_step call

    def train_step(self, batch, fallback, sizes: list[int]) -> dict[str, float]:
        assert sizes == [len(batch)]
        self.trained.append(batch.uids.tolist())
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


def train(
    sel_cfg: SelectionConfig, grad_accum: int, trained: list | None = None
) -> tuple[list, list[dict], list[FakeHistorical], list]:
    """STEPS optimizer steps of the real train_step: the historical version after each,
    the metrics, the historical models, the histograms written as (step, name); the uids
    of each train_step call are appended to ``trained``."""
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
    trainer.micro_batch = B // grad_accum
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
    if trained is not None:
        trained.extend(trainer.engine.trained)
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


@pytest.mark.parametrize("strategy", ["current_score", "small_loss", "dissect_momentum", "random"])
def test_one_top_k_over_the_whole_step_however_it_is_split(strategy):
    """grad_accum 2 and 3 keep exactly floor(rate * B) pairs of each step, the same ones as
    one selection over the step's concatenated micro-batches (grad_accum 1), trained in
    micro-batches of k // grad_accum rows or one more."""
    cfg = SelectionConfig(strategy=strategy, rate=0.5, warmup_steps=1)
    k = B // 2
    steps_one: list = []
    _, m1, _, _ = train(cfg, grad_accum=1, trained=steps_one)
    assert all(len(t) == k for t in steps_one) and len(steps_one) == STEPS
    for accum in (2, 3):
        calls: list = []
        _, metrics, _, _ = train(cfg, grad_accum=accum, trained=calls)
        assert sorted(len(c) for c in calls[:accum]) == sorted(k // accum + (m < k % accum) for m in range(accum))
        steps = [sum(calls[i : i + accum], []) for i in range(0, len(calls), accum)]
        assert [sorted(s) for s in steps] == [sorted(s) for s in steps_one]
        assert [m["selected"] for m in metrics] == [k] * STEPS
        for a, b in zip(metrics, m1):
            assert a.get("selection/rate_effective") == b.get("selection/rate_effective")


def test_micro_splits_spread_the_kept_rows_over_micro_batches_and_ranks():
    from dissect_ds.train import micro_splits

    kept = [5, 2, 0, 3]  # four ranks, k = 10
    for accum in (1, 2, 3, 4):
        per_rank = [micro_splits(kept, accum, r) for r in range(len(kept))]
        for r, splits in enumerate(per_rank):
            rows = torch.cat([idx for idx, _ in splits]).sort().values
            assert torch.equal(rows, torch.arange(kept[r]))  # every kept row once
            assert [len(idx) for idx, _ in splits] == [sizes[r] for _, sizes in splits]
        sizes = [s for _, s in per_rank[0]]
        assert all(s == [sz for _, sz in other] for other in per_rank for s in [sizes])  # the same on every rank
        totals = [sum(s) for s in sizes]
        assert sum(totals) == 10 and max(totals) - min(totals) <= 1


def test_too_few_kept_pairs_for_the_micro_batches_is_a_config_error():
    cfg = C.Config(train=C.TrainConfig(batch_size=8, grad_accum=4), selection=SelectionConfig("random", rate=0.3))
    with pytest.raises(C.ConfigError, match=r"selection.rate: 0.3 keeps 2 pairs .* train.grad_accum \(4\)"):
        C.validate(cfg, 1)
