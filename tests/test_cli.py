"""Command lines follow conventions: `--help` exits 0, `--version`, the `ft` console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ft
from tests.helpers import ROOT


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_python_m_ft_help_lists_the_commands() -> None:
    for flag in ("--help", "-h"):
        proc = cli(sys.executable, "-m", "ft", flag)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("usage: python -m ft [-h] [--version] COMMAND")
        assert "\n  inspect " in proc.stdout and "\n  launch " in proc.stdout


def test_python_m_ft_without_a_command_or_with_a_wrong_one_exits_2() -> None:
    assert cli(sys.executable, "-m", "ft").returncode == 2
    proc = cli(sys.executable, "-m", "ft", "nope")
    assert proc.returncode == 2 and "unknown command 'nope'" in proc.stderr


def test_version() -> None:
    for command in (["ft"], ["ft.launch"], ["ft", "inspect"]):
        proc = cli(sys.executable, "-m", *command, "--version")
        assert (proc.returncode, proc.stdout) == (0, f"ft {ft.__version__}\n"), command


def ft_script() -> str:
    found = shutil.which("ft", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("the `ft` console script is not installed (pip install -e . installs it)")
    return found


def test_ft_console_script_runs_inspect_and_launch(tmp_path: Path) -> None:
    script = ft_script()
    proc = cli(script, "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: ft [-h] [--version]")
    proc = cli(script, "launch", "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: ft launch ")
    proc = cli(script, "inspect", "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: ft inspect ")
    proc = cli(script, "inspect", str(tmp_path / "none"))
    assert proc.returncode == 3 and "does not exist" in proc.stdout
    worker = tmp_path / "w.py"
    worker.write_text("import os; print('hello from', os.environ['FT_PROCESS_INDEX'])\n")
    proc = cli(script, "launch", "-n", "2", str(worker))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[worker 1] hello from 1" in proc.stdout


@pytest.mark.parametrize("script", ["resume_demo.py", "fault_demo.py", "digits_classifier.py"])
def test_every_example_has_help(script: str) -> None:
    proc = cli(sys.executable, f"multiworker_examples/{script}", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: ")


def test_inspect_shows_the_variable_counts_that_json_shows(tmp_path: Path) -> None:
    import keras
    import numpy as np

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile("adam", "mse", metrics=["mae"])
    callback = ft.BackupAndRestore(tmp_path / "b", delete_checkpoint=False)
    model.fit(np.zeros((8, 3)), np.zeros((8, 2)), epochs=1, verbose=0, callbacks=[callback])
    text = cli(sys.executable, "-m", "ft", "inspect", str(tmp_path / "b"))
    data = json.loads(
        cli(sys.executable, "-m", "ft", "inspect", "--json", str(tmp_path / "b")).stdout
    )
    counts = data["backups"][0]["variables"]
    assert counts["model"] == 2 and counts["optimizer"] > 0
    shown = ", ".join(f"{n} {group}" for group, n in counts.items())
    assert f"    variables:  {shown}\n" in text.stdout


def test_import_ft_and_its_command_lines_import_no_engine() -> None:
    code = (
        "import sys, ft, ft.launch, ft.inspection, ft.__main__, ft.report, ft.log\n"
        "print(sorted(m for m in ('keras', 'tensorflow', 'jax') if m in sys.modules))\n"
    )
    proc = cli(sys.executable, "-c", code)
    assert (proc.returncode, proc.stdout) == (0, "[]\n"), proc.stderr
