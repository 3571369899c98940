"""Each cluster environment, simulated with 2 real local processes started directly.

No `ft.launch` (it sets TF_CONFIG): the processes get only one environment's
variables, train a short `fit` under `ft.strategies.auto()` with
`ft.BackupAndRestore`, and must form one cluster: 2 processes seen by each,
identical final weights, and only the chief writes into `backup_dir`.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import portpicker
import pytest

from tests.helpers import SCENARIO, assert_same_weights, engine_env, report, weights

pytestmark = pytest.mark.slow

CLUSTER_PREFIXES = ("TF_CONFIG", "SLURM_", "KERAS_DISTRIBUTION_", "JAX_COORDINATOR", "TPU_WORKER")
CLUSTER_NAMES = ("COORDINATOR_ADDRESS", "COORDINATOR_PORT", "NUM_PROCESSES", "PROCESS_ID")
CLUSTER_NAMES += ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "FT_NUM_PROCESSES", "FT_RESTART_COUNT")


def _free_pair() -> int:
    """A free port p with p + 1 free too."""
    for _ in range(100):
        port = portpicker.pick_unused_port()
        if port < 65535 and portpicker.is_port_free(port + 1):
            return port
    raise RuntimeError("no two consecutive free ports")


def _slurm_job_id() -> int:
    """A job id whose ports (JAX's SLURM coordinator port, which TensorFlow's first
    worker uses too, and the next) are free."""
    for _ in range(200):
        job_id = random.randrange(1, 10**6)
        port = 61440 + job_id % 4096
        if port < 65535 and portpicker.is_port_free(port) and portpicker.is_port_free(port + 1):
            return job_id
    raise RuntimeError("no free SLURM port pair")


def variables(environment: str, index: int, port: int, job_id: int) -> dict[str, str]:
    """What the environment gives process `index` of 2, all on this machine."""
    if environment == "slurm":  # two tasks on node localhost, from one `srun -n 2`
        return {
            "SLURM_JOB_ID": str(job_id),
            "SLURM_NTASKS": "2",
            "SLURM_PROCID": str(index),
            "SLURM_LOCALID": str(index),
            "SLURM_STEP_NODELIST": "localhost",
            "SLURM_STEP_TASKS_PER_NODE": "2",
        }
    if environment == "kubeflow":  # a Kubeflow JAXJob
        return {
            "COORDINATOR_ADDRESS": "localhost",
            "COORDINATOR_PORT": str(port),
            "NUM_PROCESSES": "2",
            "PROCESS_ID": str(index),
        }
    if environment == "kubeflow-trainer":  # Kubeflow Trainer's JAX runtime
        return {
            "JAX_COORDINATOR_ADDRESS": "localhost",
            "JAX_COORDINATOR_PORT": str(port),
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(index),
        }
    assert environment == "keras"
    return {
        "KERAS_DISTRIBUTION_JOB_ADDRESSES": f"localhost:{port},localhost:{port + 1}",
        "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
        "KERAS_DISTRIBUTION_PROCESS_ID": str(index),
    }


def _env(backend: str, cluster: dict[str, str], index: int) -> dict[str, str]:
    env = engine_env(backend, TF_CPP_MIN_LOG_LEVEL="3")
    for name in list(env):
        if name.startswith(CLUSTER_PREFIXES) or name in CLUSTER_NAMES:
            del env[name]
    env.update(cluster, FT_PROCESS_INDEX=str(index))  # scenario.py names its output by it
    return env


@pytest.mark.parametrize(
    "environment, backend",
    [
        ("slurm", "tensorflow"),
        ("slurm", "jax"),
        ("kubeflow", "jax"),  # under TensorFlow only a local simulation: unit-tested
        ("kubeflow-trainer", "jax"),
        ("keras", "jax"),
        ("keras", "tensorflow"),
    ],
)
def test_two_processes_form_one_cluster(environment: str, backend: str, tmp_path: Path) -> None:
    port, job_id = _free_pair(), _slurm_job_id()
    backup_dir = tmp_path / "b"
    args = ["--strategy", "auto", "--backup-dir", str(backup_dir), "--save-freq", "4"]
    args += ["--keep", "--forbid-writes", "--epochs", "1", "--timeout", "60"]
    args += ["--out", str(tmp_path / "w{index}.npz")]
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCENARIO), *args],
            env=_env(backend, variables(environment, index, port, job_id), index),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in (0, 1)
    ]
    outputs = []
    deadline = time.monotonic() + 240
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=30)
    for index, (proc, output) in enumerate(zip(procs, outputs, strict=True)):
        assert "FORBIDDEN WRITE" not in output
        assert proc.returncode == 0, f"process {index} exited {proc.returncode}:\n{output[-5000:]}"
    for index in (0, 1):  # each trained with the other, not alone
        assert report(tmp_path / f"w{index}.npz")["num_processes"] == 2
    assert_same_weights(weights(tmp_path / "w0.npz"), weights(tmp_path / "w1.npz"))
    names = sorted(os.listdir(backup_dir))
    assert ".ft-lock" in names and any(n.startswith("ft-step-") for n in names), names
