"""Memory/speed switches of the model: gradient checkpointing changes nothing but memory;
patch dropout acts in training mode only, so scoring and evaluation see every patch."""

from __future__ import annotations

import pytest
import torch

from dissect_ds.loss import contrastive_loss
from dissect_ds.model import build_model

NAME = "dissect-tiny-vit"


def _batch(model, tokenizer, n: int = 8):
    g = torch.Generator().manual_seed(0)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    images = torch.rand(n, 3, size, size, generator=g)
    tokens = tokenizer([f"a picture number {i}" for i in range(n)])
    return images, tokens


def _loss_and_grads(model, images, tokens):
    model.train()
    model.zero_grad()
    out = model(images, tokens)
    loss, _ = contrastive_loss(out["image_features"], out["text_features"], out["logit_scale"], [len(images)], 0)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    plain, _, _, tokenizer = build_model(NAME)
    torch.manual_seed(0)
    ckpt, *_ = build_model(NAME, grad_checkpointing=True)
    assert ckpt.visual.transformer.grad_checkpointing and not plain.visual.transformer.grad_checkpointing
    ckpt.load_state_dict(plain.state_dict())
    images, tokens = _batch(plain, tokenizer)
    loss_a, grads_a = _loss_and_grads(plain, images, tokens)
    loss_b, grads_b = _loss_and_grads(ckpt, images, tokens)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-5, atol=1e-6, msg=n)


def test_patch_dropout_only_in_training_mode():
    plain, _, _, tokenizer = build_model(NAME)
    dropped, *_ = build_model(NAME, patch_dropout=0.5)
    dropped.load_state_dict(plain.state_dict())
    images, tokens = _batch(plain, tokenizer)
    with torch.no_grad():
        plain.eval(), dropped.eval()
        torch.testing.assert_close(dropped(images, tokens)["image_features"], plain(images, tokens)["image_features"])
        plain.train(), dropped.train()
        torch.manual_seed(1)
        a = dropped(images, tokens)["image_features"]
        assert not torch.allclose(a, plain(images, tokens)["image_features"], atol=1e-4)


def test_augment_false_trains_on_the_val_transform():
    from PIL import Image

    image = Image.fromarray((torch.rand(40, 30, 3) * 255).to(torch.uint8).numpy())
    _, train, val, _ = build_model(NAME)
    _, plain_train, plain_val, _ = build_model(NAME, augment=False)
    torch.manual_seed(0)
    assert not torch.equal(train(image), val(image))  # a random resized crop
    torch.testing.assert_close(plain_train(image), val(image), rtol=0, atol=0)
    torch.testing.assert_close(plain_val(image), val(image), rtol=0, atol=0)


def test_uint8_transform_then_device_normalize_equals_open_clips_transform():
    from PIL import Image

    from dissect_ds.model import split_normalize

    image = Image.fromarray((torch.rand(40, 30, 3) * 255).to(torch.uint8).numpy())
    _, train, val, _ = build_model(NAME)
    for transform in (train, val):
        uint8, normalize = split_normalize(transform)
        torch.manual_seed(1)
        small = uint8(image)
        torch.manual_seed(1)  # the same random crop
        ref = transform(image)
        assert small.dtype == torch.uint8 and small.shape == ref.shape
        torch.testing.assert_close(normalize(small[None])[0], ref, rtol=0, atol=1e-5)
        assert torch.equal(normalize(ref[None])[0], ref)  # float images pass unchanged
    assert split_normalize(len) == (len, None)  # not open_clip's shape: left alone


def _tf32_flags(rank: int, world: int, data: str) -> list[tuple[bool, bool]]:
    """PyTorch's TF32 switches after building an engine with train.tf32 = true, then false."""
    import os
    from pathlib import Path

    from dissect_ds import config as C
    from dissect_ds.engine import Engine, init_distributed

    os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    debug = str(Path(__file__).resolve().parents[2] / "configs/debug.yaml")
    out = []
    for on in ("true", "false"):
        overrides = [f"data.train={data}/train", "data.val=null", "deepspeed.zero_stage=0", f"train.tf32={on}"]
        Engine(C.load(debug, overrides, world), init_distributed())
        out.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
    return out


@pytest.mark.slow  # spawns a gloo rank
def test_tf32_switch_sets_pytorchs_matmul_and_cudnn_flags(tmp_path):
    from dissect_ds.data.synthetic import write_synthetic
    from tests.multiproc import run_ranks

    write_synthetic(str(tmp_path), num_samples=16, noise_rate=0.0, seed=0, val_samples=0, shard_size=16, progress=False)
    [flags] = run_ranks(_tf32_flags, 1, str(tmp_path))
    assert flags == [(True, True), (False, False)]


def test_small_vocabulary_tokenizes_the_synthetic_captions_as_open_clip_does(tmp_path):
    """The bench configs' own vocabulary (the BPE merges the synthetic captions use) is the
    one committed, fits each such config's embedding, and cuts every caption, class prompt and
    noisy caption of the set into open_clip's default tokens; an export loads in open_clip
    with the same tokenizer."""
    import gzip
    import json

    import open_clip

    from dissect_ds.data.synthetic import caption_text, write_synthetic
    from dissect_ds.export import CONFIG_FILE, write_open_clip_dir
    from dissect_ds.model import CONFIG_DIR, bpe_subset

    lines = gzip.open(CONFIG_DIR / "synthetic_bpe.txt.gz").read().decode().split("\n")
    assert lines[1:] == bpe_subset(caption_text()), "rewrite synthetic_bpe.txt.gz (see bpe_subset)"
    own = [f.stem for f in CONFIG_DIR.glob("*.json") if "tokenizer_kwargs" in json.loads(f.read_text())["text_cfg"]]
    assert {"dissect-bench-vit-sv", "dissect-bench-vit-gpu"} <= set(own)
    built = {name: build_model(name, augment=False) for name in own}
    for name, (model, _, _, small) in built.items():
        assert small.vocab_size == model.token_embedding.num_embeddings == 623, name
    model, _, _, small = built["dissect-bench-vit-sv"]
    assert small.eot_token_id == small.vocab_size - 1  # open_clip pools the text at the largest id

    import webdataset as wds

    from dissect_ds.data.config import DataConfig
    from dissect_ds.data.pipeline import read_classnames, read_templates

    write_synthetic(str(tmp_path / "set"), num_samples=64, noise_rate=0.4, seed=3, val_samples=48, image_size=24)
    captions = []
    for split in ("train", "val"):
        shards = sorted(str(p) for p in (tmp_path / "set" / split).glob("*.tar"))
        captions += [s["txt"].decode() for s in wds.WebDataset(shards, shardshuffle=False)]
    val = DataConfig(val=str(tmp_path / "set" / "val"))
    captions += [t.format(c=c) for t in read_templates(val) for c in read_classnames(val)]
    assert len(captions) > 100
    default = open_clip.SimpleTokenizer(context_length=16)
    for cap in captions:
        ours = [small.decoder[i] for i in small([cap])[0].tolist() if i]
        theirs = [default.decoder[i] for i in default([cap])[0].tolist() if i]
        assert ours == theirs and len(ours) <= 16, cap
    assert len(small(["a zebra"])[0].nonzero()) > 3  # a word outside the set still tokenizes, in pieces

    export = tmp_path / "export"
    write_open_clip_dir(model.state_dict(), model, "dissect-bench-vit-sv", export)
    assert (export / "synthetic_bpe.txt.gz").is_file()
    exported = json.loads((export / CONFIG_FILE).read_text())["model_cfg"]["text_cfg"]["tokenizer_kwargs"]
    assert exported["bpe_path"] == str((export / "synthetic_bpe.txt.gz").resolve())
    loaded = open_clip.get_tokenizer(f"local-dir:{export}")
    assert torch.equal(loaded(captions[:20]), small(captions[:20]))
    registered = open_clip.get_model_config("dissect-bench-vit-sv")["text_cfg"]["tokenizer_kwargs"]
    assert registered["bpe_path"] == "synthetic_bpe.txt.gz"  # the export changed its own copy only
