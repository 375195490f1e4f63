"""Reference-model strategies (oracle_clipscore, oracle_cliploss, learnability, jest), one
process: each selection equals a plain, pair-by-pair re-implementation of its formula.

The reference is a second FakeClip with its own embedding width and logit scale, frozen
at one version. 2 and 3 ranks are compared with one process in test_selection_dist.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from dissect_ds.model import Features
from dissect_ds.selection import SelectionConfig, Selector, validate
from dissect_ds.selection.config import ReferenceConfig
from dissect_ds.selection.scoring import batch_logits, gumbel, loss_increase, random_priority
from dissect_ds.selection.testing import FakeBatch, FakeClip, FakeReference

N, B, SEED = 40, 12, 7
ONE_PROCESS = dict(rank=0, world_size=1, device="cpu", seed=SEED, steps_per_epoch=3, run_dir=None, make_historical=None)


def noisy_of(uids: torch.Tensor) -> torch.Tensor:
    return uids % 3 == 0


def make(strategy: str, tmp_path, **kw) -> tuple[Selector, FakeClip, FakeReference]:
    weights = tmp_path / "reference.pt"
    weights.write_bytes(b"")  # validation only checks that the file exists
    cfg = SelectionConfig(
        strategy=strategy, reference=ReferenceConfig(model="dissect-tiny-vit", pretrained=str(weights)), **kw
    )
    learner = FakeClip(N, noisy=noisy_of(torch.arange(N)))
    reference = FakeReference(FakeClip(N, dim=8, seed=3, noisy=noisy_of(torch.arange(N)), logit_scale=30.0), 2.0)
    selector = Selector(cfg, num_uids=N, **ONE_PROCESS, reference=reference)
    return selector, learner, reference


# ------------------------------------------------------------ the formulas, pair by pair
def logits(f: Features) -> list[list[float]]:
    img, txt = f.image.double().tolist(), f.text.double().tolist()
    return [[f.logit_scale * sum(a * b for a, b in zip(i, t)) for t in txt] for i in img]


def lse(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def sub_batch_loss(L: list[list[float]], S: list[int]) -> float:
    """Summed contrastive loss of the sub-batch S: each pair's image->text and text->image
    cross-entropy among S, halved."""
    return sum(0.5 * ((lse([L[i][m] for m in S]) - L[i][i]) + (lse([L[m][i] for m in S]) - L[i][i])) for i in S)


def pair_loss(L: list[list[float]], i: int) -> float:
    """Pair i's contrastive loss against the whole batch."""
    return 0.5 * ((lse(L[i]) - L[i][i]) + (lse([row[i] for row in L]) - L[i][i]))


def gain(L: list[list[float]], chosen: list[int], j: int) -> float:
    """How much the summed loss of the sub-batch ``chosen`` grows when pair j joins."""
    return sub_batch_loss(L, [*chosen, j]) - sub_batch_loss(L, chosen)


def clip_score_plain(f: Features, i: int) -> float:
    a, b = f.image[i].double().tolist(), f.text[i].double().tolist()
    return max(0.0, 100.0 * sum(x * y for x, y in zip(a, b)))


def top_k(priority: list[float], uids: torch.Tensor, step: int, k: int) -> list[bool]:
    tie = random_priority(SEED, step, uids).tolist()
    keep = set(sorted(range(len(priority)), key=lambda i: (-priority[i], -tie[i]))[:k])
    return [i in keep for i in range(len(priority))]


def jest_plain(La, Lr, uids: torch.Tensor, step: int, k: int, chunks: int) -> list[bool]:
    chosen: list[int] = []
    for c in range(chunks):
        noise = gumbel(random_priority(SEED, step, uids, stream=1 + c)).tolist()
        score = {}
        for j in range(len(La)):
            if j in chosen:
                continue
            if c == 0:
                score[j] = pair_loss(La, j) - pair_loss(Lr, j)
            else:
                score[j] = gain(La, chosen, j) - gain(Lr, chosen, j)
        chosen += sorted(score, key=lambda j: -(score[j] + noise[j]))[: k // chunks]
    return [i in chosen for i in range(len(La))]


def expected_mask(strategy: str, learner: Features, reference: Features, uids, step: int, k: int, chunks: int):
    La, Lr = logits(learner), logits(reference)
    n = len(La)
    if strategy == "jest":
        return jest_plain(La, Lr, uids, step, k, chunks)
    priority = {
        "oracle_clipscore": lambda i: clip_score_plain(reference, i),
        "oracle_cliploss": lambda i: -pair_loss(Lr, i),
        "learnability": lambda i: pair_loss(La, i) - pair_loss(Lr, i),
    }[strategy]
    return top_k([priority(i) for i in range(n)], uids, step, k)


@pytest.mark.parametrize("strategy", ["oracle_clipscore", "oracle_cliploss", "learnability", "jest"])
def test_selection_equals_the_plain_formula(strategy, tmp_path):
    chunks = {"jest_chunks": 3} if strategy == "jest" else {}
    selector, learner, reference = make(strategy, tmp_path, rate=0.5, warmup_steps=1, **chunks)
    g = torch.Generator().manual_seed(5)
    for step in range(5):
        uids = torch.randperm(N, generator=g)[:B]
        calls = reference.encode_calls
        sel = selector.select(step, FakeBatch(uids, noisy_of(uids)), learner.encode)
        if step == 0:  # warm-up: a random subset, and the reference is not run
            assert reference.encode_calls == calls and sel.metrics["time/score_ref"] == 0.0
        else:
            want = expected_mask(
                strategy, learner.encode(FakeBatch(uids)), reference.encode(FakeBatch(uids)), uids, step, 6, 3
            )
            assert sel.mask.tolist() == want, f"step {step}"
            assert sel.metrics["time/score_ref"] > 0.0 and "selection/reference_sel" in sel.metrics
        learner.version += 1
        selector.after_step(step)


def test_loss_increase_is_the_sub_batch_loss_difference():
    f = FakeClip(N, seed=4).features(torch.arange(10), 1.0)
    L = logits(f)
    chosen = torch.zeros(10, dtype=torch.bool)
    chosen[[1, 4, 6]] = True
    got = loss_increase(batch_logits(f).double(), chosen)
    for j in range(10):
        if not chosen[j]:
            assert got[j].item() == pytest.approx(gain(L, [1, 4, 6], j), rel=1e-6, abs=1e-9), j


def test_jest_prefers_learnable_pairs_and_keeps_exactly_k(tmp_path):
    """Pairs the learner still gets wrong but the reference gets right are drawn far more
    often than pairs both get right, and every step keeps exactly k."""
    selector, learner, reference = make("jest", tmp_path, rate=1 / 3, jest_chunks=2)
    learner.version, reference.version = 0.0, 6.0  # the reference has learned what the learner has not
    kept_noisy = kept = 0
    g = torch.Generator().manual_seed(1)
    for step in range(20):
        uids = torch.randperm(N, generator=g)[:B]
        sel = selector.select(step, FakeBatch(uids, noisy_of(uids)), learner.encode)
        assert int(sel.mask.sum()) == 4
        kept_noisy += int(noisy_of(uids)[sel.mask].sum())
        kept += 4
    # In this fake, the reference's later version has pulled noisy captions towards their
    # images 3x faster: they are the most "learnable" pairs.
    assert kept_noisy / kept > 1 / 3 + 0.2


def test_oracle_clipscore_reads_precomputed_scores_without_a_reference_model(tmp_path):
    """A ``dissect_ds.score`` directory (two shard files, info.json) replaces the reference:
    the kept pairs are the top table scores, a uid without a score ranks last, and the
    section names its key when the table was made for another data set."""
    import json

    scores = torch.linspace(0, 100, N).half()
    scores = scores[torch.randperm(N, generator=torch.Generator().manual_seed(2))]
    missing = 25  # in the second shard
    torch.save({"uids": torch.arange(0, 20), "scores": scores[:20]}, tmp_path / "shard-000000.pt")
    keep = torch.tensor([u for u in range(20, N) if u != missing])
    torch.save({"uids": keep, "scores": scores[keep]}, tmp_path / "shard-000001.pt")
    (tmp_path / "info.json").write_text(json.dumps({"num_uids": N}))
    cfg = SelectionConfig(strategy="oracle_clipscore", rate=0.5, reference=ReferenceConfig(scores=str(tmp_path)))
    selector = Selector(cfg, num_uids=N, **ONE_PROCESS)  # no reference model: none is needed
    table = scores.float().clone()
    table[missing] = -1.0
    for step in range(3):
        uids = torch.randperm(N, generator=torch.Generator().manual_seed(step))[:B]
        sel = selector.select(step, FakeBatch(uids), FakeClip(N).encode)
        assert sel.mask.tolist() == top_k(table[uids].tolist(), uids, step, B // 2)
    with pytest.raises(ValueError, match="selection.reference.scores"):
        Selector(cfg, num_uids=N + 1, **ONE_PROCESS)
    assert validate(SelectionConfig(strategy="learnability", reference=ReferenceConfig(scores=str(tmp_path))))[
        0
    ].startswith("selection.reference.scores: only oracle_clipscore")
