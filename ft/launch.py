"""`python -m ft.launch`: run an N-worker cluster on this machine, restarting it after a failure.

    python -m ft.launch -n 2 [--max-restarts 3] [--grace-period 10] [--engine-logs]
                        script.py [args...]

Runs in the launcher parent only. What each worker gets, the exit codes and
what is kept quiet are in `HELP_EPILOG` (shown by `--help`). Every output
line is prefixed with `[worker i]`; the launcher's own lines with
`[ft.launch]`. When a worker exits with a non-zero code the launcher says so
at once, stops the others (SIGTERM, then SIGKILL after the grace period) and
starts the whole group again on fresh ports while restarts are left;
otherwise it exits with the failing worker's code (128 + N when it was
killed by signal N). A worker that exits 42 (`ft.PREEMPTED_EXIT_CODE`: it
saved before a preemption) restarts the group without using a restart.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import portpicker

from ft import errors
from ft.preemption import SIGTERM_FILE_ENV

# A worker that outlives SIGKILL by this long is stuck in the kernel.
KILL_WAIT_SECONDS = 30.0
POLL_SECONDS = 0.05
PREEMPTED = 42  # ft.PREEMPTED_EXIT_CODE: "preempted, state saved, restart me"
# Set in a worker's environment unless already set (not with --engine-logs):
# the engines' C++ logs at INFO and WARNING stay out of the way.
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "GRPC_VERBOSITY": "ERROR", "GLOG_minloglevel": "2"}
# What is printed before those settings take effect (TensorFlow's oneDNN and
# CPU banners, absl's preamble, Gloo's connection notes): dropped from output.
ENGINE_NOISE = re.compile(
    r"^(?:I\d{4} [\d:.]+ +\d+ \S+:\d+\] "
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|To enable the following instructions: .* rebuild TensorFlow"
    r"|\[Gloo\] Rank \d+ is connected to \d+ peer ranks)"
)

HELP_EPILOG = f"""\
This runs every worker on this machine. On a cluster, start one process per
host with your scheduler (Kubernetes, Slurm, a cloud's managed training) and
give each a TF_CONFIG like the one below; ft reads it on TensorFlow and JAX
alike. The scheduler then restarts failed jobs, as --max-restarts does here.

each worker gets, in its environment:
  TF_CONFIG          the whole cluster, {{"cluster": {{"worker": ["localhost:PORT", ...]}},
                     "task": {{"type": "worker", "index": i}}}}; worker 0 is the chief
                     (and JAX's coordinator); fresh ports at every (re)start
  FT_PROCESS_INDEX   i, from 0;   FT_NUM_PROCESSES   N
  FT_RESTART_COUNT   how many times the group was started again (0 the first time)
  FT_LAUNCH_ID       one id for this launcher's whole life: a restarted group takes
                     over at once the lease its killed predecessor held on a gs://
                     or s3:// backup_dir
  {SIGTERM_FILE_ENV}    a file ft creates when this worker gets SIGTERM, so the
                     launcher can name the preempted worker
  PYTHONUNBUFFERED=1, and unless already set (not with --engine-logs):
  {" ".join(f"{k}={v}" for k, v in QUIET_ENV.items())}

engine logs: the engines' C++ INFO and WARNING logs (TensorFlow's oneDNN
banner, coordination service, barriers, Gloo) are hidden by the variables
above and by dropping the lines printed before they take effect. Errors are
always shown. --engine-logs shows everything.

exit codes:
  0      every worker exited 0
  N      a worker exited N and no restart was left (128 + S when killed by
         signal S: 137 for SIGKILL, 143 for SIGTERM)
  42     the launcher got SIGTERM and the workers saved before stopping
         (ft.PREEMPTED_EXIT_CODE: "preempted, restart me")
  130    stopped by Ctrl-C (SIGINT)
  143    stopped by SIGTERM without a save
A worker exiting 42 restarts the group without using one of --max-restarts.
"""


@dataclass
class GroupResult:
    """How one launch of the worker group ended."""

    code: int  # 0 when every worker exited 0, else the first failure's exit code
    failed_worker: int | None
    preempted: bool = False  # some worker exited with PREEMPTED while stopping


@dataclass
class LaunchResult:
    """How a whole launch ended, over every restart of the group.

    Attributes:
        exit_code: The launcher's exit code (see `HELP_EPILOG`).
        restarts: Restarts used after failures (counted against `max_restarts`).
        preemptions: Restarts after a preemption (exit 42), which use none.
        outputs: Each worker's output lines, without the `[worker i] ` prefix,
            over every start, when the launcher was made with `keep_output=True`.
    """

    exit_code: int
    restarts: int
    preemptions: int
    outputs: list[list[str]] = field(default_factory=list)


def exit_code(returncode: int) -> int:
    """A Popen return code as a shell would report it (signal N -> 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def tf_config(ports: Sequence[int], index: int) -> str:
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    return json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})


def is_engine_noise(line: str) -> bool:
    """True for an engine's C++ INFO line or start-up banner (see `ENGINE_NOISE`)."""
    return ENGINE_NOISE.match(line) is not None


class Launcher:
    """Starts, watches, stops and restarts one group of worker processes.

    Args:
        num_workers: Integer, the workers of the group.
        command: The script and its arguments; each worker runs it with this Python.
        max_restarts: Integer, group restarts allowed after failures.
        grace_period: Float, seconds between SIGTERM and SIGKILL when stopping workers.
        engine_logs: Boolean, show the engines' C++ logs. Defaults to `False`.
        keep_output: Boolean, also keep each worker's lines for `LaunchResult.outputs`.
        env: Extra environment for every worker, or None.
    """

    def __init__(
        self,
        num_workers: int,
        command: list[str],
        max_restarts: int,
        grace_period: float,
        *,
        engine_logs: bool = False,
        keep_output: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.num_workers = num_workers
        self.command = command
        self.max_restarts = max_restarts
        self.grace_period = grace_period
        self.engine_logs = engine_logs
        self.keep_output = keep_output
        self.env = dict(env or {})
        self.restarts = 0
        self.launch_id = uuid.uuid4().hex
        self.preemptions = 0
        self.outputs: list[list[str]] = [[] for _ in range(num_workers)]
        self._procs: list[subprocess.Popen[bytes]] = []
        self._pumps: list[threading.Thread] = []
        self._stop_signal: int | None = None
        self._print_lock = threading.Lock()

    def run(self) -> int:
        """Run the group until it succeeds or no restart is left; the launcher's exit code."""
        return self.launch().exit_code

    def launch(self) -> LaunchResult:
        """Like `run`, with the restarts and (with `keep_output`) each worker's lines."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        while True:
            result = self._run_group()
            if self._stop_signal is not None:
                # Workers that saved before stopping ask to be restarted; say so upward.
                if self._stop_signal == signal.SIGTERM and result.preempted:
                    self._say(f"stopped by SIGTERM after the workers saved; exiting {PREEMPTED}")
                    return self._result(PREEMPTED)
                return self._result(128 + self._stop_signal)
            if result.code == 0:
                return self._result(0)
            if result.code == PREEMPTED:
                self.preemptions += 1
                continue
            if self.restarts >= self.max_restarts:
                return self._result(result.code)
            self.restarts += 1

    def _result(self, code: int) -> LaunchResult:
        return LaunchResult(code, self.restarts, self.preemptions, self.outputs)

    def _decision(self, result: GroupResult, sigterm_from: list[int]) -> str:
        """What happens after this failure, said before the other workers are stopped."""
        worker = result.failed_worker
        if result.code == PREEMPTED:
            if sigterm_from:
                worker = sigterm_from[0]
            return (
                f"worker {worker} was preempted and saved (exit {PREEMPTED}); "
                f"restarting the group (preemption {self.preemptions + 1}, not counted as a "
                "restart)"
            )
        said = f"worker {worker} exited with code {result.code}"
        if self.restarts >= self.max_restarts:
            return (
                f"{said}; no restart left ({self.restarts} of {self.max_restarts} used), "
                "stopping the other workers and exiting"
            )
        return f"{said}; restarting the group ({self.restarts + 1} of {self.max_restarts})"

    def _worker_env(self, ports: list[int], index: int, marker_dir: str) -> dict[str, str]:
        env = dict(os.environ)
        if not self.engine_logs:
            for key, value in QUIET_ENV.items():
                env.setdefault(key, value)
        env.update(self.env)
        env.update(
            TF_CONFIG=tf_config(ports, index),
            FT_PROCESS_INDEX=str(index),
            FT_NUM_PROCESSES=str(self.num_workers),
            FT_RESTART_COUNT=str(self.restarts + self.preemptions),  # relaunches so far
            FT_LAUNCH_ID=self.launch_id,
            PYTHONUNBUFFERED="1",
        )
        env[SIGTERM_FILE_ENV] = os.path.join(marker_dir, f"sigterm.{index}")
        return env

    def _run_group(self) -> GroupResult:
        ports = [portpicker.pick_unused_port() for _ in range(self.num_workers)]
        marker_dir = tempfile.mkdtemp(prefix="ft-launch-")
        self._procs, self._pumps = [], []
        for index in range(self.num_workers):
            proc = subprocess.Popen(
                [sys.executable, *self.command],
                env=self._worker_env(ports, index, marker_dir),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a group of its own: we stop it and its children
            )
            pump = threading.Thread(target=self._pump, args=(proc, index), daemon=True)
            pump.start()
            self._procs.append(proc)
            self._pumps.append(pump)
        try:
            result = self._watch()
            if result.failed_worker is not None:
                # The failed worker's last lines first, then what happens next.
                self._pumps[result.failed_worker].join(timeout=2)
                sigterm_from = [
                    i
                    for i in range(self.num_workers)
                    if os.path.exists(os.path.join(marker_dir, f"sigterm.{i}"))
                ]
                self._say(self._decision(result, sigterm_from))
        finally:
            self._stop_all()
            for port in ports:
                portpicker.return_port(port)
            shutil.rmtree(marker_dir, ignore_errors=True)
        result.preempted = any(p.returncode == PREEMPTED for p in self._procs)
        return result

    def _watch(self) -> GroupResult:
        while self._stop_signal is None:
            codes = [p.poll() for p in self._procs]
            for index, code in enumerate(codes):
                if code not in (None, 0):
                    return GroupResult(exit_code(code), index)
            if all(code == 0 for code in codes):
                return GroupResult(0, None)
            time.sleep(POLL_SECONDS)
        return GroupResult(128 + self._stop_signal, None)

    def _stop_all(self) -> None:
        live = [p for p in self._procs if p.poll() is None]
        for proc in live:
            _signal_group(proc, signal.SIGTERM)
            _signal_group(proc, signal.SIGCONT)  # a stopped worker must run to see SIGTERM
        deadline = time.monotonic() + self.grace_period
        for proc in live:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                self._say(f"worker {self._procs.index(proc)} ignored SIGTERM; sending SIGKILL")
        for index, proc in enumerate(self._procs):
            _signal_group(proc, signal.SIGKILL)  # and whatever it started
            try:
                proc.wait(timeout=KILL_WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                raise errors.ProcessExitTimeoutError(
                    f"worker {index} (pid {proc.pid}) did not exit within "
                    f"{KILL_WAIT_SECONDS:g} s of SIGKILL: it is stuck in the kernel (an "
                    "uninterruptible wait on a device or a network filesystem). Check "
                    f"`cat /proc/{proc.pid}/stack`; the launcher stops here instead of "
                    "starting a group beside it."
                ) from None
        for pump in self._pumps:
            pump.join(timeout=5)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stop_signal = signum

    def _pump(self, proc: subprocess.Popen[bytes], index: int) -> None:
        assert proc.stdout is not None
        prefix = f"[worker {index}] ".encode()
        out = sys.stdout.buffer
        for line in iter(proc.stdout.readline, b""):
            text = line.decode("utf-8", "replace").rstrip("\n")
            if not self.engine_logs and is_engine_noise(text):
                continue
            if self.keep_output:
                self.outputs[index].append(text)
            with self._print_lock:
                out.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
                out.flush()

    def _say(self, message: str) -> None:
        with self._print_lock:
            print(f"[ft.launch] {message}", flush=True)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def build_parser(prog: str = "python -m ft.launch") -> argparse.ArgumentParser:
    """The launcher's command line (`python -m ft.launch` and `ft launch`)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run an N-worker training cluster on this machine (one process per\n"
        "worker), restarting the whole group when a worker fails.",
        epilog=HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from ft import __version__

    parser.add_argument("--version", action="version", version=f"ft {__version__}")
    parser.add_argument(
        "-n", "--num-workers", type=int, required=True, help="number of workers (required)"
    )
    parser.add_argument(
        "--max-restarts", type=int, default=0, help="group restarts allowed (default 0)"
    )
    parser.add_argument(
        "--grace-period",
        type=float,
        default=10.0,
        help="seconds between SIGTERM and SIGKILL when stopping workers (default 10)",
    )
    parser.add_argument(
        "--engine-logs",
        action="store_true",
        help="show the engines' C++ INFO/WARNING logs (hidden by default)",
    )
    parser.add_argument("script", help="the Python script every worker runs (required)")
    rest = parser.add_argument(
        "args", nargs=argparse.REMAINDER, help="arguments for the script (optional)"
    )
    rest.required = False  # argparse marks REMAINDER required; it is not
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m ft.launch") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.num_workers < 1:
        parser.error(f"-n must be at least 1, got {args.num_workers}")
    if args.max_restarts < 0:
        parser.error(f"--max-restarts must be 0 or more, got {args.max_restarts}")
    if not os.path.isfile(args.script):
        parser.error(f"no such script: {args.script}")
    launcher = Launcher(
        args.num_workers,
        [args.script, *args.args],
        args.max_restarts,
        args.grace_period,
        engine_logs=args.engine_logs,
    )
    return launcher.run()


if __name__ == "__main__":
    sys.exit(main())
