"""The ``selection`` section of a run config."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

SCOPES = ("global", "local")
WARMUP_MODES = ("random", "full")
HISTORY_DTYPES = ("auto", "float16", "float32")


LOCAL_DIR = "local-dir:"


@dataclass
class ReferenceConfig:
    """A pretrained, frozen model that scores pairs for the reference-based strategies
    (YAML section ``selection.reference``). Never downloaded, never trained, never refreshed."""

    model: str | None = None
    """An open_clip architecture name (with ``pretrained``), or ``local-dir:DIR``, a directory
    exported by dissect_ds or open_clip (config and weights)."""
    pretrained: str | None = None
    """A local weights file for ``model`` (a state dict, e.g. a run's ``open_clip_model.pt``)."""
    scores: str | None = None
    """oracle_clipscore: a directory of per-uid scores written by ``python -m dissect_ds.score``,
    read instead of running the reference model every step."""

    def validate(self, scores_allowed: bool = False) -> list[str]:
        """Problems that a start-up would only hit later: a missing name, file or directory."""
        from dissect_ds.model import model_exists

        if self.scores is not None:
            if not scores_allowed:
                return ["selection.reference.scores: only oracle_clipscore reads precomputed scores"]
            if not (Path(self.scores) / "info.json").is_file():
                return [f"selection.reference.scores: {self.scores} has no info.json (run python -m dissect_ds.score)"]
            if self.model is None and self.pretrained is None:
                return []
        if not self.model:
            return [
                "selection.reference.model: this strategy needs a reference model (an open_clip name or local-dir:DIR)"
            ]
        if self.model.startswith(LOCAL_DIR):
            where = Path(self.model.removeprefix(LOCAL_DIR))
            if not (where / "open_clip_config.json").is_file():
                return [f"selection.reference.model: {where} has no open_clip_config.json (an export directory)"]
            if self.pretrained:
                return ["selection.reference.pretrained: not used with local-dir: (the directory holds the weights)"]
            return []
        if not model_exists(self.model):
            return [
                f"selection.reference.model: unknown model {self.model!r} (see `python -m dissect_ds.model --list`)"
            ]
        if not self.pretrained:
            return ["selection.reference.pretrained: a local weights file is required (weights are never downloaded)"]
        if not Path(self.pretrained).is_file():
            return [f"selection.reference.pretrained: file not found: {self.pretrained}"]
        return []


@dataclass
class SelectionConfig:
    """Which pairs of each global batch are trained on (YAML section ``selection``).

    Steps are 0-based optimizer steps (a step of ``train.grad_accum`` micro-batches counts
    once); step ``s`` is in warm-up iff ``s < warmup_length(steps_per_epoch)``.
    During warm-up every strategy but ``none`` trains on a random ``rate`` subset
    (``warmup_mode: random``) or on the full batch (``full``).
    """

    strategy: str = "none"
    """none|random|big_loss|small_loss|current_score|dissect_warmup|dissect_momentum|dissect_model,
    or with a reference model oracle_clipscore|oracle_cliploss|learnability|jest
    (``clipscore``: deprecated alias of ``current_score``)."""
    rate: float = 1.0
    """In (0, 1]; k = max(1, floor(rate * B)) pairs of the global batch B are kept."""
    scope: str = "global"
    """global, or local: the authors' per-rank top max(1, floor(rate * b)) of each rank's b rows."""
    warmup_steps: int = 0
    """Warm-up length in steps ..."""
    warmup_epochs: float = 0.0
    """... or in epochs (ceil(warmup_epochs * steps_per_epoch)); the larger of the two wins."""
    warmup_mode: str = "random"
    """random|full: what is trained on during warm-up."""
    beta: float = 0.9
    """dissect_momentum: h <- beta * h + (1 - beta) * c after each visit."""
    refresh_steps: int = 0
    """dissect_model: re-snapshot every K steps after the first snapshot (0 = never)."""
    ema_decay: float = 0.0
    """dissect_model: > 0 makes the historical model an EMA of the weights, updated every
    step after the snapshot (w_h <- decay * w_h + (1 - decay) * w)."""
    cache_hist_scores: bool = False
    """dissect_model: score each uid once per snapshot; kept in the sharded score memory."""
    history_dtype: str = "auto"
    """auto|float16|float32: element type of the score memory (scores lie in [0, 100]).
    auto: float32 for dissect_momentum, whose EMA increments (1 - beta) * (c - h) fall below
    half a float16 ulp (0.03 at scores 64-100) and would be lost; float16 (2 bytes per uid)
    for the stored-once scores of dissect_warmup and of dissect_model's cache."""
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    """oracle_clipscore, oracle_cliploss, learnability, jest: the pretrained scoring model."""
    jest_chunks: int = 16
    """jest: the k kept pairs are drawn in this many chunks (must divide k), each conditioned
    on the chunks before it."""
    record: bool = False
    """Each rank appends <run_dir>/selection/rank{R}.jsonl, one line per scored pair."""
    shadow: bool = False
    """Compute the differential against a live snapshot without using it for selection
    (strategies without a historical score of their own: none, random, *_loss, current_score)."""
    shadow_step: int = -1
    """The shadow snapshot is taken in ``after_step(shadow_step)``, i.e. holds the weights
    after ``shadow_step + 1`` updates. -1: at the end of warm-up, or the initial weights
    (taken before the first selection) when there is no warm-up."""

    def warmup_length(self, steps_per_epoch: int) -> int:
        """Warm-up length in steps: max(warmup_steps, ceil(warmup_epochs * steps_per_epoch))."""
        # The epsilon keeps e.g. 0.3 * 10 (= 3.0000000000000004) from becoming 4 steps.
        from_epochs = math.ceil(self.warmup_epochs * steps_per_epoch - 1e-9) if self.warmup_epochs > 0 else 0
        return max(int(self.warmup_steps), from_epochs)

    def validate(self) -> list[str]:
        """The rules of the fields themselves, one line per problem naming the key and what
        is allowed; [] when valid. The strategy's own rules are checked by
        :func:`dissect_ds.selection.strategies.validate`, which calls this."""
        errors: list[str] = []
        if not (0.0 < self.rate <= 1.0):
            errors.append(f"selection.rate: {self.rate} must be in (0, 1]")
        if self.scope not in SCOPES:
            errors.append(f"selection.scope: {self.scope!r} is not one of {'|'.join(SCOPES)}")
        if self.warmup_steps < 0:
            errors.append(f"selection.warmup_steps: {self.warmup_steps} must be >= 0")
        if self.warmup_epochs < 0:
            errors.append(f"selection.warmup_epochs: {self.warmup_epochs} must be >= 0")
        if self.warmup_mode not in WARMUP_MODES:
            errors.append(f"selection.warmup_mode: {self.warmup_mode!r} is not one of {'|'.join(WARMUP_MODES)}")
        if not (0.0 <= self.beta < 1.0):
            errors.append(f"selection.beta: {self.beta} must be in [0, 1)")
        if self.refresh_steps < 0:
            errors.append(f"selection.refresh_steps: {self.refresh_steps} must be >= 0 (0 = never)")
        if not (0.0 <= self.ema_decay < 1.0):
            errors.append(f"selection.ema_decay: {self.ema_decay} must be in [0, 1) (0 = no EMA)")
        if self.history_dtype not in HISTORY_DTYPES:
            errors.append(f"selection.history_dtype: {self.history_dtype!r} is not one of {'|'.join(HISTORY_DTYPES)}")
        if self.shadow_step < -1:
            errors.append(f"selection.shadow_step: {self.shadow_step} must be >= 0, or -1 (end of warm-up)")
        return errors
