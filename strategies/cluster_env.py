"""The cluster environments users launch from, each parsed into one `ClusterSpec`.

`detect()` looks, in this order, at `TF_CONFIG` (Kubeflow TFJob, `python -m
ft.launch`), Kubeflow JAXJob's `COORDINATOR_ADDRESS`/`COORDINATOR_PORT`/
`NUM_PROCESSES`/`PROCESS_ID`, Kubeflow Trainer's `JAX_`-prefixed ones, Keras's
`KERAS_DISTRIBUTION_JOB_ADDRESSES`/`_NUM_PROCESSES`/`_PROCESS_ID`, SLURM
(`srun`), and GKE TPU (`TPU_WORKER_ID`, `TPU_WORKER_HOSTNAMES`). The first one
present describes the cluster; the others present must agree on the number of
processes. The process with index 0 is the chief on both engines.

TensorFlow's MultiWorkerMirroredStrategy needs one `host:port` per process:

- SLURM: every task of node `n` listens on `n:(BASE + SLURM_LOCALID)`, where
  BASE is the port JAX picks for its SLURM coordinator, `61440 + SLURM_JOB_ID %
  4096` (`JAX_COORDINATOR_PORT` replaces it), so two jobs sharing a node do
  not collide and every task computes the same addresses.
- GKE TPU: refused under TensorFlow (TPUs need TPUStrategy); the spec lists
  the hosts with port 8476 only to count them.
- Keras: the addresses of `KERAS_DISTRIBUTION_JOB_ADDRESSES`, one per process.
- Where only a coordinator is named (Kubeflow's JAX variables, Keras with one
  address): process `i` listens on the coordinator's host, port + `i`, when
  that host is this machine (`localhost`, `127.x`); across hosts TensorFlow
  cannot learn the other workers' addresses and `ft.strategies.auto()` says so.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from ft import errors


@dataclass(frozen=True)
class ClusterSpec:
    """This process's place in a cluster, from `TF_CONFIG` or another environment.

    A `chief` task, when present, is process 0 and the workers follow it; an
    `evaluator` takes no part in training. The functions below parse the
    other environments (Kubeflow, Keras, SLURM, GKE TPU).
    """

    # host:port of each training process in process-index order (TensorFlow's
    # servers); empty where the environment names only the JAX coordinator.
    addresses: tuple[str, ...]
    task_type: str
    task_index: int
    process_index: int
    source: str = "TF_CONFIG"  # the environment it was read from
    process_count: int = 0  # where `addresses` is empty
    coordinator: str = ""  # JAX's coordinator; defaults to the first address
    jax_detects: bool = False  # jax.distributed.initialize() finds it by itself

    @property
    def num_processes(self) -> int:
        return len(self.addresses) or self.process_count

    @property
    def coordinator_address(self) -> str:
        return self.coordinator or self.addresses[0]


def cluster_from_tf_config(environ: Mapping[str, str] | None = None) -> ClusterSpec | None:
    """Parse `TF_CONFIG`; None when it is unset or describes a single task."""
    raw = (environ if environ is not None else os.environ).get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        config: Any = json.loads(raw)
        cluster = config.get("cluster", {})
        task = config.get("task", {})
        task_type, task_index = str(task["type"]), int(task["index"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise errors.UnsupportedConfigurationError(
            f"TF_CONFIG is not valid: {e!r}. Received: TF_CONFIG={raw[:200]!r}. Expected JSON "
            'like {"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", '
            '"index": 0}}.'
        ) from None
    if cluster.get("ps"):
        raise errors.UnsupportedConfigurationError(
            "TF_CONFIG describes a parameter-server cluster (a `ps` job); ft supports "
            "synchronous data-parallel training (`chief` and `worker` jobs) only."
        )
    addresses = tuple(cluster.get("chief", [])) + tuple(cluster.get("worker", []))
    if task_type == "evaluator" or len(addresses) <= 1:
        return None
    if task_type == "chief":
        process_index = task_index
    elif task_type == "worker":
        process_index = len(cluster.get("chief", [])) + task_index
    else:
        raise errors.UnsupportedConfigurationError(
            f"TF_CONFIG task type {task_type!r} is not supported. Expected 'chief', 'worker' "
            "or 'evaluator'."
        )
    if not 0 <= process_index < len(addresses):
        raise errors.UnsupportedConfigurationError(
            f"TF_CONFIG task index {task_index} is out of range for the {task_type} job."
        )
    return ClusterSpec(addresses, task_type, task_index, process_index)


# The port in a GKE TPU spec's addresses (JAX's own TPU coordinator uses 8482).
TPU_TF_PORT = 8476
_LOOPBACK = re.compile(r"^(localhost|127\.\d+\.\d+\.\d+|\[?::1\]?)$")


def _fail(environment: str, found: Mapping[str, str], problem: str, expected: str) -> NoReturn:
    shown = ", ".join(f"{k}={v!r}" for k, v in found.items()) or "nothing"
    raise errors.UnsupportedConfigurationError(
        f"The {environment} cluster description is {problem}. Received: {shown}. Expected "
        f"{expected}. Set the missing variables (or unset the stray ones) in the job's "
        "environment; see docs/clusters.md."
    )


def _int(environment: str, found: Mapping[str, str], name: str) -> int:
    try:
        return int(found[name])
    except (KeyError, ValueError):
        _fail(environment, found, f"missing or invalid {name}", f"{name} as an integer")


def _check_index(environment: str, found: Mapping[str, str], index: int, count: int) -> None:
    if count < 1 or not 0 <= index < count:
        _fail(
            environment,
            found,
            f"inconsistent: process index {index} is out of range for {count} processes",
            f"a process index from 0 to {count - 1} and a count of at least 1",
        )


def _split_address(environment: str, found: Mapping[str, str], address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        _fail(environment, found, f"invalid: address {address!r} has no port", "host:port")
    return host, int(port)


def _coordinator_only(
    environment: str,
    found: Mapping[str, str],
    coordinator: str,
    index: int,
    count: int,
) -> ClusterSpec | None:
    _check_index(environment, found, index, count)
    if count == 1:
        return None
    host, port = _split_address(environment, found, coordinator)
    tf_addresses: tuple[str, ...] = ()
    if _LOOPBACK.match(host):
        tf_addresses = tuple(f"{host}:{port + i}" for i in range(count))
    return ClusterSpec(
        tf_addresses,
        "worker",
        index,
        index,
        source=environment,
        process_count=count,
        coordinator=coordinator,
    )


def _kubeflow(prefix: str, environment: str, env: Mapping[str, str]) -> ClusterSpec | None:
    names = [prefix + n for n in ("COORDINATOR_ADDRESS", "COORDINATOR_PORT")]
    names += [prefix + n for n in ("NUM_PROCESSES", "PROCESS_ID")]
    found = {n: env[n] for n in names if n in env}
    # JAX reads JAX_COORDINATOR_ADDRESS/_PORT itself (as overrides of its own detection):
    # the environment is Kubeflow's only with a process count or index.
    if not {prefix + "NUM_PROCESSES", prefix + "PROCESS_ID"} & found.keys():
        return None
    count = _int(environment, found, prefix + "NUM_PROCESSES")
    index = _int(environment, found, prefix + "PROCESS_ID")
    address = found.get(prefix + "COORDINATOR_ADDRESS", "")
    if not address:
        _fail(environment, found, f"incomplete: {prefix}COORDINATOR_ADDRESS is missing", "it")
    if prefix + "COORDINATOR_PORT" in found and ":" not in address.strip("[]"):
        address = f"{address}:{_int(environment, found, prefix + 'COORDINATOR_PORT')}"
    return _coordinator_only(environment, found, address, index, count)


def from_kubeflow_jaxjob(env: Mapping[str, str]) -> ClusterSpec | None:
    """Kubeflow JAXJob's `COORDINATOR_ADDRESS`/`_PORT`, `NUM_PROCESSES`, `PROCESS_ID`."""
    return _kubeflow("", "Kubeflow JAXJob", env)


def from_kubeflow_trainer(env: Mapping[str, str]) -> ClusterSpec | None:
    """Kubeflow Trainer: `JAX_COORDINATOR_ADDRESS`/`_PORT`, `JAX_NUM_PROCESSES`, `_PROCESS_ID`."""
    return _kubeflow("JAX_", "Kubeflow Trainer", env)


def from_keras(env: Mapping[str, str]) -> ClusterSpec | None:
    """Keras's `KERAS_DISTRIBUTION_JOB_ADDRESSES`, `_NUM_PROCESSES`, `_PROCESS_ID`."""
    environment = "Keras"
    names = ("JOB_ADDRESSES", "NUM_PROCESSES", "PROCESS_ID")
    found = {
        f"KERAS_DISTRIBUTION_{n}": env[f"KERAS_DISTRIBUTION_{n}"]
        for n in names
        if f"KERAS_DISTRIBUTION_{n}" in env
    }
    if not found:
        return None
    addresses = tuple(
        a.strip() for a in found.get("KERAS_DISTRIBUTION_JOB_ADDRESSES", "").split(",") if a.strip()
    )
    if not addresses:
        _fail(
            environment,
            found,
            "incomplete: KERAS_DISTRIBUTION_JOB_ADDRESSES is missing",
            "a comma-separated list of host:port, the first being the coordinator",
        )
    if "KERAS_DISTRIBUTION_NUM_PROCESSES" in found or len(addresses) == 1:
        count = _int(environment, found, "KERAS_DISTRIBUTION_NUM_PROCESSES")
    else:
        count = len(addresses)
    index = _int(environment, found, "KERAS_DISTRIBUTION_PROCESS_ID")
    if len(addresses) == 1:
        return _coordinator_only(environment, found, addresses[0], index, count)
    if len(addresses) != count:
        _fail(
            environment,
            found,
            f"inconsistent: {len(addresses)} addresses for {count} processes",
            "one address per process, or only the coordinator's",
        )
    _check_index(environment, found, index, count)
    for address in addresses:
        _split_address(environment, found, address)
    return ClusterSpec(addresses, "worker", index, index, source=environment)


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list, expanded: `node[01-03],gpu7` -> node01 node02 node03 gpu7."""
    hosts: list[str] = []
    for name in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", hostlist):
        match = re.search(r"\[([^\]]*)\]", name)
        if match is None:
            hosts.append(name)
            continue
        head, tail = name[: match.start()], name[match.end() :]
        for part in match.group(1).split(","):
            first, _, last = part.partition("-")
            if not first.isdigit() or (last and not last.isdigit()):
                raise ValueError(f"invalid range {part!r} in host list {hostlist!r}")
            for number in range(int(first), int(last or first) + 1):
                hosts.extend(expand_hostlist(f"{head}{number:0{len(first)}d}{tail}"))
    return hosts


def _tasks_per_node(spec: str) -> list[int]:
    """`2(x3),1` -> [2, 2, 2, 1], SLURM's format of SLURM_STEP_TASKS_PER_NODE."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise ValueError(f"invalid tasks-per-node {spec!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def slurm_tf_port(env: Mapping[str, str]) -> int:
    """The first TensorFlow port on every node: JAX's SLURM coordinator port."""
    if env.get("JAX_COORDINATOR_PORT", "").isdigit():
        return int(env["JAX_COORDINATOR_PORT"])
    return int(env.get("SLURM_JOB_ID", "0")) % 4096 + 65536 - 4096


def from_slurm(env: Mapping[str, str]) -> ClusterSpec | None:
    """SLURM (`srun`): `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_STEP_NODELIST` (or
    `SLURM_JOB_NODELIST`), tasks placed on nodes in block order by
    `SLURM_STEP_TASKS_PER_NODE` (one task per node when it is unset)."""
    environment = "SLURM"
    names = (
        "SLURM_JOB_ID",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURM_STEP_NODELIST",
        "SLURM_JOB_NODELIST",
        "SLURM_STEP_TASKS_PER_NODE",
        "SLURM_LOCALID",
    )
    found = {n: env[n] for n in names if n in env}
    if "SLURM_NTASKS" not in found and "SLURM_PROCID" not in found:
        return None
    count = _int(environment, found, "SLURM_NTASKS")
    if count == 1:
        return None
    if "SLURM_PROCID" not in found:
        _fail(
            environment,
            found,
            f"incomplete: SLURM_NTASKS={count} but no SLURM_PROCID",
            "each task started by `srun` (which sets SLURM_PROCID), not run directly "
            "in the batch script",
        )
    index = _int(environment, found, "SLURM_PROCID")
    _check_index(environment, found, index, count)
    nodelist = found.get("SLURM_STEP_NODELIST") or found.get("SLURM_JOB_NODELIST", "")
    try:
        nodes = expand_hostlist(nodelist)
        per_node = (
            _tasks_per_node(found["SLURM_STEP_TASKS_PER_NODE"])
            if "SLURM_STEP_TASKS_PER_NODE" in found
            else [1] * len(nodes)
        )
    except ValueError as e:
        _fail(environment, found, f"invalid: {e}", "SLURM's host list and tasks-per-node")
    if not nodes or len(per_node) != len(nodes) or sum(per_node) != count:
        _fail(
            environment,
            found,
            f"inconsistent: {count} tasks cannot be placed on nodes {nodes} "
            f"({per_node} tasks per node)",
            "SLURM_STEP_NODELIST with one node per task, or SLURM_STEP_TASKS_PER_NODE "
            "adding up to SLURM_NTASKS",
        )
    port = slurm_tf_port(env)
    addresses = tuple(
        f"{n}:{port + local}" for n, k in zip(nodes, per_node, strict=True) for local in range(k)
    )
    jax_detects = all(n in env for n in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_LOCALID"))
    return ClusterSpec(
        addresses, "worker", index, index, source=environment, jax_detects=jax_detects
    )


def from_gke_tpu(env: Mapping[str, str]) -> ClusterSpec | None:
    """GKE TPU: `TPU_WORKER_ID` and `TPU_WORKER_HOSTNAMES` (comma-separated)."""
    environment = "GKE TPU"
    found = {n: env[n] for n in ("TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES") if n in env}
    if not found:
        return None
    hosts = [h.strip() for h in found.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if not hosts:
        _fail(
            environment,
            found,
            "incomplete: TPU_WORKER_HOSTNAMES is missing",
            "a comma-separated list of the slice's hosts",
        )
    index = _int(environment, found, "TPU_WORKER_ID")
    _check_index(environment, found, index, len(hosts))
    if len(hosts) == 1:
        return None
    addresses = tuple(f"{h}:{TPU_TF_PORT}" for h in hosts)
    return ClusterSpec(addresses, "worker", index, index, source=environment, jax_detects=True)


# In order of precedence.
PARSERS: tuple[tuple[str, Callable[[Mapping[str, str]], ClusterSpec | None]], ...] = (
    ("TF_CONFIG", cluster_from_tf_config),
    ("Kubeflow JAXJob", from_kubeflow_jaxjob),
    ("Kubeflow Trainer", from_kubeflow_trainer),
    ("Keras", from_keras),
    ("SLURM", from_slurm),
    ("GKE TPU", from_gke_tpu),
)


def detect(environ: Mapping[str, str] | None = None) -> ClusterSpec | None:
    """The cluster this process belongs to, or None for a single process.

    Call on all processes. Raises `ft.errors.UnsupportedConfigurationError`
    when the first environment present is incomplete or inconsistent, or when
    two multi-process environments disagree about the number of processes.
    """
    env = os.environ if environ is None else environ
    chosen: ClusterSpec | None = None
    for _, parse in PARSERS:
        spec = parse(env)
        if spec is not None:
            chosen = spec
            break
    if chosen is None or (chosen.source == "TF_CONFIG" and "FT_NUM_PROCESSES" in env):
        return chosen  # python -m ft.launch's TF_CONFIG is its own, even inside an allocation
    for name, parse in PARSERS:
        if name == chosen.source:
            continue
        try:
            other = parse(env)
        except errors.UnsupportedConfigurationError:
            continue  # only the description in use must be complete
        if other is not None and other.num_processes != chosen.num_processes:
            raise errors.UnsupportedConfigurationError(
                f"Two cluster descriptions disagree about the number of processes: "
                f"{chosen.source} says {chosen.num_processes} (process {chosen.process_index}), "
                f"{other.source} says {other.num_processes} (process {other.process_index}). "
                f"Expected one description, or several that agree; ft uses {chosen.source} "
                f"first. Unset the other's variables in the job's environment."
            )
    return chosen
