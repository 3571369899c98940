"""`python -m ft COMMAND`: command-line tools. Commands: `inspect`."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    commands = {"inspect": "ft.inspection"}
    if not argv or argv[0] not in commands:
        print(
            "usage: python -m ft inspect BACKUP_DIR [--json]\n"
            "       python -m ft.launch -n N [--max-restarts R] script.py [args...]",
            file=sys.stderr,
        )
        return 2
    from ft import inspection

    return inspection.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
