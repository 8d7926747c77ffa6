"""README's result tables, generated from benchmarks/results (typed tables went stale: issue 25).

Each generated table in README.md sits between two HTML comments, invisible on GitHub:

    <!-- table from benchmarks/results/plan-rtx4090.md; drop: options, fusions -->
    | model | ... |
    <!-- end table -->

The opening comment says where the table comes from, in parts separated by ";":
  from A.md[, B.md ...]   the results files (paths from the repository root); the first
                          markdown table of each (or of its `section`) is copied as it is, with
                          every column it has, so a column added to the results appears here
  section: TEXT           take the table under the first heading that starts with TEXT
  drop: c1, c2            leave out these columns (a name the file lacks is ignored)
  keep: c1, c2            only these columns, in this order (a name the file lacks is an error)
  run: label1, label2     with several files: a first column "run" naming each file's rows

    python -m benchmarks.readme_tables           # rewrite README.md's tables from the results
    python -m benchmarks.readme_tables --check   # exit 1 if README.md differs (what the test runs)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- table (from [^\n]*?) -->\n)(.*?)(<!-- end table -->)", re.S)


class TableError(ValueError):
    pass


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def read_table(text: str, section: str | None = None
               ) -> tuple[list[str], list[str], list[list[str]]]:
    """(header, alignment row, rows) of the first markdown table (under `section` if given)."""
    lines = text.splitlines()
    start = 0
    if section:
        start = next((i for i, x in enumerate(lines)
                      if x.startswith("#") and x.lstrip("#").strip().startswith(section)), None)
        if start is None:
            raise TableError(f"no heading starting with {section!r}")
    for i in range(start, len(lines) - 1):
        if lines[i].startswith("|") and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1].strip()):
            rows = []
            for x in lines[i + 2:]:
                if not x.startswith("|"):
                    break
                rows.append(_cells(x))
            return _cells(lines[i]), _cells(lines[i + 1]), rows
    raise TableError("no markdown table" + (f" under {section!r}" if section else ""))


def parse_spec(spec: str) -> dict:
    """'from a.md, b.md; drop: x, y' -> {'from': ['a.md', 'b.md'], 'drop': ['x', 'y']}."""
    out: dict = {}
    for part in (p.strip() for p in spec.split(";") if p.strip()):
        if part.startswith("from "):
            key, value = "from", part[5:]
        elif ":" in part:
            key, value = (s.strip() for s in part.split(":", 1))
        else:
            raise TableError(f"cannot read {part!r} (want 'from FILES' or 'key: value')")
        if key not in ("from", "section", "drop", "keep", "run"):
            raise TableError(f"unknown key {key!r}")
        out[key] = value.strip() if key == "section" else [v.strip() for v in value.split(",")]
    if not out.get("from"):
        raise TableError(f"no 'from' in {spec!r}")
    return out


def build(spec: dict, root: Path = ROOT) -> str:
    """The markdown table one block's spec asks for."""
    files = spec["from"]
    labels = spec.get("run")
    if labels is not None and len(labels) != len(files):
        raise TableError(f"{len(labels)} run labels for {len(files)} files")
    header = align = None
    rows: list[list[str]] = []
    for n, name in enumerate(files):
        path = root / name
        if not path.is_file():
            raise TableError(f"{name} does not exist")
        h, a, r = read_table(path.read_text(), spec.get("section"))
        if header is not None and h != header:
            raise TableError(f"{name}'s columns differ from {files[0]}'s")
        header, align = h, a
        rows += [([labels[n]] if labels else []) + row for row in r]
    if labels:
        header, align = ["run", *header], ["---", *align]
    if "keep" in spec:
        missing = [c for c in spec["keep"] if c not in header]
        if missing:
            raise TableError(f"no column {missing} in {files} (columns: {header})")
        index = ([0] if labels else []) + [header.index(c) for c in spec["keep"]]
    else:
        index = [i for i, c in enumerate(header) if c not in spec.get("drop", [])]
    pick = lambda cells: "| " + " | ".join(cells[i] for i in index) + " |"  # noqa: E731
    return "\n".join([pick(header), pick(align),
                      *map(pick, rows)]) + "\n"


def render(readme: str, root: Path = ROOT) -> str:
    """README text with every marked table regenerated; errors name the block."""
    def one(m: re.Match) -> str:
        try:
            table = build(parse_spec(m.group(2)), root)
        except TableError as e:
            raise TableError(f"README block '<!-- table {m.group(2)} -->': {e}") from None
        return m.group(1) + table + m.group(4)

    return BLOCK.sub(one, readme)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    p.add_argument("--check", action="store_true",
                   help="only compare: exit 1 if the README's tables differ from the results")
    args = p.parse_args(argv)
    path = Path(args.readme)
    old = path.read_text()
    try:
        new = render(old)
    except TableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    blocks = len(BLOCK.findall(old))
    if new == old:
        print(f"{path}: {blocks} tables, all as the results files say")
        return 0
    if args.check:
        print(f"{path}: tables differ from benchmarks/results; run "
              "python -m benchmarks.readme_tables", file=sys.stderr)
        return 1
    path.write_text(new)
    print(f"{path}: rewrote its {blocks} tables from the results files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
