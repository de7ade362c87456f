"""Run a study in stages, each resumable: cache the training activations, train every
dictionary the grid trains, score every dictionary's coders on the same held-out tokens, and
gather the rows with their intervals and paired differences.

The folder:

    study.json                 the resolved spec (a folder holds one study)
    activations/SITE/          the training store (only if the study trains)
    dictionaries/NAME/         each trained dictionary's run folder (`saelab train`'s),
                               with snapshots/TOKENS at the curve's training tokens
    evals/NAME/                each dictionary's comparison (`saelab compare`'s files)
    curves/NAME/TOKENS/        each snapshot's encoder on the curve's windows
    results.json, *.png/svg, report.html
    partial/                   `--partial`: the same, of the dictionaries scored so far

A killed study is run again with the same command: the store and each training run resume
from their checkpoints, a finished comparison is read back, and only what is missing is done.
Under torchrun every stage is data-parallel: the cache's shards, each training run's batches
and each comparison's windows are split over the ranks, and rank 0 writes what they share.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saelab.activations import ActivationStore, cache_activations
from saelab.distributed import join_world
from saelab.errors import SaelabError
from saelab.evals import (
    BatchPasses,
    CoderSpec,
    corpus_windows,
    plan,
    read_comparison,
    score_dictionary,
)
from saelab.formats import load_sae
from saelab.io import read_json, record_run, to_json, write_json
from saelab.lm import LanguageModel, load_model
from saelab.reports import read_metrics, write_study_plots, write_study_report
from saelab.study.analysis import answers, gather
from saelab.study.spec import DictionaryEntry, StudySpec
from saelab.training import SNAPSHOTS, TrainConfig, train

log = logging.getLogger(__name__)
RESULTS = "results.json"
PARTIAL = "partial"  # out/partial/: what `--partial` gathers of a study still running
CURVES = "curves"  # curves/NAME/TOKENS: a snapshot's encoder, for the training curve
PRINCIPAL_DIRECTIONS = 8  # part (d): the error's share in the activations' top 8 directions


def run_study(spec: StudySpec, out: Path, *, say: Callable[[str], None] = log.info,
              partial: bool = False) -> dict[str, Any]:
    """Run (or resume) the study `spec` in `out`; return its results. With `partial`,
    train and score nothing: gather the dictionaries scored so far into `out/partial/`."""
    record_run(out / "study.json", to_json(spec), what="a study")
    if partial:
        return _gather_finished(spec, out, say)
    seconds: dict[str, float] = {}
    began = time.perf_counter()
    world = join_world(spec.device)  # under torchrun every stage runs on every rank
    device = world.device(spec.device)
    lm = load_model(spec.model, device=device)
    skip = 0
    if spec.trains:
        say(f"cache {spec.cache_tokens} tokens of {spec.site}")
        store = cache_activations(out / "activations", model=spec.model, sites=(spec.site,),
                                  corpus=spec.corpus, text_column=spec.text_column,
                                  tokens=spec.cache_tokens, context_size=spec.context_size,
                                  device=device, lm=lm)[spec.site]
        skip = store.manifest["n_windows"] * (spec.context_size - 1)
        seconds["cache"] = time.perf_counter() - began
        for i, entry in enumerate(d for d in spec.dictionaries if d.trained):
            say(f"train {entry.name} ({i + 1} of {sum(d.trained for d in spec.dictionaries)})")
            t = time.perf_counter()
            train(train_config(spec, entry), store, out / "dictionaries" / entry.name)
            seconds[f"train {entry.name}"] = time.perf_counter() - t
    fit_windows, windows = corpus_windows(lm, spec.corpus, text_column=spec.text_column,
                                          context_size=spec.context_size, skip_tokens=skip,
                                          fit_tokens=spec.fit_tokens, tokens=spec.eval_tokens)
    evaluations: dict[str, dict[str, Any]] = {}
    passes: dict[int, BatchPasses] = {}  # the clean, zero and gradient passes, paid once
    for i, entry in enumerate(spec.dictionaries):
        say(f"score {entry.name} ({i + 1} of {len(spec.dictionaries)})")
        t = time.perf_counter()
        evaluations[entry.name] = _evaluate(spec, entry, lm, fit_windows, windows, out, passes,
                                            device)
        if entry.trained:
            _score_snapshots(spec, entry, lm, fit_windows, windows, out, passes, device)
        seconds[f"score {entry.name}"] = time.perf_counter() - t
    results = _results(spec, evaluations, out, scored_curves_only=False)
    results["seconds"] = {**seconds, "total": time.perf_counter() - began}
    if world.is_main:
        _write(results, out)
    world.barrier()
    return results


def train_config(spec: StudySpec, entry: DictionaryEntry) -> TrainConfig:
    """The TrainConfig of one trained entry: the study's sizes, the entry's settings, and a
    snapshot at each of the study's curve tokens that falls before the run's end."""
    assert entry.architecture is not None
    settings: dict[str, Any] = {"architecture": entry.architecture,
                                "n_latents": spec.n_latents, "tokens": spec.train_tokens,
                                "batch_size": spec.batch_size, "target_l0": entry.target_l0,
                                "seed": spec.seed, "device": spec.device}
    config = TrainConfig(**{**settings, **entry.options})
    end = config.steps * config.batch_size
    return dataclasses.replace(config, snapshot_tokens=tuple(
        t for t in spec.curve_tokens if t < end))


def _gather_finished(spec: StudySpec, out: Path, say: Callable[[str], None]
                     ) -> dict[str, Any]:
    """The study so far: the dictionaries whose comparison is finished, gathered into
    out/partial/ as the whole study would be; nothing is trained or scored."""
    lm = load_model(spec.model)  # for its tokenizer: the same windows as the study's
    skip = 0
    if spec.trains:
        store = ActivationStore(out / "activations" / spec.site)
        skip = store.manifest["n_windows"] * (spec.context_size - 1)
    fit_windows, windows = corpus_windows(lm, spec.corpus, text_column=spec.text_column,
                                          context_size=spec.context_size, skip_tokens=skip,
                                          fit_tokens=spec.fit_tokens, tokens=spec.eval_tokens)
    evaluations, missing = {}, []
    for entry in spec.dictionaries:
        folder = out / "evals" / entry.name
        done = read_comparison(folder, _comparison_config(spec, entry, out, fit_windows,
                                                          windows)) \
            if (folder / "config.json").is_file() else None
        if done is None:
            missing.append(entry.name)
        else:
            evaluations[entry.name] = done
    if not evaluations:
        raise SaelabError(f"no dictionary of the study in {out} is scored yet",
                          expected="at least one finished comparison in evals/",
                          found="none", fix="let the study run on, then look again")
    results = _results(spec, evaluations, out, scored_curves_only=True)
    results["partial"] = {"scored": list(evaluations), "missing": missing}
    results["seconds"] = {}
    say(f"{len(evaluations)} of {len(spec.dictionaries)} dictionaries scored; "
        f"gathered into {out / PARTIAL}")
    _write(results, out / PARTIAL)
    return results


def _results(spec: StudySpec, evaluations: dict[str, dict[str, Any]], out: Path, *,
             scored_curves_only: bool) -> dict[str, Any]:
    """The gathered rows and answers of the dictionaries in `evaluations`, with the training
    curves of the trained ones (only those whose every point is scored, if asked)."""
    entries = tuple(e for e in spec.dictionaries if e.name in evaluations)
    curves = {}
    for entry in (e for e in entries if e.trained):
        folders = _curve_folders(spec, entry, out)
        if folders and not (scored_curves_only and not all(
                (f / "windows.npz").is_file() for f in folders.values())):
            curves[entry.name] = folders
    results = gather(dataclasses.replace(spec, dictionaries=entries), evaluations,
                     {e.name: out / "evals" / e.name for e in entries},
                     {e.name: _training_outcome(out, e) for e in entries}, curves)
    results["answers"] = answers(results)
    return results


def _write(results: dict[str, Any], folder: Path) -> None:
    write_json(folder / RESULTS, results)
    write_study_plots(results, folder)
    write_study_report(results, folder)


def _comparison_config(spec: StudySpec, entry: DictionaryEntry, out: Path,
                       fit_windows: np.ndarray, windows: np.ndarray) -> dict[str, Any]:
    """What ties a dictionary's comparison folder to the study: a finished one with this
    config is read back."""
    return {"sae": _source(out, entry), "coders": list(spec.coders), "ks": list(spec.ks),
            "spliced_at_every_k": list(spec.spliced_at_every_k),
            "windows": int(len(windows)), "fit_windows": int(len(fit_windows)),
            "first_window": windows[0].tolist(), "batch_tokens": spec.batch_tokens}


def _source(out: Path, entry: DictionaryEntry) -> str:
    return str(out / "dictionaries" / entry.name) if entry.trained else str(entry.sae)


def _evaluate(spec: StudySpec, entry: DictionaryEntry, lm: LanguageModel,
              fit_windows: np.ndarray, windows: np.ndarray, out: Path,
              passes: dict[int, BatchPasses], device: str) -> dict[str, Any]:
    folder = out / "evals" / entry.name
    source = _source(out, entry)
    done = read_comparison(folder, _comparison_config(spec, entry, out, fit_windows, windows))
    if done is not None:
        return done
    torch.manual_seed(spec.seed)
    sae = load_sae(source, device=device)
    coders, ks, every_k, cap = spec.coders, spec.ks, spec.spliced_at_every_k, spec.max_matched_k

    def specs(matched_k: int) -> tuple[list[CoderSpec], int]:
        return plan(coders, ks, matched_k if matched_k <= cap else None), matched_k

    def spliced(row: CoderSpec, matched_k: int) -> bool:
        return "all" in every_k or row.k in (None, matched_k) or row.name in every_k

    return score_dictionary(lm, sae, spec.site, fit_windows, windows, specs, folder,
                            about={"model": spec.model, "sae": source, "dictionary": entry.name},
                            batch_tokens=spec.batch_tokens, spliced=spliced, attribution=True,
                            principal_directions=PRINCIPAL_DIRECTIONS, passes=passes)


def curve_windows(spec: StudySpec, windows: np.ndarray) -> np.ndarray:
    """The evaluated windows a training curve is scored on: the first curve_eval_tokens."""
    return windows[: -(-spec.curve_eval_tokens // (windows.shape[1] - 1))]


def _curve_folders(spec: StudySpec, entry: DictionaryEntry, out: Path) -> dict[int, Path]:
    """Training tokens -> the comparison folder of the encoder at that point of training
    (the last: the finished dictionary's own comparison, where it has an encoder row)."""
    config = train_config(spec, entry)
    points = {t: out / CURVES / entry.name / str(t) for t in config.snapshot_tokens}
    if "encoder" in spec.coders:
        points[config.steps * config.batch_size] = out / "evals" / entry.name
    return points


def _score_snapshots(spec: StudySpec, entry: DictionaryEntry, lm: LanguageModel,
                     fit_windows: np.ndarray, windows: np.ndarray, out: Path,
                     passes: dict[int, BatchPasses], device: str) -> None:
    """Each snapshot's encoder, spliced in, on the curve's windows (a comparison folder each,
    read back once finished)."""
    curve = curve_windows(spec, windows)
    snapshots = out / "dictionaries" / entry.name / SNAPSHOTS
    for tokens in train_config(spec, entry).snapshot_tokens:
        folder = out / CURVES / entry.name / str(tokens)
        source = snapshots / str(tokens)
        config = {"sae": str(source), "coders": ["encoder"], "windows": int(len(curve)),
                  "fit_windows": int(len(fit_windows)), "first_window": curve[0].tolist(),
                  "batch_tokens": spec.batch_tokens}
        if read_comparison(folder, config) is not None:
            continue
        sae = load_sae(source, device=device)
        score_dictionary(lm, sae, spec.site, fit_windows, curve,
                         lambda k: ([CoderSpec("encoder")], k), folder,
                         about={"model": spec.model, "sae": str(source),
                                "dictionary": entry.name, "training_tokens": tokens},
                         batch_tokens=spec.batch_tokens, passes=passes)


def _training_outcome(out: Path, entry: DictionaryEntry) -> dict[str, Any]:
    """What a trained entry's run recorded: its config's outcome (the coefficient reached)
    and its final training metrics; {} for a loaded dictionary."""
    if not entry.trained:
        return {}
    folder = out / "dictionaries" / entry.name
    outcome = read_json(folder / "config.json").get("outcome", {})
    metrics = read_metrics(folder / "metrics.jsonl")
    return {**outcome, "final": metrics[-1] if metrics else {}}
