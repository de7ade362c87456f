"""The built-in offline corpus: Python's own documentation, real English that ships everywhere.

First the reference manual's topics (`pydoc_data.topics`, what `help("if")` shows), then the
docstrings of the standard library's modules, classes and functions, read from source with
`ast` (never imported: importing `antigravity` opens a browser). Deterministic order,
exact duplicates dropped, short fragments ("Return self.") skipped.
"""

from __future__ import annotations

import ast
import sysconfig
from collections.abc import Iterator
from pathlib import Path

NAME = "python-docs"
_MIN_CHARS = 80  # shorter docstrings are mostly one-line summaries ("Return self.")
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "turtledemo"}


def _topics() -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def _docstrings(tree: ast.Module) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def _stdlib_files() -> Iterator[Path]:
    root = Path(sysconfig.get_path("stdlib"))
    for path in sorted(root.rglob("*.py")):
        if not _SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]):
            yield path


def python_docs() -> Iterator[str]:
    """Documents of the built-in corpus, lazily, in a fixed order."""
    seen: set[str] = set()

    def fresh(text: str) -> bool:
        text = text.strip()
        if len(text) < _MIN_CHARS or text in seen:
            return False
        seen.add(text)
        return True

    yield from (t.strip() for t in _topics() if fresh(t))
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):  # a few stdlib files are deliberately invalid
            continue
        yield from (d.strip() for d in _docstrings(tree) if fresh(d))
