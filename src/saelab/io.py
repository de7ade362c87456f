"""Files: atomic writes, strict reads, and the run file that ties a folder to one config.

A crash never leaves a half-written file that looks whole (`atomic_write`), and a file that
is truncated or damaged never surfaces as a traceback: the readers here turn it into one
`SaelabError` that names the file, what was expected, what was found and what to do.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from saelab.errors import SaelabError

SAELAB_VERSION = importlib.metadata.version("saelab")  # one definition: pyproject.toml

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write through `write(file)` into a temporary file beside `path`, then rename it there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    data = (json.dumps(obj, indent=2) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or one clear error if the file is missing or broken."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SaelabError(f"cannot read {path}", expected="a JSON object",
                          found=f"{type(err).__name__}: {err}",
                          fix="the file is damaged or truncated: write or download it again"
                          ) from err
    if not isinstance(obj, dict):
        raise SaelabError(f"cannot read {path}", expected="a JSON object",
                          found=f"a JSON {type(obj).__name__}",
                          fix="write or download it again")
    return obj


def read_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Every tensor of a safetensors file, or one clear error if it is truncated or damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        size = f"{path.stat().st_size} bytes" if path.is_file() else "no such file"
        raise SaelabError(f"cannot read {path}", expected="a complete safetensors file",
                          found=f"{type(err).__name__}: {err} ({size})",
                          fix="the file is truncated or damaged: write or download it again"
                          ) from err


def sha256_files(paths: list[Path]) -> str:
    """sha256 over the bytes of `paths`, one after another."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def to_json(config: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON types (paths as strings, tuples as lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}


def record_run(path: Path, config: dict[str, Any], *, what: str,
               inputs: dict[str, Any] | None = None,
               defaults: dict[str, Any] | None = None) -> bool:
    """Tie a run folder to one config: the run file `path` records `config` (and `inputs`,
    such as a model's sha256, which are compared only when given) the first time; later,
    the same config is a resumed run (True) and any other is refused, naming the settings
    that differ, so two runs never mix their files in one folder. A setting the record
    lacks (a run made before the setting existed) matches when it is at its `defaults`
    value. False: recorded now."""
    config = json.loads(json.dumps(config))  # as it reads back: tuples are lists
    known: dict[str, Any] = json.loads(json.dumps(defaults or {}))
    if not path.is_file():
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        write_json(path, {"config": config, "inputs": inputs or {}, "started": stamp,
                          "saelab_version": SAELAB_VERSION})
        return False
    recorded = read_json(path)
    old_config, old_inputs = recorded.get("config"), recorded.get("inputs")
    if not isinstance(old_config, dict) or not isinstance(old_inputs, dict):
        raise SaelabError(f"{path} is not a saelab run file",
                          expected="config and inputs recorded by saelab",
                          found=", ".join(sorted(recorded)) or "an empty object",
                          fix="use another output folder, or delete this one to start over")
    diff = {k: (old_config.get(k), v) for k, v in config.items() if old_config.get(k) != v
            and not (k not in old_config and k in known and known[k] == v)}
    diff |= {k: (old_inputs.get(k), v) for k, v in (inputs or {}).items()
             if old_inputs.get(k) != v}
    if diff:
        raise SaelabError(
            f"{path.parent} holds {what} made with other settings",
            expected="; ".join(f"{k}={new}" for k, (_, new) in diff.items()),
            found="; ".join(f"{k}={old}" for k, (old, _) in diff.items()),
            fix="use another output folder, or delete this one to start over")
    return True
