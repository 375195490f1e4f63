"""NaN judged right: a diverged model's NaN features score as a failure, never as a perfect
model; the divergence check reads the real weights only, not ZeRO-3's partition padding."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dissect_ds.evaluate import recall_metrics, retrieval_ranks, zeroshot_top1

ROOT = Path(__file__).resolve().parents[2]


def _features(n: int = 8, d: int = 4) -> torch.Tensor:
    f = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    return f / f.norm(dim=-1, keepdim=True)


def test_nan_features_score_zero_recall():
    nan = torch.full((8, 4), float("nan"))
    m = recall_metrics(nan, nan.clone())
    assert m["eval/i2t_R@1"] == 0.0 and m["eval/t2i_R@1"] == 0.0 and m["eval/i2t_R@10"] == 0.0


def test_one_nan_row_only_hurts_its_own_queries():
    image = _features()
    i2t, _ = retrieval_ranks(image, image.clone())
    assert (i2t == 0).all()  # identical features: every query ranks its match first
    image[3] = float("nan")
    i2t, t2i = retrieval_ranks(image, image.clone())
    assert i2t[3] >= 1 and t2i[3] >= 1  # the NaN pair never counts as a hit
    others = torch.arange(8) != 3
    assert (i2t[others] >= 1).all()  # a NaN candidate outranks every match: no spurious perfect score


class _NanEngine:
    tokenizer = staticmethod(lambda prompts: torch.zeros(len(prompts), 3, dtype=torch.long))

    @staticmethod
    def encode_text(tokens: torch.Tensor) -> torch.Tensor:
        return torch.full((tokens.shape[0], 4), float("nan"))


def test_nan_zeroshot_is_zero():
    image = torch.full((6, 4), float("nan"))
    labels = torch.zeros(6, dtype=torch.long)  # argmax of an all-NaN row is 0: a naive check would say 1.0
    assert zeroshot_top1(_NanEngine(), image, labels, ["a", "b"], ["a photo of a {c}."]) == 0.0


def _zero3_padding(rank: int, world: int, data: str) -> tuple[bool, bool, bool]:
    """On a real ZeRO-3 engine: (finite as built, finite with NaN in the partitions' padding,
    finite with one real element NaN)."""
    from dissect_ds import config as C
    from dissect_ds.engine import Engine, init_distributed

    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    overrides = [f"data.train={data}/train", "data.val=null", "deepspeed.zero_stage=3"]
    engine = Engine(C.load(str(ROOT / "configs/debug.yaml"), overrides, world), init_distributed())
    built = engine.weights_finite()
    scale = engine.ds.module.logit_scale  # 1 element: rank 1's partition is all padding
    assert scale.ds_numel == 1 and scale.ds_tensor.numel() == 1
    if rank == 1:
        scale.ds_tensor.fill_(float("nan"))
    padded = engine.weights_finite()
    if rank == 0:
        scale.ds_tensor.fill_(float("nan"))
    return built, padded, engine.weights_finite()


@pytest.mark.slow  # spawns 2 gloo ranks
def test_zero3_partition_padding_is_not_a_divergence(tmp_path):
    """DeepSpeed pads the last ranks' ZeRO-3 partitions with memory it never writes; the
    divergence check must read only the real weights, or a healthy run stops at random."""
    from dissect_ds.data.synthetic import write_synthetic
    from tests.multiproc import run_ranks

    write_synthetic(str(tmp_path), num_samples=32, noise_rate=0.0, seed=0, val_samples=0, shard_size=16, progress=False)
    assert run_ranks(_zero3_padding, 2, str(tmp_path), timeout=300) == [(True, True, False)] * 2
