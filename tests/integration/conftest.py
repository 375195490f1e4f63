"""Fixtures for launcher and SLURM tests: the one-host SLURM cluster and a clean launcher
environment (no rank variables inherited from whatever runs pytest)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.common import BIN, ROOT, env

CLUSTER = ROOT / "scripts" / "slurm_cluster.sh"
OUR_CONF_MARK = "written by dissect_ds scripts/slurm_cluster.sh"


def launch_env(**extra: str) -> dict[str, str]:
    """common.env() without launcher variables of an enclosing job (pytest itself may run
    inside an sbatch or mpirun), with the venv's launchers (mpirun, deepspeed) first on PATH."""
    e = {k: v for k, v in env().items() if not k.startswith(("SLURM_", "PMI_", "PMIX_", "OMPI_", "MPI_"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    e["PATH"] = f"{BIN}:{e.get('PATH', '')}"
    e.update(extra)
    return e


def _ours_running() -> bool:
    conf = Path("/etc/slurm/slurm.conf")
    if not conf.is_file() or OUR_CONF_MARK not in conf.read_text():
        return False
    return subprocess.run([str(CLUSTER), "status"], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def slurm_cluster() -> list[str]:
    """The one-host SLURM cluster of scripts/slurm_cluster.sh (started when needed; left
    running for later tests and sessions). Returns its node names (two on one host)."""
    if os.geteuid() != 0:
        if not _ours_running():
            pytest.skip("starting SLURM needs root (and no cluster of scripts/slurm_cluster.sh is running)")
    else:
        if not (shutil.which("slurmctld") or shutil.which("apt-get")):
            pytest.skip("SLURM is not installed and there is no apt-get to install it")
        proc = subprocess.run([str(CLUSTER), "up"], capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, f"scripts/slurm_cluster.sh up failed:\n{proc.stdout}\n{proc.stderr}"
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, check=True).stdout
    nodes = sorted(set(out.split()))
    assert nodes, "sinfo lists no nodes"
    return nodes
