"""BENCHMARKS.md is written by several scripts, each owning one section between markers."""
from __future__ import annotations

from pathlib import Path


def write_section(path: Path, name: str, text: str) -> None:
    """Replace the `<!-- name:begin -->` ... `<!-- name:end -->` section of `path` with text
    (appended when absent), leaving every other section alone."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    current = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if begin in current and end in current:
        current = current[:current.index(begin)] + block + \
            current[current.index(end) + len(end) + 1:]
    else:
        current = current.rstrip() + "\n\n" + block
    path.write_text(current)
