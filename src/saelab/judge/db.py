"""A judgement study's SQLite database: the frozen trials, the key that unblinds them, the
raters and every answer.

What a rater sees (`trials.payload`) is computed once, when the study is made, so it is the
same for everyone and every visit. The key (`trial_keys`: which coder, latent and row a trial
shows, where the intruder is) lives in its own table, which nothing served reads. Each
answer is its own committed transaction in WAL mode with synchronous=FULL, so a process
killed at any moment keeps every answer it had acknowledged; an undone answer stays in the
table, marked, so the record of what was clicked is complete.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saelab.errors import SaelabError

DATABASE = "study.db"
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE trials (id INTEGER PRIMARY KEY, task TEXT NOT NULL, payload TEXT NOT NULL);
CREATE TABLE trial_keys (trial INTEGER PRIMARY KEY REFERENCES trials(id), key TEXT NOT NULL);
CREATE TABLE raters (name TEXT PRIMARY KEY, joined TEXT NOT NULL);
CREATE TABLE answers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rater TEXT NOT NULL REFERENCES raters(name),
    trial INTEGER NOT NULL REFERENCES trials(id),
    answer TEXT NOT NULL,
    given TEXT NOT NULL,
    seconds REAL,
    undone INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX one_live_answer ON answers(rater, trial) WHERE undone = 0;
"""


@dataclass(frozen=True)
class Trial:
    """One frozen trial: what is shown (`payload`), and, kept apart, what it hides (`key`)."""

    task: str
    payload: dict[str, Any]
    key: dict[str, Any]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def create_study_db(path: Path, meta: dict[str, Any], trials: Sequence[Trial]) -> None:
    """Write a new database at `path` holding `trials` in the given order (their ids are
    1, 2, ...: shuffle them first so that an id says nothing). Written beside `path` and
    renamed into place, so a killed `judge new` leaves no half study."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    con = sqlite3.connect(tmp)
    try:
        con.executescript(SCHEMA)
        con.executemany("INSERT INTO meta VALUES (?, ?)",
                        [(k, json.dumps(v)) for k, v in meta.items()])
        con.executemany("INSERT INTO trials VALUES (?, ?, ?)",
                        [(i + 1, t.task, json.dumps(t.payload)) for i, t in enumerate(trials)])
        con.executemany("INSERT INTO trial_keys VALUES (?, ?)",
                        [(i + 1, json.dumps(t.key)) for i, t in enumerate(trials)])
        con.commit()
    finally:
        con.close()
    os.replace(tmp, path)


class StudyDB:
    """One connection to a study's database (one per thread or request)."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise SaelabError(f"no judgement study at {path.parent}",
                              expected=f"{DATABASE} written by `saelab judge new`",
                              found="nothing there", fix="check the path, or make the study "
                              "with saelab judge new")
        self.path = path
        self.con = sqlite3.connect(path, timeout=30, isolation_level=None,
                                   check_same_thread=False)
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute("PRAGMA synchronous=FULL")
        self.con.execute("PRAGMA foreign_keys=ON")

    def close(self) -> None:
        self.con.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self.con.execute("BEGIN IMMEDIATE")
        try:
            yield self.con
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise

    def meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.con.execute("SELECT key, value FROM meta")}

    def tasks(self) -> set[str]:
        return {r[0] for r in self.con.execute("SELECT DISTINCT task FROM trials")}

    def trial(self, trial: int) -> tuple[str, dict[str, Any]]:
        """(task, payload) of one trial: what a rater is shown."""
        row = self.con.execute("SELECT task, payload FROM trials WHERE id = ?",
                               (trial,)).fetchone()
        if row is None:
            raise KeyError(trial)
        return row[0], json.loads(row[1])

    def join(self, rater: str) -> None:
        """Register `rater` (a second visit changes nothing)."""
        self.con.execute("INSERT OR IGNORE INTO raters VALUES (?, ?)", (rater, _now()))

    def order(self, rater: str) -> list[int]:
        """The rater's order of every trial: shuffled by the study's seed and the rater's
        name, so it is the same on every visit and differs between raters."""
        seed = self.meta().get("seed", 0)
        ids = [r[0] for r in self.con.execute("SELECT id FROM trials ORDER BY id")]
        return sorted(ids, key=lambda i: hashlib.sha256(
            f"{seed}\0{rater}\0{i}".encode()).digest())

    def answered(self, rater: str) -> set[int]:
        return {r[0] for r in self.con.execute(
            "SELECT trial FROM answers WHERE rater = ? AND undone = 0", (rater,))}

    def next_trial(self, rater: str) -> int | None:
        """The first trial in the rater's order they have not answered (None: all done)."""
        done = self.answered(rater)
        return next((i for i in self.order(rater) if i not in done), None)

    def answer(self, rater: str, trial: int, answer: dict[str, Any],
               seconds: float | None = None) -> None:
        """Record (and commit) `rater`'s answer to `trial`; a trial answered already is
        refused (undo it first)."""
        with self._transaction() as con:
            try:
                con.execute("INSERT INTO answers (rater, trial, answer, given, seconds) "
                            "VALUES (?, ?, ?, ?, ?)",
                            (rater, trial, json.dumps(answer), _now(), seconds))
            except sqlite3.IntegrityError as err:
                raise SaelabError(f"trial {trial} cannot take this answer",
                                  expected="a registered rater and a trial they have not "
                                  "answered", found=str(err),
                                  fix="undo the earlier answer first") from err

    def undo(self, rater: str) -> int | None:
        """Mark `rater`'s latest live answer undone; return its trial (None: nothing to
        undo)."""
        with self._transaction() as con:
            row = con.execute("SELECT id, trial FROM answers WHERE rater = ? AND undone = 0 "
                              "ORDER BY id DESC LIMIT 1", (rater,)).fetchone()
            if row is None:
                return None
            con.execute("UPDATE answers SET undone = 1 WHERE id = ?", (row[0],))
            return int(row[1])

    def progress(self, rater: str) -> tuple[int, int]:
        """(trials answered, trials in all) for `rater`."""
        total = self.con.execute("SELECT COUNT(*) FROM trials").fetchone()[0]
        return len(self.answered(rater)), int(total)

    def unblinded(self) -> list[dict[str, Any]]:
        """Every live answer with its trial's task and key: for the report and the export,
        never for a rater."""
        rows = self.con.execute(
            "SELECT a.rater, a.trial, t.task, a.answer, a.given, a.seconds, k.key "
            "FROM answers a JOIN trials t ON t.id = a.trial "
            "JOIN trial_keys k ON k.trial = a.trial WHERE a.undone = 0 ORDER BY a.id")
        return [{"rater": r, "trial": t, "task": task, "answer": json.loads(ans),
                 "given": given, "seconds": sec, "key": json.loads(key)}
                for r, t, task, ans, given, sec, key in rows]
