"""Selection over 2 and 3 gloo ranks on CPU equals the single-process selection.

Every scenario runs a few steps in one process (W=1, the reference) and in W=2 and W=3
spawned processes that each get their slice of the same global batches. The global masks
(the ranks' local masks concatenated), metrics and history values must match; the W=2
checkpoint is then resumed at W=3 and W=1.
"""

from __future__ import annotations

import io
import json
import os

import pytest
import torch

from dissect_ds import distributed as dist
from dissect_ds.selection import SelectionConfig, Selector
from dissect_ds.selection.config import ReferenceConfig
from dissect_ds.selection.scoring import random_priority
from dissect_ds.selection.testing import FakeBatch, FakeClip, FakeHistorical, FakeReference
from tests.multiproc import run_ranks

N = 40
STEPS = 6
RESUME_STEPS = 2
SIZES = {1: [12], 2: [7, 5], 3: [5, 3, 4]}  # uneven on purpose
BAD = torch.arange(N) >= 20  # pairs with score 0 (text = -image), used by "zero_selected"

SCENARIOS: dict[str, dict] = {
    "random": {"strategy": "random", "rate": 0.4},
    "current_score": {"strategy": "current_score", "rate": 0.4, "warmup_steps": 1},
    "big_loss": {"strategy": "big_loss", "rate": 0.4},
    "small_loss": {"strategy": "small_loss", "rate": 0.4, "warmup_steps": 1, "warmup_mode": "full"},
    "warmup": {"strategy": "dissect_warmup", "rate": 0.4, "warmup_steps": 3},
    "warmup_full_fp32": {
        "strategy": "dissect_warmup",
        "rate": 0.25,
        "warmup_epochs": 0.5,  # 2 steps at steps_per_epoch=4
        "warmup_mode": "full",
        "history_dtype": "float32",
    },
    "momentum": {"strategy": "dissect_momentum", "rate": 0.4, "warmup_steps": 1},
    "model_refresh": {"strategy": "dissect_model", "rate": 0.4, "warmup_steps": 2, "refresh_steps": 2},
    "model_ema": {"strategy": "dissect_model", "rate": 0.4, "warmup_steps": 1, "ema_decay": 0.7},
    "model_cache": {
        "strategy": "dissect_model",
        "rate": 0.4,
        "warmup_steps": 1,
        "refresh_steps": 3,
        "cache_hist_scores": True,
    },
    "none_shadow_record": {"strategy": "none", "shadow": True, "warmup_steps": 2, "record": True},
    "local_scope": {"strategy": "current_score", "rate": 0.4, "scope": "local"},
    "zero_selected": {"strategy": "current_score", "rate": 0.5},
    "zero_rows": {"strategy": "dissect_momentum", "rate": 0.4},
    "oracle_clipscore": {"strategy": "oracle_clipscore", "rate": 0.4, "warmup_steps": 1},
    "oracle_cliploss": {"strategy": "oracle_cliploss", "rate": 0.4},
    "learnability": {"strategy": "learnability", "rate": 0.4, "warmup_steps": 2, "warmup_mode": "full"},
    "jest": {"strategy": "jest", "rate": 0.5, "jest_chunks": 3},
}
REFERENCE = ("oracle_clipscore", "oracle_cliploss", "learnability", "jest")
SCENARIO_SIZES = {
    "zero_selected": {1: [12], 2: [6, 6], 3: [4, 4, 4]},  # the last rank holds only score-0 pairs
    "zero_rows": {1: [12], 2: [12, 0], 3: [4, 0, 8]},
}
RESUMED = ("warmup", "momentum", "model_cache")


def noisy_of(uids: torch.Tensor) -> torch.Tensor:
    return uids % 3 == 0


def global_batches(name: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(sorted(SCENARIOS).index(name))
    if name == "zero_selected":  # 6 clean pairs (score > 0), then 6 score-0 pairs
        clean = torch.tensor([u for u in range(20) if not noisy_of(torch.tensor(u))])
        return [
            torch.cat([clean[torch.randperm(len(clean), generator=g)[:6]], 20 + torch.randperm(20, generator=g)[:6]])
            for _ in range(STEPS)
        ]
    return [torch.randperm(N, generator=g)[:12] for _ in range(STEPS + RESUME_STEPS)]


def build(name: str, rank: int, world: int, run_dir: str) -> tuple[Selector, FakeClip, list[FakeHistorical]]:
    model = FakeClip(N, noisy=noisy_of(torch.arange(N)), bad=BAD)
    hists: list[FakeHistorical] = []

    def make_historical() -> FakeHistorical:
        hists.append(FakeHistorical(model))
        return hists[-1]

    extra = {}
    reference = FakeReference(FakeClip(N, dim=8, seed=3, noisy=noisy_of(torch.arange(N)), logit_scale=30.0), 2.0)
    if name in REFERENCE:
        weights = os.path.join(run_dir, "reference.pt")
        open(weights, "a").close()  # validation only checks that the file exists
        extra["reference"] = ReferenceConfig(model="dissect-tiny-vit", pretrained=weights)
    cfg = SelectionConfig(**SCENARIOS[name], **extra)
    selector = Selector(
        cfg,
        num_uids=N,
        rank=rank,
        world_size=world,
        device="cpu",
        seed=11,
        steps_per_epoch=4,
        run_dir=os.path.join(run_dir, f"W{world}", name),
        make_historical=make_historical,
        reference=reference,
    )
    return selector, model, hists


def run_steps(selector, model, name, rank, world, steps: range) -> dict:
    sizes = SCENARIO_SIZES.get(name, SIZES)[world]
    batches = global_batches(name)
    out: dict = {"masks": [], "metrics": [], "current": []}
    for step in steps:
        local = batches[step][dist.local_slice(sizes, rank)]
        sel = selector.select(step, FakeBatch(local, noisy_of(local)), model.encode)
        assert sel.mask.shape == (len(local),) and sel.mask.dtype == torch.bool
        assert sel.kept_per_rank == dist.all_gather_sizes(int(sel.mask.sum()), "cpu")  # known without a collective
        out["masks"].append(sel.mask.clone())
        out["metrics"].append({k: v for k, v in sel.metrics.items() if not k.startswith("time/")})
        out["current"].append(sel.histograms.get("selection/current"))
        model.version += 1
        selector.after_step(step)
    return out


def scenario(name: str, rank: int, world: int, run_dir: str) -> dict:
    """Run a scenario from scratch; return masks, metrics, history and checkpoint state."""
    selector, model, hists = build(name, rank, world, run_dir)
    out = run_steps(selector, model, name, rank, world, range(STEPS))
    out["auroc"] = selector.epoch_end(0)
    out["history"] = selector.memory.lookup(torch.arange(N)) if selector.memory is not None else None
    out["state"] = selector.state_dict()
    out["calls"] = (model.encode_calls, [h.encode_calls for h in hists])
    return out


def resume(name: str, shards: list[dict], rank: int, world: int, run_dir: str) -> dict:
    """Load a checkpoint saved at another world size, look up every uid, run on."""
    selector, model, _ = build(name, rank, world, run_dir)
    selector.load_state_dict(shards)
    model.version = float(STEPS)
    history = selector.memory.lookup(torch.arange(N))
    out = run_steps(selector, model, name, rank, world, range(STEPS, STEPS + RESUME_STEPS))
    out["history"] = history
    return out


def _ranks(rank: int, world: int, run_dir: str, shards: dict | None) -> bytes:
    """Runs on each spawned rank (tests/multiproc.py sets up the gloo group)."""
    torch.set_num_threads(1)
    results = {name: scenario(name, rank, world, run_dir) for name in SCENARIOS}
    if shards is not None:
        results["resumed"] = {name: resume(name, shards[name], rank, world, run_dir) for name in RESUMED}
    buf = io.BytesIO()  # plain bytes through the result queue, no shared-memory tensors
    torch.save(results, buf)
    return buf.getvalue()


def _spawn(world: int, run_dir: str, shards: dict | None = None) -> list[dict]:
    out = run_ranks(_ranks, world, run_dir, shards, timeout=150.0)
    return [torch.load(io.BytesIO(b), weights_only=False) for b in out]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, list[dict]]:
    run_dir = str(tmp_path_factory.mktemp("sel_dist"))
    out = {1: [{name: scenario(name, 0, 1, run_dir) for name in SCENARIOS}]}
    out[2] = _spawn(2, run_dir)
    shards = {name: [r[name]["state"] for r in out[2]] for name in RESUMED}
    out[3] = _spawn(3, run_dir, shards)
    out[1][0]["resumed"] = {name: resume(name, shards[name], 0, 1, run_dir) for name in RESUMED}
    out["run_dir"] = run_dir
    return out


def global_masks(ranks: list[dict], name: str, key: str = "masks") -> list[torch.Tensor]:
    return [torch.cat([r[name][key][i] for r in ranks]) for i in range(len(ranks[0][name][key]))]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", [n for n in SCENARIOS if n != "local_scope"])
def test_multi_rank_equals_single_process(runs, name, world):
    ref, ranks = runs[1][0][name], [r[name] for r in runs[world]]
    for step, (got, want) in enumerate(zip(global_masks(runs[world], name), ref["masks"])):
        assert torch.equal(got, want), f"{name} W={world} step {step}"
    for step, want in enumerate(ref["metrics"]):
        for r in ranks:  # global metrics: the same on every rank, and as in one process
            assert r["metrics"][step].keys() == want.keys()
            for k, v in want.items():
                assert r["metrics"][step][k] == pytest.approx(v, rel=1e-5, abs=1e-5), (step, k)
    if ref["history"] is not None:
        for r in ranks:
            torch.testing.assert_close(r["history"], ref["history"], rtol=0, atol=0, equal_nan=True)
    # Collective forwards: every rank ran the same number of (current, historical) encodes.
    assert all(r["calls"] == ranks[0]["calls"] for r in ranks)
    assert ranks[0]["calls"][0] == ref["calls"][0]
    assert ranks[0]["auroc"] == pytest.approx(ref["auroc"])


@pytest.mark.parametrize("world", [2, 3])
def test_local_scope_is_per_rank_topk(runs, world):
    sizes = SIZES[world]
    batches = global_batches("local_scope")
    for step in range(STEPS):
        current = runs[world][0]["local_scope"]["current"][step].tolist()
        tie = random_priority(11, step, batches[step]).tolist()  # the Selector's tie-break draw
        for rank in range(world):
            rows = range(*dist.local_slice(sizes, rank).indices(12))
            k = max(1, int(0.4 * sizes[rank]))
            keep = sorted(rows, key=lambda i: (-current[i], -tie[i]))[:k]
            want = [i in keep for i in rows]
            assert runs[world][rank]["local_scope"]["masks"][step].tolist() == want, (step, rank)


@pytest.mark.parametrize("world", [2, 3])
def test_uneven_selection_and_empty_ranks(runs, world):
    last = runs[world][-1]
    assert all(not m.any() for m in last["zero_selected"]["masks"])
    assert all(m.all() for m in runs[world][0]["zero_selected"]["masks"])
    assert all(m.shape == (0,) for m in runs[world][1]["zero_rows"]["masks"])


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("name", RESUMED)
def test_checkpoint_at_two_ranks_resumes_at_other_world_sizes(runs, name, world):
    saved = runs[2][0][name]["history"]
    assert torch.isnan(saved).any() and not torch.isnan(saved).all()
    resumed = [r["resumed"][name] for r in runs[world]]
    for r in resumed:
        torch.testing.assert_close(r["history"], saved, rtol=0, atol=0, equal_nan=True)
    ref = runs[1][0]["resumed"][name]
    for got, want in zip(global_masks([r["resumed"] for r in runs[world]], name), ref["masks"]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("world", [2, 3])
def test_records_of_all_ranks_equal_the_single_process_record(runs, world):
    def read(w: int) -> list[dict]:
        d = os.path.join(runs["run_dir"], f"W{w}", "none_shadow_record", "selection")
        rows = [json.loads(line) for r in range(w) for line in open(os.path.join(d, f"rank{r}.jsonl"))]
        return sorted(rows, key=lambda x: (x["step"], x["uid"]))

    want = read(1)
    assert len(want) == 12 * STEPS and want[-1]["differential"] is not None and want[0]["historical"] is None
    assert read(world) == want
