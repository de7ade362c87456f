"""Pretrained SAEs in every library's layout, one SAE object for all of them.

Reads SAELens (any version), Gemma Scope (1 and 2), sparsify and dictionary_learning files,
from a local path or the Hugging Face hub; writes SAELens (saelab's own layout), sparsify and
dictionary_learning, each layout's reader and writer in one module. Whatever the
source, the SAE that comes back takes raw activations, knows its site in saelab's names when
the files tell it, and says whether its encoder subtracts `b_dec` first.
"""

from saelab.formats.load import Format, Located, WritableFormat, load_sae, locate, write_sae

__all__ = ["Format", "Located", "WritableFormat", "load_sae", "locate", "write_sae"]
