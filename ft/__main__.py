"""`ft COMMAND` and `python -m ft COMMAND`: ft's command-line tools.

Commands: `inspect` (what a backup holds, checksums verified) and `launch`
(an N-worker job on this machine, as `python -m ft.launch`). The `ft`
console script calls `cli`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

COMMANDS = {
    "inspect": "show what the backups in BACKUP_DIR hold and verify every file",
    "launch": "run an N-worker job on this machine, restarting it when a worker fails",
}


def _usage(prog: str) -> str:
    lines = [
        f"usage: {prog} [-h] [--version] COMMAND [ARGS...]",
        "",
        "ft: fault tolerance for distributed Keras 3 training.",
        "",
        "commands:",
        *(f"  {name:<9} {text}" for name, text in COMMANDS.items()),
        "",
        "options:",
        "  -h, --help  show this help message and exit",
        "  --version   show ft's version and exit",
        "",
        f"`{prog} COMMAND --help` describes a command.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str = "python -m ft") -> int:
    """Run one command; returns the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage(prog), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    if args[0] == "--version":
        from ft import __version__

        print(f"ft {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command == "inspect":
        from ft import inspection

        return inspection.main(rest, prog=f"{prog} inspect")
    if command == "launch":
        from ft import launch

        return launch.main(rest, prog=f"{prog} launch")
    print(f"{_usage(prog)}\n\n{prog}: error: unknown command {command!r}", file=sys.stderr)
    return 2


def cli() -> None:
    """The `ft` console script."""
    sys.exit(main(prog=os.path.basename(sys.argv[0]) or "ft"))


if __name__ == "__main__":
    sys.exit(main())
