"""Experiment grids: dictionaries x coders x k on the same held-out tokens, resumable, with
bootstrap intervals and paired differences; the ITO claim's parts answered in words."""

from saelab.study.analysis import answers, gather, verdict
from saelab.study.runner import run_study, train_config
from saelab.study.spec import PRESETS, DictionaryEntry, StudySpec, grid, read_spec

__all__ = ["PRESETS", "DictionaryEntry", "StudySpec", "answers", "gather", "grid", "read_spec",
           "run_study", "train_config", "verdict"]
