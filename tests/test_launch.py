"""`python -m ft.launch`: cluster description, output prefixes, restarts, exit codes, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ft.launch import exit_code, tf_config
from ft.strategies import cluster_from_tf_config
from tests.helpers import ROOT

WORKER = """
import json, os, sys, time
index = int(os.environ["FT_PROCESS_INDEX"])
restart = int(os.environ["FT_RESTART_COUNT"])
config = json.loads(os.environ["TF_CONFIG"])
print("ready", index, restart, os.environ["FT_NUM_PROCESSES"], config["task"]["index"],
      len(config["cluster"]["worker"]), flush=True)
mode = sys.argv[1]
if mode == "fail-once" and index == 1 and restart == 0:
    sys.exit(7)
if mode == "always-fail" and index == 1:
    sys.exit(5)
if mode == "kill-self" and index == 0:
    os.kill(os.getpid(), 9)
if mode == "noisy":
    print("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR")
    print("I0000 00:00:1795661451.562046    7328 port.cc:153] oneDNN custom operations are on.")
    print("E0000 00:00:1795661451.562046    7328 worker.cc:1] a real engine error")
if mode == "die-first":
    # Worker 1 dies once worker 0 ignores SIGTERM (a file beside the launcher's markers).
    ignoring = os.path.join(os.path.dirname(os.environ["FT_SIGTERM_FILE"]), "ignoring")
    if index == 1:
        while not os.path.exists(ignoring):
            time.sleep(0.01)
        print("last words", flush=True)
        sys.exit(7)
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(ignoring, "w").close()
    time.sleep(600)
if mode == "preempt-1" and restart == 0:
    mine = os.environ["FT_SIGTERM_FILE"]
    if index == 1:
        open(mine, "w").close()  # what ft does when this worker gets SIGTERM
        time.sleep(1)
    else:
        other = mine[: -len(str(index))] + "1"
        while not os.path.exists(other):
            time.sleep(0.01)
    sys.exit(42)
if mode == "sleep":
    with open(sys.argv[2] + f".{index}", "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)
"""


def run_launch(tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "ft.launch", *args[:-1], str(script), args[-1]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_each_worker_gets_its_tf_config_and_prefixed_output(tmp_path: Path) -> None:
    proc = run_launch(tmp_path, "-n", "3", "ok")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for index in range(3):
        assert f"[worker {index}] ready {index} 0 3 {index} 3" in proc.stdout


def test_failed_worker_restarts_the_whole_group(tmp_path: Path) -> None:
    proc = run_launch(tmp_path, "-n", "2", "--max-restarts", "2", "fail-once")
    assert proc.returncode == 0, proc.stdout
    assert "worker 1 exited with code 7; restarting the group (1 of 2)" in proc.stdout
    assert "[worker 0] ready 0 1 2" in proc.stdout and "[worker 1] ready 1 1 2" in proc.stdout
    assert "(2 of 2)" not in proc.stdout


def test_exits_with_the_failing_code_when_no_restart_is_left(tmp_path: Path) -> None:
    proc = run_launch(tmp_path, "-n", "2", "--max-restarts", "1", "always-fail")
    assert proc.returncode == 5
    assert proc.stdout.count("[worker 1] ready") == 2
    assert "no restart left (1 of 1 used)" in proc.stdout


def test_a_death_is_reported_before_the_others_are_stopped(tmp_path: Path) -> None:
    proc = run_launch(tmp_path, "-n", "2", "--grace-period", "1", "die-first")
    assert proc.returncode == 7, proc.stdout
    lines = proc.stdout.splitlines()
    died = lines.index(
        "[ft.launch] worker 1 exited with code 7; no restart left (0 of 0 used), "
        "stopping the other workers and exiting"
    )
    assert lines.index("[worker 1] last words") < died
    assert died < lines.index("[ft.launch] worker 0 ignored SIGTERM; sending SIGKILL")


def test_the_worker_that_got_sigterm_is_named(tmp_path: Path) -> None:
    # Worker 0 exits 42 first; worker 1 is the one that was preempted.
    proc = run_launch(tmp_path, "-n", "2", "preempt-1")
    assert proc.returncode == 0, proc.stdout
    assert (
        "[ft.launch] worker 1 was preempted and saved (exit 42); restarting the group "
        "(preemption 1, not counted as a restart)"
    ) in proc.stdout


def test_engine_logs_are_hidden_unless_asked_for(tmp_path: Path) -> None:
    quiet = run_launch(tmp_path, "-n", "1", "noisy")
    assert quiet.returncode == 0, quiet.stdout
    assert "oneDNN" not in quiet.stdout and "absl::InitializeLog" not in quiet.stdout
    assert (
        "[worker 0] E0000 00:00:1795661451.562046    7328 worker.cc:1] a real engine error"
        in quiet.stdout
    )
    loud = run_launch(tmp_path, "--engine-logs", "-n", "1", "noisy")
    assert "[worker 0] I0000 00:00:1795661451.562046    7328 port.cc:153] oneDNN" in loud.stdout
    assert "absl::InitializeLog" in loud.stdout


def test_help_documents_variables_exit_codes_and_scope() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ft.launch", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0
    for needle in (
        "TF_CONFIG",
        "FT_PROCESS_INDEX",
        "FT_NUM_PROCESSES",
        "FT_RESTART_COUNT",
        "FT_SIGTERM_FILE",
        " 42 ",
        " 130 ",
        " 143 ",
        "on this machine",
        "On a cluster",
        "--engine-logs",
        "TF_CPP_MIN_LOG_LEVEL",
    ):
        assert needle in proc.stdout, needle


def test_no_arguments_names_only_what_is_required() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ft.launch"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 2
    assert "required: -n/--num-workers, script\n" in proc.stderr


def test_signal_death_is_reported_as_128_plus_signal(tmp_path: Path) -> None:
    proc = run_launch(tmp_path, "-n", "2", "kill-self")
    assert proc.returncode == 137
    assert exit_code(-9) == 137 and exit_code(3) == 3


def test_ctrl_c_stops_every_worker_and_leaves_no_orphan(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    pids = tmp_path / "pid"
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ft.launch",
            "-n",
            "2",
            "--grace-period",
            "2",
            str(script),
            "sleep",
            str(pids),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not all(Path(f"{pids}.{i}").exists() for i in (0, 1)):
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.1)
    time.sleep(0.2)
    worker_pids = [int(Path(f"{pids}.{i}").read_text()) for i in (0, 1)]
    launcher.send_signal(signal.SIGINT)
    assert launcher.wait(timeout=30) == 130
    for pid in worker_pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        # A zombie is gone for good; anything else is an orphan.
        state = (
            Path(f"/proc/{pid}/stat").read_text().split()[2]
            if Path(f"/proc/{pid}").exists()
            else "Z"
        )
        assert state == "Z", f"worker {pid} survived Ctrl-C"


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ft.launch", "-n", "0", "x.py"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "-n must be at least 1" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "ft.launch", "-n", "2", "missing.py"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "no such script" in proc.stderr


def test_tf_config_round_trips_through_the_parser() -> None:
    config = tf_config([1111, 2222], 1)
    spec = cluster_from_tf_config({"TF_CONFIG": config})
    assert spec is not None
    assert (spec.process_index, spec.num_processes, spec.coordinator_address) == (
        1,
        2,
        "localhost:1111",
    )


def test_chief_job_is_process_zero_and_evaluator_takes_no_part() -> None:
    cluster = {"chief": ["c:1"], "worker": ["w:1", "w:2"], "evaluator": ["e:1"]}

    def spec(task_type: str, index: int):
        return cluster_from_tf_config(
            {
                "TF_CONFIG": json.dumps(
                    {"cluster": cluster, "task": {"type": task_type, "index": index}}
                )
            }
        )

    assert spec("chief", 0).process_index == 0
    assert spec("worker", 1).process_index == 2
    assert spec("worker", 1).num_processes == 3
    assert spec("evaluator", 0) is None
