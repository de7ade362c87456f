"""`saelab judge new | report | export` on a tiny real model: the frozen trials against the
codes computed again here, their blinding, the answers' database, and the report's
statistics against scipy and the krippendorff package on planted answers."""

from __future__ import annotations

import csv
import json
import sqlite3

import numpy as np
import pytest
import torch
from scipy import stats

import saelab as sl
from conftest import store_with_sae
from saelab.cli import main
from saelab.coding import Coder
from saelab.evals import activations_of
from saelab.formats import write_sae
from saelab.judge import DATABASE, StudyDB, judge_results

CODERS = ("encoder", "nn-gp")
BLIND = ("encoder", "gp", "nn-", "mp", "omp", "refit", "scaled", "pursuit", "coder")


@pytest.fixture(scope="module")
def study(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("judge")
    store, sae = store_with_sae(tiny_model_dir, root, tokens=3000, n_latents=96, seed=0)
    write_sae(sae, root / "sae")
    out = root / "study"
    assert main(["judge", "new", "--sae", str(root / "sae"), "--activations",
                 str(root / "acts"), "--out", str(out), "--coders", ",".join(CODERS),
                 "--latents", "12", "--pairs", "10", "--tokens", "2000", "--k", "6"]) == 0
    return {"out": out, "store": store, "sae": sl.load_sae(root / "sae")}


def trials(out):
    con = sqlite3.connect(out / DATABASE)
    rows = con.execute("SELECT t.id, t.task, t.payload, k.key FROM trials t "
                       "JOIN trial_keys k ON k.trial = t.id ORDER BY t.id").fetchall()
    con.close()
    return [(i, task, json.loads(p), json.loads(k)) for i, task, p, k in rows]


def codes(study):
    x = study["store"][:2000].float()
    return {"encoder": Coder(study["sae"], "encoder")(x),
            "nn-gp": Coder(study["sae"], "gp", k=6, nonnegative=True)(x)}


def test_the_study_holds_every_trial_once(study):
    held = trials(study["out"])
    tasks = [t for _, t, _, _ in held]
    assert tasks.count("rate") == 24 and tasks.count("intruder") == 24
    assert tasks.count("pair") == 10
    assert len({(k["coder"], k["latent"]) for _, t, _, k in held if t == "rate"}) == 24
    assert tasks != sorted(tasks)  # shuffled before the ids were given


def test_trials_show_what_the_codes_say(study):
    """Computed again here from the store: a card's top contexts are the latent's largest
    activations under that coder, shaded relative to the largest; an intruder's four are
    rows where it fires and the fifth one where it does not; a pair shows each coder's
    largest latents at its row, on the side its key says."""
    code = codes(study)
    n_latents = study["sae"].n_latents
    for _, task, payload, key in trials(study["out"]):
        if task == "rate":
            acts = activations_of(code[key["coder"]], torch.tensor([key["latent"]]),
                                  n_latents)[:, 0]
            expected = acts.abs().topk(len(key["top"])).values
            np.testing.assert_allclose(acts[key["top"]].abs(), expected, rtol=1e-5)
            first = next(t for t in payload["card"]["top"][0]["tokens"] if t["top"])
            assert first["shade"] == pytest.approx(float(acts[key["top"][0]]
                                                         / acts.abs().max()), abs=1e-3)
            assert payload["card"]["frequency"] == pytest.approx(
                float((acts != 0).double().mean()), abs=1e-6)
        elif task == "intruder":
            acts = activations_of(code[key["coder"]], torch.tensor([key["latent"]]),
                                  n_latents)[:, 0]
            fired = [bool(acts[r] != 0) for r in key["rows"]]
            assert fired.count(False) == 1 and not fired[key["intruder"]]
            assert all(t["shade"] is None for c in payload["contexts"] for t in c["tokens"])
        else:
            for side in ("left", "right"):
                c = code[key[side]]
                weights = {}
                for i, v in zip(c.indices[key["row"]].tolist(), c.values[key["row"]].tolist(),
                                strict=True):
                    if v:
                        weights[i] = weights.get(i, 0.0) + v
                top = sorted(weights, key=lambda i: -abs(weights[i]))[:8]
                assert key["latents"][key[side]] == top
                shown = [e["weight"] for e in payload[side]["latents"]]
                largest = abs(weights[top[0]])
                np.testing.assert_allclose(shown, [weights[i] / largest for i in top],
                                           atol=1e-3)
                assert payload[side]["more"] == len(weights) - len(top)


def test_no_payload_names_a_coder_or_a_latent(study):
    def walk(value, path=""):
        if isinstance(value, dict):
            for k, v in value.items():
                assert not any(word in k for word in BLIND), f"{path}.{k}"
                if k != "text":  # token text is the corpus's own
                    walk(v, f"{path}.{k}")
                assert k not in ("row", "window", "position", "latent", "id"), f"{path}.{k}"
        elif isinstance(value, list):
            for v in value:
                walk(v, path)
        elif isinstance(value, str):
            assert not any(word in value for word in BLIND), path
        else:  # no index (latent, row, window): the only whole number is a count
            assert not isinstance(value, int) or isinstance(value, bool) \
                or path.endswith(".more"), path

    for _, _, payload, _ in trials(study["out"]):
        walk(payload)


def test_raters_orders_answers_and_undo(study, tmp_path):
    db_path = tmp_path / DATABASE
    db_path.write_bytes((study["out"] / DATABASE).read_bytes())
    db = StudyDB(db_path)
    db.join("ada")
    db.join("bob")
    assert db.order("ada") == StudyDB(db_path).order("ada")  # the same on every visit
    assert db.order("ada") != db.order("bob")
    assert sorted(db.order("ada")) == list(range(1, 59))
    first = db.next_trial("ada")
    assert first == db.order("ada")[0]
    db.answer("ada", first, {"score": 2})
    with pytest.raises(sl.SaelabError, match="cannot take this answer"):
        db.answer("ada", first, {"score": 1})
    assert db.next_trial("ada") == db.order("ada")[1] and db.progress("ada") == (1, 58)
    assert db.undo("ada") == first and db.next_trial("ada") == first
    assert db.undo("ada") is None
    db.answer("ada", first, {"score": 0})
    live = db.unblinded()
    assert [a["answer"] for a in live] == [{"score": 0}]
    with pytest.raises(sl.SaelabError, match="cannot take this answer"):
        db.answer("carol", first, {"score": 1})  # not a registered rater
    db.close()


def plant(db_path, seed=0):
    """Two raters answer every trial, the second coder favoured: ratings, choices and
    intruder picks drawn at random with known rules."""
    rng = np.random.default_rng(seed)
    db = StudyDB(db_path)
    first, second = CODERS
    for rater in ("ada", "bob"):
        db.join(rater)
        for trial in db.order(rater):
            task = db.con.execute("SELECT task FROM trials WHERE id = ?", (trial,)).fetchone()[0]
            key = json.loads(db.con.execute("SELECT key FROM trial_keys WHERE trial = ?",
                                            (trial,)).fetchone()[0])
            if task == "rate":
                p = [0.2, 0.3, 0.5] if key["coder"] == second else [0.4, 0.3, 0.3]
                answer = {"score": int(rng.choice(3, p=p)), "explanation": "x"}
            elif task == "pair":
                pick = rng.choice(["second", "first", "same"], p=[0.5, 0.3, 0.2])
                side = {"second": "left" if key["left"] == second else "right",
                        "first": "left" if key["left"] == first else "right",
                        "same": "same"}[pick]
                answer = {"choice": side, "confidence": int(rng.integers(1, 4))}
            else:
                right = rng.random() < (0.7 if key["coder"] == second else 0.5)
                answer = {"choice": key["intruder"] if right else (key["intruder"] + 1) % 5}
            db.answer(rater, trial, answer, seconds=1.0)
    answers = db.unblinded()
    db.close()
    return answers


def test_report_statistics_against_references(study, tmp_path):
    krippendorff = pytest.importorskip("krippendorff")
    db_path = tmp_path / "s" / DATABASE
    db_path.parent.mkdir()
    db_path.write_bytes((study["out"] / DATABASE).read_bytes())
    answers = plant(db_path)
    results = judge_results(db_path.parent)
    first, second = CODERS
    # rate: per-latent means over the two raters, paired by latent
    by = {}
    for a in answers:
        if a["task"] == "rate":
            by.setdefault((a["key"]["coder"], a["key"]["latent"]), []).append(
                a["answer"]["score"])
    latents = sorted({lat for _, lat in by})
    d = np.array([np.mean(by[(second, i)]) - np.mean(by[(first, i)]) for i in latents])
    paired = results["rate"]["paired"]
    assert paired["mean"] == pytest.approx(d.mean())
    ref = stats.wilcoxon(d, zero_method="pratt", alternative="greater", method="asymptotic",
                         correction=False)
    assert paired["wilcoxon_pratt"]["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
    boot = stats.bootstrap((d,), np.mean, confidence_level=0.9, method="BCa",
                           n_resamples=10_000, random_state=0).confidence_interval
    se = d.std(ddof=1) / np.sqrt(len(d))
    assert abs(paired["interval"]["low"] - boot.low) < 0.1 * se
    assert abs(paired["interval"]["high"] - boot.high) < 0.1 * se
    # pair: shares of the coder preferred, ties apart, exact interval
    preferred = [a["key"][a["answer"]["choice"]] if a["answer"]["choice"] != "same" else None
                 for a in answers if a["task"] == "pair"]
    wins, losses = preferred.count(second), preferred.count(first)
    pair = results["pair"]
    assert (pair[f"prefer {second}"], pair[f"prefer {first}"], pair["no difference"]) == \
        (wins, losses, preferred.count(None))
    ci = stats.binomtest(wins, wins + losses).proportion_ci(0.95, method="exact")
    assert pair["share_preferring_second"]["low"] == pytest.approx(ci.low, abs=1e-9)
    # intruder: accuracy per coder, p against chance
    for coder in CODERS:
        mine = [a for a in answers if a["task"] == "intruder" and a["key"]["coder"] == coder]
        right = sum(a["answer"]["choice"] == a["key"]["intruder"] for a in mine)
        entry = results["intruder"]["coders"][coder]
        assert entry["correct"] == right and entry["answers"] == len(mine)
        assert entry["p_value_vs_chance"] == pytest.approx(
            stats.binomtest(right, len(mine), 0.2, alternative="greater").pvalue, rel=1e-9)
    # agreement on the ratings: both raters answered every trial
    trials_rated = sorted({a["trial"] for a in answers if a["task"] == "rate"})
    score = {(a["rater"], a["trial"]): a["answer"]["score"] for a in answers
             if a["task"] == "rate"}
    matrix = np.array([[score[(r, t)] for t in trials_rated] for r in ("ada", "bob")],
                      dtype=float)
    assert results["agreement"]["rate"]["alpha"] == pytest.approx(
        krippendorff.alpha(reliability_data=matrix, level_of_measurement="ordinal"),
        rel=1e-9)
    assert results["agreement"]["rate"]["trials"] == 24


def test_report_and_export_commands(study, tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / DATABASE).write_bytes((study["out"] / DATABASE).read_bytes())
    answers = plant(folder / DATABASE, seed=1)
    assert main(["judge", "report", str(folder), "--out", str(tmp_path / "r")]) == 0
    page = (tmp_path / "r" / "report.html").read_text()
    assert "Wilcoxon-Pratt" in page and "<svg" in page
    assert json.loads((tmp_path / "r" / "results.json").read_text())["answers"] == len(answers)
    assert main(["judge", "export", str(folder)]) == 0
    with open(folder / "answers.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(answers)
    assert {r["task"] for r in rows} == {"rate", "pair", "intruder"}
    pair = next(r for r in rows if r["task"] == "pair" and r["choice"] != "same")
    assert pair["preferred"] == (pair["left"] if pair["choice"] == "left" else pair["right"])


def test_judge_new_errors(study, tmp_path):
    with pytest.raises(sl.SaelabError, match="compares two coders"):
        sl.judge.JudgeNewConfig(sae="x", activations=tmp_path, out=tmp_path,
                                coders=("encoder",))
    with pytest.raises(sl.SaelabError, match="no judgement study"):
        StudyDB(tmp_path / DATABASE)
