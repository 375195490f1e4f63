"""Configs: every shipped config parses; malformed ones fail with one line and exit 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from dissect_ds import config as C

ROOT = Path(__file__).resolve().parents[2]


def _data(synthetic) -> list[str]:
    # Run directories away from the checkout's runs/: after `make demo`, runs/demo holds
    # checkpoints, and loading configs/demo.yaml as it stands would (rightly) refuse it.
    out = synthetic.parent / "config-test-runs"
    return [f"data.train={synthetic}/train", f"data.val={synthetic}/val", f"run.output_dir={out}"]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(path, synthetic):
    cfg = C.load(str(path), _data(synthetic))
    assert cfg.train.steps > 0 and cfg.train.batch_size > 0
    assert "zero_optimization" in C.load_ds_json(cfg)


def test_contract_keys_exist(synthetic):
    cfg = C.load(None, _data(synthetic))
    for dotted in (
        "run.name run.output_dir run.seed model.name data.train data.val train.steps train.batch_size train.lr "
        "deepspeed.config deepspeed.zero_stage checkpoint.every_steps resume eval.every_steps selection.strategy "
        "selection.rate selection.scope selection.warmup_steps selection.beta selection.record"
    ).split():
        node = cfg
        for part in dotted.split("."):
            node = getattr(node, part)


def test_overrides_are_typed_and_dumped(synthetic, tmp_path):
    cfg = C.load(None, [*_data(synthetic), "train.lr=3e-4", "selection.strategy=clipscore", "deepspeed.zero_stage=3"])
    assert cfg.train.lr == 3e-4 and cfg.selection.strategy == "clipscore" and cfg.deepspeed.zero_stage == 3
    C.dump(cfg, tmp_path / "config.yaml")
    again = C.load(str(tmp_path / "config.yaml"))
    assert C.to_dict(again) == C.to_dict(cfg)


BAD = [
    (["train.stepz=10"], "unknown key 'train.stepz'"),
    (["train.lr=0"], "train.lr"),
    (["train.lr=-1e-3"], "train.lr"),
    (["train.steps=ten"], "train.steps: expected int"),
    (["train.batch_size=30", "train.grad_accum=4"], "divisible"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage"),
    (["deepspeed.bf16=true", "deepspeed.fp16=true"], "at most one precision"),
    (["model.name=NoSuchNet"], "model.name"),
    (["data.train=/nonexistent/{000..003}.tar"], "data.train"),
    (["selection.strategy=bogus"], "selection.strategy"),
    (["selection.rate=1.5"], "selection.rate"),
    (["selection.rate=0"], "selection.rate"),
    (["deepspeed.config=ds_configs/nope.json"], "deepspeed.config"),
    (["resume=/no/such/checkpoint"], "resume"),
    (["train=5"], "train: expected a section"),
    (["log.every_steps=0"], "log.every_steps"),
    *[
        ([f"selection.strategy={s}", "selection.reference.model=dissect-tiny-vit"], "selection.reference.pretrained")
        for s in ("oracle_clipscore", "oracle_cliploss", "learnability", "jest")
    ],
    (
        [
            "selection.strategy=learnability",
            "selection.reference.model=dissect-tiny-vit",
            "selection.reference.pretrained=/no/ref.pt",
        ],
        "selection.reference.pretrained: file not found",
    ),
    (
        ["selection.strategy=oracle_clipscore", "selection.reference.model=local-dir:/no/dir"],
        "selection.reference.model",
    ),
    (
        ["selection.strategy=oracle_clipscore", "selection.reference.model=NoSuchNet"],
        "selection.reference.model: unknown",
    ),
    (["selection.strategy=random", "selection.reference.model=dissect-tiny-vit"], "selection.reference: only used"),
    (["selection.strategy=jest", "selection.rate=0.5", "selection.jest_chunks=5"], "selection.jest_chunks"),
    (["selection.strategy=random", "selection.jest_chunks=4"], "selection.jest_chunks: only used by strategy jest"),
]


@pytest.mark.parametrize("overrides,needle", BAD, ids=[b[1] for b in BAD])
def test_malformed_config_is_one_line_error(overrides, needle, synthetic):
    with pytest.raises(C.ConfigError) as e:
        C.load(None, [*_data(synthetic), *overrides])
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_batch_must_divide_world_size(synthetic):
    cfg = C.load(None, [*_data(synthetic), "train.batch_size=30"])
    with pytest.raises(C.ConfigError, match="world size"):
        C.validate(cfg, world_size=4)


@pytest.mark.parametrize("args", [["train.lr=0"], ["--config", "configs/missing.yaml"], ["deepspeed.zero_stage=7"]])
def test_cli_exits_2_with_one_line(args, synthetic):
    proc = subprocess.run(
        [sys.executable, "-m", "dissect_ds.train", *args, *_data(synthetic)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "WARNING" not in ln and "warn" not in ln.lower()]
    assert len(lines) == 1 and lines[0].startswith("config error:"), proc.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.classnames=/nope.txt", "data.classnames"),  # was accepted, then crashed the final evaluation
        ("data.shuffle_buffer=-1", "data.shuffle_buffer"),
        ("data.num_workers=-2", "data.num_workers"),
    ],
)
def test_the_data_section_validates_itself(synthetic, override, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load(None, [*_data(synthetic), override])


def test_no_shuffle_buffer_is_allowed(synthetic):
    assert C.load(None, [*_data(synthetic), "data.shuffle_buffer=0"]).data.shuffle_buffer == 0


def test_a_bad_section_is_not_replaced_by_an_override(synthetic, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: 5\n")
    with pytest.raises(C.ConfigError, match="run: expected a section"):
        C.load(str(bad), [*_data(synthetic), "run.name=x"])
