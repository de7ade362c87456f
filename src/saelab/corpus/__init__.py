"""Text corpora and their tokenisation into fixed-length windows."""

from saelab.corpus.builtin import NAME as BUILTIN_CORPUS
from saelab.corpus.sources import iter_documents
from saelab.corpus.windows import token_windows

__all__ = ["BUILTIN_CORPUS", "iter_documents", "token_windows"]
