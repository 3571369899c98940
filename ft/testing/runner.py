"""`ft.testing.run`: start a job through `python -m ft.launch`, wait a bounded time, clean up.

Runs in the test process. The launcher runs in a session of its own and
starts each worker in another; every process of the job inherits a unique
`FT_TESTING_JOB` token, so whatever is left when the job ends, times out or
the test is interrupted is found (Linux: through /proc) and SIGKILLed with
its process group.
"""

from __future__ import annotations

import numbers
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ft import errors
from ft.testing.result import JobResult, parse

ENV_DIR = "FT_TESTING_DIR"  # the job's directory: fault markers, the test's files
ENV_JOB = "FT_TESTING_JOB"
BACKENDS = ("tensorflow", "jax")
# Defaults for the workers, each overridable through `env`: run on the CPU
# (N processes on one machine), keep TensorFlow's C++ logging quiet.
DEFAULT_ENV = {"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
# ft's INFO lines (where each worker resumed) must reach the output.
SHOWN_ENV = {"FT_LOG_LEVEL": "INFO"}
_REAP_SECONDS = 10.0


def run(
    script: str | os.PathLike[str],
    num_workers: int = 2,
    *,
    args: Sequence[str] = (),
    backend: str | None = None,
    max_restarts: int = 0,
    env: Mapping[str, str] | None = None,
    timeout: float = 300.0,
    grace_period: float = 5.0,
    directory: str | os.PathLike[str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    echo: bool = True,
) -> JobResult:
    """Runs `script` as a `num_workers`-worker job on this machine, as `python -m ft.launch` does.

    Call from a test. The job is `python -m ft.launch -n NUM_WORKERS
    --max-restarts MAX_RESTARTS --grace-period GRACE_PERIOD SCRIPT ARGS...`
    in a process of its own; every worker gets the launcher's environment
    (`TF_CONFIG`, `FT_PROCESS_INDEX`, ...) plus `FT_TESTING_DIR`, the job's
    directory, where the fault callbacks (`ft.testing.KillWorker`, ...) keep
    their once-per-job markers. When the job ends, times out, or the caller
    is interrupted, every process it started is stopped.

    Example:

    >>> result = ft.testing.run("train.py", num_workers=2, backend="jax", max_restarts=1)
    >>> assert result.exit_code == 0, result.tail()
    >>> assert result.workers[0].resumed.step == result.workers[1].resumed.step

    Args:
        script: String or path-like, the training script every worker runs.
        num_workers: Integer, how many workers. Defaults to 2.
        args: Sequence of strings, the script's arguments. Defaults to none.
        backend: `"tensorflow"`, `"jax"`, or None to keep `KERAS_BACKEND` from
            the environment. Defaults to None.
        max_restarts: Integer, how many failures the launcher restarts the
            group after (preemptions use none). Defaults to 0.
        env: Mapping of environment variables for the workers, over this
            process's environment and the defaults (`JAX_PLATFORMS=cpu`,
            `CUDA_VISIBLE_DEVICES=""`, `TF_CPP_MIN_LOG_LEVEL=2` unless set here;
            `FT_LOG_LEVEL=INFO`, so that restores are seen). Defaults to None.
        timeout: Float, seconds the whole job may take, restarts included.
            Past it every process is stopped and `ft.errors.JobTimeoutError`
            raised. Defaults to 300.
        grace_period: Float, the launcher's `--grace-period`: seconds between
            SIGTERM and SIGKILL when it stops workers. Defaults to 5.
        directory: String or path-like, the job's directory (`FT_TESTING_DIR`);
            created if needed. Defaults to a temporary directory, removed after.
        cwd: Where the launcher runs. Defaults to this process's directory.
        echo: Boolean, whether to copy the job's output to `sys.stdout` as it
            comes (pytest shows it for failed tests). Defaults to True.

    Returns:
        A `JobResult`: exit code, restarts, each worker's output lines and
        restore points.

    Raises:
        ft.errors.JobTimeoutError: the job did not end within `timeout`.
    """
    script = os.fspath(script)
    _check_arguments(script, num_workers, backend, max_restarts, timeout, grace_period)
    owned = None
    if directory is None:
        owned = tempfile.TemporaryDirectory(prefix="ft-testing-")
        directory = owned.name
    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    token = uuid.uuid4().hex
    job_env = {**DEFAULT_ENV, **os.environ, **SHOWN_ENV}
    if backend is not None:
        job_env["KERAS_BACKEND"] = backend
    job_env.update(env or {})
    job_env.update({ENV_DIR: directory, ENV_JOB: token, "PYTHONUNBUFFERED": "1"})
    command = [
        sys.executable,
        "-m",
        "ft.launch",
        "-n",
        str(num_workers),
        "--max-restarts",
        str(max_restarts),
        "--grace-period",
        str(grace_period),
        script,
        *args,
    ]
    lines: list[str] = []
    times: list[float] = []
    try:
        launcher = subprocess.Popen(
            command,
            env=job_env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the test, which then stops the job
        )
        try:
            reader = threading.Thread(
                target=_read, args=(launcher, lines, times, echo), daemon=True
            )
            reader.start()
            try:
                code = launcher.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _stop_launcher(launcher, grace_period)
                reader.join(timeout=_REAP_SECONDS)
                result = parse(lines, num_workers, 128 + signal.SIGKILL, directory, times)
                raise errors.JobTimeoutError(
                    f"ft.testing.run: the {num_workers}-worker job of {script} did not end "
                    f"within timeout={timeout:g} s; every process of it was stopped. Expected "
                    "it to finish: look at the last lines below for a hang, or raise "
                    f"`timeout` if it is only slow.\n{result.tail()}",
                    result,
                ) from None
            reader.join(timeout=_REAP_SECONDS)
            return parse(lines, num_workers, code, directory, times)
        finally:
            if launcher.poll() is None:  # interrupted (e.g. Ctrl-C) while waiting
                _stop_launcher(launcher, grace_period)
            _kill_where(ENV_JOB, lambda value: value == token)
    finally:
        if owned is not None:
            owned.cleanup()


class JobRunner:
    """Runs jobs for one test, each with its own directory under the test's `tmp_path`.

    Call like `ft.testing.run` (`runner(script, num_workers=2, ...)`), and
    `close()` when done; the `ft_job` pytest fixture is one, closed after the test.

    Attributes:
        path: The directory the jobs' directories go under (the test's `tmp_path`).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._runs = 0

    def __call__(self, script: str | os.PathLike[str], *args: Any, **kwargs: Any) -> JobResult:
        """`ft.testing.run(script, ...)`, with `directory` defaulting to `path/ft-job-N`."""
        self._runs += 1
        kwargs.setdefault("directory", self.path / f"ft-job-{self._runs}")
        return run(script, *args, **kwargs)

    run = __call__

    def close(self) -> None:
        """SIGKILLs whatever this test's jobs left running."""
        kill_jobs_under(self.path)


def kill_jobs_under(directory: str | os.PathLike[str]) -> list[int]:
    """SIGKILLs every process of the jobs whose directory is `directory` or under it; their pids.

    Call from the test process, e.g. when a test ends (the `ft_job` fixture
    does). Linux only (reads /proc); elsewhere does nothing and returns [].
    """
    root = os.path.abspath(os.fspath(directory))
    return _kill_where(ENV_DIR, lambda value: value == root or value.startswith(root + os.sep))


def _kill_where(name: str, match: Callable[[str], bool]) -> list[int]:
    """SIGKILLs every process whose environment variable `name` matches (and its
    process group), then waits up to 10 s for them to be gone; their pids."""
    own_group = os.getpgrp()
    found = _processes_with(name.encode() + b"=", match)
    for pid in found:
        try:
            group = os.getpgid(pid)
            if group != own_group:
                os.killpg(group, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + _REAP_SECONDS
    while any(_alive(pid) for pid in found) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def _check_arguments(
    script: str,
    num_workers: int,
    backend: str | None,
    max_restarts: int,
    timeout: float,
    grace_period: float,
) -> None:
    if not os.path.isfile(script):
        raise FileNotFoundError(
            f"ft.testing.run: no such script. Received: script={script!r}. Expected the path "
            "of the training script every worker runs."
        )
    for name, value, least in (("num_workers", num_workers, 1), ("max_restarts", max_restarts, 0)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
            raise ValueError(
                f"Invalid value for argument `{name}`. Received: {name}={value!r}. "
                f"Expected an integer >= {least}."
            )
    if backend is not None and backend not in BACKENDS:
        raise ValueError(
            f"Invalid value for argument `backend`. Received: backend={backend!r}. "
            f"Expected one of {BACKENDS} or None (keep KERAS_BACKEND)."
        )
    for name, seconds in (("timeout", timeout), ("grace_period", grace_period)):
        if not isinstance(seconds, numbers.Real) or not 0 < seconds < float("inf"):
            raise ValueError(
                f"Invalid value for argument `{name}`. Received: {name}={seconds!r}. "
                "Expected a positive, finite number of seconds."
            )


def _read(
    launcher: subprocess.Popen[bytes], lines: list[str], times: list[float], echo: bool
) -> None:
    assert launcher.stdout is not None
    start = time.monotonic()
    for raw in iter(launcher.stdout.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip("\n")
        times.append(time.monotonic() - start)
        lines.append(line)
        if echo:
            print(line, flush=True)


def _stop_launcher(launcher: subprocess.Popen[bytes], grace_period: float) -> None:
    """SIGTERM (the launcher stops its workers), then SIGKILL after the grace period."""
    try:
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=grace_period + 5)
    except subprocess.TimeoutExpired:
        launcher.kill()
        launcher.wait(timeout=_REAP_SECONDS)
    except ProcessLookupError:
        pass


def _processes_with(prefix: bytes, match: Callable[[str], bool]) -> list[int]:
    """Pids of this user's processes with an environment entry `prefix + value` that matches."""
    if not os.path.isdir("/proc"):
        return []
    found = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                entries = f.read().split(b"\0")
        except OSError:  # gone, or not ours
            continue
        for entry in entries:
            if entry.startswith(prefix) and match(entry[len(prefix) :].decode("utf-8", "replace")):
                found.append(int(name))
                break
    return found


def _alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[-1].split()[0]
    except OSError:
        return False
    return state not in (b"Z", b"X")
