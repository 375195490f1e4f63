"""Every command shown in README.md and docs/*.md works as written.

Shell blocks (```, ```bash, ```sh) are read line by line; every command in them must be one
this test knows how to check, so a new documented command cannot slip in unchecked:
- ``make T``: ``make -n T`` succeeds;
- ``deepspeed`` / ``torchrun`` / ``mpirun``: the launcher's own argument parser accepts the line,
  and the training command it starts passes ``python -m dissect_ds.train ... --check`` at the
  launch's world size (the documented data paths are the user's, so the synthetic set stands in);
- ``python -m M ...``: M's argparse parser accepts the arguments (``dissect_ds.train`` as above);
- ``sbatch [options] S``, ``bash S`` and ``scripts/*.sh``: the script exists and ``bash -n`` accepts it;
- ``python3 -m pip CMD ...``: pip's parser for CMD accepts the options (nothing is installed);
- ``tensorboard``: the venv provides it.
An argument list elided with ``...`` is checked up to the launcher. Blocks tagged ``text`` or a
language (yaml, json) are not commands.
"""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]


def documented_commands() -> list[tuple[str, str]]:
    """``(where, command)`` for every command line of every shell block."""
    out = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        in_block, shell, pending = False, False, ""
        for i, line in enumerate(lines, 1):
            fence = re.match(r"^\s*```(\w*)", line)
            if fence:
                in_block, shell = (not in_block), fence.group(1) in ("", "bash", "sh", "shell")
                continue
            if not (in_block and shell):
                continue
            text = pending + re.sub(r"(^|\s)#.*$", "", line).strip()
            if text.endswith("\\"):
                pending = text[:-1] + " "
                continue
            pending = ""
            if text:
                out.append((f"{doc.relative_to(ROOT)}:{i}", text))
    return out


def inline_commands() -> list[tuple[str, str]]:
    """``(where, command)`` for every ``python -m`` command written inline (a code span in
    the prose, which may wrap over lines), outside the shell blocks. A bare module name
    (``python -m dissect_ds.score``) names a tool and a synopsis (``csv|synthetic``) is no
    command: both are left out."""
    out = []
    for doc in DOCS:
        prose = re.sub(r"^\s*```.*?^\s*```", "", doc.read_text(), flags=re.S | re.M)
        for m in re.finditer(r"`((?:\.venv/bin/)?python3? -m [^`]+)`", prose):
            command = " ".join(m.group(1).split())
            if len(command.split()) > 3 and "|" not in command:
                out.append((f"{doc.relative_to(ROOT)} (inline)", command))
    return out


COMMANDS = documented_commands() + inline_commands()


class _Parsed(Exception):
    pass


def _parses(module: str, args: list[str], monkeypatch) -> None:
    """Run ``python -m module args`` in-process up to its argparse call; fail on a parse error."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [module, *args])
    with pytest.raises(_Parsed):
        runpy.run_module(module, run_name="__main__", alter_sys=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A working directory like the repository's after the documented preparation steps:
    configs/ and ds_configs/ of the repository, data/evalsets/, a reference export and its
    offline scores, and a small synthetic set (returned) standing in for every data.train /
    data.val."""
    from dissect_ds.data.evalsets import write_eval_sets
    from dissect_ds.data.synthetic import write_synthetic

    work = tmp_path_factory.mktemp("cmd-work")
    for name in ("configs", "ds_configs"):
        (work / name).symlink_to(ROOT / name)
    write_eval_sets(str(work / "data" / "evalsets"))
    out = work / "data" / "synthetic"
    write_synthetic(str(out), num_samples=64, noise_rate=0.0, seed=0, val_samples=16, shard_size=64, progress=False)
    # What the reference-model examples name: an earlier run's export and its offline scores.
    from dissect_ds.export import write_open_clip_dir
    from dissect_ds.model import build_model

    model, *_ = build_model("dissect-tiny-vit")
    write_open_clip_dir(model.state_dict(), model, "dissect-tiny-vit", work / "runs" / "ref" / "open_clip")
    (work / "scores" / "syn").mkdir(parents=True)
    (work / "scores" / "syn" / "info.json").write_text('{"num_uids": 64}')
    return out


def _check_train(args: list[str], world: int, data: Path, tmp: Path, monkeypatch) -> None:
    from dissect_ds import train

    if "..." in args:
        return
    for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.chdir(data.parents[1])
    stand_in = [f"data.train={data}/train", f"data.val={data}/val", f"run.output_dir={tmp}"]
    try:
        code = train.main([*args, *stand_in, "--check"])
    except SystemExit as e:
        code = e.code
    assert code == 0, f"python -m dissect_ds.train {shlex.join(args)} failed its config check"


def _strip_env(words: list[str]) -> list[str]:
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        words = words[1:]
    return words[1:] if words[:1] == ["sudo"] else words


def _check_python(words: list[str], world: int, data: Path, tmp: Path, monkeypatch) -> None:
    assert words[1] == "-m", f"run modules with python -m: {shlex.join(words)}"
    module, args = words[2], words[3:]
    if module == "dissect_ds.train":
        _check_train(args, world, data, tmp, monkeypatch)
    elif module == "pip":  # pip's own option parser (optparse), without installing anything
        from pip._internal.commands import create_command

        create_command(args[0]).parse_args(args[1:])
    else:
        _parses(module, [a for a in args if a != "..."], monkeypatch)


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command(where, command, data, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    words = _strip_env(shlex.split(command))
    tool = words[0]
    if tool == "make":
        proc = subprocess.run(["make", "-n", *words[1:]], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    elif tool == "deepspeed":
        from deepspeed.launcher.runner import parse_args

        a = parse_args(words[1:])
        if a.module:
            _check_train(a.user_args, a.num_gpus if a.num_gpus > 0 else 1, data, tmp_path, monkeypatch)
        else:
            assert (ROOT / a.user_script).is_file(), f"{where}: no script {a.user_script}"
            _check_train(a.user_args, 1, data, tmp_path, monkeypatch)
    elif tool == "torchrun":
        from torch.distributed.run import get_args_parser

        a = get_args_parser().parse_args(words[1:])
        assert a.module and a.training_script == "dissect_ds.train", f"{where}: torchrun must run -m dissect_ds.train"
        nodes = int(str(a.nnodes).split(":")[-1])
        _check_train(a.training_script_args, nodes * int(a.nproc_per_node), data, tmp_path, monkeypatch)
    elif tool == "mpirun":
        assert words[1] == "-np", f"{where}: expected mpirun -np N"
        _check_python(words[3:], int(words[2]), data, tmp_path, monkeypatch)
    elif tool in ("python", "python3", ".venv/bin/python"):
        _check_python(words, 1, data, tmp_path, monkeypatch)
    elif tool in ("sbatch", "bash") or tool.startswith("scripts/"):
        script = tool if tool.startswith("scripts/") else next(w for w in words[1:] if not w.startswith("-"))
        assert (ROOT / script).is_file(), f"{where}: no script {script}"
        assert subprocess.run(["bash", "-n", str(ROOT / script)]).returncode == 0
    elif tool == "tensorboard":
        assert (Path(sys.executable).parent / "tensorboard").exists()
    else:
        pytest.fail(f"{where}: no check for {tool!r}; teach tests/unit/test_documented_commands.py or tag the block")


def test_every_doc_has_been_read():
    assert any(w.startswith("README.md") for w, _ in COMMANDS) and any("(inline)" in w for w, _ in COMMANDS)
    assert any("deepspeed" in c and "--module" in c for _, c in COMMANDS)
