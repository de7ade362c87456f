"""The `saelab` command: dispatch only. Each verb lives in `saelab.verbs` as a `Verb` (its
config, what it runs, what it prints); flags are generated from the verb's config."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from saelab.config import Verb, add_config_arguments, config_from_args, say
from saelab.errors import SaelabError
from saelab.io import SAELAB_VERSION
from saelab.verbs import (
    cache,
    compare,
    convert,
    dashboard,
    decompose,
    demo,
    info,
    judge,
    sites,
    study,
    synth,
    toy,
    train,
    width_sweep,
)

VERBS: dict[str, Verb] = {
    "cache": cache.VERB, "sites": sites.VERB, "train": train.VERB,
    "decompose": decompose.VERB, "info": info.VERB, "convert": convert.VERB,
    "evaluate": compare.EVALUATE, "compare": compare.COMPARE, "dashboard": dashboard.VERB,
    "synth": synth.VERB, "study": study.VERB, "demo": demo.VERB,
}

# Verbs with sub-verbs: `saelab toy tms ...`: (the group's help, its verbs).
VERB_GROUPS: dict[str, tuple[str, dict[str, Verb]]] = {
    "toy": ("Toy models of superposition (Elhage et al. 2022) and SAEs on synthetic data.", {
        "tms": toy.TMS, "dropout": toy.DROPOUT, "phase-diagram": toy.PHASE_DIAGRAM,
        "width-sweep": width_sweep.VERB}),
    "judge": ("Blind judgement studies: encoder against ITO decompositions, judged by people.", {
        "new": judge.NEW, "serve": judge.SERVE, "report": judge.REPORT,
        "export": judge.EXPORT}),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saelab", description="Sparse dictionaries for language-model activations.")
    parser.add_argument("--version", action="version", version=f"saelab {SAELAB_VERSION}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, verb in VERBS.items():
        add_config_arguments(sub.add_parser(name, help=verb.help, description=verb.help),
                             verb.config)
    for name, (help_text, verbs) in VERB_GROUPS.items():
        group = sub.add_parser(name, help=help_text, description=help_text)
        inner = group.add_subparsers(dest="subverb", required=True, metavar="SUBVERB")
        for sub_name, verb in verbs.items():
            add_config_arguments(inner.add_parser(sub_name, help=verb.help,
                                                  description=verb.help), verb.config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    grouped = args.verb not in VERBS
    verb = VERB_GROUPS[args.verb][1][args.subverb] if grouped else VERBS[args.verb]
    name = f"{args.verb} {args.subverb}" if grouped else args.verb
    try:
        for line in verb.summary(verb.run(config_from_args(verb.config, args))):
            say(line)
    except SaelabError as err:
        sys.stderr.write(f"saelab {name}: error: {err}\n")
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
