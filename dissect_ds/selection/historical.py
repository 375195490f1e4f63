"""The live historical model: snapshot schedule, scoring, optional per-uid score cache."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

import torch

from dissect_ds import distributed as dist
from dissect_ds.model import Features
from dissect_ds.selection.memory import ScoreMemory
from dissect_ds.selection.scoring import clip_score

log = logging.getLogger(__name__)


class HistoricalModel(Protocol):
    """A frozen copy of the network, held off the accelerator (engine.py provides it).

    Every method is collective: all ranks call it, the same number of times (ZeRO-3).
    """

    def encode(self, batch) -> Features:
        """No-grad, inference-mode features of this rank's local batch."""
        ...

    def refresh(self) -> None:
        """Copy the live training weights into the copy."""
        ...

    def ema_update(self, decay: float) -> None:
        """w_h <- decay * w_h + (1 - decay) * w."""
        ...

    def state_dict(self) -> dict:
        """The *full* weights on rank 0 (gathered if partitioned); other ranks may return {}."""
        ...

    def load_state_dict(self, sd: dict) -> None:
        """Called on every rank with rank 0's :meth:`state_dict`."""
        ...


class ReferenceModel(Protocol):
    """A frozen pretrained scoring model (engine.py provides it). ``encode`` is collective."""

    def encode(self, batch) -> Features:
        """No-grad, inference-mode features of this rank's local batch (the reference's own
        embedding space and logit scale)."""
        ...


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock timings cover the work they name."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LiveSnapshot:
    """Owns a :class:`HistoricalModel` and when it is taken, refreshed or EMA-updated.

    The snapshot is taken in ``after_step(snapshot_after)``, so it holds the weights after
    ``snapshot_after + 1`` updates and serves steps ``> snapshot_after``. (The first step
    after a snapshot or refresh scores it against the same weights: d is flat up to
    numerical noise, and exact ties are broken at random.) With
    ``snapshot_after == -1`` it is taken from the initial weights, right before the first
    scoring. Afterwards it is refreshed in ``after_step(s)`` whenever
    ``(s - snapshot_after) % refresh_steps == 0``, or EMA-updated in every ``after_step``
    when ``ema_decay > 0``. All decisions depend only on the step, so they are the same on
    every rank, as the collective model calls require.

    ``cache``: when given, each uid is scored once per snapshot and its score kept there
    (cleared on refresh); a step whose whole global batch is cached skips the forward.
    """

    def __init__(
        self,
        make_historical: Callable[[], HistoricalModel] | None,
        *,
        snapshot_after: int,
        refresh_steps: int = 0,
        ema_decay: float = 0.0,
        cache: ScoreMemory | None = None,
        device: torch.device,
        rank: int,
    ) -> None:
        if make_historical is None:
            raise ValueError("this selection strategy needs a historical model: pass make_historical")
        self._make = make_historical
        self.snapshot_after, self.refresh_steps, self.ema_decay = snapshot_after, refresh_steps, ema_decay
        self.cache, self.device, self.rank = cache, device, rank
        self.model: HistoricalModel | None = None

    def available(self, step: int) -> bool:
        """Whether step ``step`` is scored against the snapshot."""
        return step > self.snapshot_after

    def _take(self) -> None:
        if self.model is None:
            self.model = self._make()
        self.model.refresh()
        if self.cache is not None:
            self.cache.clear()

    def after_step(self, step: int) -> None:
        """Snapshot / refresh / EMA after the optimizer update of ``step`` (collective)."""
        if step == self.snapshot_after:
            self._take()
        elif self.model is not None and step > self.snapshot_after:
            if self.ema_decay > 0:
                self.model.ema_update(self.ema_decay)
            elif self.refresh_steps > 0 and (step - self.snapshot_after) % self.refresh_steps == 0:
                self._take()

    def scores(self, batch, uids: torch.Tensor, sizes: list[int], step: int, timings: dict[str, float]) -> torch.Tensor:
        """Historical scores h of the global batch: ``[B]`` float32 (collective).

        ``uids``: the global batch's ``[B]`` uids; ``sizes``: rows per rank. Adds the
        forward's seconds to ``timings["time/score_hist"]``.
        """
        if self.model is None:
            # No warm-up (snapshot of the initial weights), or resumed without saved weights.
            if self.snapshot_after >= 0:
                log.warning("historical snapshot missing at step %d: taking one from the current weights", step)
            self._take()
        cached = self.cache.lookup(uids) if self.cache is not None else None
        missing = None if cached is None else torch.isnan(cached)
        # `missing` is computed from the all-reduced lookup, so every rank takes the same branch.
        if missing is not None and not bool(missing.any()):
            return cached
        t0 = time.perf_counter()
        fresh = dist.all_gather_cat(clip_score(self.model.encode(batch)).float(), sizes)
        sync(self.device)
        timings["time/score_hist"] = timings.get("time/score_hist", 0.0) + time.perf_counter() - t0
        if self.cache is None:
            return fresh
        # Round through the cache dtype so a score reads the same on a hit and on a miss.
        fresh = self.cache.round(fresh)
        self.cache.update(uids[missing], fresh[missing])
        return torch.where(missing, fresh, cached)

    def state_dict(self) -> dict:
        """Whether a snapshot exists, and its weights on rank 0 only (collective)."""
        sd: dict = {"taken": self.model is not None}
        if self.model is not None:
            weights = self.model.state_dict()  # every rank calls: may gather ZeRO-3 partitions
            if self.rank == 0:
                sd["model"] = weights
        return sd

    def load_state_dict(self, shards: list[dict]) -> None:
        """Restore from all ranks' saved dicts (the weights live in rank 0's)."""
        weights = next((s["model"] for s in shards if "model" in s), None)
        if weights is None:
            # Not taken yet, or saved without weights: scores() re-takes it when needed.
            self.model = None
            return
        if self.model is None:
            self.model = self._make()
        self.model.load_state_dict(weights)
