"""The `saelab` command: verbs, flags from configs, user errors without tracebacks."""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from saelab.cli import VERB_GROUPS, VERBS, build_parser
from saelab.config import add_config_arguments, config_from_args, field_docs


def saelab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "saelab", *args], capture_output=True, text=True)


def test_help_lists_every_verb():
    out = saelab("--help")
    assert out.returncode == 0
    for verb in VERBS:
        assert verb in out.stdout


EVERY_VERB = {**VERBS, **{f"{group} {name}": verb for group, (_, verbs) in VERB_GROUPS.items()
                          for name, verb in verbs.items()}}


@pytest.mark.parametrize("verb", list(EVERY_VERB))
def test_every_option_of_every_verb_is_explained(verb, capsys):
    """In-process: the same parser `saelab VERB --help` prints (one subprocess per verb cost
    minutes; test_help_lists_every_verb runs the real command)."""
    cls = EVERY_VERB[verb].config
    docs = field_docs(cls)
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*verb.split(), "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for name in cls.__dataclass_fields__:
        assert docs.get(name), f"{verb}: field {name} has no docstring"
        positional = name in getattr(cls, "POSITIONAL", ())
        assert (name.upper() if positional else "--" + name.replace("_", "-")) in text


@dataclass(frozen=True, kw_only=True)
class _Example:
    out: Path
    """Where."""
    n_latents: int | None = None
    """How many."""
    site: tuple[str, ...] = ("a",)
    """Which."""
    kind: Literal["x", "y"] = "x"
    """What kind."""
    flag: bool = False
    """On or off."""


def test_flags_round_trip_into_the_config():
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, _Example)
    parse = lambda *a: config_from_args(_Example, parser.parse_args(list(a)))  # noqa: E731
    assert parse("--out", "d") == _Example(out=Path("d"))
    cfg = parse("--out", "d", "--n-latents", "7", "--site", "p", "--site", "q", "--kind", "y",
                "--flag")
    assert cfg == _Example(out=Path("d"), n_latents=7, site=("p", "q"), kind="y", flag=True)
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "d", "--kind", "z"])
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --out is required


def test_cache_cli_writes_a_store_and_a_summary(tiny_model_dir, tmp_path):
    out = saelab("cache", "--model", str(tiny_model_dir), "--out", str(tmp_path), "--tokens",
                 "500", "--context-size", "16", "--site", "blocks.2.hook_mlp_out")
    assert out.returncode == 0, out.stderr
    assert "500 tokens x 64 (float32)" in out.stdout
    assert (tmp_path / "blocks.2.hook_mlp_out" / "manifest.json").is_file()


@pytest.mark.parametrize(("args", "message"), [
    (["cache", "--site", "blocks.9.hook_resid_post"], "unknown site 'blocks.9.hook_resid_post'"),
    (["cache", "--site", "blocks.1.hook_resid_pots"], "did you mean blocks.1.hook_resid_post"),
    (["cache", "--corpus", "no/such/file.txt", "--site", "blocks.1.hook_resid_post"],
     "unknown corpus"),
    (["cache", "--tokens", "0"], "tokens (--tokens) must be positive"),
])
def test_user_errors_are_one_message_and_exit_2(tiny_model_dir, tmp_path, args, message):
    out = saelab(*args, "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"))
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_model_is_a_user_error(tmp_path):
    out = saelab("sites", str(tmp_path / "nope"))
    assert out.returncode == 2 and "does not exist" in out.stderr
    assert "Traceback" not in out.stderr


def test_sites_lists_widths(tiny_model_dir):
    out = saelab("sites", str(tiny_model_dir), "--layer", "1")
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line.split()[1] for line in out.stdout.splitlines()[2:]}
    assert lines["blocks.1.hook_resid_post"] == "64"
    assert lines["blocks.1.mlp.hook_post"] == "96"
    assert all(name.startswith("blocks.1.") for name in lines)


def test_parser_builds_for_every_verb():
    parser = build_parser()
    for verb, cls in ((name, v.config) for name, v in VERBS.items()):
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        positional = getattr(cls, "POSITIONAL", ())
        args = [a for name in required for a in ("--" + name.replace("_", "-"), "x")
                if not (name in positional and a.startswith("--"))]
        assert parser.parse_args([verb, *args]).verb == verb
        with pytest.raises(SystemExit) if required else contextlib.nullcontext():
            parser.parse_args([verb])
