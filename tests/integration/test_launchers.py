"""Every launch path trains the debug config on 2 CPU ranks to the end, exits 0, and gives
the same losses: torchrun (the reference), the deepspeed launcher on one node, mpirun
(rank discovery through mpi4py), and the deepspeed launcher's multi-node runners (a
hostfile with --launcher mpich, and --launcher slurm on the one-host SLURM cluster)."""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.common import BIN, ROOT, free_port, losses, metrics, tiny_overrides
from tests.integration.conftest import launch_env

pytestmark = pytest.mark.slow

STEPS = 8
TIMEOUT = 900  # the first launch on a fresh machine JIT-compiles DeepSpeed's CPU comm op


def _args(data: Path, out: Path, name: str) -> list[str]:
    return [
        "--config", str(ROOT / "configs/debug.yaml"),
        *tiny_overrides(data, out, name),
        f"train.steps={STEPS}", "checkpoint.every_steps=4",
    ]  # fmt: skip


def _run(cmd: list[str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd[0]} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def _assert_trained_to_the_end(run: Path) -> None:
    """Exit status alone is not enough (DeepSpeed's MPICH helper drops its child's status)."""
    rows = [m for m in metrics(run) if "loss" in m]
    assert [m["step"] for m in rows] == list(range(1, STEPS + 1))
    assert json.loads((run / "eval.json").read_text())["step"] == STEPS
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step{STEPS:08d}"
    assert (run / "open_clip_model.pt").is_file() and (run / "config.yaml").is_file()


def _assert_same_losses(run: Path, ref: Path) -> None:
    got, want = losses(run), losses(ref)
    assert sorted(got) == sorted(want)
    for step in want:  # same seeds, same data order, same world size: same numbers
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step


@pytest.fixture(scope="module")
def reference(synthetic, tmp_path_factory) -> Path:
    """torchrun --nproc_per_node 2: the run every other launcher must reproduce."""
    out = tmp_path_factory.mktemp("launchers")
    _run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
          "-m", "dissect_ds.train", *_args(synthetic, out, "torchrun")])  # fmt: skip
    return out


def test_torchrun(reference):
    run = reference / "torchrun"
    _assert_trained_to_the_end(run)
    rows = [m for m in metrics(run) if "loss" in m]
    assert all(math.isfinite(m["loss"]) for m in rows)
    assert [m["samples_seen"] for m in rows] == [16 * s for s in range(1, STEPS + 1)]  # global batch of 16


def _shm_buffers(port: int) -> list[str]:
    """DeepSpeed's CPU all-reduce buffers in /dev/shm of the run on ``port`` (one per rank when
    the launcher says every rank is local)."""
    return sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_deepspeed_launcher_one_node(reference, synthetic):
    run, port = reference / "deepspeed", free_port()
    proc = _run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
                 "--module", "dissect_ds.train", *_args(synthetic, reference, "deepspeed")])  # fmt: skip
    assert "exits successfully" in proc.stdout + proc.stderr
    _assert_trained_to_the_end(run)
    _assert_same_losses(run, reference / "torchrun")
    assert _shm_buffers(port) == []  # DeepSpeed leaves them behind; the trainer unlinks them


def test_mpirun(reference, synthetic):
    run = reference / "mpirun"
    proc = _run([str(BIN / "mpirun"), "-np", "2", sys.executable, "-m", "dissect_ds.train",
                 *_args(synthetic, reference, "mpirun")])  # fmt: skip
    text = proc.stdout + proc.stderr
    # A rank that leaves without MPI_Finalize, or one that aborts in it, makes Hydra say so.
    for bad in ("BAD TERMINATION", "Abort(", "MPI_ABORT", "application called MPI_Abort"):
        assert bad not in text, bad
    _assert_trained_to_the_end(run)
    _assert_same_losses(run, reference / "torchrun")


def test_deepspeed_multinode_hostfile_mpich(reference, synthetic, tmp_path):
    """Two "hosts" in a hostfile, both this machine (its name and localhost): DeepSpeed's
    multi-node path with the MPICH runner (Hydra starts one rank per host)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"{socket.gethostname()} slots=1\nlocalhost slots=1\n")
    run = reference / "ds-mpich"
    # The script path, not --module: DeepSpeed 0.18's MPICH runner puts -m before its own helper.
    _run([str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--launcher", "mpich", "--no_ssh_check",
          "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
          "dissect_ds/train.py", *_args(synthetic, reference, "ds-mpich")])  # fmt: skip
    _assert_trained_to_the_end(run)
    _assert_same_losses(run, reference / "torchrun")


@pytest.mark.slurm
def test_deepspeed_multinode_launcher_slurm(reference, synthetic, tmp_path, slurm_cluster):
    """--launcher slurm: DeepSpeed runs `srun` over the hostfile's nodes, here the two node
    names of the one-host cluster, one rank each; ranks map SLURM_PROCID themselves."""
    if len(slurm_cluster) < 2:
        pytest.skip("the cluster has one node name")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{n} slots=1\n" for n in slurm_cluster[:2]))
    run = reference / "ds-slurm"
    _run([str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--launcher", "slurm", "--no_ssh_check",
          "--launcher_args", "--nodes=2 --ntasks-per-node=1 --cpus-per-task=1 --kill-on-bad-exit=1 --time=20",
          "--master_addr", "127.0.0.1", "dissect_ds/train.py",
          *_args(synthetic, reference, "ds-slurm")])  # fmt: skip
    _assert_trained_to_the_end(run)
    _assert_same_losses(run, reference / "torchrun")


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = TIMEOUT) -> None:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and any(m.get("step", 0) >= step for m in metrics(run)):
            return
        assert proc.poll() is None, f"the run ended early: {proc.stdout.read()[-4000:] if proc.stdout else ''}"
        time.sleep(0.5)
    raise AssertionError(f"step {step} never logged")


def _ranks_of(name: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"dissect_ds.train.*run.name={name}( |$)"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_killing_the_deepspeed_launcher_checkpoints_and_stops_the_ranks(synthetic, tmp_path):
    """SIGTERM to the deepspeed runner alone: its ranks notice, checkpoint and exit."""
    import time

    name = "orphan"
    args = [*_args(synthetic, tmp_path, name), "train.steps=100000", "checkpoint.every_steps=0"]
    port = free_port()
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), "--module", "dissect_ds.train"]
    runner = subprocess.Popen(
        [*cmd, *args], cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    run = tmp_path / name
    try:
        _wait_for_step(run, 2, runner)
        assert _shm_buffers(port) == []  # unlinked at start-up, so a killed run leaves none either
        runner.terminate()  # the runner only: its launch.py child and the ranks are left running
        runner.wait(timeout=60)
        deadline = time.time() + 300
        while _ranks_of(name) and time.time() < deadline:
            time.sleep(1)
        assert not _ranks_of(name), "ranks kept training after their launcher died"
    finally:
        for pid in _ranks_of(name):
            subprocess.run(["kill", "-9", str(pid)])
    latest = (run / "checkpoints" / "latest").read_text().strip()
    last = max(m["step"] for m in metrics(run))
    assert latest == f"step{last:08d}"  # the checkpoint of the last step, written on the way out


def test_a_second_run_of_the_same_directory_is_refused(synthetic, tmp_path):
    name = "locked"
    args = [*_args(synthetic, tmp_path, name), "train.steps=100000", "checkpoint.every_steps=0", "resume=latest"]
    first = subprocess.Popen(
        [sys.executable, "-m", "dissect_ds.train", *args], cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        _wait_for_step(tmp_path / name, 1, first)
        second = subprocess.run(
            [sys.executable, "-m", "dissect_ds.train", *args],
            cwd=ROOT,
            env=launch_env(),
            capture_output=True,
            text=True,
        )
        assert second.returncode == 2
        assert f"is in use by pid {first.pid}" in second.stderr, second.stderr[-2000:]
        assert first.poll() is None  # the first run is untouched
    finally:
        first.kill()
        first.wait()
    # The holder died without releasing: its lock is stale, and the next run takes it over.
    assert (tmp_path / name / ".lock").exists()
    proc = subprocess.run(
        [sys.executable, "-m", "dissect_ds.train", *args[:-3], "train.steps=1", "checkpoint.every_steps=0"],
        cwd=ROOT, env=launch_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / name / ".lock").exists()


def test_sigterm_checkpoints_and_exits_with_the_preempted_status(synthetic, tmp_path):
    name = "term"
    args = [*_args(synthetic, tmp_path, name), "train.steps=100000", "checkpoint.every_steps=0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "dissect_ds.train", *args], cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE, text=True
    )
    _wait_for_step(tmp_path / name, 1, proc)
    proc.terminate()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-2000:]
    step = int(out.split("preempted: checkpoint at step ")[1].split()[0])
    assert (tmp_path / name / "checkpoints" / "latest").read_text().strip() == f"step{step:08d}"
    assert not (tmp_path / name / ".lock").exists()  # released on the way out


def test_the_jit_op_is_built_once_whichever_ninja_comes_first_on_path():
    """Launchers pass different PATHs (torchrun keeps the caller's, the deepspeed launcher and
    mpirun come from the venv's bin). A system ninja and the one DeepSpeed installs hash the
    same build command differently, so ranks taking turns used to rebuild DeepSpeed's CPU comm
    op each time (half a minute of g++ while the other ranks wait); every rank now builds with
    DeepSpeed's ninja, and a start with the other PATH loads the build that is there."""
    import ninja

    system_path = "/usr/local/bin:/usr/bin:/bin"
    system = shutil.which("ninja", path=system_path)
    versions = {
        subprocess.run([n, "--version"], capture_output=True, text=True).stdout
        for n in (system, ninja.BIN_DIR + "/ninja")
        if n
    }
    if len(versions) < 2:
        pytest.skip("no system ninja of another version to take turns with")
    env = launch_env()
    env.pop("TORCH_EXTENSIONS_DIR", None)  # the default: a folder inside the venv
    log = Path(sys.prefix, "torch_extensions", "deepspeed_shm_comm", ".ninja_log")
    code = "from dissect_ds.engine import init_distributed; init_distributed(); print('op loaded')"

    def start(path: str) -> int:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={**env, "PATH": path},
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert proc.returncode == 0 and "op loaded" in proc.stdout, proc.stderr[-2000:]
        return log.read_text().count(".so\t")

    builds = start(system_path)  # builds the op if this venv has none yet
    assert start(f"{BIN}:{system_path}") == builds  # loaded, not rebuilt
