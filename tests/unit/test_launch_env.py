"""Launcher environments -> RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*: env_from_launcher for
SLURM (one and several nodes), MPI and torch-style launchers, and the sbatch scripts'
own arithmetic (batch scaling, overrides, rendezvous) run against stub srun/scontrol."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from dissect_ds.distributed import env_from_launcher

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "slurm").glob("train_*.sh"))


def _slurm_env(procid: int, localid: int, nodeid: int, **extra: str) -> dict[str, str]:
    """What srun gives task ``procid`` of a 2-node x 2-task step of job 123456."""
    env = {
        "SLURM_JOB_ID": "123456",
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(localid),
        "SLURM_NODEID": str(nodeid),
        "SLURM_NTASKS": "4",
        "SLURM_NNODES": "2",
        "SLURM_TASKS_PER_NODE": "2(x2)",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
    }
    env.update(extra)
    return env


def _no_scontrol(monkeypatch, tmp_path) -> None:
    """A compute node where scontrol is not on PATH (the fallback path)."""
    monkeypatch.setenv("PATH", str(tmp_path))


def _stub_scontrol(monkeypatch, tmp_path) -> None:
    """A compute node's scontrol, expanding gpu[07-08] as SLURM does."""
    stub = tmp_path / "scontrol"
    stub.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"\n')
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")


@pytest.mark.parametrize("procid,localid,nodeid", [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)])
def test_slurm_two_nodes_maps_every_task(procid, localid, nodeid, monkeypatch, tmp_path):
    _stub_scontrol(monkeypatch, tmp_path)
    out = env_from_launcher(_slurm_env(procid, localid, nodeid))
    assert out["RANK"] == str(procid)
    assert out["WORLD_SIZE"] == "4"
    assert out["LOCAL_RANK"] == str(localid)
    assert out["LOCAL_WORLD_SIZE"] == "2"
    # Every task must agree on the rendezvous without talking: first node, port from the job id.
    assert out["MASTER_ADDR"] == "gpu07"
    assert out["MASTER_PORT"] == str(20000 + 123456 % 20000)


@pytest.mark.parametrize(
    "nodelist,first",
    [
        ("gpu[07-08]", "gpu07"),
        ("gpu[07,09-10],cpu01", "gpu07"),
        ("node-a,node-b", "node-a"),
        ("rack1-n[003-004]", "rack1-n003"),
        ("single", "single"),
    ],
)
def test_slurm_master_addr_is_the_first_host_without_scontrol(nodelist, first, monkeypatch, tmp_path):
    _no_scontrol(monkeypatch, tmp_path)
    out = env_from_launcher(_slurm_env(0, 0, 0, SLURM_JOB_NODELIST=nodelist))
    assert out["MASTER_ADDR"] == first


def test_slurm_explicit_rendezvous_wins(monkeypatch, tmp_path):
    """The sbatch scripts export MASTER_ADDR/MASTER_PORT; tasks must not override them."""
    _no_scontrol(monkeypatch, tmp_path)
    out = env_from_launcher(_slurm_env(3, 1, 1, MASTER_ADDR="10.1.2.3", MASTER_PORT="29999"))
    assert (out["MASTER_ADDR"], out["MASTER_PORT"]) == ("10.1.2.3", "29999")
    assert (out["RANK"], out["WORLD_SIZE"], out["LOCAL_RANK"]) == ("3", "4", "1")


def test_slurm_single_node_with_ntasks_per_node(monkeypatch, tmp_path):
    _no_scontrol(monkeypatch, tmp_path)
    env = _slurm_env(5, 5, 0, SLURM_NTASKS="8", SLURM_NTASKS_PER_NODE="8", SLURM_TASKS_PER_NODE="8")
    env["SLURM_JOB_NODELIST"] = "gpu07"
    out = env_from_launcher(env)
    assert (out["RANK"], out["WORLD_SIZE"], out["LOCAL_RANK"], out["LOCAL_WORLD_SIZE"]) == ("5", "8", "5", "8")
    assert out["MASTER_ADDR"] == "gpu07"


def test_torch_style_variables_take_precedence_over_slurm(monkeypatch, tmp_path):
    """deepspeed/torchrun started inside an allocation: their RANK is the truth, not SLURM_PROCID."""
    _no_scontrol(monkeypatch, tmp_path)
    env = _slurm_env(0, 0, 0, RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_ADDR="h", MASTER_PORT="1234")
    out = env_from_launcher(env)
    assert (out["RANK"], out["WORLD_SIZE"], out["LOCAL_RANK"]) == ("3", "4", "1")
    assert (out["MASTER_ADDR"], out["MASTER_PORT"]) == ("h", "1234")


def test_local_world_size_from_torchrun_or_the_deepspeed_launcher():
    base = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    assert env_from_launcher({**base, "LOCAL_WORLD_SIZE": "4"})["LOCAL_WORLD_SIZE"] == "4"  # torchrun
    assert env_from_launcher({**base, "LOCAL_SIZE": "2"})["LOCAL_WORLD_SIZE"] == "2"  # deepspeed launcher


def test_open_mpi_and_mpich_variables():
    ompi = env_from_launcher(
        {
            "OMPI_COMM_WORLD_RANK": "3",
            "OMPI_COMM_WORLD_SIZE": "4",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
        }
    )
    assert (ompi["RANK"], ompi["WORLD_SIZE"], ompi["LOCAL_RANK"], ompi["LOCAL_WORLD_SIZE"]) == ("3", "4", "1", "2")
    hydra = env_from_launcher({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"})
    assert (hydra["RANK"], hydra["WORLD_SIZE"], hydra["LOCAL_RANK"], hydra["LOCAL_WORLD_SIZE"]) == ("1", "2", "1", "2")


def test_plain_process_is_rank_zero_of_one():
    out = env_from_launcher({})
    assert (out["RANK"], out["WORLD_SIZE"], out["LOCAL_RANK"]) == ("0", "1", "0")
    assert out["MASTER_ADDR"] == "127.0.0.1" and 0 < int(out["MASTER_PORT"]) < 65536


# ------------------------------------------------------------------ the sbatch scripts


def _headers(script: Path) -> dict[str, str]:
    out = {}
    for line in script.read_text().splitlines():
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if m:
            out[m.group(1)] = m.group(2) or ""
    return out


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_sbatch_headers(script):
    h = _headers(script)
    assert "requeue" in h
    assert re.fullmatch(r"USR1@\d+", h["signal"]), "the ranks (not the batch shell) must get USR1 before the end"
    assert h["ntasks-per-node"] == h["gpus-per-node"], "one task per GPU"
    for key in ("nodes", "cpus-per-task", "time", "output", "open-mode"):
        assert key in h, key
    name = script.stem.removeprefix("train_")
    assert (ROOT / "configs" / f"{name}.yaml").is_file()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


STUB_SCONTROL = """#!/bin/bash
case "$1 $2" in
  "show hostnames") echo node-a; echo node-b ;;
  "show node") echo "NodeName=$3 Arch=x86_64 CoresPerSocket=8"; echo "   NodeAddr=10.9.8.7 NodeHostName=$3 Version=22.05" ;;
  "show job") echo "   Command=$STUB_COMMAND" ;;
esac
"""
STUB_SRUN = """#!/bin/bash
python3 - "$@" <<'EOF'
import json, os, sys
keys = ("MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES")
json.dump({"argv": sys.argv[1:], "cwd": os.getcwd(), **{k: os.environ.get(k) for k in keys}}, open(os.environ["STUB_OUT"], "w"))
EOF
"""


def _run_script(tmp_path: Path, name: str, **env: str) -> dict:
    """Run slurm/train_<name>.sh as slurmd would (a copy in a spool dir) with stub srun/scontrol."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for tool, text in (("scontrol", STUB_SCONTROL), ("srun", STUB_SRUN)):
        (bindir / tool).write_text(text)
        (bindir / tool).chmod(0o755)
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    copy = spool / "slurm_script"
    copy.write_text((ROOT / "slurm" / f"train_{name}.sh").read_text())
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DISSECT_", "MASTER_", "OMP_"))}
    full = {
        **base,
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "STUB_OUT": str(tmp_path / "srun.json"),
        "STUB_COMMAND": str(ROOT / "slurm" / f"train_{name}.sh"),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NTASKS": "16",
        "SLURM_NTASKS_PER_NODE": "8",
        "SLURM_CPUS_PER_TASK": "10",
        "SLURM_SUBMIT_DIR": str(tmp_path),  # not the repo: the script must find it by its path
        **env,
    }
    proc = subprocess.run(["bash", str(copy)], cwd=tmp_path, env=full, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((tmp_path / "srun.json").read_text())


def _overrides(argv: list[str]) -> dict[str, str]:
    i = argv.index("--config")
    assert argv[i - 2 : i] == ["-m", "dissect_ds.train"]
    out: dict[str, str] = {"--config": argv[i + 1]}
    for item in argv[i + 2 :]:
        k, v = item.split("=", 1)
        out[k] = v  # later overrides win, as in dissect_ds.config
    return out


def test_sbatch_script_scales_batch_steps_and_warmup_with_world_size(tmp_path):
    got = _run_script(tmp_path, "cc12m")
    o = _overrides(got["argv"])
    assert got["cwd"] == str(ROOT)
    assert o["--config"] == "configs/cc12m.yaml"
    assert o["train.batch_size"] == str(1280 * 16)
    # 32 epochs of 12,423,374 pairs at 20,480 per step; warm-up stays 10k x 10,240 samples
    assert o["train.steps"] == str(32 * (12423374 // 20480))
    assert o["train.warmup_steps"] == str(10000 * 10240 // 20480)
    assert o["resume"] == "latest"
    assert got["MASTER_ADDR"] == "10.9.8.7"  # NodeAddr of the first node
    assert got["MASTER_PORT"] == str(20000 + 4242 % 20000)
    assert got["OMP_NUM_THREADS"] == "10"
    # the tasks' own mapping agrees with the port the script exported
    task = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node-a"}
    assert env_from_launcher(task)["MASTER_PORT"] == got["MASTER_PORT"]


def test_sbatch_script_environment_variables(tmp_path):
    got = _run_script(
        tmp_path,
        "cc3m",
        DISSECT_TRAIN_DATA="/d/train",
        DISSECT_VAL_DATA="/d/val",
        DISSECT_OUTPUT_DIR="/out",
        DISSECT_CONFIG="configs/debug.yaml",
        DISSECT_BATCH_PER_RANK="4",
        DISSECT_EXTRA="train.steps=7 model.name=dissect-tiny-vit resume=",
        DISSECT_CPU="1",
    )
    o = _overrides(got["argv"])
    assert o["--config"] == "configs/debug.yaml"
    assert (o["data.train"], o["data.val"], o["run.output_dir"]) == ("/d/train", "/d/val", "/out")
    assert o["train.batch_size"] == str(4 * 16)
    assert o["train.steps"] == "7" and o["model.name"] == "dissect-tiny-vit"
    assert o["resume"] == ""  # DISSECT_EXTRA comes last and wins
    assert "train.warmup_steps" not in o  # another config: its own schedule
    assert got["DS_ACCELERATOR"] == "cpu" and got["CUDA_VISIBLE_DEVICES"] == ""


def test_sbatch_script_can_keep_the_config_batch(tmp_path):
    o = _overrides(_run_script(tmp_path, "yfcc15m", DISSECT_BATCH_PER_RANK="0")["argv"])
    assert "train.batch_size" not in o and "train.steps" not in o
    assert o["--config"] == "configs/yfcc15m.yaml"


def test_docs_name_every_variable_the_scripts_read():
    doc = (ROOT / "docs" / "cluster.md").read_text()
    used = set(re.findall(r"\bDISSECT_[A-Z_]+", (ROOT / "slurm" / "common.sh").read_text()))
    used -= {v for v in used if v.startswith("DISSECT_SET")}  # set by the scripts, not users
    missing = sorted(v for v in used if v not in doc)
    assert not missing, f"undocumented in docs/cluster.md: {missing}"
