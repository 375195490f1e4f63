"""Data layer: shards and ids, deterministic and exactly resumable streams, val
coverage, bad-data handling, the shard writers (synthetic, csv)."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections import Counter
from itertools import islice
from pathlib import Path

import open_clip
import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision import transforms as T

from dissect_ds import prepare
from dissect_ds.data import (
    Batch,
    DataConfig,
    SpecError,
    build_train_stream,
    dataset_size,
    iter_val,
    read_classnames,
    validate_spec,
)
from dissect_ds.data.shards import read_shard
from dissect_ds.data.synthetic import MAX_VAL, RARE, check_val_captions, classnames, write_synthetic

TOKENIZER = open_clip.get_tokenizer("RN50")
# Random augmentation on purpose: resume must reproduce it bit for bit.
AUGMENT = T.Compose([T.RandomResizedCrop(16, scale=(0.5, 1.0)), T.ToTensor()])
PLAIN = T.Compose([T.Resize((8, 8)), T.ToTensor()])
N_TRAIN, N_VAL, SHARD = 240, 60, 30


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    argv = ["synthetic", "--num-samples", str(N_TRAIN), "--noise-rate", "0.25", "--seed", "3"]
    argv += ["--output", str(out), "--val-samples", str(N_VAL), "--image-size", "16"]
    assert prepare.main([*argv, "--shard-size", str(SHARD)]) == 0
    return out


def _cfg(synth: Path, **kw) -> DataConfig:
    return DataConfig(train=str(synth / "train"), val=str(synth / "val"), **kw)


def _stream(cfg: DataConfig, seed: int = 0, rank: int = 0, world: int = 1, bs: int = 16, **kw):
    return build_train_stream(
        cfg,
        seed=seed,
        rank=rank,
        world_size=world,
        batch_size=bs,
        preprocess=kw.pop("preprocess", AUGMENT),
        tokenizer=TOKENIZER,
        **kw,
    )


def _val(cfg: DataConfig, rank: int = 0, world: int = 1, bs: int = 16, pre=AUGMENT) -> list[Batch]:
    return list(iter_val(cfg, rank=rank, world_size=world, batch_size=bs, preprocess=pre, tokenizer=TOKENIZER))


def _cat(batches: list[Batch]) -> list[int]:
    return [u for b in batches for u in b.uids.tolist()]


def _png(red: int, size: int = 8, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (red, 0, 0)).save(buf, format=fmt)
    return buf.getvalue()


def _write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    with wds.TarWriter(str(path), encoder=False) as w:
        for s in samples:
            w.write(s)


# --- synthetic set and manifest -------------------------------------------------------


def test_synthetic_writes_manifest_uids_noise_and_labels(synth: Path, tmp_path: Path) -> None:
    sizes = json.loads((synth / "train" / "sizes.json").read_text())
    assert len(sizes) == N_TRAIN // SHARD and sum(sizes.values()) == N_TRAIN
    assert dataset_size(str(synth / "train")) == (N_TRAIN, N_TRAIN)
    assert dataset_size(str(synth / "val")) == (N_VAL, N_VAL)
    names = (synth / "classnames.txt").read_text().split("\n")[:-1]
    assert names == classnames() and len(names) == 48

    raw = [s for name in sorted(sizes) for s in read_shard(str(synth / "train" / name))]
    metas = [json.loads(s["json"]) for s in raw]
    assert sorted(m["uid"] for m in metas) == list(range(N_TRAIN))
    assert sum(m["noisy"] for m in metas) == N_TRAIN // 4
    assert {m["difficulty"] for m in metas} >= {0, 1, 2, 3}
    rare = {names.index(f"{c} {s}") for c, s in RARE}
    assert sum(m["label"] in rare for m in metas) <= 10  # about 1% of train
    # A clean caption names the colour and shape of the labelled object; a noisy one
    # (another image's caption) mostly does not.
    names_label = [all(w in s["txt"].decode() for w in names[m["label"]].split()) for s, m in zip(raw, metas)]
    clean = [ok for ok, m in zip(names_label, metas) if not m["noisy"]]
    noisy = [ok for ok, m in zip(names_label, metas) if m["noisy"]]
    assert all(clean) and sum(noisy) < len(noisy) / 3

    val = [json.loads(s["json"]) for s in read_shard(str(synth / "val" / "000000.tar"))]
    assert not any(m["noisy"] for m in val) and [m["uid"] for m in val] == list(range(SHARD))
    assert sum(m["label"] in rare for m in val) >= 2  # 1/8 of val: rare combinations are tested

    # Same arguments, same bytes.
    again = tmp_path / "again"
    argv = ["synthetic", "--num-samples", str(N_TRAIN), "--noise-rate", "0.25", "--seed", "3"]
    argv += ["--output", str(again), "--val-samples", "0", "--image-size", "16"]
    assert prepare.main([*argv, "--shard-size", str(SHARD)]) == 0
    for name in sizes:
        assert (again / "train" / name).read_bytes() == (synth / "train" / name).read_bytes()
    assert not (again / "val").exists()


def test_synthetic_val_is_balanced_and_every_caption_fits_only_its_image(synth: Path) -> None:
    samples = [s for name in ("000000.tar", "000001.tar") for s in read_shard(str(synth / "val" / name))]
    metas = [json.loads(s["json"]) for s in samples]
    captions = [s["txt"].decode() for s in samples]
    check_val_captions(captions, [m["attrs"] for m in metas])  # raises unless well posed
    counts = torch.bincount(torch.tensor([m["label"] for m in metas]), minlength=48)
    assert int(counts.max() - counts.min()) <= 1  # 60 pairs over 48 classes
    # A caption is true of its own attribute tuple only: swapping two captions breaks that.
    swapped = [captions[1], captions[0], *captions[2:]]
    with pytest.raises(ValueError, match="not true of its image"):
        check_val_captions(swapped, [m["attrs"] for m in metas])
    with pytest.raises(ValueError, match="share"):
        check_val_captions(captions[:2] * 2, [m["attrs"] for m in metas[:2]] * 2)
    with pytest.raises(ValueError, match="val_samples"):
        write_synthetic(str(synth / "unused"), num_samples=1, noise_rate=0.0, seed=0, val_samples=MAX_VAL + 1)


# --- batches and order ----------------------------------------------------------------


def test_batches_have_the_contract_shapes_and_select(synth: Path) -> None:
    b = next(iter(_stream(_cfg(synth, num_workers=0), bs=12)))
    assert b.images.shape == (12, 3, 16, 16) and b.images.dtype == torch.float32
    assert b.tokens.shape == (12, 77) and b.tokens.dtype == torch.int64
    assert b.uids.dtype == torch.int64 and len(set(b.uids.tolist())) == 12
    assert b.noisy is not None and b.noisy.dtype == torch.bool
    assert b.labels is not None and b.labels.dtype == torch.int64
    assert len(b) == 12

    mask = torch.zeros(12, dtype=torch.bool)
    mask[[1, 5, 7]] = True
    sub = b.select(mask)
    assert len(sub) == 3 and torch.equal(sub.uids, b.uids[[1, 5, 7]])
    assert torch.equal(sub.images, b.images[[1, 5, 7]]) and torch.equal(sub.noisy, b.noisy[mask])
    none = Batch(b.images, b.tokens, b.uids).select(torch.tensor([0, 2]))
    assert none.noisy is None and none.labels is None and torch.equal(none.uids, b.uids[[0, 2]])
    moved = b.to("cpu")
    assert moved.images.dtype == b.images.dtype and torch.equal(moved.tokens, b.tokens)
    assert moved.ref_images is None and Batch.cat([sub, sub]).uids.tolist() == sub.uids.tolist() * 2


def test_a_reference_with_other_inputs_gets_its_own_view_of_the_same_pairs(synth: Path) -> None:
    """A reference model of another image size and tokenizer: the workers decode each image
    once and add the reference's (deterministic) view and tokens; selecting rows keeps them
    aligned with the learner's."""
    other = T.Compose([T.Resize((24, 24)), T.PILToTensor()])
    from dissect_ds.model import build_model

    *_, short = build_model("dissect-tiny-vit")  # its tokenizer: context length 32, not 77
    b = next(iter(_stream(_cfg(synth, num_workers=0), bs=12, reference=(other, short))))
    assert b.ref_images.shape == (12, 3, 24, 24) and b.ref_images.dtype == torch.uint8
    assert b.ref_tokens.shape == (12, 32) and torch.equal(b.ref_tokens[:, :8], b.tokens[:, :8])
    samples = {s["json"]["uid"]: s for s in _decoded(synth / "train")}
    for row in (0, 7):
        want = other(samples[int(b.uids[row])]["png"].convert("RGB"))
        assert torch.equal(b.ref_images[row], want)
    view = b.select(torch.tensor([7, 0])).reference_view()
    assert torch.equal(view.images, b.ref_images[[7, 0]]) and torch.equal(view.uids, b.uids[[7, 0]])
    with pytest.raises(ValueError, match="no reference inputs"):
        Batch(b.images, b.tokens, b.uids).reference_view()


def _decoded(split: Path) -> list[dict]:
    import webdataset as wds

    return list(wds.WebDataset(sorted(str(p) for p in split.glob("*.tar")), shardshuffle=False).decode("pil"))


def test_order_is_a_function_of_the_seed(synth: Path) -> None:
    cfg = _cfg(synth, num_workers=0)
    a = list(islice(_stream(cfg, seed=5), 3))
    b = list(islice(_stream(cfg, seed=5), 3))
    c = list(islice(_stream(cfg, seed=6), 3))
    assert _cat(a) == _cat(b)
    assert all(torch.equal(x.images, y.images) for x, y in zip(a, b))
    assert _cat(a) != _cat(c)


def test_stream_leaves_the_global_rng_alone(synth: Path) -> None:
    before = torch.get_rng_state()
    list(islice(_stream(_cfg(synth, num_workers=0)), 2))
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize(
    ("workers", "world", "rank", "resampled", "k"),
    [(0, 1, 0, False, 13), (2, 2, 1, False, 5), (2, 1, 0, True, 5)],
)
def test_resume_is_bit_exact(synth: Path, workers: int, world: int, rank: int, resampled: bool, k: int) -> None:
    cfg = _cfg(synth, num_workers=workers, shuffle_buffer=50, resampled=resampled)
    m = 6
    full = list(islice(_stream(cfg, rank=rank, world=world), k + m))

    first = _stream(cfg, rank=rank, world=world)
    it = iter(first)
    head = [next(it) for _ in range(k)]  # the workers have prefetched beyond these
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint as plain data
    del it
    resumed = list(islice(_stream(cfg, rank=rank, world=world, state=state), m))
    again = list(islice(first, m))  # iterating the same stream again also continues

    assert _cat(head) == _cat(full[:k])
    for expected, got, got2 in zip(full[k:], resumed, again):
        assert torch.equal(expected.uids, got.uids) and torch.equal(expected.uids, got2.uids)
        assert torch.equal(expected.images, got.images) and torch.equal(expected.images, got2.images)
        assert torch.equal(expected.tokens, got.tokens)
    if not resampled:
        epochs = [p[0] for p in first.state_dict()["positions"]]
        assert max(epochs) >= 1, "the checked span should cross a stream epoch"


@pytest.mark.parametrize("workers", [0, 2])
def test_cached_decoding_gives_the_same_batches_and_decodes_each_pair_once(synth: Path, workers: int) -> None:
    calls = Counter()

    def counted(img: Image.Image) -> torch.Tensor:
        calls[img.tobytes()] += 1
        return PLAIN(img)

    plain = _cfg(synth, num_workers=workers, shuffle_buffer=50, augment=False)
    cached = dataclasses.replace(plain, cache_decoded=True)
    assert cached.validate() is None
    epochs = 3 * N_TRAIN // 16  # three passes over the set
    want = list(islice(_stream(plain, preprocess=PLAIN), epochs))
    got = list(islice(_stream(cached, preprocess=counted), epochs))
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a.uids, b.uids) and torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens)
    if workers == 0:  # in-process: the counter sees every decode (the workers' copies are their own)
        assert sum(calls.values()) == N_TRAIN


def test_ranks_split_each_stream_epoch(synth: Path) -> None:
    cfg = _cfg(synth, num_workers=1, shuffle_buffer=40)
    per_rank = N_TRAIN // 2
    seen = [_cat(list(islice(_stream(cfg, rank=r, world=2), per_rank // 16 + 1)))[:per_rank] for r in (0, 1)]
    assert all(len(set(s)) == per_rank for s in seen)
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(range(N_TRAIN))


def test_layout_change_restarts_at_the_next_stream_epoch(synth: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = _cfg(synth, num_workers=0)
    two = _stream(cfg, rank=0, world=2)
    list(islice(two, 9))  # 144 samples: into epoch 1 of rank 0's 120
    state = two.state_dict()
    assert state["positions"][0][0] == 1
    with pytest.raises(ValueError, match="rank 1 was given the stream state of rank 0"):
        _stream(cfg, rank=1, world=2, state=state)
    with caplog.at_level(logging.WARNING):
        one = _stream(cfg, rank=0, world=1, state=state)
    assert "world_size 2->1" in caplog.text
    list(islice(one, 1))
    assert one.state_dict()["positions"][0][0] == 2


@pytest.mark.parametrize(("old_world", "old_workers", "new_world", "new_workers"), [(2, 2, 1, 1), (2, 1, 3, 2)])
def test_another_layout_continues_the_open_epoch(
    synth: Path, old_world: int, old_workers: int, new_world: int, new_workers: int
) -> None:
    """Resumed at another world size / worker count, the ranks deliver the rest of the
    interrupted stream epoch: with what the old ranks took, every pair once, except for at
    most one batch per new rank that runs into the next epoch."""
    bs = 8
    old = [
        _stream(_cfg(synth, num_workers=old_workers, shuffle_buffer=20), rank=r, world=old_world, bs=bs)
        for r in range(old_world)
    ]
    taken = [u for s in old for u in _cat(list(islice(s, 5)))]
    assert len(set(taken)) == len(taken) == old_world * 5 * bs
    states = json.loads(json.dumps([s.state_dict() for s in old]))
    cfg = _cfg(synth, num_workers=new_workers, shuffle_buffer=20)
    fresh, crossing = [], 0
    for r in range(new_world):
        stream = _stream(cfg, rank=r, world=new_world, bs=bs, state=states)
        done: set[int] = set()  # workers whose batches have reached stream epoch 1
        for batch in stream:
            state = stream.state_dict()
            worker = (state["next_worker"] - 1) % state["num_workers"]  # the one that made this batch
            if worker in done:
                continue
            if state["positions"][worker][0] > 0:
                crossing += 1  # this batch runs into stream epoch 1
                done.add(worker)
                if len(done) == state["num_workers"]:
                    break
                continue
            fresh.extend(batch.uids.tolist())
    assert len(set(fresh)) == len(fresh) and not set(fresh) & set(taken)
    missing = set(range(N_TRAIN)) - set(fresh) - set(taken)
    assert len(missing) <= bs * crossing and crossing <= new_world * new_workers


def test_a_continued_stream_resumes_exactly(synth: Path) -> None:
    old = [_stream(_cfg(synth, num_workers=1, shuffle_buffer=20), rank=r, world=2, bs=8) for r in range(2)]
    for s in old:
        list(islice(s, 4))
    states = json.loads(json.dumps([s.state_dict() for s in old]))
    cfg = _cfg(synth, num_workers=1, shuffle_buffer=20)
    whole = _cat(list(islice(_stream(cfg, rank=1, world=3, bs=8, state=states), 12)))
    first = _stream(cfg, rank=1, world=3, bs=8, state=states)
    head = _cat(list(islice(first, 5)))
    again = json.loads(json.dumps([first.state_dict()]))
    assert again[0]["seen"]  # the seen marks travel until the epoch is done
    assert head + _cat(list(islice(_stream(cfg, rank=1, world=3, bs=8, state=again), 7))) == whole


def test_more_ranks_than_shards_is_a_clear_error(synth: Path) -> None:
    cfg = DataConfig(train=str(synth / "val"), num_workers=2)  # 2 shards
    with pytest.raises(ValueError, match="rank 2 of 3 gets no shard"):
        _stream(cfg, rank=2, world=3)
    # One shard per rank: one worker, however many were asked for.
    assert _stream(cfg, rank=1, world=2).state_dict()["num_workers"] == 1


# --- val ------------------------------------------------------------------------------


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 1), (3, 2)])
def test_iter_val_covers_every_sample_once(synth: Path, world: int, workers: int) -> None:
    cfg = _cfg(synth, num_workers=workers)
    counts: Counter[int] = Counter()
    for rank in range(world):
        uids = _cat(_val(cfg, rank=rank, world=world, bs=7))
        assert all(u % world == rank for u in uids)  # val uid == position in the fixed order
        counts.update(uids)
    assert sorted(counts) == list(range(N_VAL)) and set(counts.values()) == {1}


def test_joined_sources_get_disjoint_uids(synth: Path) -> None:
    spec = f"{synth / 'train'}::{synth / 'val'}"
    assert validate_spec(spec) is None
    assert dataset_size(spec) == (N_TRAIN + N_VAL, N_TRAIN + N_VAL)
    uids = _cat(_val(DataConfig(val=spec, num_workers=0), bs=64))
    assert sorted(uids) == list(range(N_TRAIN + N_VAL))


def test_source_weights_set_how_often_each_source_is_drawn(synth: Path) -> None:
    """Resampled train = train (8 shards of 30) :: val (2 shards of 30) with weights 1::12:
    per shard val is drawn 12x as often, so val pairs make up 12*2 / (8 + 12*2) = 3/4."""
    spec = f"{synth / 'train'}::{synth / 'val'}"
    cfg = DataConfig(train=spec, resampled=True, num_workers=0, shuffle_buffer=1, source_weights="1::12")
    assert cfg.validate() is None
    uids = _cat(list(islice(_stream(cfg, bs=30, preprocess=PLAIN), 400)))
    from_val = sum(u >= N_TRAIN for u in uids) / len(uids)
    assert abs(from_val - 0.75) < 0.05, from_val
    plain = _cat(list(islice(_stream(dataclasses.replace(cfg, source_weights=None), bs=30, preprocess=PLAIN), 400)))
    assert abs(sum(u >= N_TRAIN for u in plain) / len(plain) - 0.2) < 0.05  # 2 of 10 shards
    # Still a pure function of the seed, and exactly resumable.
    first = _stream(cfg, bs=30, preprocess=PLAIN)
    it = iter(first)
    head = [next(it) for _ in range(7)]
    state = json.loads(json.dumps(first.state_dict()))
    assert _cat(head + list(islice(_stream(cfg, bs=30, state=state, preprocess=PLAIN), 5))) == uids[: 12 * 30]


def test_samples_per_epoch_sets_the_resampled_epoch_length(synth: Path) -> None:
    cfg = _cfg(synth, resampled=True, num_workers=0, shuffle_buffer=1, samples_per_epoch=90)
    stream = _stream(cfg, bs=30, world=1)
    list(islice(stream, 3))  # 3 shards of 30 = one epoch of 90 pairs
    assert stream.state_dict()["positions"][0] == [0, 90]
    list(islice(stream, 1))
    assert stream.state_dict()["positions"][0] == [1, 30]
    assert cfg.epoch_samples(N_TRAIN) == 90 and _cfg(synth).epoch_samples(N_TRAIN) == N_TRAIN


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"source_weights": "1::2"}, "only with data.resampled=true"),
        ({"samples_per_epoch": 10}, "only with data.resampled=true"),
        ({"resampled": True, "source_weights": "1::2"}, "2 weight(s) for 1 data.train source(s)"),
        ({"resampled": True, "source_weights": "x"}, "must be numbers joined with '::'"),
        ({"resampled": True, "source_weights": "0"}, "at least one > 0"),
        ({"resampled": True, "samples_per_epoch": 0}, "must be > 0"),
        ({"cache_decoded": True}, "only with data.augment=false"),
    ],
)
def test_resampling_options_are_checked_in_one_line(synth: Path, kw: dict, message: str) -> None:
    err = _cfg(synth, **kw).validate()
    assert err is not None and message in err and "\n" not in err


def test_jpeg_draft_decodes_at_a_reduced_scale_that_still_covers_the_input(tmp_path: Path) -> None:
    from dissect_ds.data.pipeline import _Decoder
    from dissect_ds.data.shards import Shard

    buf = io.BytesIO()
    Image.new("RGB", (400, 300), (200, 30, 30)).save(buf, format="JPEG")
    sizes = []
    decoder = _Decoder(lambda img: sizes.append(img.size) or torch.zeros(1), seed=None, draft=100)
    shard = Shard(url="x", size=2, sample_offset=0, json_uids=False, uid_base=0, uid_offset=0, uid_limit=2)
    assert not isinstance(decoder({"jpg": buf.getvalue(), "txt": b"a"}, shard, 0, 0), str)
    assert not isinstance(decoder({"png": _png(200, size=400), "txt": b"a"}, shard, 1, 0), str)
    assert sizes == [(200, 150), (400, 400)]  # JPEG: 1/2 scale keeps the short side >= 100; PNG: full size


def test_read_classnames_defaults_to_the_val_folder_or_its_parent(synth: Path, tmp_path: Path) -> None:
    assert read_classnames(_cfg(synth)) == classnames()
    spec = str(synth / "val" / "{000000..000001}.tar")
    assert read_classnames(DataConfig(val=spec)) == classnames()
    own = tmp_path / "names.txt"
    own.write_text("cat\ndog\n\n")
    assert read_classnames(DataConfig(val=str(synth / "val"), classnames=str(own))) == ["cat", "dog"]
    assert read_classnames(DataConfig(train=str(synth / "train"))) is None


# --- bad data and foreign shards -------------------------------------------------------


def _corrupt_set(root: Path) -> tuple[set[int], dict[str, int]]:
    """4 shards x 50 samples; 10 (5%) broken in one way each; each shard ends with a
    good sample. Returns the good uids and the injected counts."""
    root.mkdir()
    bad = {
        3: ("jpg", b"not an image"),
        57: ("jpg", b"\xff\xd8\xff\xe0 truncated jpeg"),
        101: ("png", _png(1)[:40]),  # cut PNG
        160: ("drop_image", None),
        20: ("txt", b""),
        88: ("txt", b"  \n "),
        140: ("drop_txt", None),
        33: ("json", b"{not json"),
        120: ("json", b'{"label": 1}'),  # no uid while the others have one
        199 - 1: ("json", b"[1, 2]"),
    }
    sizes = {}
    for s in range(4):
        samples = []
        for uid in range(50 * s, 50 * s + 50):
            sample = {
                "__key__": f"{uid:06d}",
                "jpg": _png(uid % 256, fmt="JPEG"),
                "txt": f"caption {uid}".encode(),
                "json": json.dumps({"uid": uid, "noisy": uid % 2 == 0}).encode(),
            }
            if uid in bad:
                field, value = bad[uid]
                if field.startswith("drop_"):
                    del sample[field[5:] if field != "drop_image" else "jpg"]
                elif field == "png":
                    del sample["jpg"]
                    sample["png"] = value
                else:
                    sample[field] = value
            samples.append(sample)
        _write_tar(root / f"{s:06d}.tar", samples)
        sizes[f"{s:06d}.tar"] = 50
    (root / "sizes.json").write_text(json.dumps(sizes))
    (root / "info.json").write_text(json.dumps({"num_samples": 200, "num_uids": 200, "uids": "json"}))
    good = set(range(200)) - set(bad)
    return good, {"corrupt_image": 4, "missing_caption": 3, "bad_json": 3, "lost_in_shard": 0}


def test_bad_samples_are_skipped_counted_and_batches_stay_full(tmp_path: Path) -> None:
    good, injected = _corrupt_set(tmp_path / "bad")
    cfg = DataConfig(train=str(tmp_path / "bad"), val=str(tmp_path / "bad"), num_workers=0, shuffle_buffer=0)
    stream = _stream(cfg, bs=10, preprocess=PLAIN)
    batches = list(islice(stream, len(good) // 10))  # exactly one stream epoch
    assert all(len(b) == 10 for b in batches)
    uids = _cat(batches)
    assert len(uids) == len(set(uids)) and set(uids) == good
    assert stream.skip_counts() == injected
    assert stream.state_dict()["positions"] == [[0, 200]]
    assert set(_cat(_val(cfg, bs=32, pre=PLAIN))) == good

    # With workers and a shuffle buffer the stream stays full and keeps counting.
    cfg2 = DataConfig(train=str(tmp_path / "bad"), num_workers=2, shuffle_buffer=30)
    stream2 = _stream(cfg2, bs=10, preprocess=PLAIN)
    batches2 = list(islice(stream2, 40))  # a bit over two stream epochs
    assert all(len(b) == 10 for b in batches2) and set(_cat(batches2)) == good
    counts = stream2.skip_counts()
    assert all(injected[k] <= counts[k] <= 3 * injected[k] for k in injected)


def test_img2dataset_style_shards_get_dense_derived_uids(tmp_path: Path) -> None:
    root = tmp_path / "i2d"
    root.mkdir()
    layout = {"b.tar": (7, "with_json"), "a.tar": (5, "no_json"), "c.tar": (6, "png")}
    # uid order = sorted shard names (a, b, c), then position: the red channel encodes it.
    first = {"a.tar": 0, "b.tar": 5, "c.tar": 12}
    for name, (n, kind) in layout.items():
        samples = []
        for pos in range(n):
            uid = first[name] + pos
            s = {"__key__": f"{pos:09d}", "txt": f"a photo {uid}".encode()}  # keys repeat across shards
            if kind == "png":
                s["png"] = _png(10 * uid)
            else:
                s["jpg"] = _png(10 * uid, fmt="JPEG")
            if kind == "with_json":
                s["json"] = json.dumps({"caption": "x", "status": "success"}).encode()
            samples.append(s)
        _write_tar(root / name, samples)

    def check(spec: str) -> None:
        assert dataset_size(spec) == (18, 18)
        batches = _val(DataConfig(val=spec, num_workers=0), bs=5, pre=PLAIN)
        uids = _cat(batches)
        assert sorted(uids) == list(range(18))
        red = torch.cat([b.images[:, 0, 0, 0] for b in batches]) * 255 / 10
        assert torch.equal(red.round().long(), torch.tensor(uids))
        assert all(b.noisy is None and b.labels is None for b in batches)

    check(str(root))  # counted by reading the tars (no sizes.json)
    check(str(root / "{c,a,b}.tar"))  # spec order does not matter
    (root / "sizes.json").write_text(json.dumps({k: v[0] for k, v in layout.items()}))
    check(str(root))
    train = list(islice(_stream(DataConfig(train=str(root), num_workers=0), bs=6, preprocess=PLAIN), 3))
    assert sorted(_cat(train)) == list(range(18))


# --- specs ----------------------------------------------------------------------------


def test_validate_spec_messages(synth: Path, tmp_path: Path) -> None:
    assert validate_spec(str(synth / "train")) is None
    assert validate_spec(str(synth / "train" / "{000000..000007}.tar")) is None
    missing = str(tmp_path / "x" / "{0..3}.tar")
    assert validate_spec(missing) == f"no shards match '{missing}'"
    assert validate_spec(missing, name="data.train") == f"data.train: no shards match '{missing}'"
    partial = str(synth / "val" / "{000000..000002}.tar")
    assert validate_spec(partial, name="data.val").startswith("data.val: 1 of 3 shards of")
    assert validate_spec(str(synth)) == f"no *.tar in directory '{synth}'; did you mean '{synth / 'train'}'?"
    assert validate_spec("") == "empty data spec"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "000000.tar").write_bytes((synth / "val" / "000000.tar").read_bytes())
    (broken / "sizes.json").write_text("{oops")
    assert validate_spec(str(broken)).startswith(f"cannot parse {broken / 'sizes.json'}")
    (broken / "sizes.json").write_text('{"000000.tar": 30, "000001.tar": 30}')
    assert "1 shard(s) listed in" in validate_spec(str(broken))
    with pytest.raises(SpecError, match="^data.train: no shards match"):
        _stream(DataConfig(train=missing))
    bad_val = DataConfig(train=str(synth / "train"), val=missing)
    assert bad_val.validate() == f"data.val: no shards match '{missing}'"
    assert DataConfig(train=str(synth / "train"), num_workers=-1).validate().startswith("data.num_workers")


# --- prepare csv ----------------------------------------------------------------------


def test_prepare_csv_roundtrip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "img").mkdir()
    rows = ["image,caption,noisy,label"]
    for i in range(10):
        (tmp_path / "img" / f"{i}.png").write_bytes(_png(20 * i))
        rows.append(f"img/{i}.png,picture number {i},{'true' if i % 3 == 0 else 'false'},{i % 3}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "names.txt").write_text("zero\none\ntwo\n")
    out = tmp_path / "out"
    argv = ["csv", "--input", str(tmp_path / "pairs.csv"), "--output", str(out)]
    assert prepare.main([*argv, "--val-fraction", "0.2", "--classnames", str(tmp_path / "names.txt")]) == 0
    assert dataset_size(str(out / "train")) == (8, 8) and dataset_size(str(out / "val")) == (2, 2)
    assert read_classnames(DataConfig(val=str(out / "val"))) == ["zero", "one", "two"]
    seen = []
    for split in ("train", "val"):
        for b in _val(DataConfig(val=str(out / split), num_workers=0), bs=4, pre=PLAIN):
            rows_of = (b.images[:, 0, 0, 0] * 255 / 20).round().long()
            assert torch.equal(b.labels, rows_of % 3) and torch.equal(b.noisy, rows_of % 3 == 0)
            seen += rows_of.tolist()
    assert sorted(seen) == list(range(10))

    # TSV with class names as labels: names are indexed in sorted order and written.
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text(
        "image\tcaption\tlabel\n" + "".join(f"img/{i}.png\tpic {i}\t{'dog' if i % 2 else 'cat'}\n" for i in range(4))
    )
    assert prepare.main(["csv", "--input", str(tsv), "--output", str(tmp_path / "o2"), "--val-fraction", "0"]) == 0
    assert (tmp_path / "o2" / "classnames.txt").read_text() == "cat\ndog\n"
    assert not (tmp_path / "o2" / "val").exists()
    labels = torch.cat([b.labels for b in _val(DataConfig(val=str(tmp_path / "o2" / "train")), pre=PLAIN)])
    assert labels.tolist() == [0, 1, 0, 1]

    capsys.readouterr()
    (tmp_path / "missing.csv").write_text("image,caption\nimg/0.png,a\nnope/1.png,b\nnope/2.png,c\n")
    assert prepare.main(["csv", "--input", str(tmp_path / "missing.csv"), "--output", str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"prepare csv: 2 of 3 images missing, first: {tmp_path / 'nope' / '1.png'}"
    assert not (tmp_path / "o3").exists()
