"""The app's settings and where its files live.

Conversations and settings go to the platform's user directories (platformdirs), never beside the program;
`MLX_OSS_APP_DIR` puts both in one folder instead (tests, portable installs). Settings are a JSON file written
atomically; one that cannot be read falls back to the defaults, field by field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from mlx_oss.engine import SamplingParams
from mlx_oss.harmony import REASONING_EFFORTS
from mlx_oss.loading import BACKENDS
from mlx_oss.store import DEFAULT_MODEL

APP_DIR_ENV = "MLX_OSS_APP_DIR"


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

    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, None, self.max_tokens or None)

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
        if self.max_tokens < 0 or self.context_length < 256:
            found.append("max tokens must be 0 or more and the context at least 256 tokens")
        return found

    @classmethod
    def load(cls, path: Path | None = None) -> AppSettings:
        path = path or config_dir() / "settings.json"
        defaults = cls()
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return defaults
        if not isinstance(raw, dict):
            return defaults
        settings = defaults
        for f in dataclasses.fields(cls):
            value = raw.get(f.name)
            kind = type(getattr(defaults, f.name))
            if isinstance(value, bool) or value is None:
                continue
            if kind is float and isinstance(value, int):
                value = float(value)
            if isinstance(value, kind):
                candidate = dataclasses.replace(settings, **{f.name: value})
                if not candidate.problems():  # a bad value falls back to the default, the others stay
                    settings = candidate
        return settings

    def save(self, path: Path | None = None) -> None:
        path = path or config_dir() / "settings.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, path)
