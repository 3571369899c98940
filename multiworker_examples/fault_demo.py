"""Watch a 2-worker job survive a killed worker: restart, resume at the right batch, same result.

    python multiworker_examples/fault_demo.py [--backend tensorflow|jax] [--sigterm]

Runs multiworker_examples/digits_classifier.py twice under
`python -m ft.launch -n 2`: once uninterrupted, once with worker 1 SIGKILLed
partway through an epoch (or, with --sigterm, preempted by a SIGTERM with
`save_before_preemption`). It shows what the launcher and ft print, and
checks that both runs end with the same test accuracy and weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SHOWN = ("restored", "restarting", "SIGKILL", "SIGTERM", "preempted", "test accuracy", "exited")


def launch(backend: str, tmp: str, *args: str, restarts: int = 0) -> dict:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    cmd = [
        sys.executable,
        "-m",
        "ft.launch",
        "-n",
        "2",
        "--max-restarts",
        str(restarts),
        "--grace-period",
        "5",
        os.path.join(HERE, "digits_classifier.py"),
        *args,
    ]
    print(f"$ KERAS_BACKEND={backend} python {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(HERE)
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if any(word in line for word in SHOWN):
            print("   " + line.rstrip(), flush=True)
    if proc.wait() != 0:
        raise SystemExit(f"the launcher exited with {proc.returncode}")
    with open(args[args.index("--result") + 1] + ".0") as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "tensorflow"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument(
        "--sigterm", action="store_true", help="preempt worker 1 with SIGTERM instead of SIGKILL"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--epochs", str(args.epochs)]
        print("1. uninterrupted reference run", flush=True)
        ref = launch(
            args.backend, tmp, *common, "--no-backup", "--result", os.path.join(tmp, "ref")
        )
        how = "gets SIGTERM (preemption)" if args.sigterm else "is SIGKILLed"
        fault = ["--sigterm-at-step" if args.sigterm else "--kill-at-step", "37"]
        print(f"\n2. the same job with ft.BackupAndRestore; worker 1 {how} at step 37", flush=True)
        faulty = launch(
            args.backend,
            tmp,
            *common,
            "--backup-dir",
            os.path.join(tmp, "backup"),
            *fault,
            "--result",
            os.path.join(tmp, "faulty"),
            restarts=2,
        )
    same = ref["weights"] == faulty["weights"]
    print(
        f"\ntest accuracy: uninterrupted {ref['accuracy']:.4f}, "
        f"killed and resumed {faulty['accuracy']:.4f}"
    )
    print("final weights identical:", same)
    sys.exit(0 if same and ref["accuracy"] == faulty["accuracy"] else 1)


if __name__ == "__main__":
    main()
