"""Local run records: one SQLite database in the user's state directory.

Every launch is written here before anything else can fail, so an instance that `lt` started can
always be found again (`lt status`) and ended (`lt down`), even after `lt` itself died.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any

STATE_DIR_ENV = "LT_STATE_DIR"

# Run statuses: launching -> up (-> pushed -> configured -> installed) -> training ->
# succeeded | failed | interrupted | stopped (ended by `lt down` before the job finished).
# Instance states: none (local run) | pending | active | terminated | left-running.
FINAL_STATUSES = ("succeeded", "failed", "interrupted", "stopped")

_COLUMNS = {
    "run_id": "TEXT PRIMARY KEY",
    "kind": "TEXT NOT NULL",  # cloud | local
    "status": "TEXT NOT NULL",
    "instance_state": "TEXT NOT NULL DEFAULT 'none'",
    "instance_id": "TEXT",
    "instance_name": "TEXT",
    "instance_type": "TEXT",
    "region": "TEXT",
    "price_cents_per_hour": "INTEGER",
    "ip": "TEXT",
    "launched_at": "REAL",
    "terminated_at": "REAL",
    "created_at": "REAL NOT NULL",
    "updated_at": "REAL NOT NULL",
    "detached": "INTEGER NOT NULL DEFAULT 0",
    "watchdog": "INTEGER NOT NULL DEFAULT 0",
    "down_after": "INTEGER NOT NULL DEFAULT 0",  # lt ends the instance when the job ends (full lifecycle)
    "message": "TEXT",
    "outputs": "TEXT",  # JSON: result.json fields, local output dir, hub urls
    "settings": "TEXT",  # JSON: the run's settings without secrets
}
_JSON_COLUMNS = ("outputs", "settings")


def state_dir() -> Path:
    """LT_STATE_DIR, else $XDG_STATE_HOME/llama-trainer, else ~/.local/state/llama-trainer."""
    if os.environ.get(STATE_DIR_ENV):
        return Path(os.environ[STATE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "llama-trainer"


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


class RunNotFound(LookupError):
    pass


class Records:
    def __init__(self, path: Path | None = None):
        self.path = path or state_dir() / "runs.sqlite3"
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with closing(self._connect()) as db, db:
            columns = ", ".join(f"{name} {kind}" for name, kind in _COLUMNS.items())
            db.execute(f"CREATE TABLE IF NOT EXISTS runs ({columns})")
            # A database from an older lt lacks newer columns: add them.
            present = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
            for name, kind in _COLUMNS.items():
                if name not in present:
                    db.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind.replace('PRIMARY KEY', '')}")

    def _connect(self) -> sqlite3.Connection:
        # Several `lt` processes may touch one run (train --detach, logs -f, status): wait for locks.
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def create(self, run_id: str, kind: str, status: str, **fields: Any) -> dict:
        now = time.time()
        row = {"run_id": run_id, "kind": kind, "status": status, "created_at": now, "updated_at": now}
        row.update(fields)
        self._check(row)
        names = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with closing(self._connect()) as db, db:
            db.execute(f"INSERT INTO runs ({names}) VALUES ({marks})", self._encode(row))
        return self.get(run_id)

    def update(self, run_id: str, **fields: Any) -> dict:
        fields["updated_at"] = time.time()
        self._check(fields)
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with closing(self._connect()) as db, db:
            cursor = db.execute(f"UPDATE runs SET {assignments} WHERE run_id = ?",
                                [*self._encode(fields), run_id])
            if cursor.rowcount == 0:
                raise RunNotFound(run_id)
        return self.get(run_id)

    def get(self, run_id: str) -> dict:
        with closing(self._connect()) as db:
            row = db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise RunNotFound(run_id)
        return self._decode(row)

    def all(self, limit: int | None = None) -> list[dict]:
        query = "SELECT * FROM runs ORDER BY created_at DESC"
        with closing(self._connect()) as db:
            rows = db.execute(query + (f" LIMIT {int(limit)}" if limit else "")).fetchall()
        return [self._decode(row) for row in rows]

    def latest(self, kind: str | None = None, live_instance: bool = False) -> dict | None:
        for run in self.all():
            if kind and run["kind"] != kind:
                continue
            if live_instance and not instance_may_be_running(run):
                continue
            return run
        return None

    def find(self, ref: str) -> dict:
        """A run by run id, unique run id prefix, instance name or instance id."""
        runs = self.all()
        for run in runs:
            if ref in (run["run_id"], run["instance_name"], run["instance_id"]):
                return run
        matches = [run for run in runs if run["run_id"].startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        raise RunNotFound(ref)

    @staticmethod
    def _check(fields: dict) -> None:
        unknown = set(fields) - set(_COLUMNS)
        if unknown:
            raise ValueError(f"unknown run record fields: {sorted(unknown)}")

    @staticmethod
    def _encode(fields: dict) -> list:
        return [json.dumps(value) if name in _JSON_COLUMNS and value is not None else value
                for name, value in fields.items()]

    @staticmethod
    def _decode(row: sqlite3.Row) -> dict:
        run = dict(row)
        for name in _JSON_COLUMNS:
            if run[name] is not None:
                run[name] = json.loads(run[name])
        run["detached"] = bool(run["detached"])
        run["watchdog"] = bool(run["watchdog"])
        run["down_after"] = bool(run["down_after"])
        return run


def instance_may_be_running(run: dict) -> bool:
    return run["kind"] == "cloud" and run["instance_state"] in ("pending", "active", "left-running")
