"""The `saelab` command: one subcommand per verb, flags generated from the verb's config."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import saelab
from saelab.activations import ActivationStore, CacheConfig, cache_activations
from saelab.config import add_config_arguments, config_from_args
from saelab.errors import SaelabError
from saelab.lm import EMBEDDED_MODEL, load_model
from saelab.reports import answer
from saelab.verbs.compare import CompareConfig, EvaluateConfig, run_compare
from saelab.verbs.convert import ConvertConfig, run_convert
from saelab.verbs.dashboard import DashboardConfig, run_dashboard
from saelab.verbs.decompose import DecomposeConfig, run_decompose
from saelab.verbs.demo import DemoConfig, run_demo
from saelab.verbs.info import InfoConfig, run_info
from saelab.verbs.synth import SynthConfig, run_synth, synth_summary
from saelab.verbs.toy import (
    DropoutConfig,
    PhaseDiagramConfig,
    TmsConfig,
    dropout_summary,
    phase_summary,
    run_dropout,
    run_phase_diagram,
    run_tms,
    tms_summary,
)
from saelab.verbs.train import TrainCommand, run_train
from saelab.verbs.width_sweep import WidthSweepConfig, run_width_sweep, width_sweep_summary

log = logging.getLogger("saelab")


@dataclass(frozen=True, kw_only=True)
class SitesConfig:
    model: str = EMBEDDED_MODEL
    """Model: gemma-3-270m, a .gguf file, a local Hugging Face folder, or a hub id."""
    layer: int | None = None
    """Only list the sites of this layer."""


def run_cache(cfg: CacheConfig) -> None:
    start = time.perf_counter()
    stores = cache_activations(cfg)
    seconds = time.perf_counter() - start
    for store in stores.values():
        _print_store(store)
    _say(f"done in {seconds:.1f} s")


def run_sites(cfg: SitesConfig) -> None:
    lm = load_model(cfg.model)
    sites = [s for s in lm.sites() if cfg.layer is None or s.layer == cfg.layer]
    _say(f"{cfg.model} ({lm.hf_model.config.model_type}): {len(sites)} sites")
    width = max(len(s.name) for s in sites)
    _say(f"{'site':<{width}}  {'width':>6}  hugging face module")
    for s in sites:
        _say(f"{s.name:<{width}}  {s.width:>6}  {s.module_path} ({s.side}put)")


def run_compare_verb(cfg: CompareConfig | EvaluateConfig) -> None:
    start = time.perf_counter()
    results = run_compare(cfg)
    _say(f"{'coder':<20} {'L0':>7} {'FVU':>8} {'delta loss':>11} {'recovered':>10}")
    for r in results["rows"]:
        _say(f"{r['label']:<20} {r['l0']:>7.2f} {r['fvu']:>8.4f} {r['delta_loss']:>11.4f} "
             f"{r['loss_recovered']:>10.3f}")
    for sentence in answer(results):
        _say(sentence)
    _say(f"done in {time.perf_counter() - start:.0f} s; report: {cfg.out / 'report.html'}")


def run_decompose_verb(cfg: DecomposeConfig) -> None:
    s = run_decompose(cfg)
    _say(f"{cfg.method}: {s['tokens']} tokens, FVU {s['fvu']:.4f}, L0 {s['l0']:.2f}, "
         f"{s['tokens_per_s']:.0f} tokens/s -> {cfg.out}")


def run_dashboard_verb(cfg: DashboardConfig) -> None:
    result = run_dashboard(cfg)
    shown = ", ".join(str(entry["latent"]) for entry in result["latents"])
    _say(f"{len(result['latents'])} latents ({shown}) coded by {cfg.method} on "
         f"{result['tokens']} tokens; {result['firing_latents']} of {result['n_latents']} "
         f"fire -> {cfg.out / 'dashboard.html'}")


def run_train_verb(cmd: TrainCommand) -> None:
    start = time.perf_counter()
    sae = run_train(cmd)
    metrics = (cmd.out / "metrics.jsonl").read_text().splitlines()
    last = json.loads(metrics[-1]) if metrics else {}
    _say(f"{cmd.architecture} SAE, {sae.n_latents} latents on {sae.site}: FVU "
         f"{last.get('fvu', float('nan')):.4f}, L0 {last.get('l0', float('nan')):.1f}, dead "
         f"{last.get('dead_fraction', float('nan')):.1%} after {cmd.steps} steps "
         f"({time.perf_counter() - start:.0f} s) -> {cmd.out}")


def _print_store(store: ActivationStore) -> None:
    norm = store.normalisation
    size = sum((store.path / s["file"]).stat().st_size for s in store.manifest["shards"])
    _say(f"{store.path}: {store.n_tokens} tokens x {store.d_model} ({store.manifest['dtype']}) "
         f"from {store.model} at {store.site}")
    _say(f"  {len(store.manifest['shards'])} shard(s), {size / 2**20:.1f} MiB; "
         f"{store.manifest['n_windows']} windows of {store.context_size} tokens, "
         f"BOS {'excluded' if store.manifest['exclude_bos'] else 'included'}")
    _say(f"  mean squared norm {norm['mean_squared_norm']:.4g}, norm scale "
         f"{norm['norm_scale']:.4g}, centred variance {norm['mean_centered_squared_norm']:.4g}")
    ctx = store.context(len(store) // 2)
    _say(f"  row {len(store) // 2} is token {ctx.position} of window {ctx.window}")


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")


def _printed(run: Callable[[Any], Any], summary: Callable[[Any], list[str]]
             ) -> Callable[[Any], None]:
    """A verb that runs, then prints the summary lines of what it returned."""
    def verb(cfg: Any) -> None:
        for line in summary(run(cfg)):
            _say(line)

    return verb


VERBS: dict[str, tuple[type, Callable, str]] = {
    "cache": (CacheConfig, run_cache, "Read activations at sites of a model over a corpus and "
              "store them on disk (resumable)."),
    "sites": (SitesConfig, run_sites, "List a model's sites with their widths."),
    "train": (TrainCommand, run_train_verb, "Train an SAE (relu, topk, batchtopk, jumprelu) on "
              "an activation store; resumable; data-parallel under torchrun."),
    "decompose": (DecomposeConfig, run_decompose_verb, "Code stored activations with an SAE's "
                  "dictionary (encoder or inference-time optimisation); print FVU and L0."),
    "info": (InfoConfig, run_info, "Show what an SAE is (any layout, local or on the hub): "
             "architecture, width, site, k or thresholds, file sizes."),
    "convert": (ConvertConfig, run_convert, "Rewrite an SAE in another library's layout "
                "(saelens, sparsify, dictionary_learning) and check the result."),
    "evaluate": (EvaluateConfig, run_compare_verb, "Score one coder on an SAE: FVU, L0, delta "
                 "LM loss with reconstructions spliced in, dead and dense latents."),
    "compare": (CompareConfig, run_compare_verb, "Every coder at every L0 on the same tokens: "
                "results.json, Pareto plots and a self-contained report.html."),
    "dashboard": (DashboardConfig, run_dashboard_verb, "Show what a sample of an SAE's latents "
                  "respond to under any coder: firing rates, top contexts, logit effects "
                  "(dashboard.html, latents.json)."),
    "synth": (SynthConfig, _printed(run_synth, synth_summary), "Write an activation store of "
              "synthetic activations built from known feature directions, with the truth."),
    "demo": (DemoConfig, run_demo, "The embedded default end to end: cache Gemma 3 270M "
             "activations, train a TopK SAE, compare the encoder with ITO; print the report."),
}


# Verbs with sub-verbs: `saelab toy tms ...`; same shape as VERBS, under a group's help.
VERB_GROUPS: dict[str, tuple[str, dict[str, tuple[type, Callable, str]]]] = {
    "toy": ("Toy models of superposition (Elhage et al. 2022) and SAEs on synthetic data.", {
        "tms": (TmsConfig, _printed(run_tms, tms_summary), "Train ReLU output toy models over "
                "sparsity (and dropout); measure and plot the features they represent."),
        "dropout": (DropoutConfig, _printed(run_dropout, dropout_summary), "Sweep hidden dropout "
                    "and sparsity; plot and fit features represented per hidden dimension."),
        "phase-diagram": (PhaseDiagramConfig, _printed(run_phase_diagram, phase_summary),
                          "The n=2, m=1 phase diagram over feature density and importance."),
        "width-sweep": (WidthSweepConfig, _printed(run_width_sweep, width_sweep_summary),
                        "Train SAEs of growing width on a `saelab synth` store; plot how "
                        "many true features they recover."),
    }),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saelab", description="Sparse dictionaries for language-model activations.")
    parser.add_argument("--version", action="version", version=f"saelab {saelab.__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (cls, _, help_text) in VERBS.items():
        verb = sub.add_parser(name, help=help_text, description=help_text)
        if name == "sites":  # `saelab sites MODEL` reads better than `--model MODEL`
            verb.add_argument("model_arg", nargs="?", metavar="MODEL",
                              help=f"the model (default: {EMBEDDED_MODEL})")
        add_config_arguments(verb, cls)
    for name, (help_text, verbs) in VERB_GROUPS.items():
        group = sub.add_parser(name, help=help_text, description=help_text)
        inner = group.add_subparsers(dest="subverb", required=True, metavar="SUBVERB")
        for sub_name, (cls, _, sub_help) in verbs.items():
            add_config_arguments(inner.add_parser(sub_name, help=sub_help, description=sub_help),
                                 cls)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    cls, run, _ = VERBS[args.verb] if args.verb in VERBS \
        else VERB_GROUPS[args.verb][1][args.subverb]
    try:
        extra = {"model": args.model_arg} if getattr(args, "model_arg", None) else {}
        run(config_from_args(cls, args, **extra))
    except SaelabError as err:
        sys.stderr.write(f"saelab {args.verb}: error: {err}\n")
        return 2
    _leave_process_group()  # not after an error: NCCL could wait on ranks still in a collective
    return 0


def _leave_process_group() -> None:
    """Under torchrun, tear the process group down before the interpreter exits: left to exit,
    gloo's threads can abort a rank ("terminate called without an active exception")."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
