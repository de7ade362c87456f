"""Corpora: the built-in Python docs, local files, Hugging Face datasets; token windows."""

from __future__ import annotations

import ast
import inspect
import itertools
import json
import sysconfig
import textwrap
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from saelab.corpus import BUILTIN_CORPUS, iter_documents, token_windows
from saelab.errors import SaelabError

STDLIB = Path(sysconfig.get_path("stdlib"))


# ---------------------------------------------------------------- the built-in corpus


@pytest.fixture(scope="module")
def python_docs() -> list[str]:
    """Every document of the built-in corpus (about 2 M characters; a few seconds)."""
    return list(iter_documents(BUILTIN_CORPUS))


def _docstrings_of(files: list[Path]) -> list[str]:
    """Reference: the cleaned docstrings of modules, classes and functions, as `help` shows them."""
    out = []
    for path in files:
        tree = ast.parse(path.read_bytes(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc.strip()) >= 80:
                    out.append(doc.strip())
    return out


def test_the_documented_name_reads_the_reference_manual():
    """`--corpus python-docs` (the README's spelling) starts with pydoc's reference topics."""
    first = next(iter_documents("python-docs"))
    assert first == topics[min(topics)].strip()


def test_builtin_corpus_is_deterministic(python_docs):
    n = 300
    again = list(itertools.islice(iter_documents(BUILTIN_CORPUS), n))
    assert again == python_docs[:n]


def test_builtin_corpus_has_no_duplicates_and_no_short_fragments(python_docs):
    assert len(set(python_docs)) == len(python_docs)
    assert all(doc == doc.strip() for doc in python_docs)
    assert min(len(doc) for doc in python_docs) >= 80


def test_builtin_corpus_is_large(python_docs):
    assert sum(len(doc) for doc in python_docs) > 1_000_000
    assert len(python_docs) > 1000


def test_builtin_corpus_starts_with_the_reference_topics_in_key_order(python_docs):
    expected = list(dict.fromkeys(topics[key].strip() for key in sorted(topics)))
    assert expected, "pydoc_data.topics is empty"
    assert python_docs[: len(expected)] == expected
    # `help("if")` shows this one; it is real reference-manual text.
    assert topics["if"].strip() in python_docs[: len(expected)]


def test_builtin_corpus_holds_stdlib_docstrings(python_docs):
    docs = set(python_docs)
    for obj in (json, json.dumps, json.JSONDecoder, textwrap.dedent, textwrap.wrap):
        doc = inspect.getdoc(obj)  # cleaned the same way as ast.get_docstring
        assert doc is not None and len(doc) >= 80
        assert doc.strip() in docs, obj
    assert "JSON (JavaScript Object Notation)" in inspect.getdoc(json)
    # and every long docstring of a whole stdlib file, in source order, after the topics
    json_docs = _docstrings_of([STDLIB / "json" / "__init__.py"])
    assert len(json_docs) >= 3
    n_topics = len(set(t.strip() for t in topics.values()))
    positions = [python_docs.index(d) for d in json_docs]
    assert positions == sorted(positions) and positions[0] >= n_topics


def test_builtin_corpus_skips_test_and_demo_folders(python_docs):
    folders = ["idlelib/idle_test", "turtledemo", "unittest/test", "lib2to3/tests",
               "test/test_json"]
    files = [f for d in folders if (STDLIB / d).is_dir() for f in sorted((STDLIB / d).glob("*.py"))]
    skipped = _docstrings_of(files)
    assert len(skipped) >= 20  # idle_test and turtledemo alone hold more than that
    docs = set(python_docs)
    assert [d for d in skipped if d in docs] == []


# ---------------------------------------------------------------- local files


def _write_jsonl(path: Path, rows: list[dict], blank_lines: bool = False) -> Path:
    lines = [json.dumps(r) for r in rows]
    if blank_lines:
        lines = list(itertools.chain.from_iterable((line, "", "   ") for line in lines))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_txt_file_is_one_document(tmp_path):
    text = "Première ligne.\n\nSecond paragraph, with unicode: αβγ.\n"
    path = tmp_path / "a.txt"
    path.write_text(text, encoding="utf-8")
    assert list(iter_documents(str(path))) == [text]


def test_jsonl_one_document_per_line_blank_lines_skipped(tmp_path):
    rows = [{"body": f"document {i}", "id": i} for i in range(5)]
    path = _write_jsonl(tmp_path / "a.jsonl", rows, blank_lines=True)
    assert list(iter_documents(str(path), text_column="body")) == [r["body"] for r in rows]


def test_jsonl_missing_column_names_line_and_found_columns(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", [{"text": "fine"}, {"body": "x", "id": 1}])
    with pytest.raises(SaelabError) as err:
        list(iter_documents(str(path)))
    assert str(err.value) == (
        f"{path}:2 has no column 'text'\n"
        "  expected: text\n"
        "  found:    body, id\n"
        "  fix:      pass --text-column with one of those")


def test_jsonl_missing_column_on_the_first_line_is_refused_on_the_call(tmp_path):
    _write_jsonl(tmp_path / "b.jsonl", [{"body": "x"}])
    _write_jsonl(tmp_path / "a.jsonl", [{"text": "fine"}])
    with pytest.raises(SaelabError, match=r"b\.jsonl:1 has no column 'text'"):
        iter_documents(str(tmp_path))  # every file of a folder is checked, not only the first


def test_jsonl_null_and_empty_texts_are_skipped(tmp_path):
    rows = [{"text": "one"}, {"text": None}, {"text": ""}, {"text": "two"}, {"text": 3}]
    path = _write_jsonl(tmp_path / "a.jsonl", rows)
    assert list(iter_documents(str(path))) == ["one", "two", "3"]


def test_empty_txt_file_gives_no_document(tmp_path):
    (tmp_path / "a.txt").write_text("", encoding="utf-8")
    (tmp_path / "b.txt").write_text("b", encoding="utf-8")
    assert list(iter_documents(str(tmp_path))) == ["b"]


def test_parquet_custom_column_empty_strings_skipped(tmp_path):
    path = tmp_path / "a.parquet"
    content = ["alpha", "", "beta", None, "gamma"]
    pq.write_table(pa.table({"content": content, "n": list(range(5))}), path, row_group_size=2)
    assert list(iter_documents(str(path), text_column="content")) == ["alpha", "beta", "gamma"]


def test_parquet_missing_column_names_found_columns(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"content": ["a"], "n": [1]}), path)
    with pytest.raises(SaelabError) as err:
        iter_documents(str(path))  # on the call, from the schema
    assert str(err.value) == (
        f"{path} has no column 'text'\n"
        "  expected: text\n"
        "  found:    content, n\n"
        "  fix:      pass --text-column with one of those")


def test_folder_reads_supported_files_in_sorted_recursive_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "c.txt").write_text("from b/c.txt", encoding="utf-8")
    _write_jsonl(tmp_path / "a.jsonl", [{"text": "a1"}, {"text": "a2"}])
    pq.write_table(pa.table({"text": ["p1", "", "p2"]}), tmp_path / "b" / "a.parquet")
    (tmp_path / "z.txt").write_text("from z.txt", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored: not a corpus suffix", encoding="utf-8")
    (tmp_path / "y.txt").mkdir()  # a folder with a corpus suffix is not a file
    expected = ["a1", "a2", "p1", "p2", "from b/c.txt", "from z.txt"]
    assert list(iter_documents(str(tmp_path))) == expected
    assert list(iter_documents(str(tmp_path))) == expected  # the same again


def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "readme.md").write_text("no corpus here")
    with pytest.raises(SaelabError) as err:
        iter_documents(str(tmp_path))
    assert str(err.value) == (
        f"corpus folder {tmp_path} holds no text files\n"
        "  expected: files ending in .txt, .jsonl, .parquet\n"
        "  found:    none\n"
        "  fix:      point --corpus at a folder of such files")


def test_unsupported_suffix_is_refused(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(SaelabError) as err:
        iter_documents(str(path))  # on the call, before any document is read
    assert str(err.value) == (
        f"cannot read corpus file {path}\n"
        "  expected: .txt, .jsonl, .parquet\n"
        "  found:    .csv\n"
        "  fix:      convert it to one of those")


@pytest.mark.parametrize(("spec", "found"), [
    ("wikitext", "wikitext"),
    ("./missing/folder", "no such file or folder"),
    ("missing.jsonl", "no such file or folder"),
])
def test_unknown_corpus_spec_is_refused(spec, found, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SaelabError) as err:
        iter_documents(spec)
    assert str(err.value) == (
        f"unknown corpus {spec!r}\n"
        "  expected: python-docs, a .txt/.jsonl/.parquet file or folder, or "
        "hf:NAME[:CONFIG][@SPLIT]\n"
        f"  found:    {found}\n"
        "  fix:      use --corpus python-docs for the built-in corpus")


# ---------------------------------------------------------------- Hugging Face datasets


@pytest.fixture
def hf_offline(monkeypatch, tmp_path):
    """Offline mode, as HF_HUB_OFFLINE=1 at start-up would give, and a private datasets cache.

    huggingface_hub and datasets read the variables once, at import (the test session imports
    them before any test runs), so their flags are set too.
    """
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")


def test_hf_dataset_offline_names_the_dataset(hf_offline):
    with pytest.raises(SaelabError) as err:
        iter_documents("hf:saelab-tests/no-such-dataset:wiki@validation")  # on the call
    e = err.value
    assert e.problem == "could not open the Hugging Face dataset 'saelab-tests/no-such-dataset'"
    assert e.expected == ("dataset saelab-tests/no-such-dataset (config wiki, split validation) "
                          "on the hub or in the local datasets cache")
    assert "saelab-tests/no-such-dataset" in e.found
    assert "local .jsonl/.parquet file" in e.fix


def test_hf_spec_reads_a_local_dataset_folder(tmp_path, hf_offline):
    folder = tmp_path / "ds"
    folder.mkdir()
    rows = [{"body": f"row number {i}", "id": i} for i in range(7)]
    _write_jsonl(folder / "train.jsonl", rows)
    expected = [r["body"] for r in rows]
    assert list(iter_documents(f"hf:{folder}", text_column="body")) == expected
    assert list(iter_documents(f"hf:{folder}@train", text_column="body")) == expected
    with pytest.raises(SaelabError) as err:
        iter_documents(f"hf:{folder}")  # on the call: row 0 is read then
    assert str(err.value) == (
        f"{folder} row 0 has no column 'text'\n"
        "  expected: text\n"
        "  found:    body, id\n"
        "  fix:      pass --text-column with one of those")


def test_hf_rows_with_null_or_empty_text_are_skipped(tmp_path, hf_offline):
    folder = tmp_path / "ds"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", [{"text": t} for t in ["a", None, "", "b", None]])
    assert list(iter_documents(f"hf:{folder}")) == ["a", "b"]


@pytest.mark.parametrize(("spec", "name", "config", "split"), [
    ("hf:wikitext", "wikitext", "default", "train"),
    ("hf:wikitext:wikitext-2-raw-v1@validation", "wikitext", "wikitext-2-raw-v1", "validation"),
    ("hf:org/name@test", "org/name", "default", "test"),
    ("hf:wikimedia/wikipedia:20231101.en", "wikimedia/wikipedia", "20231101.en", "train"),
    ("hf:/no/such/v@2/ds", "/no/such/v@2/ds", "default", "train"),
    ("hf:/no/such/v@2/ds@test", "/no/such/v@2/ds", "default", "test"),
    ("hf:/no/such/a:b/ds:cfg@test", "/no/such/a:b/ds", "cfg", "test"),
    ("hf:hf://datasets/org/name", "hf://datasets/org/name", "default", "train"),
])
def test_hf_spec_splits_at_the_last_colon_and_at(spec, name, config, split, hf_offline):
    with pytest.raises(SaelabError) as err:
        list(iter_documents(spec))
    assert err.value.problem == f"could not open the Hugging Face dataset {name!r}"
    assert err.value.expected == (f"dataset {name} (config {config}, split {split}) "
                                  "on the hub or in the local datasets cache")


def test_hf_spec_takes_an_existing_local_path_whole(tmp_path, hf_offline):
    folder = tmp_path / "ds:v1@2024"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", [{"text": "first"}, {"text": "second"}])
    assert list(iter_documents(f"hf:{folder}")) == ["first", "second"]
    assert list(iter_documents(f"hf:{folder}@train")) == ["first", "second"]


@pytest.mark.parametrize(("spec", "found"), [
    ("hf:", "an empty NAME"),
    ("hf:@train", "an empty NAME"),
    ("hf:wikitext@", "an empty SPLIT"),
    ("hf:wikitext:@train", "an empty CONFIG"),
    ("hf::", "an empty NAME and CONFIG"),
])
def test_bad_hf_spec_is_refused_on_the_call(spec, found):
    with pytest.raises(SaelabError) as err:
        iter_documents(spec)
    assert err.value.problem == f"bad Hugging Face dataset spec {spec!r}"
    assert err.value.found == found
    assert err.value.expected.startswith("hf:NAME[:CONFIG][@SPLIT]")


def test_hf_spec_reads_local_parquet_like_the_local_reader(tmp_path, hf_offline):
    folder = tmp_path / "pq"
    folder.mkdir()
    texts = [f"parquet document {i}" for i in range(10)]
    pq.write_table(pa.table({"content": texts}), folder / "train.parquet")
    via_hf = list(iter_documents(f"hf:{folder}", text_column="content"))
    assert via_hf == list(iter_documents(str(folder), text_column="content")) == texts


# ---------------------------------------------------------------- token windows


def reference_windows(docs, tokenizer, context_size: int) -> list[list[int]]:
    """Brute force: each document alone, EOS after each, chunks of T - 1, BOS first, tail dropped."""
    stream: list[int] = []
    for doc in docs:
        stream += tokenizer.encode(doc, add_special_tokens=False) + [tokenizer.eos_token_id]
    body = context_size - 1
    return [[tokenizer.bos_token_id, *stream[i * body:(i + 1) * body]]
            for i in range(len(stream) // body)]


@pytest.fixture(scope="module")
def some_docs() -> list[str]:
    """150 real documents (more than one tokenizer batch of 64), plus short and empty ones."""
    docs = list(itertools.islice(iter_documents(BUILTIN_CORPUS), 150))
    return [*docs[:70], "", "x", "Short one.", *docs[70:]]


@pytest.mark.parametrize("context_size", [2, 7, 64, 257])
def test_token_windows_match_brute_force(some_docs, tiny_tokenizer, context_size):
    windows = list(token_windows(some_docs, tiny_tokenizer, context_size,
                                 tiny_tokenizer.bos_token_id))
    expected = reference_windows(some_docs, tiny_tokenizer, context_size)
    assert len(expected) > 10
    assert [w.tolist() for w in windows] == expected
    assert all(w.dtype == np.int64 and w.shape == (context_size,) for w in windows)
    assert all(w[0] == tiny_tokenizer.bos_token_id for w in windows)


def test_token_windows_span_tokenizer_batches(some_docs, tiny_tokenizer):
    """Windows that straddle the 64-document batches still match the one-stream reference."""
    context_size = 100
    windows = [w.tolist() for w in token_windows(iter(some_docs), tiny_tokenizer, context_size,
                                                 tiny_tokenizer.bos_token_id)]
    expected = reference_windows(some_docs, tiny_tokenizer, context_size)
    assert windows == expected
    n_tokens_first_batch = sum(len(tiny_tokenizer.encode(d, add_special_tokens=False)) + 1
                               for d in some_docs[:64])
    assert len(windows) > n_tokens_first_batch // (context_size - 1) + 1


def test_token_windows_are_deterministic(some_docs, tiny_tokenizer):
    a = np.stack(list(token_windows(some_docs, tiny_tokenizer, 33, tiny_tokenizer.bos_token_id)))
    b = np.stack(list(token_windows(some_docs, tiny_tokenizer, 33, tiny_tokenizer.bos_token_id)))
    np.testing.assert_array_equal(a, b)


def test_token_windows_round_trip_to_the_text(some_docs, tiny_tokenizer):
    """Dropping BOS and joining the windows gives back the documents, EOS-separated."""
    docs = some_docs[:20]
    windows = list(token_windows(docs, tiny_tokenizer, 50, tiny_tokenizer.bos_token_id))
    ids = [t for w in windows for t in w[1:].tolist()]
    text = tiny_tokenizer.decode(ids, skip_special_tokens=False)
    joined = "".join(d + tiny_tokenizer.eos_token for d in docs)
    assert len(text) > len(joined) // 2
    assert joined.startswith(text)


def test_token_windows_short_corpus_gives_nothing(tiny_tokenizer):
    assert list(token_windows(["hi"], tiny_tokenizer, 128, tiny_tokenizer.bos_token_id)) == []
    assert list(token_windows([], tiny_tokenizer, 128, tiny_tokenizer.bos_token_id)) == []


@pytest.mark.parametrize("context_size", [1, 0, -3])
def test_token_windows_need_room_for_bos_and_a_token(tiny_tokenizer, context_size):
    with pytest.raises(SaelabError) as err:  # on the call, before any window
        token_windows(["some text"], tiny_tokenizer, context_size, tiny_tokenizer.bos_token_id)
    assert err.value.found == str(context_size) and err.value.expected == ">= 2"
