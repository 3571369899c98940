"""Watch a 2-worker job survive a killed worker: restart, resume at the right batch, same result.

    python multiworker_examples/fault_demo.py [--backend jax|tensorflow] [--sigterm]

Runs multiworker_examples/digits_classifier.py twice under
`python -m ft.launch -n 2`: once uninterrupted, once with worker 1 SIGKILLed
partway through an epoch (or, with --sigterm, preempted by a SIGTERM with
`save_before_preemption`). It shows what the launcher and ft print (every
`[ft.launch]` line and ft's own log lines), and checks that both runs end
with the same test accuracy and weights. The backend defaults to
$KERAS_BACKEND, else JAX.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = ("jax", "tensorflow")
SHOWN = ("[ft.launch]", " ft [process=", "SIGKILL to myself", "SIGTERM to myself", "test accuracy")


def launch(backend: str, tmp: str, *args: str, restarts: int = 0) -> dict:
    env = dict(os.environ, KERAS_BACKEND=backend)
    env.setdefault("JAX_PLATFORMS", "cpu")
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
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip())
        if any(word in line for word in SHOWN):
            print("   " + line.rstrip(), flush=True)
    if proc.wait() != 0:
        tail = "\n".join("   " + line for line in lines[-40:])
        raise SystemExit(
            f"{tail}\nfault_demo: the launcher exited with code {proc.returncode}, expected 0; "
            "its last lines are above."
        )
    with open(args[args.index("--result") + 1] + ".0") as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.environ.get("KERAS_BACKEND", "jax")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=default if default in BACKENDS else "jax",
        help="the Keras backend (default: $KERAS_BACKEND, else jax)",
    )
    parser.add_argument("--epochs", type=int, default=4, help="epochs of each run (default 4)")
    parser.add_argument(
        "--sigterm", action="store_true", help="preempt worker 1 with SIGTERM instead of SIGKILL"
    )
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error(f"--epochs must be at least 2 (the fault comes in epoch 1), got {args.epochs}")
    if importlib.util.find_spec(args.backend) is None:
        parser.error(
            f"--backend {args.backend}: {args.backend} is not installed. Install it with "
            f"pip install -e '.[{args.backend},examples]', or pick another --backend."
        )
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
        f"{'preempted' if args.sigterm else 'killed'} and resumed {faulty['accuracy']:.4f}"
    )
    print("final weights identical:", same)
    sys.exit(0 if same and ref["accuracy"] == faulty["accuracy"] else 1)


if __name__ == "__main__":
    main()
