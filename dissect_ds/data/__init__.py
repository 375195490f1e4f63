"""Data layer: webdataset shards with stable sample ids, deterministic resumable
per-rank streams, val iteration, shard writing and the synthetic benchmark set."""

from dissect_ds.data.batch import Batch
from dissect_ds.data.config import DataConfig
from dissect_ds.data.pipeline import (
    SKIP_REASONS,
    TrainStream,
    build_train_stream,
    iter_val,
    read_classnames,
    read_templates,
)
from dissect_ds.data.shards import SpecError, dataset_size, validate_spec
from dissect_ds.data.writer import ShardWriter

__all__ = [
    "SKIP_REASONS",
    "Batch",
    "DataConfig",
    "ShardWriter",
    "SpecError",
    "TrainStream",
    "build_train_stream",
    "dataset_size",
    "iter_val",
    "read_classnames",
    "read_templates",
    "validate_spec",
]
