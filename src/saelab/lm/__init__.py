"""Language models: loading, sites, reading and splicing."""

from saelab.lm.loading import EMBEDDED_MODEL, load_model
from saelab.lm.model import LanguageModel, Unembedding
from saelab.lm.sites import Site, list_sites, resolve_site

__all__ = ["EMBEDDED_MODEL", "LanguageModel", "Site", "list_sites", "load_model", "resolve_site",
           "Unembedding"]
