"""clip_benchmark, as users run it, evaluates our export on a clip_benchmark ``wds`` set and
agrees with our own zero-shot evaluation of the same images, class names and templates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dissect_ds.data.evalsets import write_imagefolder, write_wds
from dissect_ds.evaluation import ModelEncoder, zeroshot, zeroshot_set
from dissect_ds.export import write_open_clip_dir
from dissect_ds.model import build_model
from tests.evaltools import fit_tiny

pytestmark = pytest.mark.slow

# clip_benchmark 1.6.2's top-k accuracy calls float() on a 1-element array, which numpy 2
# rejects; the shim swaps in the same count with .item() and runs its CLI unchanged.
SHIM = """
import sys
import clip_benchmark.metrics.zeroshot_classification as zc
from clip_benchmark.cli import main

def accuracy(output, target, topk=(1,)):
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum().item()) / len(target) for k in topk]

zc.accuracy = accuracy
sys.argv = ["clip_benchmark", *sys.argv[1:]]
main()
assert "dissect_ds" not in sys.modules
"""


def test_clip_benchmark_top1_equals_ours(tmp_path):
    write_imagefolder(str(tmp_path / "train"), num_classes=8, per_class=6, seed=0)
    data = tmp_path / "wds_synth"
    write_wds(str(data), num_classes=8, per_class=6, seed=3)
    model, _, preprocess, tokenizer = build_model("dissect-tiny-vit")
    model.load_state_dict(fit_tiny(str(tmp_path / "train")))
    export = tmp_path / "export"
    write_open_clip_dir(model.state_dict(), model, "dissect-tiny-vit", export)

    ours = zeroshot(ModelEncoder(model, preprocess, tokenizer), zeroshot_set("synth", str(data)), 0, 1, batch_size=16)
    assert 0.2 < ours["top1"] < 1  # predictions differ between images, some wrong

    out = tmp_path / "result.json"
    cmd = [
        sys.executable, "-c", SHIM, "eval",
        "--dataset", "wds/synth", "--dataset_root", str(data), "--task", "zeroshot_classification",
        "--model", f"local-dir:{export}", "--pretrained", "none",
        "--no_amp", "--num_workers", "0", "--batch_size", "16", "--output", str(out),
    ]  # fmt: skip
    env = {"PATH": str(Path(sys.executable).parent), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(out.read_text())["metrics"]
    assert theirs["acc1"] == pytest.approx(ours["top1"], abs=0.005)
    assert theirs["acc5"] == pytest.approx(ours["top5"], abs=0.005)
