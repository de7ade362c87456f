"""Hugging Face module paths <-> saelab site names, for the libraries that name modules.

sparsify names the module whose output it read, relative to the base model (`layers.6`,
`layers.6.mlp`); Gemma Scope 2 names a module and a side (`model.layers.6.output`). saelab's
sites are TransformerLens hook names, mapped onto modules per architecture family by
`saelab.lm.sites`; this module runs that mapping backwards. A path that does not name exactly
one site (for the model's family when the model name tells it, else for every family) comes
back as None rather than as a guess.
"""

from __future__ import annotations

import re

from saelab.lm.sites import FAMILIES, HOOKS, SITE_PATTERN, Family, Side, module_of

# Substrings of a model name that tell its family (checked in this order).
_FAMILY_HINTS = (("gemma-3", "gemma3"), ("gemma3", "gemma3"), ("gemma-2", "gemma2"),
                 ("gemma2", "gemma2"), ("gpt2", "gpt2"), ("pythia", "gpt_neox"),
                 ("neox", "gpt_neox"), ("llama", "llama"), ("mistral", "mistral"),
                 ("qwen", "qwen2"))


def family_for_model(model: str | None) -> Family | None:
    """The architecture family a model name suggests, or None."""
    name = (model or "").lower()
    return next((FAMILIES[family] for hint, family in _FAMILY_HINTS if hint in name), None)


def site_from_module(path: str, side: Side, model: str | None = None) -> str | None:
    """The site read at `path`'s input or output (a TransformerLens name passes through)."""
    if SITE_PATTERN.match(path):
        return path
    family = family_for_model(model)
    families = [family] if family else list({id(f): f for f in FAMILIES.values()}.values())
    found = set()
    for fam in families:
        stem = fam.blocks.rsplit(".", 1)[-1]  # "layers" or "h"
        match = re.search(rf"(?:^|\.)({stem}\.(\d+)(?:\.[\w.]+)?)$", path)
        if not match:
            continue
        layer = int(match.group(2))
        for hook in HOOKS:
            module, module_side = module_of(fam, layer, hook)
            if module_side == side and f".{module}".endswith(f".{match.group(1)}"):
                found.add(f"blocks.{layer}.{hook}")
    return found.pop() if len(found) == 1 else None


def module_for_site(site: str | None, model: str | None = None) -> str | None:
    """The base-model module whose output is `site` (sparsify's hookpoint), or None when the
    site is a module's input or not a saelab site. Llama's layout when the model is unknown."""
    match = SITE_PATTERN.match(site or "")
    if not match or match.group(2) not in HOOKS:
        return None
    family = family_for_model(model) or FAMILIES["llama"]
    module, side = module_of(family, int(match.group(1)), match.group(2))
    prefix = family.blocks.rsplit(".", 1)[0] + "." if "." in family.blocks else ""
    return module.removeprefix(prefix) if side == "out" else None
