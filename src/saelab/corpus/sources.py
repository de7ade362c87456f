"""Text sources: the built-in corpus, local files, and Hugging Face datasets (streamed).

A corpus spec is one string, the same on the command line and in Python:

- `python-docs`: the built-in offline corpus (see `saelab.corpus.builtin`);
- a path: a `.txt` file (one document), a `.jsonl` file (one document per line, in the text
  column), a `.parquet` file (the text column), or a folder of such files (sorted, recursive);
- `hf:NAME[:CONFIG][@SPLIT]`: a Hugging Face dataset, streamed (split `train` by default).

Rows whose text is null or empty are skipped: they hold no document. A spec that cannot be
read fails when `iter_documents` is called, not at the first document, so a long run fails
before it loads a model.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from saelab.corpus import builtin
from saelab.errors import SaelabError

SUFFIXES = (".txt", ".jsonl", ".parquet")
HF_SPEC = "hf:NAME[:CONFIG][@SPLIT]"


def iter_documents(spec: str, *, text_column: str = "text") -> Iterator[str]:
    """The documents of corpus `spec`, in a deterministic order; a bad spec raises here."""
    if spec == builtin.NAME:
        return builtin.python_docs()
    if spec.startswith("hf:"):
        return _hf_dataset(parse_hf_spec(spec), text_column)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise SaelabError(f"corpus folder {spec} holds no text files",
                              expected=f"files ending in {', '.join(SUFFIXES)}", found="none",
                              fix="point --corpus at a folder of such files")
    elif path.is_file():
        files = [path]
    else:
        raise SaelabError(
            f"unknown corpus {spec!r}",
            expected=f"{builtin.NAME}, a .txt/.jsonl/.parquet file or folder, or {HF_SPEC}",
            found="no such file or folder" if ("/" in spec or "." in spec) else spec,
            fix=f"use --corpus {builtin.NAME} for the built-in corpus",
        )
    for f in files:
        _check_file(f, text_column)
    return (doc for f in files for doc in _documents(_file_texts(f, text_column)))


def _documents(texts: Iterable[Any]) -> Iterator[str]:
    """Texts as documents, null and empty ones skipped (they would become "None" or "")."""
    return (str(t) for t in texts if t is not None and t != "")


def _check_file(path: Path, text_column: str) -> None:
    """Raise now for what would fail at the file's first document: suffix, text column."""
    if path.suffix not in SUFFIXES:
        raise SaelabError(f"cannot read corpus file {path}", expected=", ".join(SUFFIXES),
                          found=path.suffix or "no suffix", fix="convert it to one of those")
    if path.suffix == ".jsonl":
        next(_jsonl_texts(path, text_column), None)  # the first row names its columns
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        if text_column not in names:
            _missing_column(str(path), text_column, names)


def _file_texts(path: Path, text_column: str) -> Iterator[Any]:
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8")
    elif path.suffix == ".jsonl":
        yield from _jsonl_texts(path, text_column)
    else:
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(columns=[text_column]):
            yield from batch.column(0).to_pylist()


def _jsonl_texts(path: Path, text_column: str) -> Iterator[Any]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                yield _text_of(json.loads(line), text_column, f"{path}:{line_no}")


def _text_of(row: dict[str, Any], text_column: str, where: str) -> Any:
    if text_column not in row:
        _missing_column(where, text_column, list(row))
    return row[text_column]


def _missing_column(where: str, text_column: str, columns: list[str]) -> None:
    raise SaelabError(f"{where} has no column {text_column!r}", expected=text_column,
                      found=", ".join(columns), fix="pass --text-column with one of those")


class HfSpec(NamedTuple):
    """A parsed `hf:NAME[:CONFIG][@SPLIT]`."""

    name: str
    """Hub dataset id or local dataset folder, passed to `datasets.load_dataset`."""
    config: str | None
    """Dataset configuration; None for the default."""
    split: str
    """Split to stream."""


def parse_hf_spec(spec: str) -> HfSpec:
    """Split `hf:NAME[:CONFIG][@SPLIT]` at the last '@' and ':' (hub ids hold neither).

    A local path that exists is taken whole, ':' and '@' included, and a part after '@' or
    ':' that holds a '/' is part of a path, not a split or config.
    """
    name, config, split = spec.removeprefix("hf:"), None, "train"
    if not Path(name).expanduser().exists():
        head, at, tail = name.rpartition("@")
        if at and "/" not in tail:
            name, split = head, tail
        head, colon, tail = name.rpartition(":")
        if colon and "/" not in tail and not Path(name).expanduser().exists():
            name, config = head, tail
    empty = [part for part, value in (("NAME", name), ("CONFIG", config), ("SPLIT", split))
             if value == ""]
    if empty:
        raise SaelabError(f"bad Hugging Face dataset spec {spec!r}",
                          expected=f"{HF_SPEC}, e.g. hf:wikitext:wikitext-2-raw-v1@validation",
                          found=f"an empty {' and '.join(empty)}",
                          fix="leave out ':' or '@' when there is no config or split")
    return HfSpec(name, config, split)


def _hf_dataset(spec: HfSpec, text_column: str) -> Iterator[str]:
    """Open the stream and read its first row now, so a wrong name, split or column fails here."""
    import datasets

    name, config, split = spec
    try:
        rows = iter(datasets.load_dataset(name, config, split=split, streaming=True))
        first = list(itertools.islice(rows, 1))
    except (OSError, ConnectionError, ValueError, FileNotFoundError) as err:
        raise SaelabError(
            f"could not open the Hugging Face dataset {name!r}",
            expected=f"dataset {name} (config {config or 'default'}, split {split}) "
            "on the hub or in the local datasets cache",
            found=str(err).splitlines()[0] if str(err) else type(err).__name__,
            fix="check the name, or download it elsewhere and pass a local .jsonl/.parquet file",
        ) from err
    if first:
        _text_of(first[0], text_column, f"{name} row 0")
    return _documents(_text_of(row, text_column, f"{name} row {i}")
                      for i, row in enumerate(itertools.chain(first, rows)))
