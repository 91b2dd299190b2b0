"""The KV states of several recent prompts in memory, so a request starts from the longest prefix it shares with
any of them (another conversation, a title request, a second agent), not only with the previous call.

Pure bookkeeping: entries of tokens and a `Cache` that nobody extends (users take a `copy`), found by the longest
shared prefix, bounded by a byte budget (`Cache.nbytes`) with least-recently-used eviction. The disk side is
`prompt_cache_disk`; `Engine` uses both.
"""

from __future__ import annotations

import argparse
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .backend import Cache
from .cli import number_from
from .generate import common_prefix_length

GIB = 1024**3
DEFAULT_MEMORY_BYTES = 2 * GIB
DEFAULT_DISK_BYTES = 8 * GIB
DIR_ENV = "MLX_OSS_PROMPT_CACHE_DIR"  # the disk cache's folder instead of the user cache directory
OFF_ENV = "MLX_OSS_NO_DISK_CACHE"  # any value but "" or "0": no disk cache


@dataclass(frozen=True)
class PromptCacheSettings:
    """How much the prompt cache may keep. `disk_dir` None means the default folder (`default_disk_dir`);
    `disk_bytes` 0 turns the disk cache off, `memory_bytes` 0 the in-memory one (the previous call's prefix is
    still reused)."""

    memory_bytes: int = DEFAULT_MEMORY_BYTES
    disk_bytes: int = DEFAULT_DISK_BYTES
    disk_dir: Path | None = None

    @classmethod
    def memory_only(cls, memory_bytes: int = DEFAULT_MEMORY_BYTES) -> PromptCacheSettings:
        return cls(memory_bytes, 0)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PromptCacheSettings:
        """The settings of the command-line flags `add_flags` added."""
        memory = DEFAULT_MEMORY_BYTES if args.prompt_cache_gb is None else int(args.prompt_cache_gb * GIB)
        disk = DEFAULT_DISK_BYTES if args.disk_cache_gb is None else int(args.disk_cache_gb * GIB)
        return cls(memory, 0 if args.no_disk_cache else disk, args.disk_cache_dir)

    def disk_folder(self) -> Path | None:
        """Where the disk cache lives, or None when it is off (by the budget or `MLX_OSS_NO_DISK_CACHE`)."""
        if self.disk_bytes <= 0 or os.environ.get(OFF_ENV, "") not in ("", "0"):
            return None
        return self.disk_dir or default_disk_dir()


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The prompt cache's flags, the same on every command line that runs an engine."""
    group = parser.add_argument_group("prompt cache (prompts' keys and values kept to skip their prefill)")
    group.add_argument(
        "--prompt-cache-gb",
        type=number_from(0),
        metavar="GB",
        help=f"memory for the prompts of recent conversations (default {DEFAULT_MEMORY_BYTES / GIB:g}; 0: the "
        "previous call's only)",
    )
    group.add_argument(
        "--disk-cache-gb",
        type=number_from(0),
        metavar="GB",
        help=f"disk space for long and repeated prompts, kept across restarts (default {DEFAULT_DISK_BYTES / GIB:g})",
    )
    group.add_argument(
        "--disk-cache-dir",
        type=Path,
        metavar="DIR",
        help=f"the disk cache's folder (default: prompt-cache in the user cache folder, or ${DIR_ENV})",
    )
    group.add_argument("--no-disk-cache", action="store_true", help=f"keep no prompts on disk (also ${OFF_ENV}=1)")


def default_disk_dir() -> Path:
    if os.environ.get(DIR_ENV):
        return Path(os.environ[DIR_ENV])
    import platformdirs

    return platformdirs.user_cache_path("mlx-oss") / "prompt-cache"


class MemoryPromptCache:
    """Caches of token prefixes, at most `budget` bytes in all; the least recently used go first.

    An entry whose tokens begin another entry's is dropped: the longer one serves every prompt it served.
    """

    def __init__(self, budget: int):
        self.budget = budget
        self._entries: OrderedDict[tuple[int, ...], Cache] = OrderedDict()
        self._sizes: dict[tuple[int, ...], int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def nbytes(self) -> int:
        return sum(self._sizes.values())

    def lookup(self, prompt: Sequence[int], limit: int) -> tuple[tuple[int, ...], Cache, int] | None:
        """The entry sharing the longest prefix with `prompt` (counted up to `limit` tokens): its tokens, its cache
        (copy it before extending) and that length; None when no entry shares a token. Marks it used."""
        best, best_shared = None, 0
        for tokens in self._entries:
            shared = min(common_prefix_length(tokens, prompt), limit)
            if shared > best_shared:
                best, best_shared = tokens, shared
        if best is None:
            return None
        self._entries.move_to_end(best)
        return best, self._entries[best], best_shared

    def put(self, tokens: Sequence[int], cache: Cache) -> bool:
        """Keep `cache` (which the caller no longer changes) for `tokens` (its positions); False when it alone
        exceeds the budget or another entry already begins with `tokens`."""
        tokens = tuple(tokens[: cache.length])
        size = cache.nbytes()
        if not tokens or size > self.budget:
            return False
        for other in list(self._entries):
            if other[: len(tokens)] == tokens and other != tokens:
                self._entries.move_to_end(other)
                return False
            if tokens[: len(other)] == other:
                self._drop(other)
        self._entries[tokens], self._sizes[tokens] = cache, size
        while self.nbytes() > self.budget:
            self._drop(next(iter(self._entries)))
        return True

    def _drop(self, tokens: tuple[int, ...]) -> None:
        del self._entries[tokens], self._sizes[tokens]
