"""The vocabulary of selection: what is known about one global batch when it is selected."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dissect_ds.model import Features
from dissect_ds.selection.scoring import differential


@dataclass
class ScoredBatch:
    """What is known about one global batch of B pairs at selection time.

    Tensors are global (rank order, identical on every rank) unless marked local.
    """

    step: int  # optimizer step
    micro_size: int  # rows of one micro-batch on each rank: local row i came in micro-batch i // micro_size
    in_warmup: bool
    seed: int
    batch: object  # this rank's batch, for historical-model forwards
    rows_per_rank: list[int]  # the global batch's rows on each rank
    uids: torch.Tensor  # [B] int64
    noisy: torch.Tensor  # [B] int8: 1 noisy, 0 clean, -1 unknown
    current: torch.Tensor | None = None  # [B] float32 current score c
    features: Features | None = None  # local [b, D] features of the current model
    loss: torch.Tensor | None = None  # [B] per-sample contrastive loss over the global batch
    gathered: Features | None = None  # global [B, D] features of the current model (loss strategies)
    reference: torch.Tensor | None = None  # [B] float32 score of the pretrained reference model
    reference_gathered: Features | None = None  # global [B, D] features of the reference model
    reference_loss: torch.Tensor | None = None  # [B] per-sample contrastive loss under the reference
    historical: torch.Tensor | None = None  # [B] float32 historical score h
    differential: torch.Tensor | None = None  # [B] (h - mean h) - (c - mean c), when both exist
    timings: dict[str, float] = field(default_factory=dict)

    def set_historical(self, h: torch.Tensor | None) -> None:
        """Set h, and d where the current score is known."""
        self.historical = h
        self.differential = differential(h, self.current) if h is not None and self.current is not None else None
