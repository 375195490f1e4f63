"""The `data` section of a run config."""

from __future__ import annotations

import os
from dataclasses import dataclass

from dissect_ds.data.shards import SpecError, resolve, validate_spec


@dataclass
class DataConfig:
    """Where the pairs come from and how they are streamed.

    `train`/`val`: a prepared split directory (``*.tar`` + ``sizes.json``) or a
    brace-expanded shard spec (``dir/{000..009}.tar``); several sources are joined
    with ``::``. `val` None disables evaluation. `num_workers` is per rank (0 = read
    in the main process). `resampled` draws shards with replacement (seeded) instead
    of epoch passes. `classnames` defaults to ``classnames.txt`` in or beside the
    val directory. With `resampled`, `source_weights` (``"1::3"``) weights each
    source's shards when drawing (open_clip's upsampling factors) and
    `samples_per_epoch` sets the stream epoch's length (pairs over all ranks; default the
    data set's size). `augment` False gives training images the val transform (resize and
    centre crop) instead of open_clip's random resized crop, whose aspect-ratio jitter
    changes shapes (the synthetic set's labels). `cache_decoded` (only with `augment`
    False) keeps every decoded, transformed and tokenized training pair in memory after
    its first read, so later epochs skip decoding (a data set that fits in RAM, many
    epochs over it; each DataLoader worker keeps its own cache of the pairs it reads).
    """

    train: str = ""
    val: str | None = None
    num_workers: int = 1
    shuffle_buffer: int = 1000
    resampled: bool = False
    classnames: str | None = None
    augment: bool = True
    source_weights: str | None = None
    samples_per_epoch: int | None = None
    cache_decoded: bool = False

    def weights(self) -> tuple[float, ...] | None:
        """``source_weights`` parsed (``"1::3"``: one weight per ``::`` source), or None."""
        if self.source_weights is None:
            return None
        return tuple(float(w) for w in str(self.source_weights).split("::"))

    def epoch_samples(self, num_samples: int) -> int:
        """Pairs in one epoch of the stream: ``samples_per_epoch`` if set, else the data set."""
        return self.samples_per_epoch or num_samples

    def _validate_resampling(self) -> str | None:
        if self.source_weights is not None:
            if not self.resampled:
                return "data.source_weights: only with data.resampled=true (epoch passes read every shard once)"
            try:
                weights = self.weights()
            except ValueError:
                return f"data.source_weights: {self.source_weights!r} must be numbers joined with '::' (e.g. 1::3)"
            sources = len([p for p in str(self.train).split("::") if p.strip()])
            if len(weights) != sources:
                return f"data.source_weights: {len(weights)} weight(s) for {sources} data.train source(s)"
            if any(not w >= 0 for w in weights) or not any(w > 0 for w in weights):
                return f"data.source_weights: {self.source_weights!r} must be >= 0 with at least one > 0"
        if self.samples_per_epoch is not None:
            if not self.resampled:
                return "data.samples_per_epoch: only with data.resampled=true (an epoch pass is the data set)"
            if self.samples_per_epoch <= 0:
                return f"data.samples_per_epoch: must be > 0, got {self.samples_per_epoch}"
        return None

    def validate(self) -> str | None:
        """None if usable, else a one-line error naming the key. Reads manifests, and reads
        the tars of a source that has none (to count samples and the uid range)."""
        if not self.train:
            return "data.train: required (a prepared directory or a shard spec)"
        if self.num_workers < 0:
            return f"data.num_workers: must be >= 0, got {self.num_workers}"
        if self.shuffle_buffer < 0:
            return f"data.shuffle_buffer: must be >= 0 (0 or 1: no shuffling), got {self.shuffle_buffer}"
        if self.cache_decoded and self.augment:
            return "data.cache_decoded: only with data.augment=false (an augmented pair differs every epoch)"
        err = self._validate_resampling()
        if err:
            return err
        err = validate_spec(self.train, name="data.train")
        if err is None and self.val:
            err = validate_spec(self.val, name="data.val")
        if err is None and self.classnames and not os.path.isfile(self.classnames):
            err = f"data.classnames: no such file {self.classnames!r}"
        if err is None:
            try:
                shards = resolve(self.train, "data.train")  # sample count and uid range; cached for the trainer
                if shards.num_samples == 0:
                    err = f"data.train: its {len(shards.shards)} shard(s) hold no samples"
            except SpecError as e:
                err = str(e)
        return err
