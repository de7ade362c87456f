"""Documents -> fixed-length token windows, each starting with BOS.

Documents are tokenised without special tokens and joined into one stream with EOS between
them; the stream is cut into pieces of `context_size - 1` tokens and BOS is put in front of
each, so every window is full (no padding) and the same corpus always gives the same windows.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import numpy as np
from transformers import PreTrainedTokenizerBase

from saelab.errors import SaelabError

_DOCS_PER_CALL = 64  # documents tokenised per batched tokenizer call


def token_windows(documents: Iterable[str], tokenizer: PreTrainedTokenizerBase, context_size: int,
                  bos_token_id: int) -> Iterator[np.ndarray]:
    """Windows [context_size] int64 of the concatenated documents, BOS first, tail dropped.

    A bad `context_size` raises here, not at the first window."""
    if context_size < 2:
        raise SaelabError("context_size must hold BOS and at least one token",
                          expected=">= 2", found=str(context_size),
                          fix="pass --context-size 2 or more")
    return _windows(documents, tokenizer, context_size, bos_token_id)


def _windows(documents: Iterable[str], tokenizer: PreTrainedTokenizerBase, context_size: int,
             bos_token_id: int) -> Iterator[np.ndarray]:
    body = context_size - 1
    eos = tokenizer.eos_token_id
    sep = [eos] if isinstance(eos, int) else []
    buffer: list[int] = []
    docs = iter(documents)
    while chunk := list(itertools.islice(docs, _DOCS_PER_CALL)):
        encoded = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            buffer.extend(ids)
            buffer.extend(sep)
        n_full = len(buffer) // body
        for i in range(n_full):
            yield np.array([bos_token_id, *buffer[i * body:(i + 1) * body]], dtype=np.int64)
        del buffer[: n_full * body]
