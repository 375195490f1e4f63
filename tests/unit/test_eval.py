"""Evaluation on named sets: zero-shot equals open_clip's own classifier used directly and
does not depend on the world size (1, 2, 3 gloo ranks); multi-caption recall equals a
brute-force count; bad sets fail config validation with one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dissect_ds import config as C
from dissect_ds.data.evalsets import write_eval_sets
from dissect_ds.evaluation import EvalConfig, ModelEncoder, retrieval_set, zeroshot_set
from dissect_ds.evaluation.metrics import retrieval_recalls
from tests.evaltools import fit_tiny
from tests.multiproc import run_ranks

ROOT = Path(__file__).resolve().parents[2]
MODEL = "dissect-tiny-vit"


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, str]:
    return write_eval_sets(str(tmp_path_factory.mktemp("evalsets")))


@pytest.fixture(scope="module")
def weights(tmp_path_factory, sets) -> str:
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.save(fit_tiny(sets["imagefolder"]), path)
    return str(path)


def _encoder(weights: str) -> ModelEncoder:
    from dissect_ds.model import build_model

    model, _, preprocess, tokenizer = build_model(MODEL, pretrained=weights)
    return ModelEncoder(model, preprocess, tokenizer)


def _eval_on_ranks(rank: int, world: int, weights: str, sets: dict[str, str]) -> dict[str, float]:
    from dissect_ds.evaluation import evaluate_sets

    torch.set_num_threads(1)
    cfg = EvalConfig(
        batch_size=5,  # several uneven batches per rank
        num_workers=0,
        zeroshot={"folder": sets["imagefolder"], "wds": sets["wds"]},
        retrieval={"ret": {"images": sets["retrieval_images"], "annotations": sets["retrieval_annotations"]}},
    )
    return evaluate_sets(_encoder(weights), cfg, rank, world)


def _reference_top(weights: str, folder: str) -> tuple[float, float]:
    """open_clip's classifier and plain torchvision ImageFolder, no dissect_ds evaluation code."""
    from open_clip import OPENAI_IMAGENET_TEMPLATES, build_zero_shot_classifier
    from torchvision.datasets import ImageFolder

    enc = _encoder(weights)
    data = ImageFolder(folder, transform=enc.preprocess)
    classifier = build_zero_shot_classifier(enc.model, enc.tokenizer, data.classes, OPENAI_IMAGENET_TEMPLATES)
    images = torch.stack([x for x, _ in data])
    labels = torch.tensor(data.targets)
    with torch.no_grad():
        logits = enc.model.encode_image(images, normalize=True) @ classifier
    top = logits.topk(5, dim=1).indices
    return float((top[:, 0] == labels).float().mean()), float((top == labels[:, None]).any(1).float().mean())


@pytest.mark.slow
def test_zeroshot_equals_open_clip_classifier_on_1_2_3_ranks(weights, sets):
    top1, top5 = _reference_top(weights, sets["imagefolder"])
    assert 0.2 < top1 < 1 and top5 > top1  # predictions differ between images, some wrong
    single = _eval_on_ranks(0, 1, weights, sets)
    assert single["eval/folder/top1"] == pytest.approx(top1, abs=1e-3)
    assert single["eval/folder/top5"] == pytest.approx(top5, abs=1e-3)
    assert set(single) >= {"eval/wds/top1", "eval/ret/i2t_R@1", "eval/ret/t2i_R@10", "eval/ret/mean_R@1"}
    for world in (2, 3):
        for r, metrics in enumerate(run_ranks(_eval_on_ranks, world, weights, sets)):
            assert metrics.keys() == single.keys()
            for k, v in single.items():
                assert metrics[k] == pytest.approx(v, abs=1e-3), (world, r, k)


def test_imagenet_sized_folder_gets_imagenet_names_and_openai_templates(tmp_path, sets):
    from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    png = next(Path(sets["imagefolder"]).rglob("*.png"))
    for i in range(1000):
        (tmp_path / f"n{i:08d}").mkdir()
        shutil.copy(png, tmp_path / f"n{i:08d}" / "a.png")
    s = zeroshot_set("imagenet", str(tmp_path))
    assert s.kind == "imagefolder" and list(s.classnames) == list(IMAGENET_CLASSNAMES)
    assert list(s.templates) == list(OPENAI_IMAGENET_TEMPLATES)
    assert s.samples[999] == (str(tmp_path / "n00000999" / "a.png"), 999)


def test_custom_classnames_and_templates_override(tmp_path, sets):
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"thing {i}" for i in range(6)) + "\n")
    templates = tmp_path / "templates.txt"
    templates.write_text("a drawing of a {c}.\n{} again\n")
    s = zeroshot_set("x", {"path": sets["imagefolder"], "classnames": str(names), "templates": str(templates)})
    assert s.classnames[2] == "thing 2"
    assert [t("cat") for t in s.templates] == ["a drawing of a cat.", "cat again"]
    w = zeroshot_set("w", sets["wds"])  # clip_benchmark layout: its own names and templates files
    assert w.kind == "wds" and len(w.classnames) == 6 and w.templates[0]("cat") == "a photo of a cat."


def test_val_shards_as_a_named_set_equal_the_val_metric(synthetic, weights, tmp_path):
    from dissect_ds.data import DataConfig
    from dissect_ds.evaluate import evaluate
    from dissect_ds.evaluation import zeroshot

    # Both read the prompts written beside the synthetic val split.
    s = zeroshot_set("val", str(synthetic / "val"))
    assert s.kind == "shards" and len(s.classnames) == 48
    assert [t("red circle") for t in s.templates] == ["a photo of a red circle."]
    enc = _encoder(weights)
    named = zeroshot(enc, s, 0, 1, batch_size=50)
    val = evaluate(enc, DataConfig(val=str(synthetic / "val"), num_workers=0), 50, 0, 1)
    assert named["top1"] == pytest.approx(val["eval/zeroshot_top1"], abs=1e-9)
    assert named["top5"] >= named["top1"] > 0


def test_synthetic_retrieval_captions_each_describe_one_image(sets):
    s = retrieval_set("ret", {"images": sets["retrieval_images"], "annotations": sets["retrieval_annotations"]})
    assert len(s.images) == 24 and len(s.captions) == 5 * 24
    owners: dict[str, set[int]] = {}
    for c, i in zip(s.captions, s.caption_image):
        owners.setdefault(c, set()).add(i)
    assert all(len(v) == 1 for v in owners.values())
    # Karpathy's original layout reads the same
    entries = json.loads(Path(sets["retrieval_annotations"]).read_text())
    karpathy = {
        "images": [
            {"filepath": "", "filename": e["image"], "split": "test", "sentences": [{"raw": c} for c in e["caption"]]}
            for e in entries
        ]
        + [{"filepath": "", "filename": "missing.png", "split": "train", "sentences": [{"raw": "x"}]}]
    }
    path = Path(sets["retrieval_images"]) / "karpathy.json"
    path.write_text(json.dumps(karpathy))
    k = retrieval_set("k", {"images": sets["retrieval_images"], "annotations": str(path)})
    assert k.captions == s.captions and k.caption_image == s.caption_image


def _brute_force(image, text, owner, k):
    sim = image @ text.T
    i2t = []
    for i in range(image.shape[0]):
        best = sim[i].argsort(descending=True)[:k]
        i2t.append(any(int(owner[j]) == i for j in best))
    t2i = [int(owner[j]) in sim[:, j].argsort(descending=True)[:k].tolist() for j in range(text.shape[0])]
    return sum(i2t) / len(i2t), sum(t2i) / len(t2i)


def test_multi_caption_recall_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=1)
    owner = torch.cat([torch.arange(30).repeat_interleave(3), torch.tensor([0, 5, 5])])
    text = torch.nn.functional.normalize(image[owner] + 0.9 * torch.randn(len(owner), 8, generator=g), dim=1)
    out = retrieval_recalls(image, text, owner, chunk=7)
    for k in (1, 5, 10):
        i2t, t2i = _brute_force(image, text, owner, k)
        assert out[f"i2t_R@{k}"] == pytest.approx(i2t) and out[f"t2i_R@{k}"] == pytest.approx(t2i)
    assert 0 < out["i2t_R@1"] < 1  # neither trivial nor hopeless
    # one caption per image: the val-shard metric of dissect_ds.evaluate
    from dissect_ds.evaluate import recall_metrics

    one = recall_metrics(image, text[:90:3])
    same = retrieval_recalls(image, text[:90:3], torch.arange(30))
    assert one["eval/i2t_R@5"] == pytest.approx(same["i2t_R@5"]) and one["eval/t2i_R@1"] == same["t2i_R@1"]


def _load(synthetic, *overrides):
    return C.load(None, [f"data.train={synthetic}/train", *overrides])


def test_bad_sets_fail_validation_with_one_line(tmp_path, sets, synthetic):
    folder = tmp_path / "folder"
    shutil.copytree(sets["imagefolder"], folder)
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n")
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image": "images/00000.png", "caption": ["x"]}, {"image": "nope.png", "caption": "y"}]))
    cases = [
        ([f"eval.zeroshot.inet={tmp_path}/absent"], "eval.zeroshot.inet: no such folder"),
        (
            [f"eval.zeroshot.f.path={folder}", f"eval.zeroshot.f.classnames={names}"],
            "eval.zeroshot.f.classnames: '" + str(names) + "' has 2 names but",
        ),
        (
            [f"eval.retrieval.coco.images={sets['retrieval_images']}", f"eval.retrieval.coco.annotations={ann}"],
            "eval.retrieval.coco.annotations: image 'nope.png' is not in",
        ),
        ([f"eval.retrieval.coco.images={tmp_path}"], "eval.retrieval.coco: expected a mapping with 'images'"),
    ]
    for overrides, start in cases:
        with pytest.raises(C.ConfigError) as e:
            _load(synthetic, *overrides)
        assert str(e.value).startswith(start) and "\n" not in str(e.value), str(e.value)
    (folder / "empty class").mkdir()
    with pytest.raises(C.ConfigError, match="class folder .*empty class.* holds no images"):
        _load(synthetic, f"eval.zeroshot.f={folder}")
    # the trainer exits 2 with that line before any process group starts
    proc = subprocess.run(
        [sys.executable, "-m", "dissect_ds.train", "--config", str(ROOT / "configs/debug.yaml"),
         f"data.train={synthetic}/train", "data.val=null", f"eval.zeroshot.f={folder}"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("config error: eval.zeroshot.f: class folder")
