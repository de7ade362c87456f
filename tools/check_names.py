"""Lint what ruff cannot: inside src/saelab no module imports the package root (`import
saelab`, `from saelab import ...`), and no file anywhere imports another module's private
name (`from saelab.lm.sites import _x`). Attribute access (`module._x`) is ruff's SLF001.

    python tools/check_names.py src tests benchmarks     # exit 1 and one line a problem
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_name(path: Path) -> str | None:
    """saelab.a.b for src/saelab/a/b.py; None outside the package."""
    parts = path.with_suffix("").parts
    if "saelab" not in parts or "src" not in parts:
        return None
    name = ".".join(parts[parts.index("saelab"):])
    return name.removesuffix(".__init__")


def problems(path: Path) -> list[str]:
    own = module_name(path)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import) and own is not None:
            found += [f"{path}:{node.lineno}: imports the package root (import saelab)"
                      for alias in node.names if alias.name == "saelab"]
        if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("saelab"):
            continue
        if own is not None and node.module == "saelab":
            found.append(f"{path}:{node.lineno}: imports the package root (from saelab import)")
        found += [f"{path}:{node.lineno}: imports the private name {alias.name} of {node.module}"
                  for alias in node.names
                  if alias.name.startswith("_") and node.module != own]
    return found


def main(roots: list[str]) -> int:
    found = [line for root in roots for path in sorted(Path(root).rglob("*.py"))
             for line in problems(path)]
    for line in found:
        sys.stdout.write(line + "\n")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["src", "tests", "benchmarks"]))
