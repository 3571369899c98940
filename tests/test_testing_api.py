"""`ft.testing`, used as a user would: only its public API and the `ft_job` fixture.

One 2-worker job per engine goes through every fault in turn (each fires
once per job): worker 1 is SIGKILLed, then preempted (SIGTERM), then frozen
(SIGSTOP) past the heartbeat. Each time the group is
restarted and every worker must resume at the same step; in the end both
workers hold the same weights and trained every step exactly once.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import ft.testing
from ft.errors import JobTimeoutError

SCRIPT = textwrap.dedent(
    """
    import os, sys
    import keras
    import numpy as np
    import ft
    import ft.testing

    out = sys.argv[1]
    index = int(os.environ["FT_PROCESS_INDEX"])
    strategy = ft.strategies.auto(heartbeat_timeout=5, seed=7)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 8)).astype("float32")
    y = x.sum(axis=1, keepdims=True).astype("float32")
    batch = 8
    if keras.backend.backend() == "jax":  # each JAX process feeds its share of every batch
        import jax
        count, me = jax.process_count(), jax.process_index()
        batch //= count
        share = lambda a: a.reshape(-1, count, batch, a.shape[1])[:, me].reshape(-1, a.shape[1])
        x, y = share(x), share(y)
    else:
        keras.utils.set_random_seed(7)
    with strategy.scope():
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="relu"),
                                  keras.layers.Dense(1)])
        model.compile(keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(x, y, batch_size=batch, epochs=4, verbose=0, callbacks=[
        ft.BackupAndRestore(os.path.join(out, "backup"), save_freq=5,
                            save_before_preemption=True, timeout=60),
        ft.testing.KillWorker(worker=1, step=11),
        ft.testing.PreemptWorker(worker=1, step=22),
        ft.testing.FreezeWorker(worker=1, step=38, seconds=60),
    ])
    values = [model.optimizer.iterations.value] + [v.value for v in model.weights]
    values = [v.addressable_data(0) if hasattr(v, "addressable_data") else v for v in values]
    np.savez(os.path.join(out, f"final-{index}.npz"),
             *[keras.ops.convert_to_numpy(v) for v in values])
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["tensorflow", "jax"])
def test_killed_preempted_and_frozen_workers_resume_together(
    engine: str, ft_job: ft.testing.JobRunner, tmp_path: Path
) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    result = ft_job(
        script,
        num_workers=2,
        args=[str(tmp_path)],
        backend=engine,
        max_restarts=2,
        grace_period=2,
        timeout=400,
    )
    assert result.exit_code == 0, result.tail()
    assert (result.restarts, result.preemptions) == (3, 1), result.launcher_lines
    first, second = result.workers
    assert [r.step for r in first.restores] == [r.step for r in second.restores], result.tail()
    steps = [r.step for r in first.restores]
    # Saves every 5 steps: the kill before step 11 resumes at 10, the freeze before 38
    # at 35; the preemption saves at a step both workers agree on.
    assert steps[0] == 10 and steps[2:] == [35], steps
    assert 22 < steps[1] < 35, steps
    assert any(f"saved at step {steps[1]}" in line for line in second.lines), second.output
    assert (first.restores[0].epoch, first.restores[0].batch) == (0, 10)
    final = [np.load(tmp_path / f"final-{i}.npz") for i in (0, 1)]
    assert int(final[0]["arr_0"]) == 48, "every one of the 4 x 12 steps trained exactly once"
    for key in final[0].files:
        np.testing.assert_array_equal(final[0][key], final[1][key], err_msg=key)


@pytest.mark.slow
def test_a_job_past_its_timeout_is_stopped_with_every_process(
    ft_job: ft.testing.JobRunner, tmp_path: Path
) -> None:
    script = tmp_path / "hang.py"
    script.write_text(
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],\n"
        "                         start_new_session=True)\n"
        "open(os.path.join(sys.argv[1], f'pids-{os.getpid()}'), 'w').write(str(child.pid))\n"
        "print('hanging', flush=True)\n"
        "time.sleep(600)\n"
    )
    with pytest.raises(JobTimeoutError, match="did not end within timeout=5 s") as raised:
        ft_job(script, num_workers=2, args=[str(tmp_path)], timeout=5, grace_period=1)
    result = raised.value.result
    assert isinstance(result, ft.testing.JobResult)
    assert [w.lines for w in result.workers] == [["hanging"], ["hanging"]]
    pids = [int(p.name.split("-")[1]) for p in tmp_path.glob("pids-*")]
    pids += [int(p.read_text()) for p in tmp_path.glob("pids-*")]
    assert len(pids) == 4
    for pid in pids:  # workers and a grandchild in a session of its own
        assert not _running(pid), f"process {pid} outlived the job"


def test_raise_in_worker_fires_once_per_job(tmp_path: Path) -> None:
    import keras

    from ft.errors import InjectedFaultError

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x, y = np.ones((8, 2)), np.ones((8, 1))
    fault = ft.testing.RaiseInWorker(worker=0, step=3, marker_dir=tmp_path)
    with pytest.raises(InjectedFaultError, match="worker 0 before step 3"):
        model.fit(x, y, batch_size=2, epochs=2, callbacks=[fault], verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 3, "raised before the 4th batch"
    model.fit(x, y, batch_size=2, epochs=2, callbacks=[fault], verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 11, "the second fit passed step 3"
    other = ft.testing.RaiseInWorker(worker=1, step=0, marker_dir=tmp_path / "other")
    model.fit(x, y, batch_size=2, epochs=1, callbacks=[other], verbose=0)  # we are worker 0


def test_arguments_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "s.py"
    script.write_text("")
    with pytest.raises(FileNotFoundError, match="no such script"):
        ft.testing.run(tmp_path / "missing.py")
    with pytest.raises(ValueError, match="Received: num_workers=0"):
        ft.testing.run(script, num_workers=0)
    with pytest.raises(ValueError, match="Received: backend='torch'"):
        ft.testing.run(script, backend="torch")
    with pytest.raises(ValueError, match="Received: timeout=0"):
        ft.testing.run(script, timeout=0)
    monkeypatch.delenv("FT_TESTING_DIR", raising=False)
    with pytest.raises(ValueError, match="FT_TESTING_DIR"):
        ft.testing.KillWorker(worker=1, step=3)
    with pytest.raises(ValueError, match="Received: step=-1"):
        ft.testing.KillWorker(worker=1, step=-1, marker_dir=tmp_path)


def _running(pid: int) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            return False
        if state in ("Z", "X"):
            return False
        time.sleep(0.1)
    return True


@pytest.mark.slow
def test_the_docs_example_runs_as_written(tmp_path: Path) -> None:
    """Every `# NAME.py` block of docs/testing.md is written out, and its test run by pytest."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "testing.md").read_text()
    blocks = re.findall(r"```python\n# (\w+\.py)\n(.*?)```", text, flags=re.S)
    assert [name for name, _ in blocks] == ["train.py", "test_train.py"]
    for name, code in blocks:
        (tmp_path / name).write_text(code)
    pytest_args = ["-p", "no:cacheprovider", "-p", "ft.testing.pytest_plugin", "-q"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *pytest_args, "test_train.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout


def test_importing_ft_testing_and_its_plugin_imports_no_engine() -> None:
    code = (
        "import sys, ft.testing, ft.testing.pytest_plugin\n"
        "print(sorted(m for m in ('keras', 'tensorflow', 'jax') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_restore_lines_are_read_with_or_without_what_follows() -> None:
    from ft.testing.result import parse

    lines = [
        "[worker 0] ft [process=0] INFO: restored epoch 1, batch 3 (step 15) from /b/ft-step-15",
        "[worker 1] ft [process=1] INFO: restored epoch 1, batch 3 (step 15) from /b/ft-step-15; "
        "backing up every 5 batches to /b, synchronously",
        "[ft.launch] worker 1 exited with code 137; restarting the group (1 of 1)",
        "[ft.launch] worker 1 was preempted and saved (exit 42); restarting the group "
        "(preemption 1, not counted as a restart)",
    ]
    result = parse(lines, num_workers=2, exit_code=0, directory="/d")
    expected = ft.testing.RestorePoint(epoch=1, batch=3, step=15, path="/b/ft-step-15")
    assert result.resumed == [expected, expected]
    assert (result.restarts, result.preemptions) == (2, 1)
    assert result.workers[1].lines[0].startswith("ft [process=1] INFO: restored")
    assert len(result.launcher_lines) == 2
