"""Selection strategies: one small interface, one class per strategy, one registry.

A strategy turns the scored global batch into a priority per pair (higher = kept); the
:class:`~dissect_ds.selection.selector.Selector` does the rest (gathering, warm-up, top-k,
checks, diagnostics), so strategies hold only what differs between them. Every method
sees the *global* batch (the same on every rank) and must decide the same on every rank.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, ClassVar

import torch

from dissect_ds.selection.config import ReferenceConfig
from dissect_ds.selection.historical import LiveSnapshot
from dissect_ds.selection.memory import ScoreMemory
from dissect_ds.selection.scored import ScoredBatch
from dissect_ds.selection.scoring import jest_mask, random_priority

if TYPE_CHECKING:
    from dissect_ds.selection.config import SelectionConfig

log = logging.getLogger(__name__)


class Strategy:
    """Base strategy: train on the full batch, score nothing.

    Subclasses override the class flags and :meth:`priority` (and, for history-based
    ones, :meth:`historical` / :meth:`update`). ``needs_*`` answers depend only on the
    config and ``in_warmup``, so all ranks agree on which collective forwards run.
    """

    name: ClassVar[str] = "none"
    obeys_warmup: ClassVar[bool] = True
    """During warm-up the Selector trains on a random/full subset instead of asking."""
    own_keys: ClassVar[dict[str, object]] = {}
    """Config keys (with their defaults) that only this strategy reads."""
    auto_history_dtype: ClassVar[str] = "float16"
    """What ``history_dtype: auto`` means for the score memory, where there is one."""
    reference_based: ClassVar[bool] = False
    """Reads the ``selection.reference`` section."""

    def __init__(self, cfg: SelectionConfig, memory: ScoreMemory | None, snapshot: LiveSnapshot | None) -> None:
        self.cfg, self.memory, self.snapshot = cfg, memory, snapshot

    @classmethod
    def validate(cls, cfg: SelectionConfig) -> list[str]:
        """Errors for config keys this strategy cannot honour."""
        errors = []
        for other in STRATEGIES.values():
            if other is not cls:
                for key, default in other.own_keys.items():
                    if getattr(cfg, key) != default:
                        errors.append(f"selection.{key}: only used by strategy {other.name} (got {cls.name})")
        if cfg.reference != ReferenceConfig() and not cls.reference_based:
            users = "|".join(n for n, c in STRATEGIES.items() if c.reference_based)
            errors.append(f"selection.reference: only used by strategies {users} (got {cls.name})")
        if cfg.shadow and cls.has_historical():
            errors.append(
                f"selection.shadow: {cls.name} already computes the differential; shadow is for strategies "
                f"without one ({'|'.join(n for n, c in STRATEGIES.items() if not c.has_historical())})"
            )
        return errors

    @classmethod
    def needs_memory(cls, cfg: SelectionConfig) -> bool:
        """Whether a per-uid :class:`ScoreMemory` is allocated."""
        return False

    @classmethod
    def history_dtype(cls, cfg: SelectionConfig) -> str:
        """The score memory's element type: ``cfg.history_dtype`` with ``auto`` resolved."""
        return cls.auto_history_dtype if cfg.history_dtype == "auto" else cfg.history_dtype

    @classmethod
    def needs_snapshot(cls, cfg: SelectionConfig) -> bool:
        """Whether a live historical model (:class:`LiveSnapshot`) is used."""
        return False

    @classmethod
    def has_historical(cls) -> bool:
        """Whether the strategy has a historical score of its own (shadow is then moot)."""
        return False

    @classmethod
    def needs_reference(cls, cfg: SelectionConfig) -> bool:
        """Whether the pretrained reference model (``selection.reference``) is loaded."""
        return False

    def start(self, num_uids: int, device: torch.device) -> None:
        """Load what the strategy reads besides the batch (called once by the Selector)."""

    def needs_current(self, in_warmup: bool) -> bool:
        """Whether the current model's scoring forward runs this step."""
        return False

    def needs_features(self, in_warmup: bool) -> bool:
        """Whether the current features are gathered for per-sample losses."""
        return False

    def needs_reference_scores(self, in_warmup: bool) -> bool:
        """Whether the reference model's forward runs this step (its score ``sb.reference``)."""
        return False

    def needs_reference_features(self, in_warmup: bool) -> bool:
        """Whether the reference features are gathered too (``sb.reference_loss``)."""
        return False

    def historical(self, sb: ScoredBatch) -> torch.Tensor | None:
        """[B] historical scores h, or None; may run collective forwards."""
        return None

    def priority(self, sb: ScoredBatch) -> torch.Tensor | None:
        """[B] priority (higher = kept), or None to keep the whole batch. Not in warm-up."""
        return None

    def choose(self, sb: ScoredBatch, k: int) -> torch.Tensor | None:
        """For joint selection: the ``[B]`` bool mask of exactly ``k`` kept pairs, chosen as a
        set; None (the default) ranks by :meth:`priority` and keeps its top k."""
        return None

    def update(self, sb: ScoredBatch, mask: torch.Tensor) -> None:
        """Bookkeeping after the global ``mask`` ([B] bool) is chosen."""

    def after_step(self, step: int) -> None:
        """After the optimizer update of optimizer step ``step`` (collective where a model is involved)."""
        if self.snapshot is not None:
            self.snapshot.after_step(step)

    def state_dict(self) -> dict:
        return {"snapshot": self.snapshot.state_dict()} if self.snapshot is not None else {}

    def load_state_dict(self, shards: list[dict]) -> None:
        if self.snapshot is not None:
            self.snapshot.load_state_dict([s.get("snapshot", {}) for s in shards])


class FullBatch(Strategy):
    """``none``: every pair, every step; no scoring pass at all."""

    name = "none"
    obeys_warmup = False


class Random(Strategy):
    """``random``: a uniform ``rate`` subset, a pure function of (seed, step, uids)."""

    name = "random"

    def priority(self, sb: ScoredBatch) -> torch.Tensor:
        return random_priority(sb.seed, sb.step, sb.uids)


class CurrentScore(Strategy):
    """``current_score``: keep the highest current scores c, ranked by the model being trained.

    Not the paper's CLIPScore baseline, which scores pairs with a pretrained oracle model;
    here the current model is its own oracle (formerly named ``clipscore``).
    """

    name = "current_score"

    def needs_current(self, in_warmup: bool) -> bool:
        return not in_warmup

    def priority(self, sb: ScoredBatch) -> torch.Tensor:
        return sb.current


class BigLoss(Strategy):
    """``big_loss``: keep the largest per-sample contrastive losses over the global batch."""

    name = "big_loss"
    sign: ClassVar[float] = 1.0

    def needs_current(self, in_warmup: bool) -> bool:
        return not in_warmup

    def needs_features(self, in_warmup: bool) -> bool:
        return not in_warmup

    def priority(self, sb: ScoredBatch) -> torch.Tensor:
        return self.sign * sb.loss


class SmallLoss(BigLoss):
    """``small_loss``: keep the smallest per-sample contrastive losses."""

    name = "small_loss"
    sign = -1.0


class Differential(Strategy):
    """Common part of the DISSect variants: keep the top differential d."""

    @classmethod
    def has_historical(cls) -> bool:
        return True

    def priority(self, sb: ScoredBatch) -> torch.Tensor:
        return sb.differential


class _MemoryHistory(Differential):
    """History in the sharded score memory; a uid with no history yet has h = c."""

    @classmethod
    def needs_memory(cls, cfg: SelectionConfig) -> bool:
        return True

    def needs_current(self, in_warmup: bool) -> bool:
        return True

    def historical(self, sb: ScoredBatch) -> torch.Tensor:
        h = self.memory.lookup(sb.uids)
        # Unseen pairs get h = c: zero change, so d_i = mean(c) - mean(h), a neutral value.
        return torch.where(torch.isnan(h), sb.current, h)


class DissectWarmup(_MemoryHistory):
    """``dissect_warmup``: h = the current score at a pair's last warm-up visit, then frozen.

    Every scored pair of a warm-up step is recorded (trained on or not); pairs never
    seen during warm-up use h = c.
    """

    name = "dissect_warmup"

    @classmethod
    def validate(cls, cfg: SelectionConfig) -> list[str]:
        errors = super().validate(cfg)
        if cfg.warmup_steps <= 0 and cfg.warmup_epochs <= 0:
            errors.append("selection.warmup_steps / warmup_epochs: dissect_warmup needs a warm-up (one must be > 0)")
        return errors

    def update(self, sb: ScoredBatch, mask: torch.Tensor) -> None:
        if sb.in_warmup:
            self.memory.update(sb.uids, sb.current)


class DissectMomentum(_MemoryHistory):
    """``dissect_momentum``: h <- beta * h + (1 - beta) * c after every visit.

    d is computed before the update; the first visit initialises h = c (the authors
    started from 0, which made epoch 0 select the *lowest* scores). During warm-up the
    history is updated while a random/full subset is trained on.
    """

    name = "dissect_momentum"
    # h moves by (1 - beta) * (c - h) per visit, e.g. 0.01: lost in float16 at scores >= 64.
    auto_history_dtype = "float32"

    def update(self, sb: ScoredBatch, mask: torch.Tensor) -> None:
        beta = self.cfg.beta
        self.memory.update(sb.uids, beta * sb.historical + (1.0 - beta) * sb.current)


class DissectModel(Differential):
    """``dissect_model``: h from a live frozen copy of the network (host memory).

    Snapshot at the end of warm-up (or of the initial weights without warm-up),
    optionally refreshed every ``refresh_steps`` or EMA-updated every step. No scoring
    forward runs during warm-up.
    """

    name = "dissect_model"
    own_keys = {"refresh_steps": 0, "ema_decay": 0.0, "cache_hist_scores": False}

    @classmethod
    def validate(cls, cfg: SelectionConfig) -> list[str]:
        errors = super().validate(cfg)
        if cfg.refresh_steps > 0 and cfg.ema_decay > 0:
            errors.append("selection.refresh_steps / ema_decay: choose one (refresh a snapshot, or an EMA)")
        if cfg.cache_hist_scores and cfg.ema_decay > 0:
            errors.append(
                "selection.cache_hist_scores: needs a fixed snapshot, but ema_decay > 0 changes it every step"
            )
        return errors

    @classmethod
    def needs_memory(cls, cfg: SelectionConfig) -> bool:
        return cfg.cache_hist_scores

    @classmethod
    def needs_snapshot(cls, cfg: SelectionConfig) -> bool:
        return True

    def needs_current(self, in_warmup: bool) -> bool:
        return not in_warmup

    def historical(self, sb: ScoredBatch) -> torch.Tensor | None:
        if sb.in_warmup:
            return None
        return self.snapshot.scores(sb.batch, sb.uids, sb.rows_per_rank, sb.step, sb.timings)


class _Reference(Strategy):
    """Common part of the strategies that score with a pretrained reference model.

    The reference is frozen and loaded once (``selection.reference``); unlike the
    historical model it is never refreshed, and may be another architecture.
    """

    reference_based = True
    reads_scores: ClassVar[bool] = False
    """Can read precomputed per-uid scores (``selection.reference.scores``) instead."""

    @classmethod
    def needs_reference(cls, cfg: SelectionConfig) -> bool:
        return True

    @classmethod
    def validate(cls, cfg: SelectionConfig) -> list[str]:
        return super().validate(cfg) + cfg.reference.validate(scores_allowed=cls.reads_scores)

    def needs_reference_scores(self, in_warmup: bool) -> bool:
        return not in_warmup


class OracleClipScore(_Reference):
    """``oracle_clipscore``: keep the pairs the reference scores highest (CLIPScore filtering,
    as LAION and DataComp do offline, here per global batch). With
    ``selection.reference.scores`` the scores come from a table written once by
    ``python -m dissect_ds.score`` and the reference never runs (a uid without a score ranks last)."""

    name = "oracle_clipscore"
    reads_scores = True

    @classmethod
    def needs_reference(cls, cfg: SelectionConfig) -> bool:
        return cfg.reference.scores is None

    def start(self, num_uids: int, device: torch.device) -> None:
        from dissect_ds.score import load_scores

        scores = self.cfg.reference.scores
        self.table = None if scores is None else load_scores(scores, num_uids).to(device)

    def needs_reference_scores(self, in_warmup: bool) -> bool:
        return not in_warmup and self.cfg.reference.scores is None

    def priority(self, sb: ScoredBatch) -> torch.Tensor:
        if self.table is None:
            return sb.reference
        return torch.nan_to_num(self.table[sb.uids].float(), nan=-1.0)


class OracleClipLoss(_Reference):
    """``oracle_cliploss``: keep the smallest per-pair contrastive losses under the reference,
    each against the whole global batch."""

    name = "oracle_cliploss"

    def needs_reference_features(self, in_warmup: bool) -> bool:
        return not in_warmup

    def priority(self, sb: ScoredBatch) -> torch.Tensor:
        return -sb.reference_loss


class Learnability(OracleClipLoss):
    """``learnability``: keep the largest learner loss minus reference loss (RHO-LOSS's
    reducible loss; JEST's per-example score): pairs not learned yet but learnable."""

    name = "learnability"

    def needs_current(self, in_warmup: bool) -> bool:
        return not in_warmup

    def needs_features(self, in_warmup: bool) -> bool:
        return not in_warmup

    def priority(self, sb: ScoredBatch) -> torch.Tensor:
        return sb.loss - sb.reference_loss


class Jest(Learnability):
    """``jest``: joint example selection (Evans et al. 2024). The k pairs are drawn as a set,
    ``jest_chunks`` chunks in turn, each sampled without replacement from the softmax of every
    remaining pair's conditional learnability given the pairs already drawn (the contrastive
    loss of a pair depends on the rest of the sub-batch; see :func:`jest_mask`)."""

    name = "jest"
    own_keys = {"jest_chunks": 16}

    @classmethod
    def validate(cls, cfg: SelectionConfig) -> list[str]:
        errors = super().validate(cfg)
        if cfg.jest_chunks < 1:
            errors.append(f"selection.jest_chunks: {cfg.jest_chunks} must be >= 1")
        if cfg.scope != "global":
            errors.append("selection.scope: jest draws one joint set from the global batch (use global)")
        return errors

    def choose(self, sb: ScoredBatch, k: int) -> torch.Tensor:
        return jest_mask(sb.gathered, sb.reference_gathered, k, self.cfg.jest_chunks, sb.seed, sb.step, sb.uids)


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        FullBatch,
        Random,
        BigLoss,
        SmallLoss,
        CurrentScore,
        DissectWarmup,
        DissectMomentum,
        DissectModel,
        OracleClipScore,
        OracleClipLoss,
        Learnability,
        Jest,
    )
}
"""``selection.strategy`` name -> class."""

ALIASES: dict[str, str] = {"clipscore": "current_score"}
"""Deprecated ``selection.strategy`` names -> their current names."""
_warned: set[str] = set()


def strategy_class(name: str) -> type[Strategy] | None:
    """The strategy registered as ``name``, or under the deprecated alias ``name``; None if unknown.

    An alias logs one deprecation line per process, however often a config is validated.
    """
    if name in ALIASES:
        if name not in _warned:
            _warned.add(name)
            log.warning("selection.strategy: %r is deprecated, use %r (same behaviour)", name, ALIASES[name])
        name = ALIASES[name]
    return STRATEGIES.get(name)


def validate(cfg: SelectionConfig) -> list[str]:
    """Every problem of a ``selection`` section, one line each naming the key: the strategy
    name, the fields' own rules, then the strategy's; [] when valid."""
    cls = strategy_class(cfg.strategy)
    if cls is None:
        return [f"selection.strategy: {cfg.strategy!r} is not one of {'|'.join(STRATEGIES)}"]
    return cfg.validate() + cls.validate(cfg)
