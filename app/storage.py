"""Conversations in a SQLite file: written as they stream, so a crash loses only the tokens not yet written.

No Qt here: the window calls it from the GUI thread. Every change is its own transaction in WAL mode, so an
answer is on disk token by token (a small write, cheap next to generating the token). An answer still marked
`streaming` when the file is opened again was cut off by a crash or a kill: it is marked `interrupted`, its text
kept.

What is done with a file that cannot be used as it is, so that no conversation is ever lost:
- not a database, or damaged: renamed aside (never deleted) and a fresh one started, with a notice to show;
- made by a newer mlx-oss (a higher `user_version`), or one this user may not write: opened read-only (SQLite's
  `mode=ro`, which never writes the file), so the chats stay in view; nothing can be added;
- anything else (locked by another program, a folder that cannot be created, a folder or a pipe where the file
  should be): `StorageError`, the file left as it is. `open_conversations` then keeps this session's chats in
  memory and says so.
Every read and write failure is a `StorageError` whose words say what happened (see `file_errors`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mlx_oss.errors import MlxOssError
from mlx_oss.harmony import Message
from mlx_oss.tools import BUILTIN_TOOLS, Citation, ToolOutput

from .file_errors import (
    SQLITE_AUTH,
    SQLITE_CORRUPT,
    SQLITE_PERM,
    SQLITE_READONLY,
    aside_path,
    is_damaged,
    os_error_words,
    sentence,
    sqlite_code,
    sqlite_error_words,
)

SCHEMA_VERSION = 2  # 2: built-in tools (a conversation's toggles, its tool calls, each turn's harmony messages)
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
# Version 2, added to a version 1 file in place (its chats stay as they were: no tools, no harmony messages).
# `harmony` holds the turn's messages as the model saw them (reasoning, tool calls, tool results, answer), so a
# reopened conversation renders the very prompt the loop would have; a file's PNGs are kept in `tool_files`
# because the model may overwrite its plot in the working folder on a later call.
TOOLS_SCHEMA = """
CREATE TABLE IF NOT EXISTS tool_calls (
    id INTEGER PRIMARY KEY,
    message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    recipient TEXT NOT NULL,
    content TEXT NOT NULL,
    output TEXT NOT NULL DEFAULT '',
    display TEXT NOT NULL DEFAULT '',
    citations TEXT NOT NULL DEFAULT '[]',
    error INTEGER NOT NULL DEFAULT 0,
    seconds REAL,
    state TEXT NOT NULL DEFAULT 'running'
);
CREATE INDEX IF NOT EXISTS tool_calls_by_message ON tool_calls (message_id, id);
CREATE TABLE IF NOT EXISTS tool_files (
    id INTEGER PRIMARY KEY,
    call_id INTEGER NOT NULL REFERENCES tool_calls(id) ON DELETE CASCADE,
    path TEXT NOT NULL,
    data BLOB
);
"""
MIGRATIONS = {  # columns version 2 adds to version 1's tables
    "conversations": [("tools", "TEXT NOT NULL DEFAULT ''")],
    "messages": [("harmony", "TEXT")],
}
STATES = ("done", "streaming", "stopped", "interrupted", "failed")
# Seconds a write waits for another program that holds the file. Writes happen on the GUI thread, one per streamed
# piece: another mlx-oss writing the same file holds it for microseconds, so a longer wait only means a window
# frozen behind a program that will not let go; after this the write fails with words saying so.
WRITE_WAIT = 1.0
NEWER = "it was made by a newer mlx-oss; update mlx-oss to add to it"


class StorageError(MlxOssError):
    """The conversations could not be opened, read or written; the message says why in words."""


DEFAULT_TITLE = "New chat"


@dataclass
class StoredMessage:
    id: int
    role: str  # user or assistant
    content: str
    reasoning: str = ""
    state: str = "done"  # streaming while it is written; stopped (by the user), interrupted (crash), failed
    stats: dict = field(default_factory=dict)
    harmony: list[Message] | None = None  # the turn as the model saw it (None: written before tools, or cut off)
    tool_calls: list[StoredToolCall] = field(default_factory=list)


@dataclass
class StoredToolCall:
    """One built-in tool call of an answer, as shown: what the model sent and what came back."""

    id: int
    recipient: str
    content: str
    output: str = ""  # what the model read
    display: str = ""  # what the user sees (the full output)
    citations: tuple[Citation, ...] = ()
    error: bool = False
    seconds: float | None = None
    state: str = "running"  # running while the tool runs; done; interrupted (the app was closed meanwhile)
    files: list[tuple[str, bytes | None]] = field(default_factory=list)  # (path, its bytes when kept)


@dataclass(frozen=True)
class ConversationSummary:
    id: int
    title: str
    updated: float


class ConversationStore:
    def __init__(self, path: str | Path, busy_timeout: float = 5.0):
        """Open (or create) the database at `path`. `notice` says what was done about a file that could not be used
        as it was; `read_only` is set when nothing can be added to it. Raises `StorageError` when the file cannot
        be opened at all (and leaves it as it is)."""
        self.path = Path(path)
        self.busy_timeout = busy_timeout  # seconds to wait, when opening, for another process that holds the file
        self.notice: str | None = None
        self.read_only: str | None = None  # why nothing can be added, when that is so
        self.has_tools = True  # False for a version 1 file shown read-only: it has no tool columns to read
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create the folder {self.path.parent}: {os_error_words(e)}") from None
        if self.path.exists() and not self.path.is_file():  # a folder or a pipe: not ours to move, and SQLite
            kind = "a folder" if self.path.is_dir() else "not a regular file"  # reads a pipe as a disk error
            raise StorageError(f"cannot open the conversations in {self.path}: it is {kind}")
        if self._version_on_disk() > SCHEMA_VERSION:
            self._open_read_only(NEWER)
            return
        try:
            self.db = self._open()
        except sqlite3.DatabaseError as e:
            if is_damaged(e):
                self._set_aside(e)
            elif sqlite_code(e) in (SQLITE_READONLY, SQLITE_PERM, SQLITE_AUTH):
                self._open_read_only(sqlite_error_words(e, self.path))
            else:
                raise StorageError(
                    f"cannot open the conversations in {self.path}: {sqlite_error_words(e, self.path)}"
                ) from None

    @classmethod
    def in_memory(cls, reason: str) -> ConversationStore:
        """A store that keeps this session's chats in memory only, for when the file cannot be used; `notice` says
        so, with `reason`."""
        store = cls.__new__(cls)
        store.path, store.busy_timeout, store.read_only = Path(":memory:"), 0.0, None
        store.db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        store.db.executescript(SCHEMA)
        _migrate(store.db)
        store.has_tools = True
        store.notice = (
            f"{sentence(f'Conversations are not being saved: {reason}')} The chats of this session are lost when "
            "the window closes; fix this and restart mlx-oss to keep them."
        )
        return store

    def _version_on_disk(self) -> int:
        """The file's schema version, read without writing anything (0 when there is no readable file yet)."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return 0
        try:
            probe = sqlite3.connect(self._read_only_uri(), uri=True, timeout=self.busy_timeout)
        except sqlite3.Error:
            return 0
        try:
            return probe.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error:  # damaged, busy: opening it for writing says which, and deals with it
            return 0
        finally:
            probe.close()

    def _read_only_uri(self) -> str:
        return f"{self.path.resolve().as_uri()}?mode=ro"

    def _open_read_only(self, why: str) -> None:
        """Show the chats of a file nothing may be added to; SQLite's read-only mode never writes the file."""
        try:
            self.db = sqlite3.connect(
                self._read_only_uri(),
                uri=True,
                timeout=self.busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            self.db.execute("SELECT id, title, updated FROM conversations LIMIT 1").fetchall()
            self.db.execute(
                "SELECT id, role, content, reasoning, state, stats FROM messages WHERE conversation_id = 0"
            ).fetchall()
        except sqlite3.Error as e:
            if hasattr(self, "db"):
                self.db.close()
            raise StorageError(
                f"cannot read the conversations in {self.path} ({why}): {sqlite_error_words(e, self.path)}"
            ) from None
        self.read_only = why
        self.has_tools = _has_tool_schema(self.db)
        self.notice = f"The conversations in {self.path} are shown read-only: {why}."

    def _set_aside(self, error: sqlite3.Error) -> None:
        aside = aside_path(self.path, "damaged")
        try:
            for suffix in ("", "-wal", "-shm"):  # the journal files belong to the damaged file: they go along
                if Path(f"{self.path}{suffix}").exists():
                    Path(f"{self.path}{suffix}").rename(f"{aside}{suffix}")
        except OSError as e:
            raise StorageError(
                f"the conversations in {self.path} cannot be read ({error}) and the file cannot be set aside: "
                f"{os_error_words(e)}"
            ) from None
        self.notice = (
            f"The conversation file could not be read ({error}); it was set aside as {aside.name} "
            "and a new one started."
        )
        try:
            self.db = self._open()
        except sqlite3.Error as e:
            raise StorageError(
                f"cannot start a new conversation file in {self.path}: {sqlite_error_words(e, self.path)}"
            ) from None

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        try:
            if db.execute("PRAGMA user_version").fetchone()[0] > SCHEMA_VERSION:  # changed since it was peeked at
                raise sqlite3.DatabaseError(f"written by a newer mlx-oss ({NEWER})")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                error = sqlite3.DatabaseError("the integrity check failed")
                error.sqlite_errorcode = SQLITE_CORRUPT  # set aside like any damaged file
                raise error
            db.executescript(SCHEMA)
            _migrate(db)
            db.execute("UPDATE messages SET state='interrupted' WHERE state='streaming'")
            db.execute("UPDATE tool_calls SET state='interrupted' WHERE state='running'")
            db.execute(f"PRAGMA busy_timeout={int(WRITE_WAIT * 1000)}")
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def close(self) -> None:
        self.db.close()

    def _write(self, sql: str, parameters: tuple = ()) -> sqlite3.Cursor:
        if self.read_only:
            raise StorageError(f"could not save: {self.read_only}")
        try:
            return self.db.execute(sql, parameters)
        except sqlite3.Error as e:
            raise StorageError(f"could not save: {sqlite_error_words(e, self.path)}") from None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """The changes made inside happen together or not at all (a full disk halfway leaves none of them)."""
        self._write("BEGIN IMMEDIATE")
        try:
            yield
            self._write("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            raise

    def _read(self, sql: str, parameters: tuple = ()) -> list[tuple]:
        try:
            return self.db.execute(sql, parameters).fetchall()
        except sqlite3.Error as e:
            raise StorageError(
                f"could not read the conversations in {self.path}: {sqlite_error_words(e, self.path)}"
            ) from None

    # -- conversations ---------------------------------------------------------------------------------------

    def new(self, title: str = DEFAULT_TITLE) -> int:
        now = time.time()
        return self._write(
            "INSERT INTO conversations (title, created, updated) VALUES (?, ?, ?)", (title, now, now)
        ).lastrowid

    def list(self, search: str = "") -> list[ConversationSummary]:
        """Newest first; with `search`, those whose title or any message contains it (case-insensitive)."""
        if search:
            pattern = f"%{search.replace('!', '!!').replace('%', '!%').replace('_', '!_')}%"
            rows = self._read(
                "SELECT id, title, updated FROM conversations c WHERE title LIKE ?1 ESCAPE '!' OR EXISTS ("
                "SELECT 1 FROM messages m WHERE m.conversation_id = c.id AND "
                "(m.content LIKE ?1 ESCAPE '!' OR m.reasoning LIKE ?1 ESCAPE '!')) ORDER BY updated DESC, id DESC",
                (pattern,),
            )
        else:
            rows = self._read("SELECT id, title, updated FROM conversations ORDER BY updated DESC, id DESC")
        return [ConversationSummary(*row) for row in rows]

    def title(self, conversation: int) -> str:
        rows = self._read("SELECT title FROM conversations WHERE id = ?", (conversation,))
        if not rows:
            raise KeyError(conversation)
        return rows[0][0]

    def rename(self, conversation: int, title: str) -> None:
        self._write("UPDATE conversations SET title = ? WHERE id = ?", (title.strip() or DEFAULT_TITLE, conversation))

    def delete(self, conversation: int) -> None:
        self._write("DELETE FROM conversations WHERE id = ?", (conversation,))

    def _touch(self, conversation: int) -> None:
        self._write("UPDATE conversations SET updated = ? WHERE id = ?", (time.time(), conversation))

    # -- messages --------------------------------------------------------------------------------------------

    def messages(self, conversation: int) -> list[StoredMessage]:
        harmony = "harmony" if self.has_tools else "NULL"
        rows = self._read(
            f"SELECT id, role, content, reasoning, state, stats, {harmony} FROM messages WHERE conversation_id = ? "
            "ORDER BY id",
            (conversation,),
        )
        calls = self._tool_calls(conversation)
        return [
            StoredMessage(
                i,
                role,
                content,
                reasoning,
                state,
                json.loads(stats or "{}"),
                [message_from_json(m) for m in json.loads(turn)] if turn else None,
                calls.get(i, []),
            )
            for i, role, content, reasoning, state, stats, turn in rows
        ]

    def _tool_calls(self, conversation: int) -> dict[int, list[StoredToolCall]]:
        """The tool calls of a conversation's answers, by answer."""
        if not self.has_tools:
            return {}
        rows = self._read(
            "SELECT t.id, t.message_id, recipient, t.content, output, display, citations, error, seconds, t.state "
            "FROM tool_calls t JOIN messages m ON m.id = t.message_id WHERE m.conversation_id = ? ORDER BY t.id",
            (conversation,),
        )
        files: dict[int, list] = {}
        for call, path, data in self._read(
            "SELECT f.call_id, f.path, f.data FROM tool_files f JOIN tool_calls t ON t.id = f.call_id "
            "JOIN messages m ON m.id = t.message_id WHERE m.conversation_id = ? ORDER BY f.id",
            (conversation,),
        ):
            files.setdefault(call, []).append((path, data))
        found: dict[int, list[StoredToolCall]] = {}
        for call, message, recipient, content, output, display, citations, error, seconds, state in rows:
            cited = tuple(Citation(**c) for c in json.loads(citations or "[]"))
            found.setdefault(message, []).append(
                StoredToolCall(
                    call, recipient, content, output, display, cited, bool(error), seconds, state, files.get(call, [])
                )
            )
        return found

    def add(self, conversation: int, role: str, content: str = "", state: str = "done") -> int:
        message = self._write(
            "INSERT INTO messages (conversation_id, role, content, state, created) VALUES (?, ?, ?, ?, ?)",
            (conversation, role, content, state, time.time()),
        ).lastrowid
        self._touch(conversation)
        return message

    def append(self, message: int, content: str = "", reasoning: str = "") -> None:
        """Add streamed text to a message (one small transaction: on disk before the next token)."""
        self._write(
            "UPDATE messages SET content = content || ?, reasoning = reasoning || ? WHERE id = ?",
            (content, reasoning, message),
        )

    def finish(self, message: int, state: str, stats: dict | None = None) -> None:
        if state not in STATES:
            raise ValueError(f"unknown message state {state!r}")
        self._write("UPDATE messages SET state = ?, stats = ? WHERE id = ?", (state, json.dumps(stats or {}), message))

    def add_tool_call(self, message: int, recipient: str, content: str) -> int:
        """A built-in tool call the model just made, written before the tool runs (a crash shows it cut off)."""
        return self._write(
            "INSERT INTO tool_calls (message_id, recipient, content) VALUES (?, ?, ?)", (message, recipient, content)
        ).lastrowid

    def finish_tool_call(
        self, call: int, output: ToolOutput, seconds: float, files: list[tuple[str, bytes | None]] = ()
    ) -> None:
        """What the call returned; `files` are the files it made, with the bytes of those worth keeping (pictures)."""
        citations = json.dumps([dataclasses.asdict(c) for c in output.citations])
        with self.transaction():
            self._write(
                "UPDATE tool_calls SET output = ?, display = ?, citations = ?, error = ?, seconds = ?, state = 'done' "
                "WHERE id = ?",
                (output.text, output.display, citations, int(output.error), seconds, call),
            )
            for path, data in files:
                self._write("INSERT INTO tool_files (call_id, path, data) VALUES (?, ?, ?)", (call, path, data))

    def set_harmony(self, message: int, turn: list[Message]) -> None:
        """The turn's messages as the model saw them: what is sent again in the next turns."""
        self._write(
            "UPDATE messages SET harmony = ? WHERE id = ?",
            (json.dumps([message_to_json(m) for m in turn], ensure_ascii=False), message),
        )

    def tools(self, conversation: int) -> tuple[str, ...]:
        """The built-in tools this conversation has switched on."""
        if not self.has_tools:
            return ()
        rows = self._read("SELECT tools FROM conversations WHERE id = ?", (conversation,))
        return tuple(t for t in (rows[0][0] if rows else "").split(",") if t in BUILTIN_TOOLS)

    def set_tools(self, conversation: int, tools: tuple[str, ...]) -> None:
        self._write(
            "UPDATE conversations SET tools = ? WHERE id = ?",
            (",".join(t for t in BUILTIN_TOOLS if t in tools), conversation),
        )

    def delete_message(self, message: int) -> None:
        self._write("DELETE FROM messages WHERE id = ?", (message,))

    # -- export ----------------------------------------------------------------------------------------------

    def export_json(self, conversation: int) -> dict:
        return {
            "title": self.title(conversation),
            "messages": [
                {
                    "role": m.role,
                    "content": m.content,
                    "reasoning": m.reasoning,
                    "state": m.state,
                    "stats": m.stats,
                    **({"harmony": [message_to_json(h) for h in m.harmony]} if m.harmony else {}),
                    **(
                        {
                            "tool_calls": [
                                {
                                    "recipient": c.recipient,
                                    "content": c.content,
                                    "output": c.display or c.output,
                                    "error": c.error,
                                    "files": [path for path, _ in c.files],
                                }
                                for c in m.tool_calls
                            ]
                        }
                        if m.tool_calls
                        else {}
                    ),
                }
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
            for call in m.tool_calls:
                fence = "````" if "```" in call.content + call.display + call.output else "```"
                parts.append(
                    f"<details><summary>{call.recipient}</summary>\n\n{fence}\n{call.content}\n{fence}\n\n"
                    f"{fence}\n{call.display or call.output}\n{fence}\n\n</details>\n"
                )
            parts.append(m.content.rstrip() + "\n")
            if m.state in ("stopped", "interrupted", "failed"):
                parts.append(f"*({m.state})*\n")
        return "\n".join(parts)


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def _has_tool_schema(db: sqlite3.Connection) -> bool:
    return all({name for name, _ in columns} <= _columns(db, table) for table, columns in MIGRATIONS.items()) and bool(
        _columns(db, "tool_calls")
    )


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a version 1 file (or a new one) to this version, all at once or not at all."""
    db.execute("BEGIN IMMEDIATE")
    try:
        for table, columns in MIGRATIONS.items():
            have = _columns(db, table)
            for name, declaration in columns:
                if name not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")
        for statement in TOOLS_SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def message_to_json(message: Message) -> dict:
    return {k: v for k, v in dataclasses.asdict(message).items() if v is not None}


def message_from_json(data: dict) -> Message:
    fields = {f.name for f in dataclasses.fields(Message)}
    return Message(**{k: v for k, v in data.items() if k in fields})


def open_conversations(path: str | Path) -> ConversationStore:
    """The window's store: the file at `path` when it can be opened at all, else this session's chats in memory,
    with a notice saying why. The window then still opens (models, settings, chatting) and the user knows that
    nothing is kept, instead of a traceback or an app that refuses to start."""
    try:
        return ConversationStore(path)
    except StorageError as e:
        return ConversationStore.in_memory(str(e))
