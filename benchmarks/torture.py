"""Crash torture: SIGKILL random workers of a 2-worker `ft.launch` job at random moments.

    python benchmarks/torture.py --kills 300 --backend jax [--workers 2] [--seed S]
        [--scenario "--async-save --model-parallel"]

Runs tests/scenario.py (an MLP with BatchNorm and Dropout, saving every batch)
under `python -m ft.launch` and, while it trains, SIGKILLs a random worker at
a random moment (mid-save included, since a save happens at every step),
`--kills` times; the launcher restarts the group each time. Then it compares
every worker's final weights with an uninterrupted run and prints counts:
kills, restarts, steps lost, restores, and any backup that failed to restore.
Exit code 0 only when the weights are identical and no restore failed.
`--scenario` passes more options to every run of the scenario, the reference
included (e.g. background saves of every process's shards under JAX
multi-host: `--async-save --model-parallel`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "tests" / "scenario.py"
STEPS_PER_EPOCH = 12


def _env(backend: str) -> dict[str, str]:
    env = dict(os.environ, KERAS_BACKEND=backend, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    epochs = 3 + args.kills  # about one epoch of progress between kills
    work = Path(tempfile.mkdtemp(prefix="ft-torture-"))
    common = ["--strategy", "auto", "--epochs", str(epochs), *args.scenario.split()]
    launch = [sys.executable, "-m", "ft.launch", "-n", str(args.workers)]

    ref = subprocess.run(
        [*launch, str(SCENARIO), *common, "--no-backup", "--out", str(work / "ref{index}.npz")],
        env=_env(args.backend),
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if ref.returncode != 0:
        raise SystemExit(f"reference run failed:\n{ref.stdout[-3000:]}")

    cmd = [
        *launch,
        "--max-restarts",
        str(args.kills + 5),
        "--grace-period",
        "3",
        str(SCENARIO),
        *common,
        "--backup-dir",
        str(work / "backup"),
        "--save-freq",
        "1",
        # A kill can land after fit's end: kept, the backups let the restarted group
        # resume at the end instead of training again from scratch (deleted, as
        # `delete_checkpoint=True` asks, nothing would be left to resume from).
        "--keep",
        "--pid-file",
        str(work / "pid"),
        "--out",
        str(work / "w{index}.npz"),
    ]
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, env=_env(args.backend), stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stdout is not None
    lines: list[str] = []
    training = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if " step " in line or re.search(r"\] step \d+", line):
                training.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    kills = 0
    committed: list[bool] = []
    while kills < args.kills and proc.poll() is None:
        training.clear()
        if not training.wait(timeout=120):
            break
        time.sleep(rng.uniform(0.0, args.max_delay))
        victim = rng.randrange(args.workers)
        try:
            pid = int((work / f"pid.{victim}").read_text())
            os.kill(pid, signal.SIGKILL)
            kills += 1
            # Whether a backup was committed when the kill landed: the next launch
            # must then restore one (with background saves a step's line does not
            # mean its backup is committed).
            committed.append(any((work / "backup").glob("ft-step-*")))
        except (OSError, ValueError):
            continue
        # Wait for the launcher to notice and restart the group.
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if any("restarting the group" in ln for ln in lines[-50:]):
                break
            time.sleep(0.05)
        (work / f"pid.{victim}").unlink(missing_ok=True)
    code = proc.wait(timeout=3600)
    reader.join(timeout=10)
    text = "".join(lines)

    same = True
    max_diff = 0.0
    for index in range(args.workers):
        out = work / f"w{index}.npz"
        if not out.exists():
            same = False
            continue
        with np.load(work / "ref0.npz") as a, np.load(out) as b:
            for key in a.files:
                diff = float(np.max(np.abs(a[key] - b[key])))
                max_diff = max(max_diff, diff)
                same &= bool(np.array_equal(a[key], b[key]))

    # Per launch of the group: the last step worker 0 reported as saved, and
    # the step the next launch restored. A launch after a kill that restores
    # nothing although a backup existed is a failed restore.
    segments = text.split("restarting the group")
    restored = re.findall(r"\[worker 0\] ft \[process=0\] INFO: restored .*\(step (\d+)\)", text)
    reached = [int(m) for m in re.findall(r"\[worker 0\] step (\d+)", text)]
    lost, failed, last_saved = 0, 0, 0
    for launch, (previous, segment) in enumerate(itertools.pairwise(segments)):
        steps = re.findall(r"\[worker 0\] step (\d+)", previous)
        last_saved = int(steps[-1]) if steps else last_saved
        found = re.search(r"\[worker 0\] ft \[process=0\] INFO: restored .*\(step (\d+)\)", segment)
        if found is None:
            had_backup = committed[launch] if launch < len(committed) else last_saved > 0
            failed += int(had_backup)
        else:
            lost += max(last_saved - int(found.group(1)), 0)
    failed += len(re.findall(r"CheckpointCorruptedError|is damaged", text))
    result = {
        "backend": args.backend,
        "workers": args.workers,
        "seed": args.seed,
        "scenario": args.scenario,
        "kills": kills,
        "restarts": len(segments) - 1,
        "restores": len(restored),
        "steps_total": epochs * STEPS_PER_EPOCH,
        "steps_lost": lost,
        "failed_restores": failed,
        "launcher_exit": code,
        "final_weights_identical": same,
        "max_abs_diff": max_diff,
        "seconds": round(time.monotonic() - started, 1),
        "last_step_seen": reached[-1] if reached else None,
    }
    if not args.keep:
        subprocess.run(["rm", "-rf", str(work)])
    else:
        (work / "launcher.log").write_text(text)
        result["work_dir"] = str(work)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backend", default="jax", choices=["jax", "tensorflow"])
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    parser.add_argument(
        "--max-delay", type=float, default=1.5, help="seconds, after training resumed"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--scenario", default="", help="more options for tests/scenario.py, in one string"
    )
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    result = run(args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    ok = (
        result["final_weights_identical"]
        and result["failed_restores"] == 0
        and result["launcher_exit"] == 0
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
