"""EleutherAI sparsify: a run folder holds one folder per hookpoint, each with `cfg.json`
(`activation`, `k`, `num_latents`, `expansion_factor`, `d_in`, `transcode`, `skip_connection`,
...) and `sae.safetensors` (`encoder.weight` [n_latents, d_in], `encoder.bias`, `W_dec`
[n_latents, d_in], `b_dec`). The encoder subtracts `b_dec`, then keeps the top k of
ReLU(pre-activations). The hookpoint folder's name is the Hugging Face module whose output was
read, relative to the base model (`layers.6`): the only record of the site. sparsify's
`groupmax` activation, skip connections and transcoders have no saelab counterpart and are
refused.
"""

from __future__ import annotations

from pathlib import Path

from saelab.errors import SaelabError
from saelab.formats.bias import encoder_bias
from saelab.formats.build import build_sae
from saelab.formats.sites import module_for_site, site_from_module
from saelab.io import atomic_write, read_json, read_safetensors, write_json
from saelab.saes import SAE, TopKSAE

CFG, WEIGHTS, RUN_CONFIG = "cfg.json", "sae.safetensors", "config.json"
_NAMES = {"encoder.weight": "W_enc", "encoder.bias": "b_enc"}


def read(folder: Path) -> SAE:
    """The TopK SAE in a sparsify hookpoint folder."""
    cfg = read_json(folder / CFG)
    kind = ("a transcoder" if cfg.get("transcode") else "a skip connection"
            if cfg.get("skip_connection") else None)
    if kind or cfg.get("activation", "topk") != "topk" or not isinstance(cfg.get("k"), int):
        raise SaelabError(f"{folder} holds a sparsify coder saelab cannot run",
                          expected="activation topk with an integer k, no transcode, no "
                          "skip_connection", found=kind or f"activation {cfg.get('activation')!r}"
                          f", k {cfg.get('k')!r}", fix="use a plain TopK SAE from the run")
    state = {_NAMES.get(key, key): value
             for key, value in read_safetensors(folder / WEIGHTS).items()}
    if "W_enc" in state:
        state["W_enc"] = state["W_enc"].T  # nn.Linear's [n_latents, d_in]
    run = folder.parent / RUN_CONFIG
    model = read_json(run).get("model") if run.is_file() else None
    return build_sae(TopKSAE, state, source=folder / WEIGHTS, hyperparameters={"k": cfg["k"]},
                     apply_b_dec_to_input=True, site=site_from_module(folder.name, "out", model),
                     model=model)


def write(sae: SAE, out: Path) -> Path:
    """`out/HOOKPOINT/` as sparsify lays it out (the site's module, else the site's name);
    returns that folder. Only TopK SAEs: sparsify has no other activation."""
    if not isinstance(sae, TopKSAE):  # sparsify has one activation: TopK of ReLU
        raise SaelabError(f"sparsify has no {sae.architecture} SAE", expected="a topk SAE",
                          found=sae.architecture, fix="convert to saelens or dictionary_learning")
    from safetensors.torch import save

    folder = out / (module_for_site(sae.site, sae.model) or sae.site or "sae")
    tensors = {"encoder.weight": sae.W_enc.detach().T, "encoder.bias": encoder_bias(sae, True),
               "W_dec": sae.W_dec.detach(), "b_dec": sae.b_dec.detach()}
    data = save({key: value.cpu().contiguous() for key, value in tensors.items()})
    atomic_write(folder / WEIGHTS, lambda f: f.write(data))
    write_json(folder / CFG, {
        "activation": "topk", "expansion_factor": max(1, sae.n_latents // sae.d_model),
        "normalize_decoder": True, "num_latents": sae.n_latents, "k": sae.k,
        "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": sae.d_model})
    if sae.model:  # what sparsify's run config.json says of the model (loaders read only this)
        write_json(out / RUN_CONFIG, {"model": sae.model, "hookpoints": [folder.name]})
    return folder
