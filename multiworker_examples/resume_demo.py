"""Watch ft.BackupAndRestore survive a SIGKILL in the middle of an epoch.

    python multiworker_examples/resume_demo.py [--backend jax]

Trains a small classifier on scikit-learn's digits (shipped with the package,
nothing downloaded) three times, each run in a process of its own:
an uninterrupted reference, a run SIGKILLed partway through an epoch, and
a rerun of that same command that resumes from the backup. It prints where
training resumed and checks the final weights against the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile

EPOCHS, BATCH, SAVE_EVERY = 4, 64, 10


def train(backup_dir: str | None, kill_at_step: int | None, out: str) -> None:
    """One training run; the parent calls this file again with --child."""
    import keras
    import numpy as np
    from sklearn.datasets import load_digits

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import ft

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
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
                print(f"  (SIGKILL at step {self.step}: {where})", flush=True)
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
        print(f"  resumed at epoch {r['epoch']}, batch {r['batch']} (step {r['step']})")
    weights = [np.asarray(w).tolist() for w in model.get_weights()]
    with open(out, "w") as f:
        json.dump({"accuracy": history.history["accuracy"][-1], "weights": weights}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "tensorflow"))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        backup_dir, kill, out = args.child
        train(backup_dir if backup_dir != "-" else None, int(kill) or None, out)
        return

    env = dict(os.environ, KERAS_BACKEND=args.backend, TF_CPP_MIN_LOG_LEVEL="3")
    with tempfile.TemporaryDirectory() as tmp:
        backup_dir = os.path.join(tmp, "backup")

        def run(title: str, backup: str, kill: int) -> int:
            print(title, flush=True)
            out = os.path.join(tmp, f"{title.split()[0]}.json")
            cmd = [sys.executable, __file__, "--child", backup, str(kill), out]
            return subprocess.run(cmd, env=env, stderr=subprocess.DEVNULL).returncode

        run("reference run, uninterrupted", "-", 0)
        rc = run("interrupted run, with ft.BackupAndRestore", backup_dir, 45)
        print(f"  exit code {rc} (killed); backup_dir holds {sorted(os.listdir(backup_dir))}")
        run("restarted run, same command", backup_dir, 0)
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
