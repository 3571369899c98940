"""strategies/cluster_env.py: each cluster environment's parser and each of its errors."""

from __future__ import annotations

import json

import pytest

from ft import errors
from ft.strategies import cluster_env
from ft.strategies.cluster_env import detect, expand_hostlist

Bad = errors.UnsupportedConfigurationError


def tf_config(n: int, index: int) -> str:
    workers = [f"h{i}:{1000 + i}" for i in range(n)]
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


def test_nothing_set_is_one_process() -> None:
    assert detect({}) is None


def test_tf_config_comes_first() -> None:
    spec = detect({"TF_CONFIG": tf_config(2, 1), "SLURM_NTASKS": "1", "SLURM_PROCID": "0"})
    assert spec is not None
    assert (spec.source, spec.process_index, spec.num_processes) == ("TF_CONFIG", 1, 2)
    assert spec.coordinator_address == "h0:1000"


def test_kubeflow_jaxjob() -> None:
    env = {"COORDINATOR_ADDRESS": "job-worker-0", "COORDINATOR_PORT": "6666"}
    spec = detect({**env, "NUM_PROCESSES": "4", "PROCESS_ID": "3"})
    assert spec is not None
    assert (spec.source, spec.process_index, spec.num_processes) == ("Kubeflow JAXJob", 3, 4)
    assert spec.coordinator_address == "job-worker-0:6666"
    assert spec.addresses == ()  # TensorFlow cannot know the other hosts
    local = detect(
        {"COORDINATOR_ADDRESS": "localhost:7000", "NUM_PROCESSES": "2", "PROCESS_ID": "0"}
    )
    assert local is not None and local.addresses == ("localhost:7000", "localhost:7001")


def test_kubeflow_jaxjob_without_process_id_is_incomplete() -> None:
    env = {"COORDINATOR_ADDRESS": "c", "COORDINATOR_PORT": "1", "NUM_PROCESSES": "2"}
    with pytest.raises(
        Bad, match=r"Kubeflow JAXJob.*missing or invalid PROCESS_ID.*NUM_PROCESSES='2'"
    ):
        detect(env)


def test_kubeflow_jaxjob_without_coordinator_is_incomplete() -> None:
    with pytest.raises(Bad, match="COORDINATOR_ADDRESS is missing"):
        detect({"NUM_PROCESSES": "2", "PROCESS_ID": "0"})


def test_index_out_of_range() -> None:
    env = {"COORDINATOR_ADDRESS": "c:1", "NUM_PROCESSES": "2", "PROCESS_ID": "2"}
    with pytest.raises(Bad, match="process index 2 is out of range for 2 processes"):
        detect(env)


def test_kubeflow_trainer() -> None:
    env = {"JAX_COORDINATOR_ADDRESS": "t-node-0-0.t", "JAX_COORDINATOR_PORT": "6666"}
    spec = detect({**env, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"})
    assert spec is not None
    assert (spec.source, spec.process_index, spec.num_processes) == ("Kubeflow Trainer", 1, 2)
    assert spec.coordinator_address == "t-node-0-0.t:6666"
    # JAX's own override alone is not a cluster description
    assert cluster_env.from_kubeflow_trainer({"JAX_COORDINATOR_ADDRESS": "x:1"}) is None
    with pytest.raises(Bad, match="JAX_NUM_PROCESSES"):
        detect({**env, "JAX_PROCESS_ID": "1"})


def test_keras_addresses() -> None:
    env = {
        "KERAS_DISTRIBUTION_JOB_ADDRESSES": "10.0.0.1:1234,10.0.0.2:2345",
        "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
        "KERAS_DISTRIBUTION_PROCESS_ID": "1",
    }
    spec = detect(env)
    assert spec is not None
    assert spec.addresses == ("10.0.0.1:1234", "10.0.0.2:2345")
    assert (spec.source, spec.process_index, spec.coordinator_address) == (
        "Keras",
        1,
        "10.0.0.1:1234",
    )
    with pytest.raises(Bad, match="3 addresses for 2 processes"):
        detect({**env, "KERAS_DISTRIBUTION_JOB_ADDRESSES": "a:1,b:1,c:1"})
    with pytest.raises(Bad, match="KERAS_DISTRIBUTION_PROCESS_ID"):
        detect({k: v for k, v in env.items() if k != "KERAS_DISTRIBUTION_PROCESS_ID"})
    with pytest.raises(Bad, match="has no port"):
        detect({**env, "KERAS_DISTRIBUTION_JOB_ADDRESSES": "a,b"})


def test_keras_coordinator_only() -> None:
    env = {
        "KERAS_DISTRIBUTION_JOB_ADDRESSES": "10.0.0.1:1234",
        "KERAS_DISTRIBUTION_NUM_PROCESSES": "4",
        "KERAS_DISTRIBUTION_PROCESS_ID": "0",
    }
    spec = detect(env)
    assert spec is not None and spec.num_processes == 4 and spec.addresses == ()
    with pytest.raises(Bad, match="KERAS_DISTRIBUTION_NUM_PROCESSES"):
        detect({k: v for k, v in env.items() if k != "KERAS_DISTRIBUTION_NUM_PROCESSES"})


@pytest.mark.parametrize(
    "hostlist, hosts",
    [
        ("node01", ["node01"]),
        ("node[01-03]", ["node01", "node02", "node03"]),
        ("node[1,3-4],gpu7", ["node1", "node3", "node4", "gpu7"]),
        ("r[1-2]-n[08-09]", ["r1-n08", "r1-n09", "r2-n08", "r2-n09"]),
        ("a[9-10]x", ["a9x", "a10x"]),
    ],
)
def test_expand_hostlist(hostlist: str, hosts: list[str]) -> None:
    assert expand_hostlist(hostlist) == hosts


def slurm(**extra: str) -> dict[str, str]:
    env = {
        "SLURM_JOB_ID": "4097",
        "SLURM_NTASKS": "4",
        "SLURM_PROCID": "2",
        "SLURM_LOCALID": "0",
        "SLURM_STEP_NODELIST": "node[01-04]",
    }
    env.update(extra)
    return env


def test_slurm_one_task_per_host() -> None:
    spec = detect(slurm())
    assert spec is not None
    assert (spec.source, spec.process_index, spec.num_processes) == ("SLURM", 2, 4)
    port = 61440 + 4097 % 4096  # JAX's SLURM coordinator port
    assert spec.addresses == tuple(f"node0{i}:{port}" for i in range(1, 5))
    assert spec.jax_detects


def test_slurm_tasks_per_node_and_port_override() -> None:
    env = slurm(
        SLURM_STEP_NODELIST="a,b", SLURM_STEP_TASKS_PER_NODE="3,1", JAX_COORDINATOR_PORT="5000"
    )
    spec = detect(env)
    assert spec is not None
    assert spec.addresses == ("a:5000", "a:5001", "a:5002", "b:5000")
    job_nodelist = {k: v for k, v in slurm().items() if k != "SLURM_STEP_NODELIST"}
    spec = detect({**job_nodelist, "SLURM_JOB_NODELIST": "n[1-4]"})
    assert spec is not None and spec.addresses[0].startswith("n1:")
    assert not spec.jax_detects  # JAX's detection needs SLURM_STEP_NODELIST: ft passes all


def test_slurm_errors() -> None:
    with pytest.raises(Bad, match=r"SLURM_NTASKS=4 but no SLURM_PROCID.*srun"):
        detect({k: v for k, v in slurm().items() if k != "SLURM_PROCID"})
    with pytest.raises(Bad, match="4 tasks cannot be placed on nodes"):
        detect(slurm(SLURM_STEP_NODELIST="node[01-03]"))
    with pytest.raises(Bad, match="out of range"):
        detect(slurm(SLURM_PROCID="4"))
    with pytest.raises(Bad, match="invalid range"):
        detect(slurm(SLURM_STEP_NODELIST="node[a-b]"))
    assert detect(slurm(SLURM_NTASKS="1", SLURM_PROCID="0")) is None


def test_gke_tpu() -> None:
    spec = detect({"TPU_WORKER_ID": "1", "TPU_WORKER_HOSTNAMES": "t0,t1"})
    assert spec is not None and spec.jax_detects
    assert spec.addresses == ("t0:8476", "t1:8476") and spec.process_index == 1
    with pytest.raises(Bad, match=r"GKE TPU.*TPU_WORKER_HOSTNAMES is missing"):
        detect({"TPU_WORKER_ID": "1"})
    with pytest.raises(Bad, match="out of range"):
        detect({"TPU_WORKER_ID": "2", "TPU_WORKER_HOSTNAMES": "t0,t1"})


def test_two_environments_that_disagree() -> None:
    env = {
        **slurm(),
        "KERAS_DISTRIBUTION_JOB_ADDRESSES": "a:1,b:1",
        "KERAS_DISTRIBUTION_PROCESS_ID": "0",
    }
    with pytest.raises(Bad, match=r"Keras says 2.*SLURM says 4"):
        detect(env)


def test_environments_that_agree_or_launch_are_accepted() -> None:
    agree = {**slurm(SLURM_NTASKS="2", SLURM_STEP_NODELIST="a,b", SLURM_PROCID="1")}
    agree.update(TPU_WORKER_ID="1", TPU_WORKER_HOSTNAMES="a,b")
    spec = detect(agree)
    assert spec is not None and spec.source == "SLURM"
    # python -m ft.launch inside a SLURM allocation: its own TF_CONFIG wins
    launched = {**slurm(), "TF_CONFIG": tf_config(2, 0), "FT_NUM_PROCESSES": "2"}
    spec = detect(launched)
    assert spec is not None and spec.num_processes == 2
    with pytest.raises(Bad, match="TF_CONFIG says 2"):
        detect({**slurm(), "TF_CONFIG": tf_config(2, 0)})


def test_tensorflow_refuses_a_coordinator_only_cluster_across_hosts() -> None:
    from ft.strategies import tensorflow as tf_adapter

    spec = detect(
        {"COORDINATOR_ADDRESS": "job-worker-0:6666", "NUM_PROCESSES": "2", "PROCESS_ID": "0"}
    )
    assert spec is not None
    with pytest.raises(
        Bad, match=r"name only the JAX coordinator \(job-worker-0:6666\).*TF_CONFIG"
    ):
        tf_adapter._resolver(spec)


def test_tensorflow_refuses_a_tpu_slice() -> None:
    from ft.strategies import tensorflow as tf_adapter

    spec = detect({"TPU_WORKER_ID": "0", "TPU_WORKER_HOSTNAMES": "t0,t1"})
    assert spec is not None
    with pytest.raises(Bad, match=r"TPUStrategy.*KERAS_BACKEND=jax"):
        tf_adapter._resolver(spec)
