"""The real sbatch script on a real (one-host) SLURM cluster: a 2-node job finishes
COMPLETED and leaves the run directory; `scancel --signal=USR1` mid-run makes the job
checkpoint, requeue itself, resume and finish with the same losses as the uninterrupted job."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.common import ROOT, losses, metrics
from tests.integration.conftest import CLUSTER, launch_env

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

STEPS = 16
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# Tiny job on CPU: debug model, 8 pairs per rank (the script scales the batch: 8 x 2 = 16).
EXTRA = (
    f"model.name=dissect-tiny-vit train.steps={STEPS} train.warmup_steps=2"
    " data.num_workers=0 data.shuffle_buffer=64 eval.batch_size=64 checkpoint.every_steps=5 "
    "log.progress=false log.every_steps=1"
)


def job_info(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def sbatch(data: Path, out: Path, layout: list[str]) -> str:
    """Submit slurm/train_cc12m.sh as a user would, with the test's data and overrides."""
    env = launch_env(
        DISSECT_TRAIN_DATA=str(data / "train"),
        DISSECT_VAL_DATA=str(data / "val"),
        DISSECT_OUTPUT_DIR=str(out),
        DISSECT_BATCH_PER_RANK="8",
        DISSECT_EXTRA=EXTRA,
        DISSECT_PYTHON=sys.executable,
    )
    cmd = ["sbatch", "--parsable", *layout, "--gpus-per-node=0", "--cpus-per-task=1", "--time=30:00",
           f"--output={out}/slurm-%j.out", str(ROOT / "slurm" / "train_cc12m.sh")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def wait(job: str, until, timeout: float, log: Path) -> dict[str, str]:
    """Poll ``scontrol show job`` (no slurmdbd here, so no sacct) until ``until(info)``."""
    deadline = time.time() + timeout
    info: dict[str, str] = {}
    while time.time() < deadline:
        info = job_info(job)
        if until(info):
            return info
        time.sleep(1)
    subprocess.run(["scancel", job])
    tail = log.read_text()[-4000:] if log.exists() else "(no output file)"
    raise AssertionError(f"job {job} timed out in state {info.get('JobState')}: {info}\n{tail}")


def assert_run_directory(run: Path) -> None:
    for name in ("config.yaml", "metrics.jsonl", "tensorboard", "checkpoints/latest", "eval.json"):
        assert (run / name).exists(), name
    assert any((run / "tensorboard").iterdir())
    rows = [m for m in metrics(run) if "loss" in m]
    assert [m["step"] for m in rows] == list(range(1, STEPS + 1)), "steps missing or repeated"
    for key in ("step", "samples_seen", "loss", "lr", "selected", "time/step", "time/data", "time/score",
                "time/select", "time/train", "selection/clean_precision", "selection/noisy_recall"):  # fmt: skip
        assert all(key in m for m in rows), key
    final = json.loads((run / "eval.json").read_text())
    assert final["step"] == STEPS and {"eval/i2t_R@1", "eval/t2i_R@5"} <= set(final)


@pytest.fixture(scope="module")
def completed(slurm_cluster, synthetic, tmp_path_factory) -> tuple[str, Path]:
    """An uninterrupted job over two nodes, one rank each (the multi-node path)."""
    out = tmp_path_factory.mktemp("sbatch")
    layout = ["--nodes=2", "--ntasks-per-node=1"] if len(slurm_cluster) >= 2 else ["--nodes=1", "--ntasks-per-node=2"]
    job = sbatch(synthetic, out, layout)
    wait(job, lambda i: i.get("JobState") in TERMINAL, 900, out / f"slurm-{job}.out")
    return job, out


def test_cluster_script_is_idempotent(slurm_cluster):
    pid = Path("/run/dissect-slurm/slurmctld.pid").read_text()
    t0 = time.time()
    subprocess.run([str(CLUSTER), "up"], check=True, capture_output=True, timeout=300)
    assert Path("/run/dissect-slurm/slurmctld.pid").read_text() == pid, "a running cluster was restarted"
    assert time.time() - t0 < 60
    status = subprocess.run([str(CLUSTER), "status"], capture_output=True, text=True)
    assert status.returncode == 0 and all(n in status.stdout for n in slurm_cluster)


def test_sbatch_cc12m_completes_with_the_run_directory(completed, slurm_cluster):
    job, out = completed
    info = job_info(job)
    log = (out / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0"
    if len(slurm_cluster) >= 2:
        assert info["NumNodes"] == "2"
    assert "2 ranks" in log and "srun exited with status 0" in log
    run = out / "cc12m"
    assert_run_directory(run)
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["batch_size"] == 16  # 8 per rank x 2 ranks, from the world size
    assert cfg["model"]["name"] == "dissect-tiny-vit" and cfg["resume"] == "latest"


def test_usr1_checkpoints_requeues_and_resumes(completed, synthetic, tmp_path):
    _, ref = completed
    out = tmp_path
    job = sbatch(synthetic, out, ["--nodes=1", "--ntasks-per-node=2"])
    log = out / f"slurm-{job}.out"
    run = out / "cc12m"

    def training(info) -> bool:  # the signal handlers are installed once steps are logged
        if info.get("JobState") in TERMINAL:
            return True
        return (run / "metrics.jsonl").exists() and any(m.get("step", 0) >= 2 for m in metrics(run))

    info = wait(job, training, 600, log)
    assert info["JobState"] == "RUNNING", f"job ended before it could be signalled: {info}"
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    # The ranks checkpoint at the next step boundary and rank 0 runs `scontrol requeue`.
    settling = {"COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RUNNING"}
    info = wait(job, lambda i: i.get("Restarts") == "1" and i.get("JobState") not in settling, 300, log)
    if info["JobState"] == "PENDING":
        # SLURM holds a requeued job for about two minutes (BeginTime); let it start now.
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
    info = wait(job, lambda i: i.get("JobState") in TERMINAL, 900, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    assert info["Restarts"] == "1"
    saved = re.search(r"preempted: checkpoint at step (\d+) written", text)
    resumed = re.search(r"resumed from \S+step0*(\d+) at step (\d+)", text)
    assert saved and resumed, text[-4000:]
    step = int(saved.group(1))
    assert 2 <= step < STEPS and int(resumed.group(1)) == int(resumed.group(2)) == step
    assert "restart 1" in text  # the batch script ran again (SLURM_RESTART_COUNT)
    assert_run_directory(run)  # steps 1..STEPS, each exactly once
    # Resumed from the preemption checkpoint: the same numbers as the uninterrupted job.
    want, got = losses(ref / "cc12m"), losses(run)
    for s in range(1, STEPS + 1):
        assert got[s] == pytest.approx(want[s], rel=1e-5, abs=1e-6), s
