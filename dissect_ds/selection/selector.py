"""The selection step (docs/design.md): score, look up history, pick the global top-k, log."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dissect_ds import distributed as dist
from dissect_ds.model import Features
from dissect_ds.selection.config import SelectionConfig
from dissect_ds.selection.diagnostics import EarlySnapshotAlarm, NoiseAuroc, Recorder, score_vectors, step_metrics
from dissect_ds.selection.historical import HistoricalModel, LiveSnapshot, ReferenceModel, sync
from dissect_ds.selection.memory import ScoreMemory
from dissect_ds.selection.scored import ScoredBatch
from dissect_ds.selection.scoring import clip_score, per_sample_contrastive_loss, random_priority, topk_mask
from dissect_ds.selection.strategies import ALIASES, strategy_class, validate

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass
class Selection:
    """The outcome of one selection step.

    ``mask``: ``[b]`` bool on the selector's device, this rank's rows to train on (may be
    all False). ``num_selected``: the global count k. ``kept_per_rank``: every rank's number of
    selected rows (the same list on every rank, known without a collective). ``metrics``
    and ``histograms`` are global, identical on every rank (histograms are ``[B]`` device
    tensors).
    """

    mask: torch.Tensor
    num_selected: int
    kept_per_rank: list[int]
    metrics: dict[str, float]
    histograms: dict[str, torch.Tensor]


def _check_same_on_all_ranks(mask: torch.Tensor, what: str) -> None:
    """Raise on every rank if ``mask`` differs between ranks; one all-reduce(max).

    A checksum whose max and -min travel in one collective: this runs every step.
    """
    if dist.world_size() == 1:
        return
    idx = torch.arange(1, mask.numel() + 1, device=mask.device, dtype=torch.float64)
    s = (mask.double() * idx).sum()
    n = torch.tensor(float(mask.numel()), dtype=torch.float64, device=mask.device)
    t = dist.all_reduce(torch.stack([s, -s, n, -n]), "max")
    if not (t[0] == -t[1] and t[2] == -t[3]):
        raise RuntimeError(f"ranks diverged on {what}: checksums differ ({(-t[1]).item()} vs {t[0].item()})")


def kept_count(rate: float, n: int) -> int:
    """max(1, floor(rate * n)) for n > 0 (the epsilon absorbs e.g. 0.29 * 100 = 28.999...)."""
    return max(1, math.floor(rate * n + 1e-9)) if n > 0 else 0


class Selector:
    """Chooses which pairs of each global batch are trained on; identical on every rank.

    Per step: run the current model's scoring forward if the strategy (or the shadow
    snapshot) needs it; gather the batch sizes, then uids, noise labels and current
    scores in one all-gather; get the historical scores (one all-reduce for the score
    memory, or the historical model's forward plus a gather); rank the global batch;
    check with one all-reduce that all ranks agree (unless every pair is kept). The loss
    baselines gather the features and the per-sample losses too. All collectives are O(B)
    (features: O(B D)).
    Every rank computes the same mask over the global batch, equal to what one process
    computes on the concatenated batch, and keeps its own rows.
    After warm-up, a strategy that ranks by the differential warns on rank 0 when d ranks
    against the current score (:class:`~dissect_ds.selection.diagnostics.EarlySnapshotAlarm`).

    ``time/select`` is the step's wall time minus the scoring forwards (``time/score``,
    ``time/score_hist``, ``time/score_ref``) and minus ``time/select_wait``, the time spent in the step's
    first collective waiting for slower ranks (load skew the train step would otherwise
    absorb). Timing metrics are this rank's own, not global.

    Steps are optimizer steps: warm-up length, snapshot, refresh, EMA and shadow schedules
    count optimizer updates whatever ``train.grad_accum`` is. Under gradient accumulation
    the trainer passes the whole step (its micro-batches concatenated), so one top-k is
    taken over the global batch B however it is split; :meth:`after_step` runs once,
    after the step's optimizer update.

    Collective contract: all ranks call :meth:`select` once per optimizer step and
    :meth:`after_step` once per optimizer step, :meth:`state_dict` and
    :meth:`load_state_dict` together. ``make_historical``
    (collective) builds the host-resident historical model, lazily, for ``dissect_model``
    and ``shadow``; ``reference`` is the pretrained reference model of the reference-based
    strategies (the trainer loads it at start-up).
    """

    def __init__(
        self,
        cfg: SelectionConfig,
        *,
        num_uids: int,
        rank: int,
        world_size: int,
        device: torch.device | str,
        seed: int,
        steps_per_epoch: int,
        run_dir: str | None,
        make_historical: Callable[[], HistoricalModel] | None,
        reference: ReferenceModel | None = None,
    ) -> None:
        errors = validate(cfg)
        if errors:
            raise ValueError("invalid selection config:\n" + "\n".join(errors))
        if reference is None and strategy_class(cfg.strategy).needs_reference(cfg):
            raise ValueError(f"selection.strategy {cfg.strategy} needs a reference model: pass reference")
        if num_uids <= 0:
            raise ValueError(f"Selector: num_uids must be > 0, got {num_uids}")
        self.cfg, self.num_uids, self.rank, self.world_size = cfg, int(num_uids), int(rank), int(world_size)
        self.device, self.seed = torch.device(device), int(seed)
        self.warmup_length = cfg.warmup_length(steps_per_epoch)
        cls = strategy_class(cfg.strategy)
        self.history_dtype = cls.history_dtype(cfg)
        memory = (
            ScoreMemory(num_uids, rank, world_size, self.history_dtype, self.device) if cls.needs_memory(cfg) else None
        )
        snapshot = None
        if cls.needs_snapshot(cfg):
            snapshot = LiveSnapshot(
                make_historical,
                snapshot_after=self.warmup_length - 1,
                refresh_steps=cfg.refresh_steps,
                ema_decay=cfg.ema_decay,
                cache=memory if cfg.cache_hist_scores else None,
                device=self.device,
                rank=rank,
            )
        self.memory = memory
        self.strategy = cls(cfg, memory, snapshot)
        self.strategy.start(self.num_uids, self.device)
        self.reference = reference
        self.shadow = None
        if cfg.shadow:
            at = cfg.shadow_step if cfg.shadow_step >= 0 else self.warmup_length - 1
            self.shadow = LiveSnapshot(make_historical, snapshot_after=at, device=self.device, rank=rank)
        self.recorder = Recorder(run_dir, rank) if cfg.record and run_dir is not None else None
        if cfg.record and run_dir is None:
            log.warning("selection.record is set but no run_dir was given: not recording")
        self.noise_auroc = NoiseAuroc()
        # Only where selection follows the differential, and one warning line: rank 0.
        self.alarm = EarlySnapshotAlarm() if rank == 0 and cls.has_historical() else None

    # ---------------------------------------------------------------- the step
    def select(
        self, step: int, batch, encode: Callable[[object], Features], micro_size: int | None = None
    ) -> Selection:
        """Select this rank's rows of ``batch``, its share of optimizer step ``step`` (collective).

        ``batch`` has ``.uids`` (``[b]`` int64), ``.noisy`` (``[b]`` bool or None) and
        ``len()``; ``encode(batch)`` is the current model's no-grad inference-mode forward
        (collective; called on every rank or on none). ``micro_size``: rows per
        micro-batch when ``batch`` is a step's micro-batches concatenated (for the
        per-pair records; default: one micro-batch).
        """
        t_start = time.perf_counter()
        cfg, strategy = self.cfg, self.strategy
        in_warmup = step < self.warmup_length
        with_loss = strategy.needs_features(in_warmup)
        timings: dict[str, float] = {}
        feats = ref_feats = None
        if strategy.needs_current(in_warmup) or with_loss or self.shadow is not None:
            feats = self._timed(lambda: encode(batch), timings, "time/score")
        if strategy.needs_reference_scores(in_warmup):
            ref_feats = self._timed(lambda: self.reference.encode(batch), timings, "time/score_ref")
        sb = self._gather_batch(step, micro_size or max(1, len(batch)), in_warmup, batch, feats, ref_feats)
        sb.timings.update(timings)
        if with_loss:
            sb.gathered, sb.loss = self._per_sample_loss(sb, feats)
        if strategy.needs_reference_features(in_warmup):
            sb.reference_gathered, sb.reference_loss = self._per_sample_loss(sb, ref_feats)
        sb.set_historical(strategy.historical(sb))
        if sb.historical is None and self.shadow is not None and self.shadow.available(step):
            sb.set_historical(self.shadow.scores(batch, sb.uids, sb.rows_per_rank, step, sb.timings))

        chosen = None
        if in_warmup and strategy.obeys_warmup:
            priority = random_priority(self.seed, step, sb.uids) if cfg.warmup_mode == "random" else None
        else:
            chosen = strategy.choose(sb, kept_count(cfg.rate, sb.uids.shape[0]))
            priority = strategy.priority(sb) if chosen is None else None
        mask = self._topk(priority, sb) if chosen is None else chosen
        if priority is not None or chosen is not None:
            # Cheap insurance: a rank that diverged would train on other pairs than its peers
            # think, and the gathered loss would silently mix two selections.
            _check_same_on_all_ranks(mask, f"selection mask at step {step}")
        strategy.update(sb, mask)

        rows = dist.local_slice(sb.rows_per_rank, self.rank)
        scores = score_vectors(sb)
        metrics = step_metrics(sb, mask, scores)
        if self.rank == 0:
            self.noise_auroc.add(sb)
        if self.alarm is not None and not in_warmup:
            self.alarm.add(step, metrics)
        if self.recorder is not None:
            self.recorder.write(sb, rows, mask)
        # Always present (0 without a forward) so every metrics line has the same timing keys.
        timings = {"time/score": 0.0, "time/score_hist": 0.0, "time/score_ref": 0.0, **sb.timings}
        metrics.update(timings)
        metrics["time/select"] = time.perf_counter() - t_start - sum(timings.values())
        histograms = {f"selection/{k}": v for k, v in scores.items()}
        selected = torch.stack([m.sum() for m in mask.split(sb.rows_per_rank)]).tolist()  # one host sync
        return Selection(mask[rows], int(metrics["selected"]), selected, metrics, histograms)

    def _timed(self, forward: Callable[[], Features], timings: dict[str, float], key: str) -> Features:
        """Run a scoring forward; its wall time (queued kernels included) goes to ``timings[key]``."""
        t0 = time.perf_counter()
        out = forward()
        sync(self.device)
        timings[key] = time.perf_counter() - t0
        return out

    def _gather_batch(
        self, step: int, micro_size: int, in_warmup: bool, batch, feats: Features | None, ref_feats: Features | None
    ) -> ScoredBatch:
        """Gather uids, noise labels and (when scored) current and reference scores in one
        all-gather.

        Packed as float64 columns ``[uid, noisy code, c, reference]``: exact for uids < 2**53
        and float32 scores, and one collective instead of four (gloo latency dominates the
        bookkeeping of small CPU runs).
        """
        b = len(batch)
        uids = torch.as_tensor(batch.uids).to(self.device, torch.long).reshape(b)
        noisy = getattr(batch, "noisy", None)
        code = torch.full_like(uids, -1) if noisy is None else torch.as_tensor(noisy).to(self.device, torch.long)
        cols = [uids, code.reshape(b)] + [clip_score(f) for f in (feats, ref_feats) if f is not None]
        t0 = time.perf_counter()
        sizes = dist.all_gather_sizes(b, self.device)
        # The first collective of the step absorbs the ranks' skew (data loading, the
        # scoring forward): that wait is not selection cost, so it is reported apart.
        wait = time.perf_counter() - t0
        g = dist.all_gather_cat(torch.stack([c.double() for c in cols], dim=1), sizes)
        g_uids = g[:, 0].long()
        if g_uids.numel():
            lo, hi = torch.aminmax(g_uids)
            # Global check, so every rank raises together instead of one hanging the rest.
            if int(lo) < 0 or int(hi) >= self.num_uids:
                raise ValueError(f"selection: uid out of range [0, {self.num_uids}): min {int(lo)}, max {int(hi)}")
        return ScoredBatch(
            step=step,
            micro_size=micro_size,
            in_warmup=in_warmup,
            seed=self.seed,
            batch=batch,
            rows_per_rank=sizes,
            uids=g_uids,
            noisy=g[:, 1].to(torch.int8),
            current=g[:, 2].float() if feats is not None else None,
            reference=g[:, -1].float() if ref_feats is not None else None,
            features=feats,
            timings={"time/select_wait": wait},
        )

    def _per_sample_loss(self, sb: ScoredBatch, feats: Features) -> tuple[Features, torch.Tensor]:
        """One model's global ``[B, D]`` features and ``[B]`` per-sample contrastive loss of
        every pair against the global batch."""
        d = feats.image.shape[1]
        g = dist.all_gather_cat(torch.cat([feats.image.float(), feats.text.float()], dim=1), sb.rows_per_rank)
        offset = dist.local_slice(sb.rows_per_rank, self.rank).start
        loss_local = per_sample_contrastive_loss(
            feats.image, feats.text, g[:, :d], g[:, d:], offset, float(feats.logit_scale)
        )
        gathered = Features(image=g[:, :d], text=g[:, d:], logit_scale=feats.logit_scale)
        return gathered, dist.all_gather_cat(loss_local, sb.rows_per_rank)

    def _topk(self, priority: torch.Tensor | None, sb: ScoredBatch) -> torch.Tensor:
        n = sb.uids.shape[0]
        if priority is None:
            return torch.ones(n, dtype=torch.bool, device=self.device)
        # Exact ties are common (unseen pairs have h = c, so d is flat; so is the first step
        # after a snapshot): break them by a per-(step, uid) draw, not by uid, which would
        # keep the smallest uids of every such batch.
        tiebreak = random_priority(self.seed, sb.step, sb.uids)
        if self.cfg.scope == "local":
            group = torch.repeat_interleave(
                torch.arange(len(sb.rows_per_rank), device=self.device),
                torch.tensor(sb.rows_per_rank, device=self.device),
            )
            k = torch.tensor([kept_count(self.cfg.rate, s) for s in sb.rows_per_rank], dtype=torch.long)
            return topk_mask(priority, tiebreak, k, group)
        k = torch.tensor([kept_count(self.cfg.rate, n)], dtype=torch.long)
        return topk_mask(priority, tiebreak, k)

    # ---------------------------------------------------------------- schedule
    def after_step(self, step: int) -> None:
        """Snapshot at warm-up end, refresh or EMA update (collective).

        Call once per optimizer step, after its update (i.e. after the last micro-batch).
        """
        self.strategy.after_step(step)
        if self.shadow is not None:
            self.shadow.after_step(step)

    def epoch_end(self, epoch: int) -> dict[str, float]:
        """Clean-vs-noisy AUROC of the current score and of the differential over the epoch.

        ``selection/auroc_current``, ``selection/auroc_differential`` (higher score =
        clean) where noise labels and the score were seen; meaningful on rank 0 (others
        return {}). Not collective.
        """
        if self.recorder is not None:
            self.recorder.flush()
        return self.noise_auroc.compute_and_reset()

    # ---------------------------------------------------------------- state
    def history_bytes(self) -> int:
        """Bytes of this rank's score memory (0 for strategies without one)."""
        return self.memory.nbytes if self.memory is not None else 0

    def state_dict(self) -> dict:
        """This rank's state: its memory shard, the snapshot weights (rank 0), no RNG state.

        Collective when a historical model exists (its weights may be gathered).
        """
        return {
            "version": STATE_VERSION,
            "strategy": self.strategy.name,
            "world_size": self.world_size,
            "rank": self.rank,
            "num_uids": self.num_uids,
            "history_dtype": self.history_dtype,
            "memory": self.memory.state_dict() if self.memory is not None else None,
            "strategy_state": self.strategy.state_dict(),
            "shadow": self.shadow.state_dict() if self.shadow is not None else None,
        }

    def load_state_dict(self, shards: list[dict]) -> None:
        """Restore from *all* ranks' saved dicts, saved at any world size (collective).

        Each rank keeps the history of the uids it owns now. A checkpoint without the
        state this strategy needs (e.g. saved under another strategy) leaves it empty.
        """
        if not shards:
            raise ValueError("Selector.load_state_dict: expected every saved rank's dict, got none")
        if any(s.get("version") != STATE_VERSION for s in shards):
            raise ValueError(f"Selector.load_state_dict: unsupported state version (expected {STATE_VERSION})")
        if self.memory is not None:
            saved = [s["memory"] for s in shards if s.get("memory") is not None]
            # Another strategy's memory means something else (e.g. cached snapshot scores).
            saved_strategy = shards[0].get("strategy")
            if saved and ALIASES.get(saved_strategy, saved_strategy) == self.strategy.name:
                self.memory.load_shards(saved)
            else:
                log.warning(
                    "selection checkpoint has no %s score memory (saved: %s): history starts empty",
                    self.strategy.name,
                    saved_strategy,
                )
        self.strategy.load_state_dict([s.get("strategy_state") or {} for s in shards])
        if self.shadow is not None:
            self.shadow.load_state_dict([s.get("shadow") or {} for s in shards])
