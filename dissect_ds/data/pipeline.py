"""Deterministic, exactly resumable streams of decoded batches.

Order contract: the samples a rank sees are a pure function of (seed, stream epoch,
rank, world_size, num_workers, shuffle_buffer). For stream epoch e the shard list is
shuffled with a RNG seeded by (seed, e); rank r takes shards[r::world_size] and its
logical worker w takes that share's [w::num_workers]; a shuffle buffer seeded by
(seed, e, r, w) mixes the raw (undecoded) samples; then samples are decoded, checked
and batched inside the worker. With `resampled`, epoch e of a worker is instead
ceil(num_shards / (world_size * num_workers)) shards drawn with replacement from a RNG
seeded by (seed, e, r, w). Each worker's stream is infinite: it rolls into its next
epoch on its own.

Resume: every batch carries its worker id and that worker's position (epoch, raw
samples taken out of the shuffle buffer in that epoch) after the batch's last sample.
A resumed worker rebuilds its epoch and replays that many raw samples through the
shuffle buffer without decoding them, so the batches that follow are bit-identical.
DataLoader hands out batches from its workers round-robin, starting at worker 0;
worker ids are rotated so that the worker after the last one consumed goes first.

Resume with another layout (world size, workers, shuffle buffer): from every saved
rank's positions the samples already taken in the open stream epochs are replayed on
indices alone (manifest counts and the old buffer's RNG; no tar is read) and marked
*seen*; all new workers start at the earliest open epoch and leave the seen samples out
before their shuffle buffer, so the rest of the interrupted epoch is delivered once, over
the new layout. The seen marks travel in the stream state until those epochs are done.
"""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import json
import logging
import math
import os
import random
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dissect_ds.data.batch import Batch
from dissect_ds.data.config import DataConfig
from dissect_ds.data.shards import IMAGE_EXTS, Shard, ShardSet, read_shard, resolve, split_folder

log = logging.getLogger(__name__)

SKIP_REASONS = ("corrupt_image", "missing_caption", "bad_json", "lost_in_shard")
STATE_VERSION = 1
TEMPLATES_FILE = "zeroshot_classification_templates.txt"  # beside the val split: its zero-shot prompts

Preprocess = Callable[[Image.Image], torch.Tensor]
Tokenizer = Callable[[list[str]], torch.Tensor]
T = TypeVar("T")


def _mix(*parts: int | str) -> int:
    """A stable 63-bit seed from `parts` (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _identity(x: T) -> T:
    return x


def _no_skips() -> dict[str, int]:
    return dict.fromkeys(SKIP_REASONS, 0)


@dataclass
class _Sample:
    image: torch.Tensor
    caption: str
    uid: int
    noisy: bool | None
    label: int | None
    ref_image: torch.Tensor | None = None
    tokens: torch.Tensor | None = None  # the caption's token row, filled in by _Collate


@dataclass
class _Decoder:
    """Raw sample -> _Sample, or the skip reason. With `seed`, the preprocess RNGs
    (torch CPU and `random`) are seeded from (seed, epoch, uid) so random
    augmentation is reproducible; the caller's RNG state is restored afterwards. With
    `draft`, a JPEG is decoded at the smallest of 1/1, 1/2, 1/4, 1/8 scale that keeps
    both sides >= `draft` pixels (PIL's draft mode: the DCT does the downscaling, far
    cheaper than decoding at full size and resizing). With `reference`, the reference
    model's own (deterministic) transform of the same decoded image is kept too. With
    `cache` (a dict, only without `seed`: the transform must draw nothing), each sample
    is decoded once and handed out again, tokens included, whenever its uid comes back."""

    preprocess: Preprocess
    seed: int | None = None
    draft: int | None = None
    reference: Preprocess | None = None
    cache: dict[int, _Sample] | None = None

    def __call__(self, raw: dict[str, bytes], shard: Shard, pos: int, epoch: int) -> _Sample | str:
        meta: Any = {}
        if "json" in raw:
            try:
                meta = json.loads(raw["json"])
            except ValueError:
                return "bad_json"
            if not isinstance(meta, dict):
                return "bad_json"
        if shard.json_uids:
            uid = meta.get("uid")
            if not _is_int(uid) or not 0 <= uid < shard.uid_limit:
                return "bad_json"
            uid += shard.uid_offset
        else:
            uid = shard.uid_base + pos
        if self.cache is not None and uid in self.cache:
            return self.cache[uid]
        noisy, label = meta.get("noisy"), meta.get("label")
        if noisy is not None and not (isinstance(noisy, bool) or noisy in (0, 1)):
            return "bad_json"
        if label is not None and not _is_int(label):
            return "bad_json"
        caption = raw.get("txt", b"").decode("utf-8", errors="replace").strip()
        if not caption:
            return "missing_caption"
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if ext is None:
            return "corrupt_image"
        try:
            with Image.open(io.BytesIO(raw[ext])) as img:
                if self.draft and img.format == "JPEG":
                    img.draft("RGB", (self.draft, self.draft))
                img.load()
                rgb = img.convert("RGB")
        except Exception:  # PIL raises many types for bad bytes
            return "corrupt_image"
        if self.seed is None:
            image = self.preprocess(rgb)
        else:
            image = _seeded(self.preprocess, rgb, _mix(self.seed, epoch, uid))
        sample = _Sample(
            image=image,
            caption=caption,
            uid=uid,
            noisy=None if noisy is None else bool(noisy),
            label=label,
            ref_image=None if self.reference is None else self.reference(rgb),
        )
        if self.cache is not None:
            self.cache[uid] = sample
        return sample


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _seeded(fn: Preprocess, img: Image.Image, seed: int) -> torch.Tensor:
    gen = torch.default_generator
    torch_state, py_state = gen.get_state(), random.getstate()
    gen.manual_seed(seed)
    random.seed(seed)
    try:
        return fn(img)
    finally:
        gen.set_state(torch_state)
        random.setstate(py_state)


@dataclass
class _Collate:
    """Samples -> Batch, captions tokenized in one call (and by the reference's tokenizer
    when the decoder keeps reference images)."""

    tokenizer: Tokenizer
    reference: Tokenizer | None = None

    def __call__(self, samples: list[_Sample]) -> Batch:
        def optional(values: list, dtype: torch.dtype) -> torch.Tensor | None:
            return None if any(v is None for v in values) else torch.tensor(values, dtype=dtype)

        captions = [s.caption for s in samples]
        new = [s for s in samples if s.tokens is None]  # a cached sample keeps its tokens
        if new:
            rows = torch.as_tensor(self.tokenizer([s.caption for s in new])).long()
            for s, row in zip(new, rows):
                s.tokens = row
        ref = samples[0].ref_image is not None and self.reference is not None
        return Batch(
            images=torch.stack([s.image for s in samples]),  # uint8 from the train transform, float from others
            tokens=torch.stack([s.tokens for s in samples]),
            uids=torch.tensor([s.uid for s in samples], dtype=torch.int64),
            noisy=optional([s.noisy for s in samples], torch.bool),
            labels=optional([s.label for s in samples], torch.int64),
            ref_images=torch.stack([s.ref_image for s in samples]) if ref else None,
            ref_tokens=torch.as_tensor(self.reference(captions)).long() if ref else None,
        )


def _shuffled(items: Iterable[T], bufsize: int, rng: random.Random) -> Iterator[T]:
    """Streaming shuffle through a buffer of `bufsize` items (<= 1: unchanged order)."""
    if bufsize <= 1:
        yield from items
        return
    buf: list[T] = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        i = rng.randrange(bufsize)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


LOST = "__lost__"


def _raw_samples(shards: Iterable[Shard]) -> Iterator[tuple[Shard, int, dict[str, bytes]]]:
    """Samples in file order; a shard that ends before its manifest count (truncated, empty)
    is followed by one ``{LOST: n}`` marker, so the loss is counted, not just logged."""
    for shard in shards:
        read = 0
        for pos, raw in enumerate(read_shard(shard.url)):
            read = pos + 1
            yield shard, pos, raw
        if read < shard.size:
            yield shard, read, {LOST: shard.size - read}


def shard_batches(shard: Shard, *, batch_size: int, preprocess: Preprocess, tokenizer: Tokenizer) -> Iterator[Batch]:
    """One shard's usable pairs in file order, in batches of at most ``batch_size`` (for
    scoring a data set once); unusable samples are skipped, as in training."""
    decoder, collate = _Decoder(preprocess), _Collate(tokenizer)
    pending: list[_Sample] = []
    for _, pos, raw in _raw_samples([shard]):
        out = None if LOST in raw else decoder(raw, shard, pos, 0)
        if isinstance(out, _Sample):
            pending.append(out)
        if len(pending) == batch_size:
            yield collate(pending)
            pending = []
    if pending:
        yield collate(pending)


@dataclass(frozen=True)
class _Layout:
    """Everything the sample order depends on, besides the shard set."""

    seed: int
    rank: int
    world_size: int
    num_workers: int  # logical workers, >= 1
    resampled: bool
    shuffle_buffer: int
    source_weights: tuple[float, ...] | None = None  # resampled: a shard's draw weight is its source's
    samples_per_epoch: int | None = None  # resampled: the stream epoch's length over all ranks

    def epoch_shards(self, shards: tuple[Shard, ...], epoch: int, worker: int) -> list[Shard]:
        if self.resampled:
            rng = random.Random(_mix(self.seed, "draw", epoch, self.rank, worker))
            per_worker = self.world_size * self.num_workers
            if self.samples_per_epoch:
                mean_size = max(1.0, sum(s.size for s in shards) / len(shards))
                n = max(1, math.ceil(self.samples_per_epoch / (per_worker * mean_size)))
            else:
                n = max(1, math.ceil(len(shards) / per_worker))
            if self.source_weights is None:
                return [shards[rng.randrange(len(shards))] for _ in range(n)]
            return rng.choices(shards, weights=[self.source_weights[s.source] for s in shards], k=n)
        order = list(range(len(shards)))
        random.Random(_mix(self.seed, "shards", epoch)).shuffle(order)
        mine = order[self.rank :: self.world_size][worker :: self.num_workers]
        return [shards[i] for i in mine]

    def buffer_rng(self, epoch: int, worker: int) -> random.Random:
        return random.Random(_mix(self.seed, "buffer", epoch, self.rank, worker))


@dataclass
class _Position:
    """A worker's place: `consumed` raw samples of stream epoch `epoch` are behind it."""

    epoch: int = 0
    consumed: int = 0
    skips: dict[str, int] = field(default_factory=_no_skips)


class _Seen:
    """Per stream epoch, a bitmap over global sample indices of samples already trained on."""

    def __init__(self, num_samples: int, epochs: dict[int, bytearray] | None = None) -> None:
        self.num_samples, self.epochs = num_samples, epochs or {}

    def has(self, epoch: int, index: int) -> bool:
        bits = self.epochs.get(epoch)
        return bits is not None and bool(bits[index >> 3] >> (index & 7) & 1)

    def add(self, epoch: int, indices: Iterable[int]) -> None:
        bits = self.epochs.setdefault(epoch, bytearray((self.num_samples + 7) // 8))
        for i in indices:
            bits[i >> 3] |= 1 << (i & 7)

    def state(self, from_epoch: int) -> dict[str, str]:
        """The epochs >= ``from_epoch`` as plain data (zlib + base64 strings)."""
        return {
            str(e): base64.b64encode(zlib.compress(bytes(b))).decode()
            for e, b in self.epochs.items()
            if e >= from_epoch
        }

    @classmethod
    def from_state(cls, num_samples: int, state: dict | None) -> _Seen:
        return cls(
            num_samples, {int(e): bytearray(zlib.decompress(base64.b64decode(b))) for e, b in (state or {}).items()}
        )


def _epoch_order(layout: _Layout, shardset: ShardSet, seen: _Seen, epoch: int, worker: int) -> Iterator[int]:
    """Global indices of a worker's stream epoch in the order its shuffle buffer hands them
    out, from the manifest counts alone (what the stream does, without reading a tar)."""
    shards = layout.epoch_shards(shardset.shards, epoch, worker)
    items = (i for s in shards for i in range(s.sample_offset, s.sample_offset + s.size) if not seen.has(epoch, i))
    return _shuffled(items, layout.shuffle_buffer, layout.buffer_rng(epoch, worker))


@dataclass
class _Meta:
    worker: int
    position: _Position


class _TrainIterable(IterableDataset):
    def __init__(
        self,
        shardset: ShardSet,
        layout: _Layout,
        batch_size: int,
        decoder: _Decoder,
        collate: _Collate,
        starts: list[_Position],
        worker_offset: int,
        seen: _Seen,
    ) -> None:
        self.shardset, self.layout, self.batch_size = shardset, layout, batch_size
        self.decoder, self.collate = decoder, collate
        self.starts, self.worker_offset, self.seen = starts, worker_offset, seen

    def __iter__(self) -> Iterator[tuple[Batch, _Meta]]:
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.worker_offset) % self.layout.num_workers
        start = self.starts[worker]
        epoch, skip, skips = start.epoch, start.consumed, dict(start.skips)
        pending: list[_Sample] = []
        while True:
            shards = self.layout.epoch_shards(self.shardset.shards, epoch, worker)
            unseen = (x for x in _raw_samples(shards) if not self.seen.has(epoch, x[0].sample_offset + x[1]))
            raw = _shuffled(unseen, self.layout.shuffle_buffer, self.layout.buffer_rng(epoch, worker))
            consumed = good = 0
            for shard, pos, sample in raw:
                consumed += 1
                if consumed <= skip:  # fast-forward after resume: no decoding
                    continue
                if LOST in sample:
                    skips["lost_in_shard"] += sample[LOST]
                    continue
                out = self.decoder(sample, shard, pos, epoch)
                if isinstance(out, str):
                    skips[out] += 1
                    log.debug("data: skipped %s in %s (%s)", sample["__key__"], shard.url, out)
                    continue
                good += 1
                pending.append(out)
                if len(pending) == self.batch_size:
                    pos_after = _Position(epoch, consumed, dict(skips))
                    yield self.collate(pending), _Meta(worker, pos_after)
                    pending = []
            if good == 0 and skip == 0 and consumed > 0:
                raise RuntimeError(
                    f"data: rank {self.layout.rank} worker {worker} found no usable sample in "
                    f"stream epoch {epoch} ({len(shards)} shards; skipped so far: {skips})"
                )
            epoch, skip = epoch + 1, 0


class TrainStream:
    """An infinite stream of this rank's batches of exactly `batch_size` pairs.

    Iterating (again) continues from the position after the last batch handed out.
    `state_dict()` is that position (per-rank: save every rank's); pass it as `state`
    to :func:`build_train_stream` to continue bit-identically.
    """

    def __init__(
        self,
        shardset: ShardSet,
        layout: _Layout,
        *,
        batch_size: int,
        decoder: _Decoder,
        collate: _Collate,
        loader_workers: int,
        positions: list[_Position],
        next_worker: int,
        seen: _Seen,
    ) -> None:
        self._seen = seen
        self.num_samples = shardset.num_samples
        self.num_uids = shardset.num_uids
        self._shardset, self._layout = shardset, layout
        self._batch_size, self._decoder, self._collate = batch_size, decoder, collate
        self._loader_workers = loader_workers
        self._positions, self._next_worker = positions, next_worker

    def __iter__(self) -> Iterator[Batch]:
        dataset = _TrainIterable(
            self._shardset,
            self._layout,
            self._batch_size,
            self._decoder,
            self._collate,
            starts=[_Position(p.epoch, p.consumed, dict(p.skips)) for p in self._positions],
            worker_offset=self._next_worker,
            seen=self._seen,
        )
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self._loader_workers,
            collate_fn=_identity,
            pin_memory=torch.cuda.is_available(),
            # Its own generator: creating the loader must not draw from the global RNG.
            generator=torch.Generator().manual_seed(self._layout.seed),
        )
        for batch, meta in loader:
            self._positions[meta.worker] = meta.position
            self._next_worker = (meta.worker + 1) % self._layout.num_workers
            yield batch

    def state_dict(self) -> dict:
        """Position after the last batch handed out (not what workers prefetched)."""
        return {
            "version": STATE_VERSION,
            "rank": self._layout.rank,
            **_layout_state(self._layout),
            "fingerprint": self._shardset.fingerprint(),
            "positions": [[p.epoch, p.consumed] for p in self._positions],
            "skips": [dict(p.skips) for p in self._positions],
            "next_worker": self._next_worker,
            "seen": self._seen.state(min(p.epoch for p in self._positions)),
        }

    def skip_counts(self) -> dict[str, int]:
        """Samples skipped on this rank so far (up to the last batch handed out), by reason."""
        total = _no_skips()
        for p in self._positions:
            for k, v in p.skips.items():
                total[k] = total.get(k, 0) + v
        return total


def _layout_state(lay: _Layout) -> dict:
    """What the sample order depends on, as plain data (the stream state's layout keys)."""
    return {
        "seed": lay.seed,
        "world_size": lay.world_size,
        "num_workers": lay.num_workers,
        "resampled": lay.resampled,
        "shuffle_buffer": lay.shuffle_buffer,
        "source_weights": list(lay.source_weights) if lay.source_weights else None,
        "samples_per_epoch": lay.samples_per_epoch,
    }


def _restore(states: list[dict], layout: _Layout, shardset: ShardSet) -> tuple[list[_Position], int, _Seen]:
    """Worker positions, next worker and seen marks from the saved states of every rank (or
    of this rank alone): exact with the same layout and data; with another layout, the
    rest of the open stream epochs (see the module docstring); else (other data, a
    resampled stream, or not every rank's state) from the stream epoch after the furthest
    saved one."""
    now = _layout_state(layout)
    first = states[0]
    saved = {k: first.get(k) for k in now}
    same_data = first.get("fingerprint") == shardset.fingerprint()
    version_ok = all(s.get("version") == STATE_VERSION for s in states)
    if version_ok and saved == now and same_data:
        mine = [s for s in states if s.get("rank") == layout.rank]
        if not mine:
            raise ValueError(f"data: rank {layout.rank} was given the stream state of rank {first.get('rank')}")
        state = mine[0]
        positions = [
            _Position(e, c, {**_no_skips(), **s}) for (e, c), s in zip(state["positions"], state["skips"], strict=True)
        ]
        seen = _Seen.from_state(shardset.num_samples, state.get("seen"))
        return positions, int(state["next_worker"]) % layout.num_workers, seen
    changed = {k: f"{saved[k]}->{now[k]}" for k in now if saved[k] != now[k]}
    if not same_data:
        changed["data"] = f"{first.get('fingerprint')}->{shardset.fingerprint()}"
    ranks = sorted(s.get("rank") for s in states)
    whole = ranks == list(range(int(first.get("world_size") or 0)))
    if (
        version_ok
        and same_data
        and whole
        and not saved["resampled"]
        and not now["resampled"]
        and saved["seed"] == now["seed"]
    ):
        positions, seen = _continue(states, shardset, layout)
        log.info(
            "data: stream layout changed (%s); continuing stream epoch %d without the %d samples already taken",
            ", ".join(f"{k} {v}" for k, v in changed.items()),
            positions[0].epoch,
            sum(bin(b).count("1") for b in seen.epochs.get(positions[0].epoch, b"")),
        )
        return positions, 0, seen
    epoch = 1 + max((int(p[0]) for s in states for p in s.get("positions", [])), default=-1)
    log.warning(
        "data: saved stream state does not match this run (%s); starting at stream epoch %d, "
        "so the rest of the interrupted epoch is not replayed",
        ", ".join(f"{k} {v}" for k, v in changed.items()),
        epoch,
    )
    return _fresh_positions(states, layout, epoch), 0, _Seen(shardset.num_samples)


def _fresh_positions(states: list[dict], layout: _Layout, epoch: int) -> list[_Position]:
    """Every worker at the start of ``epoch``; the saved skip counts kept (on rank 0's
    first worker when every rank's state was given, so the global totals stay right)."""
    positions = [_Position(epoch, 0) for _ in range(layout.num_workers)]
    if len(states) > 1 and layout.rank != 0:
        return positions
    for state in states:
        for s in state.get("skips", []):
            for k, v in s.items():
                positions[0].skips[k] = positions[0].skips.get(k, 0) + int(v)
    return positions


def _continue(states: list[dict], shardset: ShardSet, layout: _Layout) -> tuple[list[_Position], _Seen]:
    """New-layout positions at the earliest open stream epoch, and the samples the saved
    workers had taken in every open epoch marked seen (a worker past an epoch took all of
    its share)."""
    first = states[0]
    seen = _Seen.from_state(shardset.num_samples, first.get("seen"))  # the same on every rank
    old = [
        (
            _Layout(
                first["seed"], s["rank"], first["world_size"], first["num_workers"], False, first["shuffle_buffer"]
            ),
            w,
            e,
            c,
        )
        for s in states
        for w, (e, c) in enumerate(s["positions"])
    ]
    start = min(e for _, _, e, _ in old)
    for epoch in range(start, max(e for _, _, e, _ in old) + 1):
        taken = []
        for lay, w, e, c in old:
            if e >= epoch:
                order = _epoch_order(lay, shardset, seen, epoch, w)
                taken.extend(order if e > epoch else itertools.islice(order, c))
        seen.add(epoch, taken)
    return _fresh_positions(states, layout, start), seen


def build_train_stream(
    cfg: DataConfig,
    *,
    seed: int,
    rank: int,
    world_size: int,
    batch_size: int,
    preprocess: Preprocess,
    tokenizer: Tokenizer,
    state: dict | list[dict] | None = None,
    draft_size: int | None = None,
    reference: tuple[Preprocess, Tokenizer] | None = None,
) -> TrainStream:
    """This rank's infinite training stream of `batch_size`-pair batches.

    `state`: this rank's saved ``state_dict()``, or every saved rank's (a resume at
    another world size continues the open epoch). `draft_size`: the largest input side of
    the models fed; JPEGs are decoded at the smallest DCT scale that keeps them at least
    that large. `reference`: a reference model's (transform, tokenizer), when it cannot
    score the learner's inputs; batches then carry its view too (``ref_images``,
    ``ref_tokens``).

    Raises ValueError (one line) if the spec is unusable or, without `resampled`, the
    rank gets no shard. Without `resampled`, a rank with fewer shards than
    `num_workers` uses one worker per shard.
    """
    shardset = resolve(cfg.train, "data.train")
    n = len(shardset.shards)
    workers = max(1, cfg.num_workers)
    if not cfg.resampled:
        mine = len(range(rank, n, world_size))
        if mine == 0:
            raise ValueError(
                f"data.train: rank {rank} of {world_size} gets no shard ({n} shards); write "
                f"at least {world_size} shards (prepare --shard-size smaller) or set "
                f"data.resampled=true"
            )
        if workers > mine:
            log.warning(
                "data: rank %d has %d shard(s) per stream epoch; using %d DataLoader worker(s) instead of %d",
                rank,
                mine,
                mine,
                workers,
            )
            workers = mine
    layout = _Layout(
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=workers,
        resampled=cfg.resampled,
        shuffle_buffer=cfg.shuffle_buffer,
        source_weights=cfg.weights(),
        samples_per_epoch=cfg.samples_per_epoch,
    )
    if state:
        positions, next_worker, seen = _restore(state if isinstance(state, list) else [state], layout, shardset)
    else:
        positions, next_worker, seen = [_Position() for _ in range(workers)], 0, _Seen(shardset.num_samples)
    return TrainStream(
        shardset,
        layout,
        batch_size=batch_size,
        # Without augmentation the transform draws nothing: no RNG to seed per sample.
        decoder=_Decoder(
            preprocess,
            seed if cfg.augment else None,
            draft_size,
            reference[0] if reference else None,
            cache={} if cfg.cache_decoded else None,
        ),
        collate=_Collate(tokenizer, reference[1] if reference else None),
        loader_workers=0 if cfg.num_workers == 0 else workers,
        positions=positions,
        next_worker=next_worker,
        seen=seen,
    )


class _ValIterable(IterableDataset):
    def __init__(
        self,
        shardset: ShardSet,
        rank: int,
        world_size: int,
        batch_size: int,
        decoder: _Decoder,
        collate: _Collate,
        num_workers: int,
    ) -> None:
        self.shardset, self.rank, self.world_size = shardset, rank, world_size
        self.batch_size, self.decoder, self.collate = batch_size, decoder, collate
        self.num_workers = num_workers

    def __iter__(self) -> Iterator[tuple[Batch | None, dict[str, int]]]:
        info = get_worker_info()
        worker = info.id if info else 0
        skips = _no_skips()
        pending: list[_Sample] = []
        for shard, pos, raw in _raw_samples(self.shardset.shards[worker :: self.num_workers]):
            if (shard.sample_offset + pos) % self.world_size != self.rank:
                continue
            if LOST in raw:
                skips["lost_in_shard"] += raw[LOST]
                continue
            out = self.decoder(raw, shard, pos, 0)
            if isinstance(out, str):
                skips[out] += 1
                continue
            pending.append(out)
            if len(pending) == self.batch_size:
                yield self.collate(pending), {}
                pending = []
        yield (self.collate(pending) if pending else None), skips


def iter_val(
    cfg: DataConfig,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    preprocess: Preprocess,
    tokenizer: Tokenizer,
) -> Iterator[Batch]:
    """This rank's share of the val set, each sample once over all ranks.

    Sample i (shards in spec order, then position) goes to rank i % world_size.
    Batches hold at most `batch_size` pairs; ranks may get different batch counts.
    """
    if not cfg.val:
        raise ValueError("data.val: not set")
    shardset = resolve(cfg.val, "data.val")
    workers = min(cfg.num_workers, len(shardset.shards))
    dataset = _ValIterable(
        shardset,
        rank,
        world_size,
        batch_size,
        _Decoder(preprocess),
        _Collate(tokenizer),
        num_workers=max(1, workers),
    )
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        collate_fn=_identity,
        generator=torch.Generator().manual_seed(0),
    )
    skipped = _no_skips()
    for batch, skips in loader:
        for k, v in skips.items():
            skipped[k] += v
        if batch is not None:
            yield batch
    if any(skipped.values()):
        log.warning("data: rank %d skipped val samples: %s", rank, skipped)


def _beside_val(cfg: DataConfig, fname: str) -> str | None:
    """``fname`` in the val directory or its parent, if there is one."""
    folder = split_folder(cfg.val) if cfg.val else None
    if folder is None:
        return None
    return next((c for c in (f"{folder}/{fname}", f"{folder}/../{fname}") if os.path.isfile(c)), None)


def _lines(path: str | None) -> list[str] | None:
    if path is None:
        return None
    with open(path) as f:
        return [line.strip() for line in f if line.strip()] or None


def read_classnames(cfg: DataConfig) -> list[str] | None:
    """Class names, one per line, from `cfg.classnames` or else ``classnames.txt`` in
    the val directory or its parent; None if there is none."""
    return _lines(cfg.classnames or _beside_val(cfg, "classnames.txt"))


def read_templates(cfg: DataConfig) -> list[str] | None:
    """Zero-shot prompts, one per line with ``{c}`` (or ``{}``) for the class name, from
    ``zeroshot_classification_templates.txt`` (clip_benchmark's name) in the val
    directory or its parent; None if there is none."""
    return _lines(_beside_val(cfg, TEMPLATES_FILE))
