"""Writing webdataset shards with the manifest the readers expect."""

from __future__ import annotations

import json
import os
import re
from types import TracebackType

import webdataset as wds

from dissect_ds.data.shards import IMAGE_EXTS, INFO_FILE, SIZES_FILE

_SHARD_NAME = re.compile(r"^\d{6}\.tar$")


def clear_split(out_dir: str) -> None:
    """Remove what a previous ShardWriter left in `out_dir` (its shards and manifest
    only; other files are kept)."""
    if not os.path.isdir(out_dir):
        return
    for name in os.listdir(out_dir):
        if _SHARD_NAME.match(name) or name in (SIZES_FILE, INFO_FILE):
            os.remove(os.path.join(out_dir, name))


def write_manifest(out_dir: str, sizes: dict[str, int], info: dict | None = None) -> None:
    """Write ``sizes.json`` ({shard name: sample count}) and, if given, ``info.json``."""
    with open(os.path.join(out_dir, SIZES_FILE), "w") as f:
        json.dump(sizes, f, indent=1, sort_keys=True)
    if info is not None:
        with open(os.path.join(out_dir, INFO_FILE), "w") as f:
            json.dump(info, f, indent=1, sort_keys=True)


class ShardWriter:
    """Writes pairs to ``out_dir/000000.tar``, ``000001.tar``, ... with at most
    `shard_size` pairs each; a clean close adds ``sizes.json`` and ``info.json``
    (num_samples, num_uids = largest uid + 1). Closing after an exception writes no
    manifest, so a half-written split is not mistaken for a complete one.

    Sample key = the zero-padded uid, so keys are unique across shards. Tars are
    byte-reproducible (fixed mtime).
    """

    def __init__(self, out_dir: str, shard_size: int = 1000, extra_info: dict | None = None):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.shard_size, self.extra_info = out_dir, shard_size, extra_info or {}
        self.sizes: dict[str, int] = {}
        self.num_samples = 0
        self._max_uid = -1
        self._seen = bytearray()  # one bit per uid
        self._tar: wds.TarWriter | None = None
        self._name = ""

    def write(
        self,
        *,
        uid: int,
        image: bytes,
        image_ext: str,
        caption: str,
        meta: dict | None = None,
    ) -> None:
        """Add one pair; its JSON is ``{"uid": uid, **meta}``."""
        if image_ext not in IMAGE_EXTS:
            raise ValueError(f"image_ext must be one of {IMAGE_EXTS}, got {image_ext!r}")
        if uid < 0:
            raise ValueError(f"uid must be >= 0, got {uid}")
        # Two pairs with one uid would share one selection-history slot: refuse the second.
        if uid >= len(self._seen) * 8:
            self._seen.extend(bytes(max(uid // 8 + 1 - len(self._seen), len(self._seen))))
        if self._seen[uid // 8] & (1 << (uid % 8)):
            raise ValueError(f"uid {uid} written twice (uids must be unique over the data set)")
        self._seen[uid // 8] |= 1 << (uid % 8)
        if self._tar is None or self.sizes[self._name] >= self.shard_size:
            self._open_next()
        assert self._tar is not None
        self._tar.write(
            {
                "__key__": f"{uid:09d}",
                image_ext: image,
                "txt": caption.encode("utf-8"),
                "json": json.dumps({"uid": uid, **(meta or {})}).encode("utf-8"),
            }
        )
        self.sizes[self._name] += 1
        self.num_samples += 1
        self._max_uid = max(self._max_uid, uid)

    def _open_next(self) -> None:
        if self._tar is not None:
            self._tar.close()
        self._name = f"{len(self.sizes):06d}.tar"
        self.sizes[self._name] = 0
        self._tar = wds.TarWriter(os.path.join(self.out_dir, self._name), encoder=False, mtime=0)

    def close(self, write_manifest_files: bool = True) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        if write_manifest_files:
            info = {
                "num_samples": self.num_samples,
                "num_uids": self._max_uid + 1,
                "uids": "json",
                **self.extra_info,
            }
            write_manifest(self.out_dir, self.sizes, info)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(write_manifest_files=exc_type is None)
