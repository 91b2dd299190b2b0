"""Conversations in a SQLite file: written as they stream, so a crash loses only the tokens not yet written.

No Qt here: the window calls it from the GUI thread. Every change is its own transaction in WAL mode, so an
answer is on disk token by token (15 µs a write, measured on the 2-core test machine). An answer still marked
`streaming` when the file is opened again was cut off by a crash or a kill: it is marked `interrupted`, its text
kept. A file that is not a readable database is renamed aside (never deleted) and a fresh one started, with a
notice to show.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlx_oss.errors import MlxOssError

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    reasoning TEXT NOT NULL DEFAULT '',
    content TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT 'done',
    stats TEXT,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation_id, id);
"""
STATES = ("done", "streaming", "stopped", "interrupted", "failed")
NOT_A_DATABASE, CORRUPT = 26, 11  # SQLite's result codes for a file that is not (or no longer) a database


def _damaged(error: sqlite3.DatabaseError) -> bool:
    """A file to set aside, as opposed to one that is busy, read-only or on a full disk (left alone)."""
    code = getattr(error, "sqlite_errorcode", None)
    return code is None or code & 0xFF in (NOT_A_DATABASE, CORRUPT)


DEFAULT_TITLE = "New chat"


@dataclass
class StoredMessage:
    id: int
    role: str  # user or assistant
    content: str
    reasoning: str = ""
    state: str = "done"  # streaming while it is written; stopped (by the user), interrupted (crash), failed
    stats: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ConversationSummary:
    id: int
    title: str
    updated: float


class ConversationStore:
    def __init__(self, path: str | Path, busy_timeout: float = 5.0):
        """Open (or create) the database at `path`. `notice` says what was done about a damaged file, if any."""
        self.path = Path(path)
        self.busy_timeout = busy_timeout  # seconds to wait for another process that holds the file
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.notice: str | None = None
        try:
            self.db = self._open()
        except sqlite3.DatabaseError as e:
            if not _damaged(e):
                raise MlxOssError(
                    f"cannot open the conversations in {self.path}: {e} (is mlx-oss already running?)"
                ) from None
            aside = self.path.with_name(f"{self.path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            for suffix in ("", "-wal", "-shm"):  # the journal files belong to the damaged file: they go along
                if Path(f"{self.path}{suffix}").exists():
                    Path(f"{self.path}{suffix}").rename(f"{aside}{suffix}")
            self.notice = (
                f"The conversation file could not be read ({e}); it was set aside as {aside.name} "
                "and a new one started."
            )
            self.db = self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("the integrity check failed")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"written by a newer mlx-oss (schema {version})")
            db.executescript(SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("UPDATE messages SET state='interrupted' WHERE state='streaming'")
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def close(self) -> None:
        self.db.close()

    # -- conversations ---------------------------------------------------------------------------------------

    def new(self, title: str = DEFAULT_TITLE) -> int:
        now = time.time()
        return self.db.execute(
            "INSERT INTO conversations (title, created, updated) VALUES (?, ?, ?)", (title, now, now)
        ).lastrowid

    def list(self, search: str = "") -> list[ConversationSummary]:
        """Newest first; with `search`, those whose title or any message contains it (case-insensitive)."""
        if search:
            pattern = f"%{search.replace('!', '!!').replace('%', '!%').replace('_', '!_')}%"
            rows = self.db.execute(
                "SELECT id, title, updated FROM conversations c WHERE title LIKE ?1 ESCAPE '!' OR EXISTS ("
                "SELECT 1 FROM messages m WHERE m.conversation_id = c.id AND "
                "(m.content LIKE ?1 ESCAPE '!' OR m.reasoning LIKE ?1 ESCAPE '!')) ORDER BY updated DESC, id DESC",
                (pattern,),
            )
        else:
            rows = self.db.execute("SELECT id, title, updated FROM conversations ORDER BY updated DESC, id DESC")
        return [ConversationSummary(*row) for row in rows]

    def title(self, conversation: int) -> str:
        row = self.db.execute("SELECT title FROM conversations WHERE id = ?", (conversation,)).fetchone()
        if row is None:
            raise KeyError(conversation)
        return row[0]

    def rename(self, conversation: int, title: str) -> None:
        self.db.execute(
            "UPDATE conversations SET title = ? WHERE id = ?", (title.strip() or DEFAULT_TITLE, conversation)
        )

    def delete(self, conversation: int) -> None:
        self.db.execute("DELETE FROM conversations WHERE id = ?", (conversation,))

    def _touch(self, conversation: int) -> None:
        self.db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (time.time(), conversation))

    # -- messages --------------------------------------------------------------------------------------------

    def messages(self, conversation: int) -> list[StoredMessage]:
        rows = self.db.execute(
            "SELECT id, role, content, reasoning, state, stats FROM messages WHERE conversation_id = ? ORDER BY id",
            (conversation,),
        )
        return [
            StoredMessage(i, role, content, reasoning, state, json.loads(stats or "{}"))
            for i, role, content, reasoning, state, stats in rows
        ]

    def add(self, conversation: int, role: str, content: str = "", state: str = "done") -> int:
        message = self.db.execute(
            "INSERT INTO messages (conversation_id, role, content, state, created) VALUES (?, ?, ?, ?, ?)",
            (conversation, role, content, state, time.time()),
        ).lastrowid
        self._touch(conversation)
        return message

    def append(self, message: int, content: str = "", reasoning: str = "") -> None:
        """Add streamed text to a message (one small transaction: on disk before the next token)."""
        self.db.execute(
            "UPDATE messages SET content = content || ?, reasoning = reasoning || ? WHERE id = ?",
            (content, reasoning, message),
        )

    def finish(self, message: int, state: str, stats: dict | None = None) -> None:
        if state not in STATES:
            raise ValueError(f"unknown message state {state!r}")
        self.db.execute(
            "UPDATE messages SET state = ?, stats = ? WHERE id = ?", (state, json.dumps(stats or {}), message)
        )

    def delete_message(self, message: int) -> None:
        self.db.execute("DELETE FROM messages WHERE id = ?", (message,))

    # -- export ----------------------------------------------------------------------------------------------

    def export_json(self, conversation: int) -> dict:
        return {
            "title": self.title(conversation),
            "messages": [
                {"role": m.role, "content": m.content, "reasoning": m.reasoning, "state": m.state, "stats": m.stats}
                for m in self.messages(conversation)
            ],
        }

    def export_markdown(self, conversation: int) -> str:
        parts = [f"# {self.title(conversation)}\n"]
        for m in self.messages(conversation):
            parts.append(f"## {'You' if m.role == 'user' else 'gpt-oss'}\n")
            if m.reasoning:
                quoted = "\n".join(f"> {line}" if line else ">" for line in m.reasoning.splitlines())
                parts.append(f"<details><summary>Reasoning</summary>\n\n{quoted}\n\n</details>\n")
            parts.append(m.content.rstrip() + "\n")
            if m.state in ("stopped", "interrupted", "failed"):
                parts.append(f"*({m.state})*\n")
        return "\n".join(parts)
