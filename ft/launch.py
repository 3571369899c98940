"""`python -m ft.launch`: run an N-worker cluster on this machine, restarting it after a failure.

    python -m ft.launch -n 2 [--max-restarts 3] [--grace-period 10] script.py [args...]

Runs in the launcher parent only. Each worker gets a `TF_CONFIG` describing
the whole cluster (worker 0 is the chief, and JAX's coordinator), plus
`FT_PROCESS_INDEX`, `FT_NUM_PROCESSES` and `FT_RESTART_COUNT`. Every output
line is prefixed with `[worker i]`. When a worker exits with a non-zero code
the others are stopped (SIGTERM, then SIGKILL after the grace period) and the
whole group is started again on fresh ports while restarts are left;
otherwise the launcher exits with the failing worker's code (128 + N when it
was killed by signal N). A worker that exits 42 (`ft.PREEMPTED_EXIT_CODE`:
it saved before a preemption) restarts the group without using a restart.
Ctrl-C stops every worker (SIGTERM, then SIGKILL) and exits 130. SIGTERM to
the launcher is forwarded to every worker; when they exit 42 after saving,
the launcher exits 42 too, otherwise 143. Exit 0 means every worker exited 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import portpicker

POLL_SECONDS = 0.05
PREEMPTED = 42  # ft.PREEMPTED_EXIT_CODE: "preempted, state saved, restart me"


@dataclass
class GroupResult:
    """How one launch of the worker group ended."""

    code: int  # 0 when every worker exited 0, else the first failure's exit code
    failed_worker: int | None
    preempted: bool = False  # some worker exited with PREEMPTED while stopping


def exit_code(returncode: int) -> int:
    """A Popen return code as a shell would report it (signal N -> 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def tf_config(ports: Sequence[int], index: int) -> str:
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    return json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})


class Launcher:
    """Starts, watches, stops and restarts one group of worker processes."""

    def __init__(
        self, num_workers: int, command: list[str], max_restarts: int, grace_period: float
    ) -> None:
        self.num_workers = num_workers
        self.command = command
        self.max_restarts = max_restarts
        self.grace_period = grace_period
        self.restarts = 0
        self.preemptions = 0
        self._procs: list[subprocess.Popen[bytes]] = []
        self._pumps: list[threading.Thread] = []
        self._stop_signal: int | None = None

    def run(self) -> int:
        """Run the group until it succeeds or no restart is left; the launcher's exit code."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        while True:
            result = self._run_group()
            if self._stop_signal is not None:
                # Workers that saved before stopping ask to be restarted; say so upward.
                if self._stop_signal == signal.SIGTERM and result.preempted:
                    self._say(f"stopped by SIGTERM after the workers saved; exiting {PREEMPTED}")
                    return PREEMPTED
                return 128 + self._stop_signal
            if result.code == 0:
                return 0
            if result.code == PREEMPTED:
                self.preemptions += 1
                self._say(
                    f"worker {result.failed_worker} was preempted and saved (exit {PREEMPTED}); "
                    f"restarting the group (preemption {self.preemptions}, not counted as a "
                    "restart)"
                )
                continue
            if self.restarts >= self.max_restarts:
                self._say(
                    f"worker {result.failed_worker} exited with code {result.code}; "
                    f"no restart left ({self.restarts} of {self.max_restarts} used), exiting"
                )
                return result.code
            self.restarts += 1
            self._say(
                f"worker {result.failed_worker} exited with code {result.code}; "
                f"restarting the group ({self.restarts} of {self.max_restarts})"
            )

    def _run_group(self) -> GroupResult:
        ports = [portpicker.pick_unused_port() for _ in range(self.num_workers)]
        self._procs, self._pumps = [], []
        for index in range(self.num_workers):
            env = dict(os.environ)
            env.update(
                TF_CONFIG=tf_config(ports, index),
                FT_PROCESS_INDEX=str(index),
                FT_NUM_PROCESSES=str(self.num_workers),
                FT_RESTART_COUNT=str(self.restarts + self.preemptions),  # relaunches so far
                PYTHONUNBUFFERED="1",
            )
            proc = subprocess.Popen(
                [sys.executable, *self.command],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a group of its own: we stop it and its children
            )
            pump = threading.Thread(target=_pump, args=(proc, f"[worker {index}] "), daemon=True)
            pump.start()
            self._procs.append(proc)
            self._pumps.append(pump)
        try:
            result = self._watch()
        finally:
            self._stop_all()
            for port in ports:
                portpicker.return_port(port)
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
        for proc in self._procs:
            _signal_group(proc, signal.SIGKILL)  # and whatever it started
            proc.wait()
        for pump in self._pumps:
            pump.join(timeout=5)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stop_signal = signum

    @staticmethod
    def _say(message: str) -> None:
        print(f"[ft.launch] {message}", flush=True)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _pump(proc: subprocess.Popen[bytes], prefix: str) -> None:
    assert proc.stdout is not None
    out = sys.stdout.buffer
    for line in iter(proc.stdout.readline, b""):
        out.write(
            prefix.encode() + line if line.endswith(b"\n") else prefix.encode() + line + b"\n"
        )
        out.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ft.launch",
        description="Run an N-worker training cluster on this machine, restarting it on failure.",
    )
    parser.add_argument("-n", "--num-workers", type=int, required=True, help="number of workers")
    parser.add_argument(
        "--max-restarts", type=int, default=0, help="group restarts allowed (default 0)"
    )
    parser.add_argument(
        "--grace-period",
        type=float,
        default=10.0,
        help="seconds between SIGTERM and SIGKILL when stopping workers (default 10)",
    )
    parser.add_argument("script", help="the Python script every worker runs")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    args = parser.parse_args(argv)
    if args.num_workers < 1:
        parser.error(f"-n must be at least 1, got {args.num_workers}")
    if args.max_restarts < 0:
        parser.error(f"--max-restarts must be 0 or more, got {args.max_restarts}")
    if not os.path.isfile(args.script):
        parser.error(f"no such script: {args.script}")
    launcher = Launcher(
        args.num_workers, [args.script, *args.args], args.max_restarts, args.grace_period
    )
    return launcher.run()


if __name__ == "__main__":
    sys.exit(main())
