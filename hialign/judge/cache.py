"""SQLite cache of judge calls, so a finished judging is free to repeat and a killed one resumes.

One row per judge call (one pair in one order), keyed by a hash of everything that decides the
answer: judge model, prompt template version, prompt, both responses, order and decoding
settings. Rows are committed the moment a call returns, in WAL mode, so a ``kill -9`` loses at
most the calls still in flight. Only complete verdicts are stored; invalid ones are re-asked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path

from hialign.judge.items import JudgeItem, OrderVerdict

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS judge_calls (
    key TEXT PRIMARY KEY,
    judge_model TEXT NOT NULL,
    template_version TEXT NOT NULL,
    item_order TEXT NOT NULL,
    verdict TEXT NOT NULL,
    created REAL NOT NULL
)
"""


def call_key(judge_model: str, template: str, item: JudgeItem, order: str, decoding: dict) -> str:
    """Stable hash identifying one judge call; the item id is left out on purpose.

    Two rows with the same prompt and responses are the same question, whatever their ids.
    """
    payload = {
        "judge_model": judge_model,
        "template": template,
        "prompt": item.prompt,
        "response_a": item.response_a,
        "response_b": item.response_b,
        "order": order,
        "decoding": decoding,
    }
    text = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class JudgeCache:
    """Thread-safe store of complete order verdicts (one connection guarded by a lock)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # check_same_thread=False: the lock, not the thread, serialises access.
        self._db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)
            self._db.commit()

    def get(self, key: str) -> OrderVerdict | None:
        with self._lock:
            row = self._db.execute("SELECT verdict FROM judge_calls WHERE key = ?", (key,))
            found = row.fetchone()
        if found is None:
            return None
        return OrderVerdict(**json.loads(found[0]))

    def put(self, key: str, verdict: OrderVerdict, *, judge_model: str, template: str) -> None:
        """Store a complete verdict and commit at once (callers never store invalid ones)."""
        row = json.dumps(verdict.__dict__, ensure_ascii=False)
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO judge_calls VALUES (?, ?, ?, ?, ?, ?)",
                (key, judge_model, template, verdict.order, row, time.time()),
            )
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM judge_calls").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
