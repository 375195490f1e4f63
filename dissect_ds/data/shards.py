"""Shard specs, manifests and sample ids.

A spec is one or more sources joined with ``::``; a source is a split directory
(``*.tar`` plus ``sizes.json``) or a brace-expanded shard pattern. Shards are put
in sorted order within a source, so sample ids and positions do not depend on how the
pattern is written.

Manifest files beside the shards (what :mod:`dissect_ds.data.writer` writes):
- ``sizes.json``: ``{"000000.tar": count, ...}`` (the open_clip convention).
- ``info.json`` (optional): ``{"num_samples", "num_uids", "uids": "json"|"derived"}``.

Sample ids: when a source's JSONs carry ``uid`` they are used, plus the number of ids
of the sources before it (so joined sources never collide); otherwise (img2dataset
style) uid = offset of the shard within its source (from the counts) + position in the
shard, plus the same source offset: dense 0..N-1 and stable.
"""

from __future__ import annotations

import collections
import functools
import glob
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import braceexpand
import webdataset as wds
from webdataset.tariterators import base_plus_ext, tar_file_iterator

log = logging.getLogger(__name__)

SIZES_FILE = "sizes.json"
INFO_FILE = "info.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_PEEK_SAMPLES = 16
# Largest uid range per sample accepted: sparse uids (a filtered data set) are fine, a hash or
# a timestamp used as uid would make the history allocate far more than the data set needs.
MAX_UID_SPREAD = 4
_DENSE_FIX = (
    "write dense uids 0..N-1 (python -m dissect_ds.prepare does), or drop 'uid' from the JSON to derive them "
    "from shard order"
)


class SpecError(ValueError):
    """A data spec that cannot be used; the message is one line naming the config key."""


@dataclass(frozen=True)
class Shard:
    """One tar. Derived ids: uid = uid_base + position. JSON ids: uid = uid_offset +
    json uid, valid when 0 <= json uid < uid_limit."""

    url: str
    size: int
    sample_offset: int  # index of its first sample over the whole spec
    json_uids: bool
    uid_base: int
    uid_offset: int
    uid_limit: int
    source: int = 0  # index of its ``::`` source in the spec


@dataclass(frozen=True)
class ShardSet:
    """The resolved spec: shards in a fixed order, sample and id counts."""

    spec: str
    shards: tuple[Shard, ...]
    num_samples: int
    num_uids: int

    def fingerprint(self) -> list[int]:
        return [len(self.shards), self.num_samples, self.num_uids]


def _is_remote(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def read_shard(url: str) -> Iterator[dict[str, bytes]]:
    """Yield the samples of one tar in file order as {ext: bytes} (``__key__`` too).

    A read error ends the shard with a warning instead of failing the run: positions
    stay a function of the file, so a shard that is truncated stays truncated.
    """
    current: dict | None = None
    try:
        with wds.gopen(url, "rb") as stream:
            for f in tar_file_iterator(stream):
                key, ext = base_plus_ext(f["fname"])
                if key is None:
                    continue
                if current is None or key != current["__key__"]:
                    if current is not None:
                        yield current
                    current = {"__key__": key}
                current[ext.lower()] = f["data"]
    except Exception as exn:  # any read error: a damaged or cut tar
        log.warning("data: cannot read past %s in %s (%s)", current and current["__key__"], url, exn)
        return
    if current is not None:
        yield current


def _count(url: str) -> int:
    return sum(1 for _ in read_shard(url))


def _json_uid(sample: dict[str, bytes]) -> int | None:
    try:
        uid = json.loads(sample["json"]).get("uid")
    except (KeyError, ValueError, AttributeError, TypeError):
        return None
    return uid if isinstance(uid, int) and not isinstance(uid, bool) else None


def _source_files(part: str) -> tuple[list[str], str | None]:
    """Shard urls of one source (sorted) and the folder where its manifest would be."""
    if _is_remote(part):
        return sorted(set(braceexpand.braceexpand(part))), None
    if os.path.isdir(part):
        sizes = os.path.join(part, SIZES_FILE)
        if os.path.isfile(sizes):
            names = _load_json(sizes)
            if not isinstance(names, dict):
                raise SpecError(f"{sizes} is not a {{shard: count}} object")
            urls = sorted(os.path.join(part, n) for n in names)
        else:
            urls = sorted(glob.glob(os.path.join(part, "*.tar")))
        if not urls:
            hint = [s for s in ("train", "val") if os.path.isdir(os.path.join(part, s))]
            more = f"; did you mean {os.path.join(part, hint[0])!r}?" if hint else ""
            raise SpecError(f"no *.tar in directory {part!r}{more}")
        missing = [u for u in urls if not os.path.isfile(u)]
        if missing:
            raise SpecError(f"{len(missing)} shard(s) listed in {sizes} are missing, first: {missing[0]!r}")
        return urls, part
    urls = sorted(set(braceexpand.braceexpand(part)))
    missing = [u for u in urls if not os.path.isfile(u)]
    if len(missing) == len(urls):
        raise SpecError(f"no shards match {part!r}")
    if missing:
        raise SpecError(f"{len(missing)} of {len(urls)} shards of {part!r} are missing, first: {missing[0]!r}")
    return urls, os.path.dirname(urls[0])


def _load_json(path: str) -> object:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exn:
        raise SpecError(f"cannot parse {path} ({exn})") from None


def _parts(spec: str | None) -> list[str]:
    parts = [p.strip() for p in (spec or "").split("::") if p.strip()]
    if not parts:
        raise SpecError("empty data spec")
    return parts


def validate_spec(spec: str, name: str | None = None) -> str | None:
    """None if `spec` looks usable, else a one-line error, prefixed with ``name: `` if
    given (e.g. "data.train: no shards match 'x/{0..3}.tar'").

    Cheap: checks that shards exist and manifests parse; reads no tar.
    """
    try:
        for part in _parts(spec):
            _, folder = _source_files(part)
            if folder is not None:
                _manifests(folder)
    except SpecError as exn:
        return f"{name}: {exn}" if name else str(exn)
    return None


def _manifests(folder: str) -> tuple[dict, dict]:
    """The parsed sizes.json and info.json of `folder` ({} where absent)."""
    out: list[dict] = []
    for fname in (SIZES_FILE, INFO_FILE):
        path = os.path.join(folder, fname)
        loaded = _load_json(path) if os.path.isfile(path) else {}
        if not isinstance(loaded, dict):
            raise SpecError(f"{path} is not a JSON object")
        out.append(loaded)
    return out[0], out[1]


def resolve(spec: str, name: str = "data") -> ShardSet:
    """Resolve `spec` into shards with counts and id ranges; raises SpecError whose
    message starts with `name`.

    Tars without a manifest entry are counted by reading them (logged).
    """
    try:
        return _resolve(spec)
    except SpecError as exn:
        raise SpecError(f"{name}: {exn}") from None


@functools.lru_cache(maxsize=8)  # config validation and the trainer resolve the same spec in one process
def _resolve(spec: str) -> ShardSet:
    shards: list[Shard] = []
    num_samples = 0
    num_uids = 0
    for source, part in enumerate(_parts(spec)):
        urls, folder = _source_files(part)
        sizes, info = _manifests(folder) if folder is not None else ({}, {})
        unknown = [u for u in urls if not isinstance(sizes.get(os.path.basename(u)), int)]
        if unknown:
            log.info(
                "data: %d shard(s) of %r have no entry in %s; counting their samples by reading them",
                len(unknown),
                part,
                SIZES_FILE,
            )
        counts = [sizes[os.path.basename(u)] if u not in unknown else _count(u) for u in urls]
        if info.get("uids") in ("json", "derived"):
            json_uids = info["uids"] == "json"
        else:
            json_uids = any(_json_uid(s) is not None for _, s in zip(range(_PEEK_SAMPLES), read_shard(urls[0])))
        if not json_uids:
            source_uids = sum(counts)
        elif isinstance(info.get("num_uids"), int):
            source_uids = info["num_uids"]
        else:
            log.info("data: no %s for %r; reading all shards for the largest uid", INFO_FILE, part)
            uids = [u for url in urls for s in read_shard(url) if (u := _json_uid(s)) is not None]
            if len(set(uids)) < len(uids):
                dup = next(u for u, n in collections.Counter(uids).items() if n > 1)
                raise SpecError(f"uid {dup} occurs more than once in {part!r}: {_DENSE_FIX}")
            source_uids = 1 + max(uids, default=-1)
        if json_uids and source_uids < sum(counts):
            raise SpecError(
                f"{part!r} holds {sum(counts):,} samples but its uids span only {source_uids:,} values, so some "
                f"pairs share a uid (and would share one history slot): {_DENSE_FIX}"
            )
        if json_uids and source_uids > MAX_UID_SPREAD * sum(counts) + 1024:
            raise SpecError(
                f"the uids of {part!r} reach {source_uids - 1:,} for {sum(counts):,} samples, and the selection "
                f"history keeps a slot per uid up to the largest: {_DENSE_FIX}"
            )
        within = 0
        for url, count in zip(urls, counts):
            shards.append(
                Shard(
                    url=url,
                    size=count,
                    sample_offset=num_samples,
                    json_uids=json_uids,
                    uid_base=num_uids + within,
                    uid_offset=num_uids,
                    uid_limit=source_uids,
                    source=source,
                )
            )
            within += count
            num_samples += count
        num_uids += source_uids
    return ShardSet(spec=spec, shards=tuple(shards), num_samples=num_samples, num_uids=num_uids)


def dataset_size(spec: str) -> tuple[int, int]:
    """(num_samples, num_uids) of `spec`; num_uids = largest uid + 1."""
    s = resolve(spec)
    return s.num_samples, s.num_uids


def split_folder(spec: str) -> str | None:
    """The local folder of the first source of `spec` (None for remote shards)."""
    part = _parts(spec)[0]
    if _is_remote(part):
        return None
    if os.path.isdir(part):
        return part
    first = sorted(braceexpand.braceexpand(part))[0]
    return os.path.dirname(first) or "."
