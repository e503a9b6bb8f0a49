"""The results database of a study: one SQLite file in the study folder, one row per finished run.

Tables (schema version :data:`SCHEMA_VERSION`):

* ``meta``: key/value: ``schema_version``, ``study`` (the study's name), ``protocol`` (how runs are
  evaluated, JSON: a study folder holds one protocol), ``study_yaml`` and ``study_settings`` (the
  latest study file and its resolved settings), ``created``;
* ``runs``: one row per finished run, keyed by the hash of its resolved settings (``settings``, JSON):
  label, model, method, kind, parent (the pruned run a recovery run fine-tunes), results (JSON), the
  model folder, the machine and software versions it ran on, its wall time and when it finished;
* ``latency``: one row per run timed in the latency phase (interleaved with the dense model);
* ``failures``: a log of runs that raised an error (they are tried again on the next invocation).

A row is inserted in one transaction after the run's model folder is complete, so a process killed at
any moment leaves either the whole row or none; the primary key keeps every run at most once.
"""

from __future__ import annotations

import datetime
import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError

SCHEMA_VERSION = 1
DB_NAME = "study.sqlite"
LOCK_NAME = ".study.lock"

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (
    key TEXT PRIMARY KEY, label TEXT NOT NULL, model TEXT NOT NULL, method TEXT NOT NULL, kind TEXT NOT NULL,
    parent TEXT, settings TEXT NOT NULL, results TEXT NOT NULL, folder TEXT, machine TEXT NOT NULL,
    versions TEXT NOT NULL, seconds REAL NOT NULL, finished TEXT NOT NULL);
CREATE TABLE latency (key TEXT PRIMARY KEY, results TEXT NOT NULL, machine TEXT NOT NULL, finished TEXT NOT NULL);
CREATE TABLE failures (key TEXT NOT NULL, label TEXT NOT NULL, error TEXT NOT NULL, at TEXT NOT NULL);
"""


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


class ResultsDatabase:
    """An open results database (use :func:`open_for_study` or :func:`open_existing`)."""

    def __init__(self, path: Path, connection: sqlite3.Connection, meta: dict[str, str]) -> None:
        self.path = path
        self.connection = connection
        self.meta = meta

    def close(self) -> None:
        self.connection.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction: committed whole at the end of the block, or rolled back."""
        connection = self.connection
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def done_keys(self) -> set[str]:
        return {row[0] for row in self.connection.execute("SELECT key FROM runs")}

    def timed_keys(self) -> set[str]:
        return {row[0] for row in self.connection.execute("SELECT key FROM latency")}

    def add_run(self, run: Any, results: dict[str, Any], seconds: float, machine: dict[str, Any],
                versions: dict[str, Any]) -> bool:
        """Insert a finished run's row (False when it is already there: every run is kept once)."""
        try:
            with self.transaction() as connection:
                connection.execute(
                    "INSERT INTO runs (key, label, model, method, kind, parent, settings, results, folder, machine, "
                    "versions, seconds, finished) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (run.key, run.label, run.model, run.method, run.kind, run.parent, _dumps(run.settings),
                     _dumps(results), run.folder, _dumps(machine), _dumps(versions), float(seconds), now()))
        except sqlite3.IntegrityError:
            return False
        return True

    def add_latency(self, key: str, results: dict[str, Any], machine: dict[str, Any]) -> None:
        with self.transaction() as connection:
            connection.execute("INSERT OR REPLACE INTO latency (key, results, machine, finished) VALUES (?, ?, ?, ?)",
                               (key, _dumps(results), _dumps(machine), now()))

    def study_keys(self) -> set[str] | None:
        """The run keys of the study as last invoked on this folder (None in a database written before they were kept).

        Rows with other keys were made with earlier settings (e.g. a default that changed in a newer prunekit).
        """
        keys = self.meta.get("study_keys")
        return set(json.loads(keys)) if keys else None

    def drop_latency(self, keys: list[str]) -> int:
        """Delete the latency rows of ``keys``; returns how many there were."""
        with self.transaction() as connection:
            cursor = connection.executemany("DELETE FROM latency WHERE key = ?", [(key,) for key in keys])
            return max(0, cursor.rowcount)

    def add_failure(self, key: str, label: str, error: str) -> None:
        with self.transaction() as connection:
            connection.execute("INSERT INTO failures (key, label, error, at) VALUES (?, ?, ?, ?)",
                               (key, label, error, now()))

    def set_meta(self, values: dict[str, str]) -> None:
        with self.transaction() as connection:
            connection.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(values.items()))
        self.meta.update(values)

    def runs(self) -> list[dict[str, Any]]:
        """Every finished run as a dict (JSON columns decoded; ``latency`` added where timed), in finishing order."""
        timed = {key: (json.loads(results), json.loads(machine)) for key, results, machine in
                 self.connection.execute("SELECT key, results, machine FROM latency")}
        names = ("key", "label", "model", "method", "kind", "parent", "settings", "results", "folder", "machine",
                 "versions", "seconds", "finished")
        out = []
        for values in self.connection.execute(f"SELECT {', '.join(names)} FROM runs ORDER BY rowid"):
            row = dict(zip(names, values, strict=True))
            for key in ("settings", "results", "machine", "versions"):
                row[key] = json.loads(row[key])
            if row["key"] in timed:
                row["latency"], row["latency_machine"] = timed[row["key"]]
            out.append(row)
        return out

    def failures(self) -> list[dict[str, Any]]:
        return [{"key": k, "label": label, "error": e, "at": at} for k, label, e, at in
                self.connection.execute("SELECT key, label, error, at FROM failures ORDER BY rowid")]


def _damaged(path: Path, detail: str) -> PrunekitError:
    return PrunekitError(f"results database '{path}' is damaged or not a prunekit study database ({detail}): move it "
                         "away or choose another --out (nothing was changed)")


def _connect(path: Path, read_only: bool) -> ResultsDatabase:
    """Open and check an existing database: readable, a prunekit study, a schema this prunekit reads."""
    mode = "ro" if read_only else "rw"
    try:
        connection = sqlite3.connect(f"file:{path}?mode={mode}", uri=True, isolation_level=None, timeout=60)
    except sqlite3.Error as exc:
        raise _damaged(path, str(exc)) from exc
    try:
        check = connection.execute("PRAGMA quick_check").fetchone()
        if not check or check[0] != "ok":
            raise _damaged(path, f"integrity check: {check[0] if check else 'no answer'}")
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"meta", "runs", "latency", "failures"} <= tables:
            raise _damaged(path, "no study tables")
        meta = dict(connection.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError as exc:
        connection.close()
        raise _damaged(path, " ".join(str(exc).split())) from exc
    except PrunekitError:
        connection.close()
        raise
    try:
        version = int(meta.get("schema_version", "0"))
    except ValueError:
        connection.close()
        raise _damaged(path, f"schema version '{meta.get('schema_version')}'") from None
    if version > SCHEMA_VERSION:
        connection.close()
        raise PrunekitError(f"results database '{path}' was written by a newer prunekit (results schema {version}; "
                            f"this one reads up to {SCHEMA_VERSION}): upgrade prunekit, or choose another --out "
                            "(nothing was changed)")
    if version < 1 or "study" not in meta:
        connection.close()
        raise _damaged(path, "no study recorded in its meta table")
    return ResultsDatabase(path, connection, meta)


def open_existing(folder: str | Path, read_only: bool = True) -> ResultsDatabase:
    """The database of an existing study folder (e.g. for ``prunekit report``)."""
    folder = Path(folder)
    path = folder / DB_NAME
    if not folder.is_dir():
        raise PrunekitError(f"no study folder at '{folder}': give the --out folder of a prunekit study")
    if not path.is_file():
        raise PrunekitError(f"'{folder}' holds no {DB_NAME}: give the --out folder of a prunekit study")
    return _connect(path, read_only)


def open_for_study(folder: str | Path, study: Any) -> ResultsDatabase:
    """The database for running ``study`` in ``folder``: created in a new or empty folder, else checked to hold
    the same study evaluated the same way. Nothing in the folder is changed when a check fails."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PrunekitError(f"output path '{folder}' is a file, not a folder: choose another --out")
    path = folder / DB_NAME
    protocol = _dumps(study.protocol)
    if path.exists():
        database = _connect(path, read_only=False)
        held = database.meta.get("study")
        if held != study.name:
            database.close()
            raise PrunekitError(f"'{folder}' holds the results of study '{held}', not '{study.name}': choose another "
                                "--out (nothing was changed)")
        if database.meta.get("protocol") != protocol:
            differ = _protocol_difference(database.meta.get("protocol", "{}"), study.protocol)
            database.close()
            raise PrunekitError(f"'{folder}' holds study '{held}' evaluated another way ({differ}): restore those "
                                "evaluation settings, or choose another --out (nothing was changed)")
    else:
        extra = [p.name for p in folder.iterdir() if p.name != LOCK_NAME] if folder.exists() else []
        if extra:
            raise PrunekitError(f"'{folder}' is not empty and holds no study ({', '.join(sorted(extra)[:3])}...): "
                                "choose a new or empty --out")
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{DB_NAME}.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        connection = sqlite3.connect(tmp)
        connection.executescript(SCHEMA)
        connection.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", [
            ("schema_version", str(SCHEMA_VERSION)), ("study", study.name), ("protocol", protocol),
            ("created", now())])
        connection.commit()
        connection.close()
        os.replace(tmp, path)  # a new database appears whole, or not at all
        database = _connect(path, read_only=False)
    database.set_meta({"study_yaml": study.text, "study_settings": _dumps(study.settings),
                       "study_keys": _dumps(sorted(run.key for run in study.runs)),
                       "study_source": study.source, "description": study.description})
    return database


def _protocol_difference(held: str, wanted: dict[str, Any]) -> str:
    """'evaluation.tokens 8192 here, 16384 in the file' for the first few settings that differ."""
    try:
        before = json.loads(held)
    except json.JSONDecodeError:
        return "unreadable protocol"

    def flat(value: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for key, item in value.items():
                out.update(flat(item, f"{prefix}{key}."))
            return out
        return {prefix.rstrip("."): value}

    old, new = flat(before), flat(json.loads(_dumps(wanted)))
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k)!r} in the folder, {new.get(k)!r} in the study file" for k in keys[:3])
