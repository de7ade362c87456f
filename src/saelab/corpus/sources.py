"""Text sources: the built-in corpus, local files, and Hugging Face datasets (streamed).

A corpus spec is one string, the same on the command line and in Python:

- `python-docs`: the built-in offline corpus (see `saelab.corpus.builtin`);
- a path: a `.txt` file (one document), a `.jsonl` file (one document per line, in the text
  column), a `.parquet` file (the text column), or a folder of such files (sorted, recursive);
- `hf:NAME[:CONFIG][@SPLIT]`: a Hugging Face dataset, streamed (split `train` by default).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from saelab.corpus import builtin
from saelab.errors import SaelabError

SUFFIXES = (".txt", ".jsonl", ".parquet")


def iter_documents(spec: str, *, text_column: str = "text") -> Iterator[str]:
    """The documents of corpus `spec`, in a deterministic order."""
    if spec == builtin.NAME:
        return builtin.python_docs()
    if spec.startswith("hf:"):
        return _hf_dataset(spec[3:], text_column)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise SaelabError(f"corpus folder {spec} holds no text files",
                              expected=f"files ending in {', '.join(SUFFIXES)}", found="none",
                              fix="point --corpus at a folder of such files")
        return (doc for f in files for doc in _file_documents(f, text_column))
    if path.is_file():
        return _file_documents(path, text_column)
    raise SaelabError(
        f"unknown corpus {spec!r}",
        expected=f"{builtin.NAME}, a .txt/.jsonl/.parquet file or folder, or hf:NAME[:CONFIG][@SPLIT]",
        found="no such file or folder" if ("/" in spec or "." in spec) else spec,
        fix=f"use --corpus {builtin.NAME} for the built-in corpus",
    )


def _file_documents(path: Path, text_column: str) -> Iterator[str]:
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8")
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    yield _text_of(json.loads(line), text_column, f"{path}:{line_no}")
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path)
        if text_column not in table.schema_arrow.names:
            _missing_column(str(path), text_column, table.schema_arrow.names)
        for batch in table.iter_batches(columns=[text_column]):
            yield from (t for t in batch.column(0).to_pylist() if t)
    else:
        raise SaelabError(f"cannot read corpus file {path}", expected=", ".join(SUFFIXES),
                          found=path.suffix or "no suffix", fix="convert it to one of those")


def _text_of(row: dict, text_column: str, where: str) -> str:
    if text_column not in row:
        _missing_column(where, text_column, list(row))
    return str(row[text_column])


def _missing_column(where: str, text_column: str, columns: list[str]) -> None:
    raise SaelabError(f"{where} has no column {text_column!r}", expected=text_column,
                      found=", ".join(columns), fix="pass --text-column with one of those")


def _hf_dataset(spec: str, text_column: str) -> Iterator[str]:
    import datasets

    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    try:
        stream = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    except (OSError, ConnectionError, ValueError, FileNotFoundError) as err:
        raise SaelabError(
            f"could not open the Hugging Face dataset {name!r}",
            expected=f"dataset {name} (config {config or 'default'}, split {split or 'train'}) "
            "on the hub or in the local datasets cache",
            found=str(err).splitlines()[0] if str(err) else type(err).__name__,
            fix="check the name, or download it elsewhere and pass a local .jsonl/.parquet file",
        ) from err
    for i, row in enumerate(stream):
        yield _text_of(row, text_column, f"{name} row {i}")
