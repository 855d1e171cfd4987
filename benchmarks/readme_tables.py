"""Copy measured result tables into README.md, between ``<!-- results: PATH -->`` and
``<!-- /results -->`` markers (PATH relative to the repository root).

    python -m benchmarks.readme_tables           # update README.md in place
    python -m benchmarks.readme_tables --check   # exit 1 when README.md is out of date (tests run this)

What is copied from a result file: everything after its first heading line (the command, machine
and tables), so the README shows the same figures with the command that produced them.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- results: (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def excerpt(path: Path) -> str:
    """The result file without its title line (and the blank line after it)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    while lines and not lines[0].strip():
        lines = lines[1:]
    # the README has its own headings: demote the file's to bold lines
    lines = [f"**{line.lstrip('#').strip()}**" if line.startswith("#") else line for line in lines]
    return "\n".join(lines).rstrip() + "\n"


def render(text: str) -> tuple[str, list[str]]:
    """README text with every block filled; and the result files that are missing."""
    missing: list[str] = []

    def fill(m: re.Match) -> str:
        path = ROOT / m.group("path")
        if not path.is_file():
            missing.append(m.group("path"))
            return m.group(0)
        return f"{m.group(1)}\n{excerpt(path)}\n{m.group(4)}"

    return BLOCK.sub(fill, text), missing


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.readme_tables", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check; exit 1 if README.md differs")
    args = p.parse_args(argv)
    text = README.read_text(encoding="utf-8")
    new, missing = render(text)
    for path in missing:
        print(f"warning: {path} does not exist (run its benchmark); its README block is left as is", file=sys.stderr)
    if args.check:
        if new != text:
            print("README.md is out of date with benchmarks/results: run python -m benchmarks.readme_tables", file=sys.stderr)
            return 1
        return 0
    if new != text:
        README.write_text(new, encoding="utf-8")
        print("README.md updated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
