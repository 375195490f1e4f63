"""The trainer with named evaluation sets on 2 gloo ranks: metrics under their names in
metrics.jsonl, TensorBoard and eval.json; training unchanged by periodic evaluation; the
export loads in plain open_clip; post-hoc evaluation and export commands agree with the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dissect_ds.data.evalsets import write_eval_sets
from tests.integration.common import ROOT, env, losses, metrics, tiny_overrides, torchrun

# Two trainer runs on a shared 2-core machine can take minutes each.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SET_KEYS = ("eval/shapes/top1", "eval/shapes/top5", "eval/cb/top1", "eval/synth/i2t_R@1", "eval/synth/t2i_R@10")
VAL_KEYS = ("eval/i2t_R@1", "eval/t2i_R@5", "eval/mean_R@1", "eval/zeroshot_top1")


@pytest.fixture(scope="module")
def runs(synthetic, tmp_path_factory):
    """Two ZeRO-3 runs of 8 steps, with evaluation every 4 steps on named sets and without."""
    out = tmp_path_factory.mktemp("evalruns")
    sets = write_eval_sets(str(out / "sets"))
    next(Path(sets["imagefolder"]).rglob("*.png")).unlink()  # 23 images: ranks hold 2 and 1 batches
    named = [
        f"eval.zeroshot.shapes={sets['imagefolder']}",
        f"eval.zeroshot.cb={sets['wds']}",
        f"eval.retrieval.synth.images={sets['retrieval_images']}",
        f"eval.retrieval.synth.annotations={sets['retrieval_annotations']}",
        "eval.num_workers=0",
        "eval.batch_size=11",
    ]
    common = ["train.steps=8", "checkpoint.every_steps=4", "deepspeed.zero_stage=3"]
    torchrun(2, [*tiny_overrides(synthetic, out, "periodic"), *common, "eval.every_steps=4", *named])
    torchrun(2, [*tiny_overrides(synthetic, out, "plain"), *common, "eval.every_steps=0"])
    return out, sets


def test_named_metrics_in_jsonl_tensorboard_and_eval_json(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = runs[0] / "periodic"
    rows = [m for m in metrics(run) if "eval/shapes/top1" in m]
    assert [m["step"] for m in rows] == [4, 8]
    assert all(k in m for m in rows for k in SET_KEYS + VAL_KEYS)
    final = json.loads((run / "eval.json").read_text())
    assert final["step"] == 8 and all(final[k] == rows[-1][k] for k in SET_KEYS + VAL_KEYS)
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    for key in SET_KEYS + VAL_KEYS:
        events = acc.Scalars(key)
        assert [e.step for e in events] == [4, 8], key
        assert [e.value for e in events] == pytest.approx([m[key] for m in rows], rel=1e-6), key


def test_periodic_evaluation_does_not_change_training(runs):
    with_eval, without = losses(runs[0] / "periodic"), losses(runs[0] / "plain")
    assert sorted(with_eval) == sorted(without) == list(range(1, 9))
    for step, value in without.items():
        assert with_eval[step] == pytest.approx(value, rel=1e-6, abs=1e-7), step


# Run in a fresh interpreter that never imports dissect_ds: what a user of the export does.
PLAIN_OPEN_CLIP = """
import sys, torch, open_clip
from PIL import Image
export, images, captions, out = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split("|"), sys.argv[4]
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + export)
tokenizer = open_clip.get_tokenizer("local-dir:" + export)
model.eval()
with torch.no_grad():
    x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in images])
    feats = {"image": model.encode_image(x, normalize=True), "text": model.encode_text(tokenizer(captions), normalize=True)}
assert "dissect_ds" not in sys.modules
torch.save(feats, out)
"""


def test_export_loads_in_plain_open_clip_with_the_trainers_features(runs, tmp_path):
    from PIL import Image

    from dissect_ds.evaluation import retrieval_set
    from dissect_ds.model import build_model

    out, sets = runs
    run = out / "periodic"
    s = retrieval_set("synth", {"images": sets["retrieval_images"], "annotations": sets["retrieval_annotations"]})
    images, captions = list(s.images[:6]), list(s.captions[:6])
    e = {k: v for k, v in env().items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "-c", PLAIN_OPEN_CLIP, str(run / "open_clip"), ",".join(images), "|".join(captions)]
    proc = subprocess.run([*cmd, str(tmp_path / "f.pt")], cwd=tmp_path, env=e, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.load(tmp_path / "f.pt")
    # the trainer's model: the weights it consolidated itself, with its own preprocessing
    model, _, preprocess, tokenizer = build_model("dissect-tiny-vit", str(run / "open_clip_model.pt"))
    model.eval()
    with torch.no_grad():
        x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in images])
        torch.testing.assert_close(theirs["image"], model.encode_image(x, normalize=True))
        torch.testing.assert_close(theirs["text"], model.encode_text(tokenizer(captions), normalize=True))


def test_posthoc_evaluation_of_the_export_equals_the_trainers(runs):
    run = runs[0] / "periodic"
    cmd = [sys.executable, "-m", "dissect_ds.evaluate", "--run", str(run)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shapes" in proc.stdout and "top1" in proc.stdout  # the table
    posthoc = json.loads((run / "eval-open_clip.json").read_text())
    trainer = json.loads((run / "eval.json").read_text())
    for key in SET_KEYS + VAL_KEYS:
        assert posthoc[key] == pytest.approx(trainer[key], abs=1e-6), key


def test_export_command_consolidates_a_zero3_checkpoint(runs, tmp_path):
    import open_clip

    run = runs[0] / "periodic"
    cmd = [sys.executable, "-m", "dissect_ds.export", "--run", str(run), "--output", str(tmp_path / "x")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, *_ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'x'}")
    final = torch.load(run / "open_clip_model.pt")  # the trainer's own export at the last step
    got = model.state_dict()
    assert got.keys() == final.keys()
    for k, v in final.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)
    bad = subprocess.run(
        [sys.executable, "-m", "dissect_ds.export", "--run", str(run), "--checkpoint", "step99"],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip().startswith("export error: --checkpoint: no complete checkpoint")
