"""Reading other libraries' tensor files without trusting them.

A pickled checkpoint is read with `torch.load(weights_only=True)` only: a file that needs
arbitrary code to load is refused, never run. `.npz` files are read with pickling off. Every
way a file can be broken (truncated, damaged, not the expected kind) is one `SaelabError`.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from saelab.errors import SaelabError


def read_torch(path: Path) -> dict[str, Tensor]:
    """The tensors of a pickled state dict (`ae.pt`), loaded with weights_only=True."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise SaelabError(f"{path} needs arbitrary code to load; saelab will not run it",
                          expected="a plain state dict of tensors (torch.load weights_only=True)",
                          found=_unpickling_reason(err),
                          fix="if you trust the file, load it yourself with "
                          "torch.load(weights_only=False) and torch.save its state_dict()"
                          ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise _broken(path, "a complete torch.save file", err) from err
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise SaelabError(f"{path} is not a state dict", expected="a dict of name -> tensor",
                          found=type(obj).__name__, fix="save the module's state_dict()")
    return obj


def _unpickling_reason(err: pickle.UnpicklingError) -> str:
    """torch's message names what the file needed ("Unsupported global: GLOBAL ...") on one
    line among advice; that line, else the first."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    named = [line for line in lines if "Unsupported global" in line or "GLOBAL" in line]
    return (named or lines or [type(err).__name__])[0][:300]


def read_npz(path: Path) -> dict[str, Tensor]:
    """The arrays of an `.npz` file (Gemma Scope's `params.npz`), as tensors; no pickles."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: torch.from_numpy(np.array(data[key])) for key in data.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise _broken(path, "a complete .npz file of numeric arrays", err) from err


def _broken(path: Path, expected: str, err: Exception) -> SaelabError:
    size = f"{path.stat().st_size} bytes" if path.is_file() else "no such file"
    return SaelabError(f"cannot read {path}", expected=expected,
                       found=f"{type(err).__name__}: {str(err)[:300]} ({size})",
                       fix="the file is truncated or damaged: download or write it again")
