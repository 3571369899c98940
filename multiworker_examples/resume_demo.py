"""Watch ft.BackupAndRestore survive a SIGKILL in the middle of an epoch.

    python multiworker_examples/resume_demo.py [--backend jax|tensorflow]

Trains a small classifier on synthetic data (made with NumPy: this demo
needs Keras and one engine, nothing else) three times, each run in a
process of its own:
an uninterrupted reference, a run SIGKILLed partway through an epoch, and
a rerun of that same command that resumes from the backup. It shows what
each run prints (ft's own log lines among it), where training resumed, and
checks the final weights against the reference. The backend defaults to
$KERAS_BACKEND, else JAX.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from typing import Any

EPOCHS, BATCH, SAVE_EVERY, KILL_AT_STEP = 4, 64, 10, 45


def make_data(np: Any) -> tuple[Any, Any]:
    """1,797 noisy 64-feature points of 10 classes (the size of scikit-learn's digits)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, size=1797)
    centers = rng.normal(size=(10, 64))
    x = centers[y] + rng.normal(scale=2.0, size=(1797, 64))
    return x.astype("float32"), y.astype("int32")


def train(backup_dir: str | None, kill_at_step: int | None, out: str) -> None:
    """One training run; the parent calls this file again with --child."""
    import keras
    import numpy as np

    import ft

    x, y = make_data(np)
    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])

    class Killer(keras.callbacks.Callback):
        step = 0

        def on_train_batch_end(self, batch, logs=None):
            self.step += 1
            if self.step == kill_at_step:
                where = f"epoch {self.epoch}, batch {batch}"
                print(f"(SIGKILL at step {self.step}: {where})", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

    callbacks: list = [Killer()]
    backup = None
    if backup_dir:
        backup = ft.BackupAndRestore(backup_dir, save_freq=SAVE_EVERY)
        callbacks.insert(0, backup)
    history = model.fit(
        x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=True, callbacks=callbacks, verbose=0
    )
    if backup is not None and backup.restored:
        r = backup.restored
        print(
            f"resumed at epoch {r['epoch']}, batch {r['batch']} (step {r['step']}): "
            f"batch {r['batch']} of epoch {r['epoch']} (both counted from 0) was the first "
            f"one it ran; {r['step']} batches were done before",
            flush=True,
        )
    weights = [np.asarray(w).tolist() for w in model.get_weights()]
    with open(out, "w") as f:
        json.dump({"accuracy": history.history["accuracy"][-1], "weights": weights}, f)


BACKENDS = {"jax": "jax", "tensorflow": "tensorflow"}  # --backend -> the module it needs


def describe(returncode: int) -> str:
    """An exit status as it is: `exit code 3`, or `killed by SIGKILL (exit code 137 in a shell)`."""
    if returncode < 0:
        name = signal.Signals(-returncode).name
        return f"killed by {name} (exit code {128 - returncode} in a shell)"
    return f"exit code {returncode}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.environ.get("KERAS_BACKEND", "jax")
    parser.add_argument(
        "--backend",
        choices=sorted(BACKENDS),
        default=default if default in BACKENDS else "jax",
        help="the Keras backend (default: $KERAS_BACKEND, else jax)",
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if args.child:
        backup_dir, kill, out = args.child
        train(backup_dir if backup_dir != "-" else None, int(kill) or None, out)
        return
    from ft.launch import is_engine_noise  # the launcher's filter of engine banners

    if importlib.util.find_spec(BACKENDS[args.backend]) is None:
        parser.error(
            f"--backend {args.backend}: {args.backend} is not installed. Install it with "
            f"pip install -e '.[{args.backend},examples]', or pick another --backend."
        )

    env = dict(os.environ, KERAS_BACKEND=args.backend, TF_CPP_MIN_LOG_LEVEL="2")
    env.setdefault("JAX_PLATFORMS", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        backup_dir = os.path.join(tmp, "backup")

        def run(title: str, backup: str, kill: int) -> int:
            """One child run; its output (ft's log lines, any error) is shown indented."""
            print(title, flush=True)
            out = os.path.join(tmp, f"{title.split()[0]}.json")
            cmd = [sys.executable, __file__, "--child", backup, str(kill), out]
            proc = subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                if not is_engine_noise(line):
                    print("  " + line.rstrip(), flush=True)
            return proc.wait()

        def expect(rc: int, wanted: int, title: str) -> None:
            if rc != wanted:
                raise SystemExit(
                    f"resume_demo: the {title} ended with {describe(rc)}, expected "
                    f"{describe(wanted)}; its output is above."
                )

        expect(run("reference run, uninterrupted", "-", 0), 0, "reference run")
        rc = run("interrupted run, with ft.BackupAndRestore", backup_dir, KILL_AT_STEP)
        expect(rc, -signal.SIGKILL, "interrupted run")
        print(f"  {describe(rc)}; backup_dir holds {sorted(os.listdir(backup_dir))}")
        expect(run("restarted run, same command", backup_dir, 0), 0, "restarted run")
        with open(os.path.join(tmp, "reference.json")) as f:
            ref = json.load(f)
        with open(os.path.join(tmp, "restarted.json")) as f:
            res = json.load(f)
    same = ref["weights"] == res["weights"]
    print(f"final accuracy: reference {ref['accuracy']:.4f}, resumed {res['accuracy']:.4f}")
    print("final weights identical to the uninterrupted run:", same)
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
