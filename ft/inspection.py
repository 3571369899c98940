"""`python -m ft inspect BACKUP_DIR [--json]`: what a backup holds and whether it is intact.

BACKUP_DIR is a local or network path, or a `gs://` or `s3://` URL.

Reads only; writes nothing into `backup_dir`. Backups that a run found damaged
and moved aside (`.ft-damaged-<step>-<id>/`; in a bucket, `ft-step-N/` with
`ft-damaged.json`) are listed and checked too. Exit
codes: 0 when every committed backup is intact, 1 when one is damaged, 3 when
there is none.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from ft import __version__ as ft_version
from ft import errors
from ft.store import BackupStore, open_store

EXIT_INTACT, EXIT_DAMAGED, EXIT_USAGE, EXIT_NO_BACKUP = 0, 1, 2, 3


def describe(backup_dir: str) -> dict[str, Any]:
    """Everything `inspect` reports about `backup_dir`, as a JSON-ready dict."""
    store = open_store(backup_dir)
    backups = [_entry(store, path) for path in store.committed()]
    moved_aside = [_entry(store, path) for path in store.damaged()]
    store.close()
    return {
        "backup_dir": store.directory,
        "exists": store.exists(),
        "backups": backups,
        "moved_aside": moved_aside,
        "leftovers": store.leftovers(),
        "live_run": store.live_run(),
        "ok": bool(backups) and all(b["intact"] for b in backups),
    }


def _entry(store: BackupStore, path: str) -> dict[str, Any]:
    """What one backup directory holds, and whether every file is intact."""
    entry: dict[str, Any] = {"path": path, "name": os.path.basename(path)}
    try:
        record = store.read_record(path)
        entry.update(
            epoch=record.epoch,
            batch=record.batch,
            step=record.step,
            written_at=record.written_at,
            num_processes=record.num_processes,
            backend=record.backend,
            files=len(record.files),
            size_bytes=sum(f["size"] for f in record.files.values()),
            variables={g: len(v) for g, v in record.variables.items()},
        )
        store.verify_all(path)
        entry.update(intact=True, problem=None)
    except errors.CheckpointCorruptedError as e:
        entry.update(intact=False, problem=str(e))
    return entry


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def render(report: dict[str, Any]) -> str:
    """The human-readable form of `describe`'s report."""
    lines = [f"backup_dir: {report['backup_dir']}"]
    if not report["exists"]:
        lines.append("  does not exist: nothing to restore")
        return "\n".join(lines)
    if not report["backups"]:
        lines.append("  no committed backup: the next fit starts from scratch")
    for i, b in enumerate(report["backups"]):
        label = "newest" if i == 0 else "older"
        lines.append(f"  {b['name']} ({label})")
        if "epoch" in b:
            lines.append(
                f"    resumes at: epoch {b['epoch']}, batch {b['batch']} (global step {b['step']})"
            )
            lines.append(f"    written:    {b['written_at']}")
            lines.append(
                f"    by:         {b['num_processes']} process(es), {b['backend']} backend"
            )
            lines.append(f"    size:       {_size(b['size_bytes'])} in {b['files']} files")
            counts = ", ".join(f"{n} {group}" for group, n in b["variables"].items())
            lines.append(f"    variables:  {counts or 'none'}")
        status = (
            "intact (every file and every array checksum verified)" if b["intact"] else "DAMAGED"
        )
        lines.append(f"    status:     {status}")
        if b["problem"]:
            lines.append(f"    problem:    {b['problem']}")
    for b in report["moved_aside"]:
        lines.append(f"  {b['name']} (moved aside: found damaged by a run, never loaded)")
        if "epoch" in b:
            lines.append(
                f"    was:        epoch {b['epoch']}, batch {b['batch']} (global step {b['step']})"
            )
        status = "no damage found now" if b["intact"] else "DAMAGED"
        lines.append(f"    status:     {status}")
        if b["problem"]:
            lines.append(f"    problem:    {b['problem']}")
    for name in report["leftovers"]:
        lines.append(f"  {name}: left by an interrupted save; removed at the next start")
    lines.append(f"  live run:   {report['live_run'] or 'none'}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str = "python -m ft inspect") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Show what the backups in BACKUP_DIR hold and verify every file.",
        epilog="Exit codes: 0 intact, 1 a backup is damaged, 2 usage or unsupported "
        "BACKUP_DIR, 3 no committed backup.",
    )
    parser.add_argument("backup_dir")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead")
    parser.add_argument("--version", action="version", version=f"ft {ft_version}")
    args = parser.parse_args(argv)
    try:
        report = describe(args.backup_dir)
    except errors.UnsupportedConfigurationError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(report, indent=1) if args.json else render(report))
    if not report["backups"]:
        return EXIT_NO_BACKUP
    return EXIT_INTACT if report["ok"] else EXIT_DAMAGED


if __name__ == "__main__":
    sys.exit(main())
