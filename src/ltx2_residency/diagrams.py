"""Keep the state diagrams in the docs generated from the transition tables.

``python -m ltx2_residency.diagrams docs/architecture.md`` rewrites every block between
``<!-- mermaid:MODE -->`` and ``<!-- /mermaid:MODE -->``; the docs test fails when a block
drifts from its table.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from .domain import ResidencyMode
from .modes import TABLES, mermaid

_BLOCK = re.compile(r"(<!-- mermaid:(?P<mode>\w+) -->\n)(?P<body>.*?)(<!-- /mermaid:(?P=mode) -->)", re.S)


def block(mode: ResidencyMode) -> str:
    return f"```mermaid\n{mermaid(TABLES[mode])}```\n"


def update_markdown(text: str) -> str:
    """``text`` with every marked diagram block regenerated from its table."""
    return _BLOCK.sub(lambda m: m.group(1) + block(ResidencyMode(m["mode"])) + m.group(4), text)


def modes_in(text: str) -> list[str]:
    return [m["mode"] for m in _BLOCK.finditer(text)]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        for mode in ResidencyMode:
            print(f"%% {mode.value}: {TABLES[mode].summary}")
            print(mermaid(TABLES[mode]))
        return 0
    for path in map(Path, args):
        path.write_text(update_markdown(path.read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
