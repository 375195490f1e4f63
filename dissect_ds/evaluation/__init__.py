"""Evaluation on named sets: zero-shot classification (ImageFolder, clip_benchmark
``wds``, dissect_ds shards) and multi-caption retrieval (COCO/Flickr30k Karpathy test)."""

from dissect_ds.evaluation.config import EvalConfig
from dissect_ds.evaluation.run import EngineEncoder, ModelEncoder, evaluate_sets, retrieval, zeroshot
from dissect_ds.evaluation.sets import RetrievalSet, SetError, ZeroShotSet, retrieval_set, zeroshot_set

__all__ = [
    "EngineEncoder",
    "EvalConfig",
    "ModelEncoder",
    "RetrievalSet",
    "SetError",
    "ZeroShotSet",
    "evaluate_sets",
    "retrieval",
    "retrieval_set",
    "zeroshot",
    "zeroshot_set",
]
