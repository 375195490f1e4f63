"""Selection engine, one process: formulas, strategies, diagnostics, state.

Multi-rank equivalence (2 and 3 gloo ranks vs this single-process behaviour) is in
test_selection_dist.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dissect_ds.model import Features
from dissect_ds.selection import STRATEGIES, ScoreMemory, SelectionConfig, Selector, validate
from dissect_ds.selection.config import ReferenceConfig
from dissect_ds.selection.scoring import auroc, clip_score, per_sample_contrastive_loss, random_priority, topk_mask
from dissect_ds.selection.testing import FakeBatch, FakeClip, FakeHistorical, scores_as_features

N = 40  # uids
B = 12  # global batch


def global_batches(steps: int, seed: int = 1, n: int = N, b: int = B) -> list[torch.Tensor]:
    """Overlapping batches of distinct uids, so history lookups hit and miss."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=g)[:b] for _ in range(steps)]


def noisy_of(uids: torch.Tensor) -> torch.Tensor:
    return uids % 4 == 0


def make(cfg: SelectionConfig, model: FakeClip | None = None, run_dir: str | None = None, **kw):
    model = model or FakeClip(N, noisy=noisy_of(torch.arange(N)))
    hists: list[FakeHistorical] = []

    def make_historical() -> FakeHistorical:
        hists.append(FakeHistorical(model))
        return hists[-1]

    args = dict(num_uids=N, rank=0, world_size=1, device="cpu", seed=7, steps_per_epoch=3, run_dir=run_dir)
    args.update(kw)
    return Selector(cfg, make_historical=make_historical, **args), model, hists


def run(selector: Selector, model: FakeClip, batches: list[torch.Tensor], start: int = 0):
    """The trainer's loop: select, "train" (version += 1), after_step."""
    out = []
    for i, uids in enumerate(batches):
        step = start + i
        out.append(selector.select(step, FakeBatch(uids, noisy_of(uids)), model.encode))
        model.version += 1
        selector.after_step(step)
    return out


def all_history(selector: Selector) -> torch.Tensor:
    return selector.memory.lookup(torch.arange(N))


# ------------------------------------------------------------------ config
def test_config_defaults_valid_and_errors_name_the_key(tmp_path):
    weights = tmp_path / "ref.pt"
    weights.write_bytes(b"")
    reference = ReferenceConfig(model="dissect-tiny-vit", pretrained=str(weights))
    for name, cls in STRATEGIES.items():
        warm = {"warmup_steps": 1} if name == "dissect_warmup" else {}
        if cls.needs_reference(SelectionConfig()):
            assert validate(SelectionConfig(strategy=name))[0].startswith("selection.reference.model"), name
            warm["reference"] = reference
        assert validate(SelectionConfig(strategy=name, **warm)) == [], name
    bad = SelectionConfig(
        strategy="dissect_momentum", rate=0.0, scope="row", warmup_mode="half", beta=1.0, history_dtype="int8"
    )
    errors = validate(bad)
    for key in ("rate", "scope", "warmup_mode", "beta", "history_dtype"):
        assert any(e.startswith(f"selection.{key}:") for e in errors), (key, errors)
    assert all("\n" not in e for e in errors)
    assert validate(SelectionConfig(strategy="dissect_warmup"))[0].startswith("selection.warmup_steps")
    assert validate(SelectionConfig(strategy="current_score", refresh_steps=5))[0].startswith("selection.refresh_steps")
    assert validate(SelectionConfig(strategy="dissect_momentum", shadow=True))[0].startswith("selection.shadow")
    assert validate(SelectionConfig(strategy="nope"))[0].startswith("selection.strategy")
    with pytest.raises(ValueError, match="selection.rate"):
        make(SelectionConfig(strategy="random", rate=1.5))


def test_warmup_length_steps_or_epochs_larger_wins():
    assert SelectionConfig(warmup_steps=5, warmup_epochs=1.0).warmup_length(3) == 5
    assert SelectionConfig(warmup_steps=2, warmup_epochs=1.0).warmup_length(3) == 3
    assert SelectionConfig(warmup_epochs=0.3).warmup_length(10) == 3  # not 4 from 3.0000000000000004
    assert SelectionConfig().warmup_length(10) == 0


# ------------------------------------------------------------------ pure functions
def test_topk_ties_broken_by_tiebreak_and_groups():
    prio = torch.tensor([1.0, 1.0, 2.0, 1.0, 1.0, 0.0])
    tie = torch.tensor([0.1, 0.5, 0.0, 0.9, 0.3, 1.0])
    mask = topk_mask(prio, tie, torch.tensor([3]))
    assert mask.tolist() == [False, True, True, True, False, False]  # row 2 (best), then tiebreaks 0.9, 0.5
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    mask = topk_mask(prio, tie, torch.tensor([1, 2]), group)
    assert mask.tolist() == [False, False, True, True, True, False]
    assert not topk_mask(prio, tie, torch.tensor([0, 0]), group).any()
    # Equal (priority, tiebreak): batch order.
    assert topk_mask(torch.zeros(4), torch.zeros(4), torch.tensor([2])).tolist() == [True, True, False, False]


def test_random_priority_is_a_function_of_seed_step_and_uid():
    uids = torch.tensor([5, 1, 9, 3])
    p = random_priority(0, 3, uids)
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.equal(random_priority(0, 3, uids[perm]), p[perm])  # follows the uid, not the row
    assert not torch.equal(random_priority(0, 4, uids), p)
    assert not torch.equal(random_priority(1, 3, uids), p)


def test_auroc_matches_pairwise_definition_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (200,), generator=g).float()  # many ties
    pos = torch.rand(200, generator=g) < 0.4
    sp, sn = scores[pos][:, None], scores[~pos][None, :]
    expected = ((sp > sn).double() + 0.5 * (sp == sn).double()).mean().item()
    assert auroc(scores, pos) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(auroc(scores, torch.ones(200, dtype=torch.bool)))


def test_per_sample_loss_matches_open_clip_and_local_rows_map_to_global():
    from open_clip.loss import ClipLoss

    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(10, 8, generator=g), dim=-1)
    txt = F.normalize(img + torch.randn(10, 8, generator=g), dim=-1)
    scale = 14.0
    loss_fn = ClipLoss()
    per_image, per_text = loss_fn.get_logits(img, txt, scale)
    labels = torch.arange(10)
    expected = 0.5 * (
        F.cross_entropy(per_image, labels, reduction="none") + F.cross_entropy(per_text, labels, reduction="none")
    )
    # Three "ranks" with uneven rows, each against the gathered batch.
    pieces = [per_sample_contrastive_loss(img[a:b], txt[a:b], img, txt, a, scale) for a, b in ((0, 4), (4, 4), (4, 10))]
    got = torch.cat(pieces)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.mean(), loss_fn(img, txt, scale))


# ------------------------------------------------------------------ reference (docs/method.md, plain Python)
def ref_score(model: FakeClip, uid: int, version: float) -> float:
    f = model.features(torch.tensor([uid]), version)
    a, b = f.image[0].double().tolist(), f.text[0].double().tolist()
    cos = sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
    return max(0.0, 100.0 * cos)


def ref_dissect(kind: str, model: FakeClip, batches, cfg: SelectionConfig, warmup: int, seed: int):
    """DISSect warm-up / momentum straight from the definitions in docs/method.md, one pair at a time."""
    as_dtype = {"float16": torch.float16, "float32": torch.float32}[cfg.history_dtype]
    rnd = lambda x: torch.tensor(x, dtype=as_dtype).item()  # noqa: E731 - the memory's rounding
    hist: dict[int, float] = {}
    masks, hists = [], []
    for step, uids_t in enumerate(batches):
        uids = uids_t.tolist()
        c = [ref_score(model, u, step) for u in uids]
        h = [hist.get(u, ci) for u, ci in zip(uids, c)]  # first visit: h = c
        n = len(uids)
        d = [(h[i] - sum(h) / n) - (c[i] - sum(c) / n) for i in range(n)]
        k = max(1, math.floor(cfg.rate * n))
        if step < warmup:
            p = random_priority(seed, step, uids_t).tolist()
            keep = set(range(n)) if cfg.warmup_mode == "full" else set(sorted(range(n), key=lambda i: -p[i])[:k])
        else:
            tie = random_priority(seed, step, uids_t).tolist()  # exact ties in d: a seeded draw
            keep = set(sorted(range(n), key=lambda i: (-d[i], -tie[i]))[:k])
        masks.append([i in keep for i in range(n)])
        for i, u in enumerate(uids):
            if kind == "dissect_warmup" and step < warmup:
                hist[u] = rnd(c[i])
            if kind == "dissect_momentum":
                hist[u] = rnd(cfg.beta * h[i] + (1 - cfg.beta) * c[i])
        hists.append(dict(hist))
    return masks, hists


@pytest.mark.parametrize(
    "kind,dtype,mode,warmup",
    [
        ("dissect_warmup", "float32", "full", 3),
        ("dissect_warmup", "float16", "random", 3),
        ("dissect_momentum", "float32", "full", 2),
        ("dissect_momentum", "float32", "random", 0),
    ],
)
def test_dissect_matches_method_reference_step_by_step(kind, dtype, mode, warmup):
    cfg = SelectionConfig(strategy=kind, rate=0.4, warmup_steps=warmup, warmup_mode=mode, history_dtype=dtype, beta=0.8)
    selector, model, _ = make(cfg)
    batches = global_batches(9)
    ref_masks, ref_hists = ref_dissect(kind, FakeClip(N, noisy=noisy_of(torch.arange(N))), batches, cfg, warmup, 7)
    tol = 0.07 if dtype == "float16" else 1e-3
    for step, uids in enumerate(batches):
        sel = selector.select(step, FakeBatch(uids, noisy_of(uids)), model.encode)
        assert sel.mask.tolist() == ref_masks[step], f"step {step}"
        assert sel.num_selected == sum(ref_masks[step])
        model.version += 1
        selector.after_step(step)
        expected = torch.tensor([ref_hists[step].get(u, float("nan")) for u in range(N)])
        torch.testing.assert_close(all_history(selector), expected, atol=tol, rtol=0, equal_nan=True)


def test_momentum_first_visit_is_the_current_score():
    selector, model, _ = make(SelectionConfig(strategy="dissect_momentum", rate=0.5))
    uids = global_batches(1)[0]
    sel = run(selector, model, [uids])[0]
    c = clip_score(FakeClip(N, noisy=noisy_of(torch.arange(N))).features(uids, 0))
    torch.testing.assert_close(selector.memory.lookup(uids), c)  # float32 memory
    # Before the update h == c for every pair: the differential is exactly flat.
    assert sel.metrics["selection/differential_sel"] == sel.metrics["selection/differential_rej"] == 0.0


def test_duplicate_uid_in_a_batch_keeps_its_last_visit():
    selector, model, _ = make(SelectionConfig(strategy="dissect_warmup", warmup_steps=5, history_dtype="float32"))
    uids = torch.tensor([3, 8, 3])
    version = [0.0, 0.0, 2.0]  # the two visits of uid 3 see different models

    def encode(batch):
        f = [model.features(batch.uids[i : i + 1], version[i]) for i in range(3)]
        return Features(torch.cat([x.image for x in f]), torch.cat([x.text for x in f]), 20.0)

    selector.select(0, FakeBatch(uids), encode)
    assert selector.memory.lookup(torch.tensor([3])).item() == pytest.approx(
        clip_score(encode(FakeBatch(uids)))[2].item()
    )


# ------------------------------------------------------------------ other strategies
def test_none_never_scores_and_keeps_everything():
    selector, model, _ = make(SelectionConfig(strategy="none"))

    def encode(batch):
        raise AssertionError("strategy none must not run a scoring pass")

    sel = selector.select(0, FakeBatch(torch.arange(B), noisy_of(torch.arange(B))), encode)
    assert sel.mask.all() and sel.num_selected == B
    assert sel.metrics["selection/clean_precision"] == pytest.approx(9 / 12)
    assert sel.metrics["time/score"] == 0.0 and selector.history_bytes() == 0


def test_random_ignores_warmup_mode_and_never_scores():
    selector, model, _ = make(SelectionConfig(strategy="random", rate=0.25))
    sels = run(selector, model, global_batches(3))
    assert model.encode_calls == 0
    assert [s.num_selected for s in sels] == [3, 3, 3]
    assert not torch.equal(sels[0].mask, sels[1].mask)


@pytest.mark.parametrize("name,sign", [("current_score", None), ("big_loss", 1.0), ("small_loss", -1.0)])
def test_baselines_keep_the_extremes_of_their_signal(name, sign):
    selector, model, _ = make(SelectionConfig(strategy=name, rate=0.25, warmup_steps=1, warmup_mode="full"))
    uids = global_batches(2)
    sels = run(selector, model, uids)
    assert sels[0].mask.all()  # warm-up: full batch
    f = FakeClip(N, noisy=noisy_of(torch.arange(N))).features(uids[1], 1.0)
    signal = (
        clip_score(f) if sign is None else sign * per_sample_contrastive_loss(f.image, f.text, f.image, f.text, 0, 20.0)
    )
    assert set(uids[1][sels[1].mask].tolist()) == set(uids[1][torch.topk(signal, 3).indices].tolist())
    if sign is not None:
        assert sels[1].metrics["selection/loss_sel"] * sign > sels[1].metrics["selection/loss_rej"] * sign


def test_dissect_model_snapshot_refresh_and_no_scoring_in_warmup():
    cfg = SelectionConfig(strategy="dissect_model", rate=0.5, warmup_steps=2, refresh_steps=3)
    selector, model, hists = make(cfg)
    batches = global_batches(8)
    sels = run(selector, model, batches[:2])
    assert model.encode_calls == 0 and hists[0].version == 2.0  # taken in after_step(1)
    assert "selection/historical_sel" not in sels[1].metrics
    versions = []
    f = FakeClip(N, noisy=noisy_of(torch.arange(N)))
    for i, uids in enumerate(batches[2:], start=2):
        versions.append(hists[0].version)  # the snapshot this step is scored against
        sel = run(selector, model, [uids], start=i)[0]
        c, h = clip_score(f.features(uids, i)), clip_score(f.features(uids, versions[-1]))
        d = ((h - c) - (h.mean() - c.mean())).tolist()
        # Top 6 by d, ties by the seeded draw (at step 2 the snapshot *is* the current model: d == 0).
        tie = random_priority(7, i, uids).tolist()
        keep = sorted(range(B), key=lambda j: (-d[j], -tie[j]))[:6]
        assert set(uids[sel.mask].tolist()) == set(uids[keep].tolist()), i
    assert len(hists) == 1 and versions == [2.0, 2.0, 2.0, 5.0, 5.0, 5.0]  # refreshed in after_step(4)
    assert hists[0].version == 8.0  # and in after_step(7)
    assert hists[0].encode_calls == 6 and selector.history_bytes() == 0


def test_dissect_model_ema_and_cache():
    cfg = SelectionConfig(strategy="dissect_model", rate=0.5, warmup_steps=1, ema_decay=0.5)
    selector, model, hists = make(cfg)
    run(selector, model, global_batches(3))
    assert hists[0].version == pytest.approx(0.5 * (0.5 * 1 + 0.5 * 2) + 0.5 * 3)
    batches = global_batches(6, n=B)  # the same uids, reordered: cache hits until a refresh
    kw = dict(strategy="dissect_model", rate=0.5, warmup_steps=1, refresh_steps=3, history_dtype="float32")
    plain, m1, h1 = make(SelectionConfig(**kw))
    cached, m2, h2 = make(SelectionConfig(**kw, cache_hist_scores=True))
    for a, b in zip(run(plain, m1, batches), run(cached, m2, batches)):
        assert torch.equal(a.mask, b.mask)  # float32 cache: a hit reads exactly what a forward gives
        assert a.metrics.get("selection/historical_sel") == b.metrics.get("selection/historical_sel")
    assert (h2[0].encode_calls, h1[0].encode_calls) == (2, 5)  # misses at steps 1 and 4 only
    assert cached.history_bytes() == 4 * N


def test_shadow_logs_the_differential_without_changing_selection():
    cfg = SelectionConfig(strategy="none", shadow=True, warmup_steps=2)
    selector, model, hists = make(cfg)
    sels = run(selector, model, global_batches(5))
    assert all(s.mask.all() for s in sels)
    assert "selection/differential_sel" not in sels[1].metrics and "selection/current_sel" in sels[1].metrics
    assert "selection/historical_sel" in sels[2].metrics and hists[0].version == 2.0
    assert "selection/differential" in sels[4].histograms and sels[4].histograms["selection/differential"].shape == (B,)
    # shadow_step=-1 without warm-up: a snapshot of the initial weights, before step 0.
    selector, model, hists = make(SelectionConfig(strategy="current_score", rate=0.5, shadow=True))
    sel = run(selector, model, global_batches(1))[0]
    assert hists[0].version == 0.0 and sel.metrics["selection/differential_sel"] == pytest.approx(0.0, abs=1e-4)


# ------------------------------------------------------------------ diagnostics
def test_metrics_noise_and_epoch_auroc():
    # Noisy captions are unrelated: current scores separate them; the differential vs a
    # snapshot sees noisy scores rise faster (FakeClip memorises them 4x faster).
    cfg = SelectionConfig(strategy="current_score", rate=0.5, shadow=True, shadow_step=0)
    selector, model, _ = make(cfg)
    batches = global_batches(6)
    sels = run(selector, model, batches)
    for uids, s in zip(batches, sels):
        noisy, m = noisy_of(uids), s.mask
        assert s.metrics["selection/clean_precision"] == pytest.approx((m & ~noisy).sum().item() / m.sum().item())
        assert s.metrics["selection/noisy_recall"] == pytest.approx((~m & noisy).sum().item() / noisy.sum().item())
        assert s.metrics["selected"] == 6 and s.metrics["selection/rate_effective"] == 0.5
        assert {"time/select", "time/select_wait", "time/score", "time/score_hist"} <= s.metrics.keys()
    aucs = selector.epoch_end(0)
    assert aucs["selection/auroc_current"] > 0.9 and aucs["selection/auroc_differential"] > 0.7
    assert selector.epoch_end(1) == {}  # reset


def test_record_writes_one_line_per_pair(tmp_path):
    selector, model, _ = make(SelectionConfig(strategy="current_score", rate=0.5, record=True), run_dir=str(tmp_path))
    batches = global_batches(2)
    sels = run(selector, model, batches)
    selector.epoch_end(0)
    lines = [json.loads(x) for x in (tmp_path / "selection" / "rank0.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * B
    assert [x["uid"] for x in lines] == torch.cat(batches).tolist()
    assert [x["selected"] for x in lines] == torch.cat([s.mask for s in sels]).tolist()
    assert lines[0]["historical"] is None and lines[0]["differential"] is None
    assert lines[0]["noisy"] == bool(batches[0][0] % 4 == 0) and lines[0]["step"] == 0


# ------------------------------------------------------------------ state
def test_history_bytes_is_two_bytes_per_owned_uid():
    cfg = SelectionConfig(strategy="dissect_warmup", warmup_steps=1)
    for w in (1, 2, 3):
        sel, _, _ = make(cfg, num_uids=1001, world_size=w, rank=w - 1)
        assert sel.history_bytes() == 2 * math.ceil(1001 / w)
    sel, _, _ = make(SelectionConfig(strategy="dissect_warmup", warmup_steps=1, history_dtype="float32"))
    assert sel.history_bytes() == 4 * N
    sel, _, _ = make(SelectionConfig(strategy="dissect_momentum", history_dtype="float16"))
    assert sel.history_bytes() == 2 * N


def test_memory_reshards_to_any_world_size():
    n = 23
    values = torch.arange(n, dtype=torch.float32) * 1.5
    seen = torch.arange(n) % 5 != 0  # some uids never written: stay NaN
    old = [ScoreMemory(n, r, 2, "float32", "cpu") for r in range(2)]
    for m in old:
        m.update(torch.arange(n)[seen], values[seen])  # no collective in update
    shards = [m.state_dict() for m in old]
    expected = torch.where(seen, values, torch.nan)
    for w in (1, 3, 4):
        for r in range(w):
            m = ScoreMemory(n, r, w, "float16", "cpu")
            m.load_shards(shards)
            owned = torch.arange(r, n, w)
            torch.testing.assert_close(m.table[: owned.numel()].float(), expected[owned], equal_nan=True)
            assert torch.isnan(m.table[owned.numel() :].float()).all()
    with pytest.raises(ValueError, match="uids"):
        ScoreMemory(10, 0, 1, "float16", "cpu").load_shards(shards)


@pytest.mark.parametrize(
    "cfg",
    [
        SelectionConfig(strategy="dissect_momentum", rate=0.5, warmup_steps=1),
        SelectionConfig(strategy="dissect_model", rate=0.5, warmup_steps=2, refresh_steps=3, cache_hist_scores=True),
        SelectionConfig(strategy="random", rate=0.5, shadow=True, shadow_step=1),
    ],
    ids=lambda c: c.strategy,
)
def test_resume_continues_exactly(cfg):
    batches = global_batches(8)
    full, m_full, _ = make(cfg)
    expected = run(full, m_full, batches)
    first, m_first, _ = make(cfg)
    run(first, m_first, batches[:4])
    state = first.state_dict()
    second, m_second, _ = make(cfg)
    second.load_state_dict([state])
    m_second.version = m_first.version
    got = run(second, m_second, batches[4:], start=4)
    for a, b in zip(expected[4:], got):
        assert torch.equal(a.mask, b.mask)
        assert a.metrics.get("selection/historical_sel") == b.metrics.get("selection/historical_sel")


# ------------------------------------------------------------------ ties
def test_equal_priorities_select_without_regard_to_uid_order():
    # Momentum without warm-up: every pair is unseen (h = c), so d ties exactly everywhere.
    n, b, steps = 400, 40, 8
    selector, model, _ = make(SelectionConfig(strategy="dissect_momentum", rate=0.3), num_uids=n)
    model = FakeClip(n)
    ranks = []
    for step, uids in enumerate(torch.randperm(n, generator=torch.Generator().manual_seed(3)).view(-1, b)[:steps]):
        sel = selector.select(step, FakeBatch(uids), model.encode)
        assert sel.metrics["selection/differential_sel"] == sel.metrics["selection/differential_rej"]
        rank_in_batch = torch.argsort(torch.argsort(uids)).float() / (b - 1)  # 0 = smallest uid
        ranks.append(rank_in_batch[sel.mask])
    # Smallest-uid selection would give about 0.14; a random 30% has mean 0.5 (sd about 0.02 here).
    assert torch.cat(ranks).mean().item() == pytest.approx(0.5, abs=0.08)


# ------------------------------------------------------------------ history precision
def test_momentum_history_accumulates_small_increments_by_default():
    # c = h + 0.1 at every visit moves h by 0.01 (beta 0.9): below half a float16 ulp at 64-100.
    uids = torch.arange(4)
    h_ref = torch.tensor([64.0, 75.0, 90.0, 95.0], dtype=torch.float64)
    selector, _, _ = make(SelectionConfig(strategy="dissect_momentum", rate=0.5))
    target = {"c": h_ref.clone()}  # first visit: h = c
    for step in range(51):
        selector.select(step, FakeBatch(uids), lambda batch: scores_as_features(target["c"]))
        if step:
            h_ref = 0.9 * h_ref + 0.1 * target["c"]
        target["c"] = h_ref + 0.1
    assert h_ref[0].item() == pytest.approx(64.5)
    torch.testing.assert_close(selector.memory.lookup(uids).double(), h_ref, atol=1e-3, rtol=0)
    assert selector.history_bytes() == 4 * N  # float32 for momentum
    warm, _, _ = make(SelectionConfig(strategy="dissect_warmup", warmup_steps=1))
    assert warm.history_bytes() == 2 * N  # a last-visit score: float16 keeps 2 bytes per uid


# ------------------------------------------------------------------ names
def test_clipscore_is_a_deprecated_alias_of_current_score():
    assert "current_score" in STRATEGIES and "clipscore" not in STRATEGIES
    cfg = SelectionConfig(strategy="clipscore", rate=0.5)
    assert validate(cfg) == []
    selector, model, _ = make(cfg)
    assert type(selector.strategy) is STRATEGIES["current_score"]
    assert selector.state_dict()["strategy"] == "current_score"
    batches = global_batches(2)
    new, m2, _ = make(SelectionConfig(strategy="current_score", rate=0.5))
    for a, b in zip(run(selector, model, batches), run(new, m2, batches)):
        assert torch.equal(a.mask, b.mask)
    # One deprecation line per process, however often the config is validated.
    code = (
        "from dissect_ds.selection import SelectionConfig, validate\n"
        "cfg = SelectionConfig(strategy='clipscore')\n"
        "assert validate(cfg) == [] and validate(cfg) == [] and validate(cfg) == []\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    lines = [x for x in (out.stdout + out.stderr).splitlines() if "clipscore" in x]
    assert len(lines) == 1 and "deprecated" in lines[0] and "current_score" in lines[0], out.stderr
