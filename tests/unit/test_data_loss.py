"""Data that would silently lose or merge pairs is counted or refused."""

from __future__ import annotations

import io
import json
import tarfile
from itertools import islice
from pathlib import Path

import open_clip
import pytest
import torchvision.transforms as T
from PIL import Image

from dissect_ds import config as C
from dissect_ds.data import DataConfig, ShardWriter, build_train_stream
from dissect_ds.data.shards import read_shard

TOKENIZER = open_clip.get_tokenizer("RN50")
PLAIN = T.Compose([T.Resize((8, 8)), T.ToTensor()])


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _write(root: Path, shards: int = 2, per_shard: int = 20) -> None:
    with ShardWriter(str(root), shard_size=per_shard) as w:
        for uid in range(shards * per_shard):
            w.write(uid=uid, image=_png(), image_ext="png", caption=f"pair {uid}")


def test_a_truncated_and_an_empty_shard_are_counted_as_lost(tmp_path):
    root = tmp_path / "d"
    _write(root, shards=3)
    whole = (root / "000000.tar").read_bytes()
    (root / "000000.tar").write_bytes(whole[: len(whole) // 2])  # cut mid-sample
    with tarfile.open(root / "000001.tar", "w"):
        pass  # empty
    readable = sum(1 for url in sorted(root.glob("*.tar")) for _ in read_shard(str(url)))
    per_epoch = 60 - readable
    assert 20 < per_epoch < 60
    cfg = DataConfig(train=str(root), num_workers=0, shuffle_buffer=1)
    stream = build_train_stream(cfg, seed=0, rank=0, world_size=1, batch_size=5, preprocess=PLAIN, tokenizer=TOKENIZER)
    list(islice(stream, 2 * readable // 5 + 1))  # into the third stream epoch: two epochs' losses passed
    lost = stream.skip_counts()["lost_in_shard"]
    assert 2 * per_epoch <= lost <= 3 * per_epoch


DEBUG = str(Path(__file__).resolve().parents[2] / "configs/debug.yaml")


def _raw_shard(path: Path, uids: list[int]) -> None:
    """A tar with one pair per uid and no manifest beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i, uid in enumerate(uids):
            for ext, data in (("png", _png()), ("txt", b"x"), ("json", json.dumps({"uid": uid}).encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_a_huge_uid_is_refused_before_start(tmp_path):
    _raw_shard(tmp_path / "huge" / "000000.tar", [0, 1, 10**12])
    with pytest.raises(C.ConfigError, match="dense uids") as e:
        C.load(DEBUG, [f"data.train={tmp_path / 'huge'}", "data.val=null"])
    assert "\n" not in str(e.value) and "1,000,000,000,000" in str(e.value)


def test_a_uid_in_two_shards_is_refused_before_start(tmp_path):
    # No manifest: the shards are read, and the repeated uid is named.
    _raw_shard(tmp_path / "raw" / "000000.tar", [0, 1, 2])
    _raw_shard(tmp_path / "raw" / "000001.tar", [3, 1, 4])
    with pytest.raises(C.ConfigError, match="uid 1 occurs more than once") as e:
        C.load(DEBUG, [f"data.train={tmp_path / 'raw'}", "data.val=null"])
    assert "\n" not in str(e.value)
    # Manifests that count more samples than their uids span: some pairs must share a uid.
    _write(tmp_path / "a", shards=1)
    _write(tmp_path / "b", shards=1)
    (tmp_path / "b" / "000000.tar").rename(tmp_path / "a" / "000001.tar")
    sizes = json.loads((tmp_path / "a" / "sizes.json").read_text())
    (tmp_path / "a" / "sizes.json").write_text(json.dumps({**sizes, "000001.tar": 20}))
    with pytest.raises(C.ConfigError, match="40 samples but its uids span only 20") as e:
        C.load(DEBUG, [f"data.train={tmp_path / 'a'}", "data.val=null"])


def test_a_duplicate_uid_is_refused_when_writing(tmp_path):
    with pytest.raises(ValueError, match="uid 7 written twice"):
        with ShardWriter(str(tmp_path / "dup"), shard_size=4) as w:
            for uid in [*range(10), 7]:
                w.write(uid=uid, image=_png(), image_ext="png", caption="x")
    assert not (tmp_path / "dup" / "sizes.json").exists()  # no manifest for a failed write


def test_shards_that_are_all_empty_are_refused_before_start(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    for i in range(2):
        with tarfile.open(root / f"{i:06d}.tar", "w"):
            pass
    with pytest.raises(C.ConfigError, match="hold no samples"):
        C.load(DEBUG, [f"data.train={root}", "data.val=null"])
