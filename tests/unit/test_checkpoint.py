"""Checkpoint ownership: resume checks before start-up (one line each), atomic tags, and
what a failed save leaves behind. Real training round trips are in tests/integration."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import yaml

from dissect_ds import checkpoint as ckpt
from dissect_ds import config as C


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from dissect_ds.data.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("ckpt-data")
    write_synthetic(str(out), num_samples=64, noise_rate=0.0, seed=0, val_samples=16, shard_size=32, progress=False)
    return out


def _overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.train={data}/train", "data.val=null", f"run.output_dir={out}", "run.name=r", *extra]


def _fake_tag(out: Path, step: int, world_size: int = 2, complete: bool = True) -> Path:
    """A tag as Checkpoints.save leaves it, with the config the debug run resolves to."""
    tag = out / "r" / "checkpoints" / ckpt.tag_name(step)
    tag.mkdir(parents=True)
    for r in range(world_size):
        (tag / f"rank{r:05d}.pt").write_bytes(b"")
    if complete:
        (tag / ckpt.COMPLETE).write_text(json.dumps({"world_size": world_size, "step": step}))
        (tag.parent / ckpt.LATEST).write_text(tag.name)
    return tag


def _write_config(tag: Path, cfg: C.Config, **changes) -> None:
    tree = C.to_dict(cfg)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        tree[section][key] = value
    (tag / "config.yaml").write_text(yaml.safe_dump(tree))


def _error(args: list[str], world_size: int | None = None) -> str:
    with pytest.raises(C.ConfigError) as e:
        C.load("configs/debug.yaml", args, world_size)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])


def test_resume_of_a_folder_that_is_not_a_checkpoint(data, tmp_path):
    (tmp_path / "empty").mkdir()
    assert "not a checkpoint" in _error(_overrides(data, tmp_path, f"resume={tmp_path / 'empty'}"))
    assert "not a checkpoint directory" in _error(_overrides(data, tmp_path, f"resume={tmp_path / 'missing'}"))


def test_resume_of_an_incomplete_tag(data, tmp_path):
    tag = _fake_tag(tmp_path, 4, complete=False)
    assert "incomplete checkpoint" in _error(_overrides(data, tmp_path, f"resume={tag}"))


def test_latest_falls_back_to_the_newest_complete_tag(data, tmp_path):
    _fake_tag(tmp_path, 4)
    newest = _fake_tag(tmp_path, 8)
    (newest.parent / ckpt.LATEST).write_text("step00000012")  # a tag that is gone
    cfg = C.load("configs/debug.yaml", _overrides(data, tmp_path, "resume=latest"))
    assert ckpt.resolve_resume(cfg) == newest


def test_fresh_run_over_existing_checkpoints_is_refused(data, tmp_path):
    _fake_tag(tmp_path, 4)
    assert "already holds checkpoints" in _error(_overrides(data, tmp_path))


def test_zero_state_at_another_world_size_is_refused(data, tmp_path):
    _fake_tag(tmp_path, 4, world_size=2)
    msg = _error(_overrides(data, tmp_path, "resume=latest", "deepspeed.zero_stage=2"), world_size=1)
    assert "written by 2 ranks" in msg and "ZeRO-2" in msg
    C.load("configs/debug.yaml", _overrides(data, tmp_path, "resume=latest", "deepspeed.zero_stage=0"), 1)


@pytest.mark.parametrize(
    ("change", "override"),
    [("train__batch_size", "train.batch_size=64"), ("selection__strategy", "selection.strategy=random")],
)
def test_changed_batch_or_strategy_needs_consent(data, tmp_path, change, override):
    tag = _fake_tag(tmp_path, 4)
    base = C.load("configs/debug.yaml", _overrides(data, tmp_path / "elsewhere"))
    _write_config(tag, base)
    args = _overrides(data, tmp_path, "resume=latest", override)
    assert "checkpoint.allow_config_change=true" in _error(args)
    C.load("configs/debug.yaml", [*args, "checkpoint.allow_config_change=true"])
    C.load("configs/debug.yaml", _overrides(data, tmp_path, "resume=latest"))  # unchanged: fine


def test_changed_model_is_refused_even_with_consent(data, tmp_path):
    tag = _fake_tag(tmp_path, 4)
    _write_config(tag, C.load("configs/debug.yaml", _overrides(data, tmp_path / "elsewhere")))
    args = _overrides(data, tmp_path, "resume=latest", "model.name=RN50", "checkpoint.allow_config_change=true")
    assert "model.name" in _error(args)


def test_output_dir_that_is_a_file(data, tmp_path):
    (tmp_path / "file").write_text("x")
    assert "is a file" in _error(_overrides(data, tmp_path / "file" / "sub"))


def test_fp16_without_a_gpu(data, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert "deepspeed.fp16" in _error(_overrides(data, tmp_path, "deepspeed.fp16=true"))


class _Component:
    def state_dict(self) -> dict:
        return {"x": 1}


class _Engine:
    def __init__(self, fail: bool):
        self.fail = fail

    def save_checkpoint(self, root: Path, tag: str) -> None:
        (root / tag).mkdir(parents=True)
        (root / tag / "mp_rank_00_model_states.pt").write_bytes(b"half")
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device", str(root / tag / "optim.pt"))


def test_a_failed_save_removes_its_partial_tag_and_keeps_latest(data, tmp_path):
    cfg = C.load("configs/debug.yaml", _overrides(data, tmp_path))
    saver = ckpt.Checkpoints(cfg, rank=0, world_size=1)
    first = saver.save(4, _Engine(fail=False), {"train": _Component()})
    assert (first / ckpt.COMPLETE).is_file() and (first / "config.yaml").is_file()
    with pytest.raises(ckpt.CheckpointError, match="No space left on device"):
        saver.save(8, _Engine(fail=True), {"train": _Component()})
    root = tmp_path / "r" / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [first.name]
    assert (root / ckpt.LATEST).read_text() == first.name


def test_resaving_a_tag_replaces_it_whole(data, tmp_path):
    cfg = C.load("configs/debug.yaml", _overrides(data, tmp_path))
    tag = _fake_tag(tmp_path, 4, world_size=3)  # written before by 3 ranks
    ckpt.Checkpoints(cfg, rank=0, world_size=1).save(4, _Engine(fail=False), {"train": _Component()})
    assert sorted(p.name for p in tag.glob("rank*.pt")) == ["rank00000.pt"]
    assert json.loads((tag / ckpt.COMPLETE).read_text())["world_size"] == 1


def test_rng_component_round_trips_and_reads_the_older_tensor_format():
    import torch

    from dissect_ds.train import TorchRNG

    state = TorchRNG().state_dict()
    first = torch.rand(4)
    TorchRNG.restore(state)
    assert torch.equal(torch.rand(4), first)
    TorchRNG.restore(state["cpu"])  # a checkpoint that stored the CPU state alone
    assert torch.equal(torch.rand(4), first)
