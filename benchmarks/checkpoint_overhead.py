"""ft.BackupAndRestore against Keras's own callbacks, a raw floor and the machine's limits.

    python benchmarks/checkpoint_overhead.py [--mode cpu|gpu] [--sizes 25M 100M]
        [--backends tensorflow jax] [--saves 3] [--close-every 5] [--repeats 1] [--out docs]
        [--time-limit SECONDS]

For each backend and model size (Dense stacks with Adam: the state is 3 x the
parameters in float32), a child process (`overhead_harness.py`) runs in one
process, on the same model and data, `fit` with each of these, right after a
`fit` without callbacks (its baseline), in an order that rotates per repeat:

- the raw floor: a minimal callback that copies the state once on the training
  thread and writes its raw bytes, fsyncs and renames on a background thread;
- `ft.BackupAndRestore` (background saves);
- `keras.callbacks.BackupAndRestore` and `keras.callbacks.OrbaxCheckpoint`;
- a callback that saves nothing but has an `on_train_batch_end` (a no-op):
  Keras waits for every step's logs before calling such a hook, which costs
  a device sync per step; ft and the raw floor have none;

in two modes: saves spaced further apart than a save's background work takes
(estimated from the limits below), and saves closer than that (`--close-every`
steps, default: a third of that estimate). Each `fit` has `--saves` saves
due, then a tail of one interval less a step without any (spaced, the last
pipeline ends there as the others did before the next save). Per save it
reports the time the training thread was blocked (measured inside `fit`,
around the callback's hooks), the total time added to `fit` (against its
baseline, each timed from the start of `fit` to the end of its callbacks'
`on_train_end`, the wait for the last commit included; that end alone is
"fit's end"), and the background pipeline's time; against the same bytes' limits:
one device-to-device copy, device-to-host copy (pageable and page-locked),
memcpy, write + fsync, cold read. Restore time (the callback's `on_train_begin`
inside `fit`) is compared with a cold read of the backup's files (cold when the
kernel lets us drop the page cache); ft's first restore in the process (always
the first restore sample) is shown apart: on the H200 it paid a one-time cost
that later ones did not. Beside it, the time a new process takes to write the
first byte of every page of as much new memory as the state: a resume lands
its bytes in memory the process has not used, which the cold read (one reused
buffer) does not.

`--mode gpu` runs the JAX backend on the accelerator (sizes up to 300M);
`--mode cpu` pins JAX to the CPU. Results: `<out>/benchmark-<mode>.json` and
`<out>/benchmark-<mode>.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead_harness import SIZES, run  # noqa: E402

CALLBACKS = (
    "raw_floor",
    "ft",
    "keras_backup_and_restore",
    "keras_orbax_checkpoint",
    "per_step_hook",
)


def _med(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _f(value: float | None, unit: str = " s") -> str:
    return "-" if value is None else f"{value:.3f}{unit}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


def tables(results: list[dict[str, Any]]) -> str:
    """Markdown: per-save costs with ratios, ft's stages, limits, restore."""
    lines = [
        "| backend | model | mode (saves x every) | callback | blocked / save "
        "| added to fit / save | fit's end | pipeline / save | added / raw floor "
        "| added / keras B&R | saves moved (steps), written | peak extra host memory / state |",
        "|" + "---|" * 12,
    ]
    for res in results:
        for mode, m in res["modes"].items():
            med = {
                name: {k: _med([r[k] for r in runs]) for k, v in runs[0].items() if _num(v)}
                for name, runs in m["runs"].items()
            }
            floor = med["raw_floor"]["added_per_save"]
            keras_br = med["keras_backup_and_restore"]["added_per_save"]
            for name in CALLBACKS:
                c = med[name]
                moved = "-"
                if name == "ft":
                    # A save still due at fit's end is not written (its backups
                    # are deleted): fewer written than came due.
                    moved = (
                        f"{c['moved_saves']:.0f} ({c['moved_steps']:.0f}), "
                        f"{c['commits']:.0f} of {m['saves']}"
                    )
                lines.append(
                    f"| {res['backend']} | {res['size']} ({res['params'] / 1e6:.0f}M, "
                    f"{res['state_bytes'] / 1e9:.2f} GB) | {mode} ({m['saves']} x {m['every']}) "
                    f"| {name} | {_f(c['blocked_per_save'])} | {_f(c['added_per_save'])} "
                    f"| {_f(c.get('end_wait'))} "
                    f"| {_f(c.get('pipeline_per_save'))} | {_ratio(c['added_per_save'], floor)} "
                    f"| {_ratio(c['added_per_save'], keras_br)} | {moved} "
                    f"| {c.get('extra_host_memory', float('nan')):.2f} |"
                )
    lines += [
        "",
        "ft's pipeline by stage (median per save), against the limits of the same bytes:",
        "",
        "| backend | model | mode | snapshot made | to host | write + checksum + fsync + commit "
        "| pipeline / write+fsync | fit's end: buffers freed, backups deleted "
        "| device copy | to host, pageable | to host, pinned "
        "| memcpy | write+fsync | step |",
        "|" + "---|" * 14,
    ]
    for res in results:
        lim = res["limits"]
        for mode, m in res["modes"].items():
            runs = m["runs"]["ft"]
            pipe = _med([r["pipeline_per_save"] for r in runs])
            to_host = [r["to_host_per_save"] for r in runs if r["to_host_per_save"] is not None]
            write = [r["write_per_save"] for r in runs if r["write_per_save"] is not None]
            host_s = _f(_med(to_host) if to_host else None)
            write_s = _f(_med(write) if write else None)
            lines.append(
                f"| {res['backend']} | {res['size']} | {mode} | {runs[0]['snapshot_where']} "
                f"| {host_s} | {write_s} "
                f"| {_ratio(pipe, lim['write_fsync'])} "
                f"| {_f(_med([r.get('end_release', 0.0) for r in runs]))}, "
                f"{_f(_med([r.get('end_delete', 0.0) for r in runs]))} "
                f"| {_f(lim.get('device_copy'))} "
                f"| {_f(lim.get('to_host_pageable'))} | {_f(lim.get('to_host_pinned'))} "
                f"| {_f(lim['memcpy'])} | {_f(lim['write_fsync'])} | {_f(res['step_seconds'])} |"
            )
    lines += [
        "",
        "| backend | model | ft restore | cold read of its files | ft / cold read "
        "| ft's first restore in its process (/ its cold read) "
        "| a new process's first write to as much new memory "
        "| keras B&R restore | its cold read | page cache dropped |",
        "|" + "---|" * 10,
    ]
    for res in results:
        rs = res.get("restore")
        if rs is None:  # a run cut short before its restores were measured
            lines.append(f"| {res['backend']} | {res['size']} | not measured |" + " - |" * 7)
            continue
        ft_restore, ft_cold = _med(rs["ft_restore"]), _med(rs["ft_cold_read"])
        lines.append(
            f"| {res['backend']} | {res['size']} | {_f(ft_restore)} | {_f(ft_cold)} "
            f"| {_ratio(ft_restore, ft_cold)} "
            f"| {_f(rs['ft_restore'][0])} ({_ratio(rs['ft_restore'][0], rs['ft_cold_read'][0])}) "
            f"| {_f((rs.get('fresh_memory') or [None])[0])} "
            f"| {_f(_med(rs['keras_backup_and_restore_restore']))} "
            f"| {_f(_med(rs['keras_backup_and_restore_cold_read']))} "
            f"| {'yes' if rs['cache_dropped'][0] else 'no (not root)'} |"
        )
    return "\n".join(lines)


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def device_name(backend: str, mode: str) -> str:
    if mode == "gpu":
        try:
            import jax

            return ", ".join(sorted({d.device_kind for d in jax.devices()}))
        except Exception as e:  # reported, not fatal
            return f"unknown ({e})"
    return f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mode", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES))
    parser.add_argument("--backends", nargs="+", default=None)
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--close-every", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--modes", nargs="+", choices=["close", "spaced"], default=["close", "spaced"]
    )
    parser.add_argument(
        "--restores", type=int, default=0, help="restore samples (default 7, or --repeats if more)"
    )
    parser.add_argument("--out", default=str(ROOT / "docs"))
    parser.add_argument("--time-limit", type=float, default=None, help="seconds per child")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        res = run(
            args.child,
            args.saves,
            args.close_every,
            args.repeats,
            tuple(args.modes),
            args.restores,
        )
        res["device"] = device_name(os.environ.get("KERAS_BACKEND", ""), args.mode)
        print("RESULT " + json.dumps(res), flush=True)
        sys.stderr.flush()
        os._exit(0)  # the engines' teardown can take long on a busy host
    gpu = args.mode == "gpu"
    sizes = args.sizes or (["300M"] if gpu else ["25M"])
    backends = args.backends or (["jax"] if gpu else ["jax", "tensorflow"])
    results = []
    for backend in backends:
        for size in sizes:
            env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
            env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
            if not gpu:
                env["JAX_PLATFORMS"] = "cpu"
            command = [sys.executable, __file__, "--child", size, "--mode", args.mode]
            command += ["--saves", str(args.saves), "--repeats", str(args.repeats)]
            command += ["--modes", *args.modes, "--restores", str(args.restores)]
            if args.close_every:
                command += ["--close-every", str(args.close_every)]
            try:
                proc = subprocess.run(
                    command, env=env, capture_output=True, text=True, timeout=args.time_limit
                )
            except subprocess.TimeoutExpired as e:
                partial = env.get("FT_BENCH_PARTIAL", "(set FT_BENCH_PARTIAL to keep them)")
                tail = (e.stderr or b"")[-4000:]
                raise SystemExit(
                    f"{backend} {size}: cut short after {args.time_limit} s; what was "
                    f"measured is in {partial}\n{tail!r}"
                ) from None
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                raise SystemExit(f"{backend} {size} failed:\n{proc.stderr[-6000:]}")
            res = json.loads(line[0][7:])
            res["backend"] = backend
            results.append(res)
            print(f"{backend} {size} on {res['device']}: done", flush=True)
    text = f"Device: {results[0]['device']}\n\n" + tables(results)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"benchmark-{args.mode}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / f"benchmark-{args.mode}.md").write_text(text + "\n")
    print(f"wrote {out / f'benchmark-{args.mode}.json'} and .md")


if __name__ == "__main__":
    main()
