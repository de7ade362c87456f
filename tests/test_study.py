"""`saelab study` on a tiny real model: a trained dictionary and one loaded from each layout
saelab reads, scored on the same windows; the comparisons against the rows they come from;
a study killed mid-run resumes to the same results; the spec file's errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from saelab.cli import main
from saelab.errors import SaelabError
from saelab.formats import write_sae
from saelab.saes import JumpReluSAE, TopKSAE
from saelab.study import PRESETS, DictionaryEntry, StudySpec, read_spec, verdict

SITE = "blocks.1.hook_resid_post"
LAYOUTS = ("saelens", "sparsify", "dictionary_learning")


def study_file(tmp_path, model_dir, saes: dict[str, str]) -> dict:
    return {"model": str(model_dir), "site": SITE, "context_size": 16, "cache_tokens": 1500,
            "n_latents": 96, "train_tokens": 6000, "batch_size": 500,
            "dictionaries": [{"name": "topk-4", "architecture": "topk", "target_l0": 4},
                             *({"name": n, "sae": p} for n, p in saes.items())],
            "coders": ["encoder", "encoder-refit", "encoder-scaled", "gp", "nn-gp"],
            "ks": [2, 4], "eval_tokens": 300, "fit_tokens": 60, "batch_tokens": 120,
            "curve_tokens": [1500, 3000], "curve_eval_tokens": 150}


@pytest.fixture(scope="module")
def loaded_saes(tmp_path_factory):
    """One TopK SAE written in each writable layout, and a Gemma Scope params.npz."""
    root = tmp_path_factory.mktemp("layouts")
    sae = TopKSAE(64, 96, k=4, site=SITE).init_random(seed=3)
    paths = {layout: str(write_sae(sae, root / layout, layout)) for layout in LAYOUTS}
    rng = np.random.default_rng(0)
    jump = JumpReluSAE(64, 96).init_random(seed=4)
    folder = root / "gemma-scope" / "layer_1" / "width_96" / "average_l0_10"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", W_enc=jump.W_enc.detach().numpy(),
             W_dec=jump.W_dec.detach().numpy(), b_enc=jump.b_enc.detach().numpy(),
             b_dec=jump.b_dec.detach().numpy(),
             threshold=(0.01 * rng.random(96)).astype(np.float32))
    paths["gemma_scope"] = str(folder / "params.npz")
    return paths


def run(tmp_path, name, spec: dict) -> dict:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    out = tmp_path / name
    assert main(["study", "--config", str(path), "--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text())


def measured(rows: list[dict]) -> list[dict]:
    """The rows less their coding speed (a timing, different on every run)."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def test_study_trains_loads_every_layout_and_compares_rows_it_holds(tmp_path, tiny_model_dir,
                                                                    loaded_saes):
    results = run(tmp_path, "study", study_file(tmp_path, tiny_model_dir, loaded_saes))
    assert set(results["dictionaries"]) == {"topk-4", *loaded_saes}
    rows = {(r["dictionary"], r["label"]): r for r in results["rows"]}
    # the same SAE in three layouts: the same numbers on the same windows
    for label in ("encoder", "nn-gp k=4", "gp k=2"):
        values = [rows[(layout, label)] for layout in LAYOUTS]
        for key in ("fvu", "l0", "delta_loss", "kl"):
            if key != "fvu" and label == "gp k=2":  # not spliced: no LM metrics
                assert all(v[key] is None for v in values if key != "l0")
                continue
            np.testing.assert_allclose([v[key] for v in values], values[0][key], rtol=1e-5)
    assert results["dictionaries"]["gemma_scope"]["architecture"] == "jumprelu"
    # every paired difference is the difference of its two rows, with a verdict that
    # follows from its interval
    for c in results["comparisons"]:
        a = rows[(c["dictionary"], f"{c['coder']} k={c['k']}")]
        b = rows[(c["dictionary"], c["against"])]
        assert c["value"] == pytest.approx(a[c["metric"]] - b[c["metric"]], rel=1e-9,
                                           abs=1e-12)
        assert c["low"] <= c["value"] <= c["high"]
        assert c["verdict"] == verdict(c["metric"], c["value"], c["low"] > 0 or c["high"] < 0)
    # only the matched L0 and nn-gp are spliced at every k (the default)
    spliced = {r["label"] for r in results["rows"] if r["dictionary"] == "topk-4"
               and r["delta_loss"] is not None}
    assert spliced == {"encoder", "encoder-refit", "encoder-scaled", "gp k=4", "nn-gp k=2",
                       "nn-gp k=4"}
    assert results["dictionaries"]["topk-4"]["training_l0"] == 4
    assert results["answers"]["a"] and results["answers"]["b"]
    assert any("first order" in line for line in results["answers"]["d"])
    assert all(r["attributed_delta_loss"] is not None and 0 <= r["error_top_share"] <= 1
               for r in results["rows"] if r["matched"])
    out = tmp_path / "study"
    page = (out / "report.html").read_text()
    assert "(a) Does non-negative gradient pursuit" in page and "<svg" in page
    for stem in ("study_delta_loss", "study_training_l0", "study_forest", "study_curves"):
        assert (out / f"{stem}.png").stat().st_size > 1000
    # the training curve: two snapshots and the finished dictionary, on the first 10 windows
    curve = results["curves"]["topk-4"]
    assert list(results["curves"]) == ["topk-4"] and curve["windows"] == 10
    assert [p["tokens"] for p in curve["points"]] == [1500, 3000, 6000]
    for point, folder in zip(curve["points"], [out / "curves" / "topk-4" / "1500",
                                               out / "curves" / "topk-4" / "3000",
                                               out / "evals" / "topk-4"], strict=True):
        with np.load(folder / "windows.npz") as w:  # delta loss by hand: sums of 10 windows
            loss, clean, positions = (w[f"encoder/{c}"][:10].sum() for c in
                                      ("loss", "clean", "positions"))
        assert point["delta_loss"] == pytest.approx((loss - clean) / positions, rel=1e-9)
        low, high = point["intervals"]["delta_loss"]
        assert low <= point["delta_loss"] <= high
    snapshot = json.loads((out / "curves" / "topk-4" / "3000" / "results.json").read_text())
    assert snapshot["rows"][0]["delta_loss"] == pytest.approx(curve["points"][1]["delta_loss"])
    assert curve["last_change"]["value"] == pytest.approx(
        curve["points"][2]["delta_loss"] - curve["points"][1]["delta_loss"], rel=1e-9)
    assert any(line.startswith("topk-4: the encoder's delta loss against training tokens")
               for line in results["answers"]["training"])


def test_a_killed_study_resumes_to_the_same_results(tmp_path, tiny_model_dir, loaded_saes):
    spec = study_file(tmp_path, tiny_model_dir, {"saelens": loaded_saes["saelens"]})
    whole = run(tmp_path, "whole", spec)
    path = tmp_path / "killed.json"
    path.write_text(json.dumps(spec))
    out = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-m", "saelab.cli", "study", "--config",
                              str(path), "--out", str(out)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ,
                                                             "OMP_NUM_THREADS": "1"})
    first = out / "evals" / "topk-4" / "results.json"  # killed once one dictionary is scored
    deadline = time.time() + 300
    while not first.is_file() and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert child.poll() is None, "the study ended before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (out / "results.json").is_file()
    assert main(["study", "--config", str(path), "--out", str(out), "--partial"]) == 0
    partial = json.loads((out / "partial" / "results.json").read_text())
    assert partial["partial"] == {"scored": ["topk-4"], "missing": ["saelens"]}
    assert measured(partial["rows"]) == [r for r in measured(whole["rows"])
                                         if r["dictionary"] == "topk-4"]
    curve_done = all((out / "curves" / "topk-4" / t / "windows.npz").is_file()
                     for t in ("1500", "3000"))  # the kill may come before its curve
    assert partial["curves"] == (whole["curves"] if curve_done else {})
    assert (out / "partial" / "report.html").is_file()
    resumed = run(tmp_path, "killed", spec)
    assert measured(resumed["rows"]) == measured(whole["rows"])
    assert resumed["comparisons"] == whole["comparisons"]


def test_spec_files_in_json_and_toml_are_the_same_spec(tmp_path):
    pytest.importorskip("tomllib")
    (tmp_path / "s.json").write_text(json.dumps({
        "n_latents": 1024, "ks": [8, 16], "dictionaries": [
            {"name": "a", "architecture": "relu", "target_l0": 16,
             "options": {"sparsity_coef": 2.0}},
            {"name": "b", "sae": "gemma-scope-2b-pt-res:layer_12/width_16k/average_l0_82"}]}))
    (tmp_path / "s.toml").write_text(
        'n_latents = 1024\nks = [8, 16]\n[[dictionaries]]\nname = "a"\narchitecture = "relu"\n'
        'target_l0 = 16\noptions = { sparsity_coef = 2.0 }\n[[dictionaries]]\nname = "b"\n'
        'sae = "gemma-scope-2b-pt-res:layer_12/width_16k/average_l0_82"\n')
    spec = read_spec(tmp_path / "s.json")
    assert spec == read_spec(tmp_path / "s.toml")
    assert spec.dictionaries[0] == DictionaryEntry(name="a", architecture="relu",
                                                   target_l0=16, options={"sparsity_coef": 2.0})
    assert spec.coders == PRESETS["embedded"].coders and spec.ks == (8, 16)


@pytest.mark.parametrize("content,message", [
    ({"n_latent": 3}, "has unknown settings"),
    ({"dictionaries": [{"name": "a", "architecture": "topk", "sae": "x"}]},
     "needs exactly one source"),
    ({"dictionaries": [{"name": "a", "sae": "x"}, {"name": "a", "sae": "y"}]},
     "distinct names"),
    ({"dictionaries": [{"architecture": "topk"}]}, "is malformed"),
    ({"coders": ["encoder", "nn-encoder"]}, "unknown coder 'nn-encoder'"),
])
def test_spec_file_errors_say_what_is_wrong(tmp_path, content, message):
    (tmp_path / "s.json").write_text(json.dumps(content))
    with pytest.raises(SaelabError, match=message):
        read_spec(tmp_path / "s.json")


def test_a_study_folder_holds_one_study(tmp_path, tiny_model_dir, loaded_saes, capsys):
    spec = study_file(tmp_path, tiny_model_dir, {})
    path = tmp_path / "s.json"
    path.write_text(json.dumps({**spec, "coders": ["encoder"], "ks": [2],
                                "dictionaries": [{"name": "x", "sae": loaded_saes["saelens"]}]}))
    assert main(["study", "--config", str(path), "--out", str(tmp_path / "o")]) == 0
    path.write_text(json.dumps({**spec, "coders": ["encoder"], "ks": [4],
                                "dictionaries": [{"name": "x", "sae": loaded_saes["saelens"]}]}))
    assert main(["study", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "ks" in capsys.readouterr().err


def test_the_embedded_preset_is_the_issue_grid():
    spec = PRESETS["embedded"]
    assert spec.n_latents == 4096 and spec.eval_tokens >= 20_000
    names = {d.name for d in spec.dictionaries}
    assert names == {f"{a}-{k}" for a in ("relu", "jumprelu", "topk", "batchtopk")
                     for k in (16, 32, 64)}
    assert StudySpec() == spec  # the defaults are the embedded preset


@pytest.mark.gguf
def test_the_quick_preset_runs_on_the_embedded_model(tmp_path):
    run = subprocess.run([sys.executable, "-m", "saelab", "study", "--preset", "quick",
                          "--out", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["dictionaries"]) == {"topk-8", "topk-16"}
    assert results["clean_loss"] < results["zero_ablation_loss"]
    spliced = [r for r in results["rows"] if r["delta_loss"] is not None]
    assert spliced and all(np.isfinite(r["delta_loss"]) for r in spliced)
    assert any(s.startswith("topk, nn-gp at test k=8") for s in results["answers"]["b"])
    assert "done in" in run.stdout and (tmp_path / "report.html").is_file()


def test_a_dictionary_above_max_matched_k_is_compared_at_the_ks_only(tmp_path, tiny_model_dir,
                                                                     loaded_saes):
    spec = {**study_file(tmp_path, tiny_model_dir, {}), "coders": ["encoder", "nn-gp"],
            "ks": [2], "max_matched_k": 3,
            "dictionaries": [{"name": "x", "sae": loaded_saes["saelens"]}]}
    results = run(tmp_path, "capped", spec)
    assert [r["label"] for r in results["rows"]] == ["encoder", "nn-gp k=2"]  # no k=4 row
    assert results["comparisons"] == []
    assert any("above max_matched_k 3" in line for line in results["answers"]["a"])


def _close(a, b, path="results"):
    """a equals b, floats to 1e-9 relative (sums added in another order), the rest exactly."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12, nan_ok=True), path
    else:
        assert a == b, path


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo, tested on Linux")
def test_torchrun_evaluation_equals_one_process(tmp_path, tiny_model_dir, loaded_saes):
    """Two ranks (gloo) score a study's windows, split 7 | 7 + 6 windows by batch: the same
    rows, intervals, paired differences and per-window sums as one process."""
    spec = {**study_file(tmp_path, tiny_model_dir, {}),
            "dictionaries": [{"name": n, "sae": loaded_saes[n]}
                             for n in ("saelens", "gemma_scope")]}
    one = run(tmp_path, "one", spec)
    path = tmp_path / "two.json"
    path.write_text(json.dumps(spec))
    torchrun = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", _free_port(), "-m", "saelab", "study", "--config", str(path),
         "--out", str(tmp_path / "two")], capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert one["rows"] and len(one["rows"]) == len(two["rows"])
    _close(measured(two["rows"]), measured(one["rows"]))
    _close(two["comparisons"], one["comparisons"])
    _close(two["dictionaries"], one["dictionaries"])
    for name in ("saelens", "gemma_scope"):
        with np.load(tmp_path / "one" / "evals" / name / "windows.npz") as a, \
                np.load(tmp_path / "two" / "evals" / name / "windows.npz") as b:
            assert sorted(a.files) == sorted(b.files)
            for key in a.files:
                np.testing.assert_allclose(b[key], a[key], rtol=1e-12, atol=0, err_msg=key)


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])
