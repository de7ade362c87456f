"""Sites on tiny real architectures: each equals the Hugging Face value it names.

The references are independent of saelab's hooks: residual sites against the model's own
`output_hidden_states`, and the other sites through the identities a block computes
(resid_mid = resid_pre + attn_out, out_proj(z) = attn_out, ...), evaluated with the model's
own submodules.
"""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, tiny_lm
from saelab import SaelabError
from saelab.lm.sites import family_of, list_sites, resolve_site

TOL = 1e-5
FINAL_NORM = {"transformer": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm"}


def _ids(lm, n_pos: int = 20, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, lm.hf_model.config.vocab_size, (batch, n_pos), generator=g)
    ids[:, 0] = lm.bos_token_id
    return ids


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module", params=FAMILIES)
def family_lm(request, tiny_tokenizer):
    return request.param, tiny_lm(request.param, tiny_tokenizer)


@pytest.fixture(scope="module")
def all_sites(family_lm):
    """Every site of every layer, read in one pass, and the model's own hidden states."""
    _, lm = family_lm
    ids = _ids(lm)
    acts = lm.read(ids, [s.name for s in lm.sites()])
    with torch.inference_mode():
        hidden = lm.hf_model(ids, output_hidden_states=True, use_cache=False).hidden_states
    return lm, ids, acts, hidden


def test_widths_match_what_is_read(all_sites):
    lm, ids, acts, _ = all_sites
    for site in lm.sites():
        assert acts[site.name].shape == (*ids.shape, site.width), site.name


def test_residual_sites_equal_hidden_states(all_sites):
    lm, _, acts, hidden = all_sites
    n = len(hidden) - 1  # hidden_states: the input of each block, then the final norm's output
    for layer in range(n):
        assert _close(acts[f"blocks.{layer}.hook_resid_pre"], hidden[layer]) <= TOL
    for layer in range(n - 1):
        assert _close(acts[f"blocks.{layer}.hook_resid_post"], hidden[layer + 1]) <= TOL
    final_norm = lm.hf_model.get_submodule(FINAL_NORM.get(lm.hf_model.base_model_prefix,
                                                          "model.norm"))
    with torch.inference_mode():
        normed = final_norm(acts[f"blocks.{n - 1}.hook_resid_post"])
    assert _close(normed, hidden[n]) <= TOL


def test_block_outputs_add_up_to_the_residual_stream(all_sites):
    lm, _, acts, _ = all_sites
    parallel = "blocks.0.hook_resid_mid" not in acts
    for layer in range(len(lm.hf_model.get_submodule(family_of(lm.hf_model.config).blocks))):
        a = {k.split(".", 2)[2]: v for k, v in acts.items() if k.startswith(f"blocks.{layer}.")}
        if parallel:  # Pythia: attention and MLP both read resid_pre
            expected = a["hook_resid_pre"] + a["hook_attn_out"] + a["hook_mlp_out"]
        else:
            assert _close(a["hook_resid_pre"] + a["hook_attn_out"], a["hook_resid_mid"]) <= TOL
            expected = a["hook_resid_mid"] + a["hook_mlp_out"]
        assert _close(expected, a["hook_resid_post"]) <= TOL


def test_z_and_mlp_post_project_to_the_block_outputs(all_sites):
    """attn.hook_z through the output projection (and Gemma's post-norm) is hook_attn_out;
    likewise mlp.hook_post through the down projection is hook_mlp_out."""
    lm, _, acts, _ = all_sites
    fam = family_of(lm.hf_model.config)
    model = lm.hf_model
    for layer in range(2):
        block = f"{fam.blocks}.{layer}"
        pairs = [("attn.hook_z", fam.attn_out_proj, fam.attn_out_norm, "hook_attn_out"),
                 ("mlp.hook_post", fam.mlp_out_proj, fam.mlp_out_norm, "hook_mlp_out")]
        for inner, proj, norm, outer in pairs:
            with torch.inference_mode():
                out = model.get_submodule(f"{block}.{proj}")(acts[f"blocks.{layer}.{inner}"])
                if norm:
                    out = model.get_submodule(f"{block}.{norm}")(out)
            assert _close(out, acts[f"blocks.{layer}.{outer}"]) <= TOL, (layer, inner)


def test_early_stop_skips_later_blocks_and_equals_the_full_pass(family_lm):
    _, lm = family_lm
    ids = _ids(lm, seed=1)
    model = lm.hf_model
    blocks = model.get_submodule(family_of(model.config).blocks)
    ran: list[str] = []
    handles = [blocks[i].register_forward_hook(lambda *_, i=i: ran.append(f"block{i}"))
               for i in range(len(blocks))]
    handles.append(model.get_output_embeddings().register_forward_hook(
        lambda *_: ran.append("lm_head")))
    try:
        early = lm.read(ids, ["blocks.1.hook_mlp_out", "blocks.0.attn.hook_z"])
    finally:
        for h in handles:
            h.remove()
    assert ran == ["block0"]  # block 1 stopped inside its MLP, before finishing
    full = lm.read(ids, [s.name for s in lm.sites()])
    for name, value in early.items():
        assert torch.equal(value, full[name])


def test_identity_splice_leaves_logits_unchanged(family_lm):
    _, lm = family_lm
    ids = _ids(lm, seed=2)
    clean = lm.logits(ids)
    with torch.inference_mode():
        reference = lm.hf_model(ids, use_cache=False).logits
    assert torch.equal(clean, reference)
    sites = [s.name for s in lm.sites() if s.layer == 1]
    spliced = lm.logits(ids, splice={name: (lambda x: x.clone()) for name in sites})
    assert torch.equal(spliced, clean)


def test_splice_replaces_the_value(family_lm):
    """Zeroing the last residual stream leaves only the final norm's and head's own terms."""
    _, lm = family_lm
    model = lm.hf_model
    ids = _ids(lm, seed=3)
    last = len(model.get_submodule(family_of(model.config).blocks)) - 1
    logits = lm.logits(ids, splice={f"blocks.{last}.hook_resid_post": torch.zeros_like})
    norm = model.get_submodule(FINAL_NORM.get(model.base_model_prefix, "model.norm"))
    with torch.inference_mode():
        expected = model.get_output_embeddings()(norm(torch.zeros(*ids.shape, lm.site(
            f"blocks.{last}.hook_resid_post").width)))
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        expected = torch.tanh(expected / cap) * cap
    assert _close(logits, expected) <= TOL
    assert _close(logits, lm.logits(ids)) > 1e-2  # and the splice did change something


def test_parallel_residual_has_no_resid_mid(tiny_tokenizer):
    names = {s.name for s in tiny_lm("gpt_neox", tiny_tokenizer).sites()}
    assert "blocks.0.hook_resid_post" in names and "blocks.0.hook_resid_mid" not in names
    seq = {s.name for s in tiny_lm("gpt_neox_sequential", tiny_tokenizer).sites()}
    assert "blocks.0.hook_resid_mid" in seq


def test_site_table_order_and_count(tiny_tokenizer):
    config = tiny_lm("gemma3_text", tiny_tokenizer).hf_model.config
    sites = list_sites(config)
    assert len(sites) == 3 * 7
    assert [s.name for s in sites[:2]] == ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_z"]
    z = resolve_site(config, "blocks.2.attn.hook_z")
    assert (z.width, z.module_path, z.side) == (96, "model.layers.2.self_attn.o_proj", "in")


def test_unknown_site_names_the_closest(tiny_tokenizer):
    config = tiny_lm("llama", tiny_tokenizer).hf_model.config
    with pytest.raises(SaelabError) as err:
        resolve_site(config, "blocks.1.hook_resid_psot")
    assert "did you mean blocks.1.hook_resid_post" in str(err.value)
    with pytest.raises(SaelabError) as err:  # right hook, layer out of range
        resolve_site(config, "blocks.9.hook_mlp_out")
    message = str(err.value)
    assert "layers 0..2" in message and "blocks.0.hook_mlp_out" in message
    with pytest.raises(SaelabError, match="sites MODEL"):
        resolve_site(config, "embed")


def test_unsupported_architecture_lists_the_supported(tiny_tokenizer):
    from transformers import AutoConfig

    config = AutoConfig.for_model("bert", hidden_size=64)
    with pytest.raises(SaelabError) as err:
        list_sites(config)
    assert "'bert'" in str(err.value) and "gpt_neox" in str(err.value)
