"""Shared test parts: tiny real architectures and a real tokenizer, all built offline.

The models are randomly initialised from real `transformers` configs (no download); the
tokenizer is a byte-level BPE trained in about a second on saelab's own built-in corpus.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from saelab.corpus import BUILTIN_CORPUS, iter_documents
from saelab.lm import LanguageModel

VOCAB = 512
# One entry per supported family; small enough that a forward pass takes milliseconds.
TINY_CONFIGS: dict[str, dict] = {
    "gemma3_text": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                        sliding_window=8, layer_types=["sliding_attention", "full_attention",
                                                       "sliding_attention"]),
    "gemma2": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=24, sliding_window=8),
    "llama": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, sliding_window=8),
    "gpt2": dict(n_embd=64, n_layer=3, n_head=4, n_positions=256),
    "gpt_neox": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                     num_attention_heads=4, use_parallel_residual=True),
    "gpt_neox_sequential": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                num_attention_heads=4, use_parallel_residual=False),
}
FAMILIES = list(TINY_CONFIGS)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(itertools.islice(iter_documents(BUILTIN_CORPUS), 300), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


def tiny_hf_model(family: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0):
    model_type = family.removesuffix("_sequential")
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        model_type, vocab_size=VOCAB, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **TINY_CONFIGS[family])
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


def tiny_lm(family: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LanguageModel:
    return LanguageModel(tiny_hf_model(family, tokenizer, seed), tokenizer, f"tiny-{family}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory,
                   tiny_tokenizer: PreTrainedTokenizerFast) -> Path:
    """A tiny Llama saved as a Hugging Face folder, for tests that load from disk."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf_model("llama", tiny_tokenizer).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def store_with_sae(model_dir: Path, out: Path, *, tokens: int, n_latents: int, seed: int):
    """A store of `tokens` rows of the tiny model at blocks.1.hook_resid_post (out/acts), and a
    random TopK SAE (k 8) on it whose b_dec is the store's mean: codes then have something
    to explain."""
    import saelab as sl

    sl.cache_activations(out / "acts", model=str(model_dir), sites=("blocks.1.hook_resid_post",),
                         tokens=tokens, context_size=32)
    store = sl.ActivationStore(out / "acts")
    sae = sl.saes.TopKSAE(store.d_model, n_latents, k=8, site=store.site,
                          model=store.model).init_random(seed=seed)
    with torch.no_grad():
        sae.b_dec.copy_(store[:].mean(dim=0))
    return store, sae


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one thread: tiny tensors (the toy models) are fastest that way, and a
    busy CI core stalls the others in every parallel region."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def store(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3,000-row store of the tiny Llama at blocks.1.hook_resid_post, for training runs."""
    import saelab as sl

    root = tmp_path_factory.mktemp("train-store")
    sl.cache_activations(root, model=str(tiny_model_dir), sites=("blocks.1.hook_resid_post",),
                         tokens=3000, context_size=32)
    return root
