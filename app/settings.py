"""The app's settings and where its files live.

Conversations and settings go to the platform's user directories (platformdirs), never beside the program;
`MLX_OSS_APP_DIR` puts both in one folder instead (tests, portable installs). Settings are a JSON file written
atomically. What cannot be used in it falls back to the defaults, field by field, and never stops the app; the
window says so once (`load_for_window`), after keeping the user's file aside so that no later save overwrites
what they wrote.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from mlx_oss.atomic import write_atomically
from mlx_oss.engine import SamplingParams
from mlx_oss.errors import MlxOssError
from mlx_oss.harmony import REASONING_EFFORTS
from mlx_oss.json_input import JsonInputError, parse_json
from mlx_oss.loading import BACKENDS
from mlx_oss.store import DEFAULT_MODEL
from mlx_oss.tools import ToolSettings

from .file_errors import aside_path, os_error_words

APP_DIR_ENV = "MLX_OSS_APP_DIR"
MAX_CONTEXT = 131072  # tokens: the longest context gpt-oss was trained for
MAX_TOKENS = 1_000_000
SEARCH_BACKENDS = ("duckduckgo", "searxng")
MAX_PYTHON_TIMEOUT = 3600.0  # seconds
MAX_PYTHON_MEMORY = 1 << 20  # MB
_KINDS = {str: "text", float: "a number", int: "a whole number"}
_repr = reprlib.Repr()  # a value quoted in a message stays short, whatever the file holds
_repr.maxstring = _repr.maxother = 40
_short = _repr.repr


def data_dir() -> Path:
    if os.environ.get(APP_DIR_ENV):
        return Path(os.environ[APP_DIR_ENV])
    import platformdirs

    return Path(platformdirs.user_data_dir("mlx-oss", appauthor=False))


def config_dir() -> Path:
    if os.environ.get(APP_DIR_ENV):
        return Path(os.environ[APP_DIR_ENV])
    import platformdirs

    return Path(platformdirs.user_config_dir("mlx-oss", appauthor=False))


def work_dir(conversation: int) -> Path:
    """The conversation's working folder: python's files (plots, data), one click away in the chat."""
    return data_dir() / "work" / f"conversation-{conversation}"


def settings_path() -> Path:
    return config_dir() / "settings.json"


class SettingsRead(NamedTuple):
    settings: AppSettings
    problems: list[str]  # what in the file could not be used, in words
    bad_content: bool  # the file was read but is not settings (as opposed to: missing, or could not be read)


@dataclass
class AppSettings:
    model: str = DEFAULT_MODEL  # a hub name in the model store, or a model directory
    backend: str = "auto"
    reasoning_effort: str = "medium"
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 0  # 0: no limit but the context
    context_length: int = 8192  # tokens of conversation the engine keeps (KV cache memory grows with it)
    system_prompt: str = ""
    # The built-in tools (each conversation switches them on for itself): where `browser` searches, and the limits
    # of a `python` call.
    # (the address before the backend: a file is read field by field, and searxng is checked against its address)
    search_url: str = ""  # a SearXNG instance's address (the backend that needs one)
    search_backend: str = "duckduckgo"  # needs no key
    python_timeout_s: float = 120.0  # the model is told 120 s
    python_memory_mb: int = 2048

    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, None, self.max_tokens or None)

    def tool_settings(self, enabled: tuple[str, ...] = (), work_dir: Path | None = None) -> ToolSettings:
        """What the tools are built with (`enabled` and the working folder are the conversation's)."""
        return ToolSettings(
            enabled=enabled,
            work_dir=work_dir,
            python_timeout_s=self.python_timeout_s,
            python_memory_mb=self.python_memory_mb,
            search_backend=self.search_backend,
            search_url=self.search_url or None,
        )

    def problems(self) -> list[str]:
        """What is wrong with these values, in words (empty when they can be used)."""
        found = []
        if self.backend not in BACKENDS:
            found.append(f"backend must be one of {', '.join(BACKENDS)}")
        if self.reasoning_effort not in REASONING_EFFORTS:
            found.append(f"reasoning effort must be one of {', '.join(REASONING_EFFORTS)}")
        if not 0 <= self.temperature <= 10:
            found.append("temperature must be between 0 and 10")
        if not 0 < self.top_p <= 1:
            found.append("top-p must be above 0 and at most 1")
        if not 0 <= self.max_tokens <= MAX_TOKENS:
            found.append(f"max tokens must be between 0 (no limit) and {MAX_TOKENS}")
        if not 256 <= self.context_length <= MAX_CONTEXT:
            found.append(f"the context must be between 256 and {MAX_CONTEXT} tokens")
        if self.search_backend not in SEARCH_BACKENDS:
            found.append(f"the search backend must be one of {', '.join(SEARCH_BACKENDS)}")
        elif self.search_backend == "searxng" and not self.search_url.startswith(("http://", "https://")):
            found.append("SearXNG needs its address (http:// or https://)")
        if not 1 <= self.python_timeout_s <= MAX_PYTHON_TIMEOUT:
            found.append(f"the python time limit must be between 1 and {MAX_PYTHON_TIMEOUT:g} seconds")
        if not 128 <= self.python_memory_mb <= MAX_PYTHON_MEMORY:
            found.append(f"python's memory must be between 128 and {MAX_PYTHON_MEMORY} MB")
        if not self.model.strip():
            found.append("choose a model")
        return found

    @classmethod
    def load(cls, path: Path | None = None) -> AppSettings:
        return cls.read(path).settings

    @classmethod
    def read(cls, path: Path | None = None) -> SettingsRead:
        """The settings in the file, what in it could not be used, and whether its content was the problem.

        Never raises: a file that is malformed, not UTF-8, nested too deep for the parser, of the wrong shape or
        unreadable gives the defaults; a field of the wrong type or out of range gives that field's default.
        """
        path = path or settings_path()
        defaults = cls()
        try:
            raw = parse_json(path.read_bytes())
        except FileNotFoundError:
            return SettingsRead(defaults, [], False)
        except OSError as e:
            return SettingsRead(defaults, [f"it could not be read: {os_error_words(e)}"], False)
        except JsonInputError as e:
            return SettingsRead(defaults, [f"it is {e}"], True)
        except ValueError as e:  # a number of more than 4300 digits: Python's limit, which parse_json lets through
            return SettingsRead(defaults, [f"it is not usable JSON: {e}"], True)
        if not isinstance(raw, dict):
            return SettingsRead(defaults, [f"it is not a JSON object but {type(raw).__name__}"], True)
        settings, problems = defaults, []
        for f in dataclasses.fields(cls):
            if f.name not in raw:
                continue
            value, kind = raw[f.name], type(getattr(defaults, f.name))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                with contextlib.suppress(OverflowError):
                    value = float(value)
            if isinstance(value, bool) or not isinstance(value, kind):
                problems.append(f"{f.name} must be {_KINDS[kind]}, not {_short(value)}")
                continue
            candidate = dataclasses.replace(settings, **{f.name: value})
            wrong = candidate.problems()  # the fields taken so far are fine: what is wrong is this one
            if wrong:
                problems.append(f"{f.name} {_short(value)}: {'; '.join(wrong)}")
            else:
                settings = candidate
        return SettingsRead(settings, problems, bool(problems))

    def save(self, path: Path | None = None) -> None:
        """Write atomically (a crash leaves the old file or the new one), through a symlink to its target.

        Raises `MlxOssError` naming the file and what went wrong (a full disk, a read-only folder)."""
        path = path or settings_path()
        if path.is_symlink():  # a dotfiles manager's link stays a link
            path = path.resolve()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        except OSError as e:
            raise MlxOssError(f"could not save the settings in {path}: {os_error_words(e)}") from None


def load_for_window(path: Path | None = None) -> tuple[AppSettings, str | None]:
    """The settings to start with and, when the file had anything unusable, a notice to show.

    A file whose content is the problem is renamed aside (kept byte for byte) and a clean one written with what
    could be used, so the notice comes once, and no later save silently replaces what the user wrote. A file that
    could not be read at all (a folder, no permission) is left as it is.
    """
    path = path or settings_path()
    settings, problems, bad_content = AppSettings.read(path)
    if not problems:
        return settings, None
    notice = f"The settings in {path} could not all be used ({'; '.join(problems)}): the defaults stand in."
    if not bad_content:
        return settings, notice
    aside = aside_path(path, "unreadable")
    try:
        path.rename(aside)
    except OSError as e:
        return settings, f"{notice} The file is left as it is (it could not be set aside: {os_error_words(e)})."
    try:
        settings.save(path)
    except MlxOssError as e:
        return settings, f"{notice} Your file was kept as {aside.name}; {e}."
    return settings, f"{notice} Your file was kept as {aside.name}."
