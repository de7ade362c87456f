"""Sites: TransformerLens hook names on the outside, Hugging Face module paths on the inside.

A site is where activations are read and where reconstructions are written back. Users name
sites as TransformerLens and SAELens do (`blocks.6.hook_resid_post`); each architecture family
maps the hook names onto one of its Hugging Face modules, either the module's input
(`"in"`: the first positional argument, or `hidden_states`) or its output (`"out"`: the
tensor, or the first element of a returned tuple). No wrapping of the model, nnsight-style.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Literal

from transformers import PretrainedConfig

from saelab.errors import SaelabError

Side = Literal["in", "out"]

# Hook names within a block, in the order a sequential block computes them.
HOOKS = (
    "hook_resid_pre",
    "attn.hook_z",
    "hook_attn_out",
    "hook_resid_mid",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)
SITE_PATTERN = re.compile(r"^blocks\.(\d+)\.(.+)$")  # groups: layer, hook


@dataclass(frozen=True)
class Family:
    """How one architecture family lays out its blocks (paths relative to the CausalLM)."""

    blocks: str  # module path of the ModuleList of decoder blocks
    attn: str  # attention module, relative to a block; its output[0] is hook_attn_out
    mlp: str  # MLP module, relative to a block; its output is hook_mlp_out
    attn_out_proj: str  # output projection inside the block: its input is attn.hook_z
    mlp_out_proj: str  # MLP down projection inside the block: its input is mlp.hook_post
    resid_mid: str | None  # module whose input is the residual between attention and MLP
    # Gemma 2/3 normalise the attention and MLP outputs before adding them to the residual;
    # TransformerLens's hook_attn_out/hook_mlp_out are those normalised outputs.
    attn_out_norm: str | None = None
    mlp_out_norm: str | None = None


_LLAMA = Family(
    blocks="model.layers",
    attn="self_attn",
    mlp="mlp",
    attn_out_proj="self_attn.o_proj",
    mlp_out_proj="mlp.down_proj",
    resid_mid="post_attention_layernorm",
)
_GEMMA2 = Family(
    blocks="model.layers",
    attn="self_attn",
    mlp="mlp",
    attn_out_proj="self_attn.o_proj",
    mlp_out_proj="mlp.down_proj",
    resid_mid="pre_feedforward_layernorm",
    attn_out_norm="post_attention_layernorm",
    mlp_out_norm="post_feedforward_layernorm",
)
_GPT2 = Family(
    blocks="transformer.h",
    attn="attn",
    mlp="mlp",
    attn_out_proj="attn.c_proj",
    mlp_out_proj="mlp.c_proj",
    resid_mid="ln_2",
)
_NEOX = Family(
    blocks="gpt_neox.layers",
    attn="attention",
    mlp="mlp",
    attn_out_proj="attention.dense",
    mlp_out_proj="mlp.dense_4h_to_h",
    resid_mid="post_attention_layernorm",
)

FAMILIES: dict[str, Family] = {
    "gemma3_text": _GEMMA2,
    "gemma3": _GEMMA2,
    "gemma2": _GEMMA2,
    "gemma": _LLAMA,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt2": _GPT2,
    "gpt_neox": _NEOX,
}


@dataclass(frozen=True)
class Site:
    """A resolved site: its hook name, the module that carries it, and its width."""

    name: str
    layer: int
    module_path: str
    side: Side
    width: int


def family_of(config: PretrainedConfig) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise SaelabError(
            f"saelab has no site mapping for model type {model_type!r}",
            expected=", ".join(sorted(FAMILIES)),
            found=str(model_type),
            fix="use a model of a supported family, or add a Family to saelab/lm/sites.py",
        )
    return FAMILIES[model_type]


def _text_config(config: PretrainedConfig) -> PretrainedConfig:
    return getattr(config, "text_config", None) or config


def n_layers(config: PretrainedConfig) -> int:
    c = _text_config(config)
    return int(getattr(c, "num_hidden_layers", None) or c.n_layer)


def _widths(config: PretrainedConfig) -> dict[str, int]:
    c = _text_config(config)
    d_model = int(getattr(c, "hidden_size", None) or c.n_embd)
    n_heads = int(getattr(c, "num_attention_heads", None) or c.n_head)
    head_dim = getattr(c, "head_dim", None) or d_model // n_heads
    d_mlp = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * d_model
    widths: dict[str, int] = dict.fromkeys(HOOKS, d_model)
    widths["attn.hook_z"] = n_heads * int(head_dim)
    widths["mlp.hook_post"] = int(d_mlp)
    return widths


def _hooks_of(config: PretrainedConfig, family: Family) -> tuple[str, ...]:
    # A parallel-residual block (Pythia) has no residual stream between attention and MLP.
    parallel = bool(getattr(_text_config(config), "use_parallel_residual", False))
    if family.resid_mid is None or parallel:
        return tuple(h for h in HOOKS if h != "hook_resid_mid")
    return HOOKS


def module_of(family: Family, layer: int, hook: str) -> tuple[str, Side]:
    """The module (path from the CausalLM) and side whose value is `hook` of block `layer`."""
    block = f"{family.blocks}.{layer}"
    table: dict[str, tuple[str, Side]] = {
        "hook_resid_pre": (block, "in"),
        "hook_resid_post": (block, "out"),
        "attn.hook_z": (f"{block}.{family.attn_out_proj}", "in"),
        "mlp.hook_post": (f"{block}.{family.mlp_out_proj}", "in"),
        "hook_attn_out": (f"{block}.{family.attn_out_norm or family.attn}", "out"),
        "hook_mlp_out": (f"{block}.{family.mlp_out_norm or family.mlp}", "out"),
        "hook_resid_mid": (f"{block}.{family.resid_mid}", "in"),
    }
    return table[hook]


def list_sites(config: PretrainedConfig) -> list[Site]:
    """Every site of a model, layer by layer, in the order a block computes them."""
    family = family_of(config)
    widths = _widths(config)
    hooks = _hooks_of(config, family)
    sites = []
    for layer in range(n_layers(config)):
        for hook in hooks:
            path, side = module_of(family, layer, hook)
            sites.append(Site(f"blocks.{layer}.{hook}", layer, path, side, widths[hook]))
    return sites


def resolve_site(config: PretrainedConfig, name: str) -> Site:
    """The site called `name`, or an error naming the closest valid sites."""
    sites = {s.name: s for s in list_sites(config)}
    if name in sites:
        return sites[name]
    close = difflib.get_close_matches(name, list(sites), n=3, cutoff=0.5)
    match = SITE_PATTERN.match(name)
    if not close and match:  # right shape, wrong layer: suggest the same hook at valid layers
        close = [s for s in sites if s.endswith("." + match.group(2))][:3]
    raise SaelabError(
        f"unknown site {name!r} for this {getattr(config, 'model_type', '?')} model",
        expected=f"a TransformerLens hook name such as blocks.0.hook_resid_post "
        f"(layers 0..{n_layers(config) - 1})",
        found=name,
        fix="did you mean " + " or ".join(close) if close else "run `saelab sites MODEL` to list them",
    )
