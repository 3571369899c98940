"""Smoke tests: every example runs as the README says, with short settings, and says what it should."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, engine_env

pytestmark = pytest.mark.slow

# Makes `import tensorflow` fail, as in the README's first install (JAX only).
NO_TENSORFLOW = """
import importlib.machinery, sys
class _PathFinderWithoutTensorFlow(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return None
        return super().find_spec(name, path, target)
sys.meta_path[:] = [
    _PathFinderWithoutTensorFlow if f is importlib.machinery.PathFinder else f
    for f in sys.meta_path
]
"""


def run(
    backend: str, *args: str, unset: tuple[str, ...] = (), **env: str
) -> subprocess.CompletedProcess[str]:
    environ = engine_env(backend, sklearn=True, **env)  # the examples run as a user runs them
    for name in unset:
        environ.pop(name, None)
    proc = subprocess.run(
        [sys.executable, *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_readme_first_command_installs_jax_only_and_runs_the_resume_demo() -> None:
    readme = (ROOT / "README.md").read_text()
    first = re.search(r"```bash\n(.*?)\n```", readme, re.S)
    assert first is not None
    command = first.group(1)
    assert "pip install -e '.[jax]'" in command and "tensorflow" not in command
    assert command.endswith(".venv/bin/python multiworker_examples/resume_demo.py")
    second = re.findall(r"```bash\n(.*?)\n```", readme, re.S)[1]
    assert "pip install -q -e '.[tensorflow,jax,test]'" in second
    ci = (ROOT / ".ci" / "run").read_text()
    assert second in ci, "CI runs the README's test command as written"


def test_resume_demo_without_tensorflow(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(NO_TENSORFLOW)
    env = engine_env("jax", sklearn=True)
    proc = run(
        "jax",
        "multiworker_examples/resume_demo.py",
        unset=("KERAS_BACKEND", "TF_CPP_MIN_LOG_LEVEL"),  # the demo's default: JAX
        PYTHONPATH=f"{tmp_path}:{env['PYTHONPATH']}",
    )
    out = proc.stdout
    assert "(SIGKILL at step 45: epoch 1, batch 15)" in out
    assert "  killed by SIGKILL (exit code 137 in a shell); backup_dir holds" in out
    assert "  ft [process=0] INFO: starting fresh: no backup in " in out
    assert "  ft [process=0] INFO: restored epoch 1, batch 11 (step 40) from " in out
    assert (
        "resumed at epoch 1, batch 11 (step 40): batch 11 of epoch 1 (both counted from 0)" in out
    )
    assert re.search(r"ft \[process=0\] INFO: fit done in .* backups committed", out)
    assert "final weights identical to the uninterrupted run: True" in out
    assert "tensorflow" not in (out + proc.stderr).lower()
    # The quickstart shows this output: the same lines, up to numbers and temporary paths.
    quickstart = (ROOT / "docs" / "quickstart.md").read_text()
    sample = re.search(r"\(a real run on JAX\):\n\n```\n(.*?)```", quickstart, re.S)
    assert sample is not None
    assert shape(sample.group(1)) == shape(out)


def shape(text: str) -> list[str]:
    """Lines with temporary paths and numbers blanked out."""
    text = re.sub(r"/tmp/\w+", "TMP", text)
    return re.sub(r"\d+(\.\d+)?", "N", text).splitlines()


def test_demos_refuse_a_bad_backend() -> None:
    for demo in ("resume_demo.py", "fault_demo.py"):
        proc = subprocess.run(
            [sys.executable, f"multiworker_examples/{demo}", "--backend", "torch"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert proc.returncode == 2, proc.stderr
        assert "invalid choice: 'torch' (choose from 'jax', 'tensorflow')" in proc.stderr


def test_quiet_jax_launch_says_what_ft_does(tmp_path: Path) -> None:
    proc = run(
        "jax",
        "-m",
        "ft.launch",
        "-n",
        "2",
        "multiworker_examples/digits_classifier.py",
        "--epochs",
        "1",
        "--backup-dir",
        str(tmp_path / "b"),
        unset=("TF_CPP_MIN_LOG_LEVEL",),  # the launcher's default applies
    )
    out = proc.stdout + proc.stderr
    assert "oneDNN" not in out and "absl::InitializeLog" not in out
    for index in (0, 1):
        assert f"[worker {index}] ft [process={index}] INFO: starting fresh: no backup in" in out
        assert re.search(rf"\[worker {index}\] ft \[process={index}\] INFO: fit done in ", out)
    assert "[worker 0] test accuracy" in out


def test_fault_demo_tensorflow_sigkill() -> None:
    proc = run(
        "tensorflow",
        "multiworker_examples/fault_demo.py",
        "--backend",
        "tensorflow",
        "--epochs",
        "2",
    )
    out = proc.stdout
    died = out.index("[ft.launch] worker 1 exited with code 137; restarting the group (1 of 2)")
    assert "SIGKILL to myself" in out[:died]
    assert "ignored SIGTERM" not in out[:died]  # the death is said before the others stop
    assert "[worker 1] ft [process=1] INFO: restored epoch 1, batch 10 (step 35)" in out
    assert "killed and resumed" in out
    assert "final weights identical: True" in out


def test_fault_demo_jax_preemption() -> None:
    proc = run(
        "jax",
        "multiworker_examples/fault_demo.py",
        "--backend",
        "jax",
        "--sigterm",
        "--epochs",
        "2",
    )
    out = proc.stdout
    # The stop step is agreed at run time (no worker has passed it): every worker
    # saves that same step, and every worker resumes from it.
    saved = set(re.findall(r"preempted: saved at step (\d+)", out))
    assert len(saved) == 1, out[-4000:]
    step = saved.pop()
    assert "[ft.launch] worker 1 was preempted and saved (exit 42)" in out
    for worker in (0, 1):
        restored = rf"\[worker {worker}\] ft \[process={worker}\] INFO: restored epoch \d+, batch \d+ \(step {step}\)"
        assert re.search(restored, out), out[-4000:]
    assert "preempted and resumed" in out and "killed" not in out
    assert "final weights identical: True" in out
