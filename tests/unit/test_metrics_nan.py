"""A diverged model's NaN features must score as a failure, never as a perfect model."""

from __future__ import annotations

import torch

from dissect_ds.evaluate import recall_metrics, retrieval_ranks, zeroshot_top1


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
