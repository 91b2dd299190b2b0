"""What every command-line entry point shares: one clear line on error, never a traceback."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

from .errors import MlxOssError
from .memory_estimate import KV_BITS


def run(main: Callable[[], int | None], prog: str) -> None:
    """Run `main` and exit: 0 on success, 1 with one line for a user error, 130 on Ctrl-C."""
    try:
        code = main() or 0
    except MlxOssError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        code = 130
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prog}: error: {where}{e.strerror or e}", file=sys.stderr)
        code = 1
    except UnicodeError as e:  # text this terminal's encoding cannot hold, or bytes that are not text in it
        print(f"{prog}: error: {e}", file=sys.stderr)
        code = 1
    sys.exit(code)


class Progress:
    """A progress line on stderr for long work: bytes done of a total, redrawn at most every 1 %
    (on a terminal, in place; elsewhere one line every 10 %)."""

    def __init__(self, label: str, total: int, stream=None):
        self.label, self.total, self.done = label, max(total, 1), 0
        self.stream = stream or sys.stderr
        self._shown = -1

    def add(self, count: int) -> None:
        self.set(self.done + count)

    def set(self, done: int, note: str = "") -> None:
        """Show `done` bytes; `note` (a rate, a file name) follows the figures."""
        self.done = done
        percent = int(100 * self.done / self.total)
        if percent != self._shown:
            self._shown = percent
            end = "\n" if self.done >= self.total else ""
            lead = "\r" if self.stream.isatty() else ""
            if lead or percent % 10 == 0 or end:
                note = f", {note}" if note else ""
                line = f"{self.label}: {percent:3d}% ({format_bytes(self.done)} of {format_bytes(self.total)}{note})"
                self.stream.write(f"{lead}{line}\x1b[K{end}" if lead else f"{line}{end}")
                if not lead and not end:
                    self.stream.write("\n")
                self.stream.flush()


def format_bytes(n: int) -> str:
    """Bytes as people read them: 13.76 GB, 51.8 MB."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def format_count(n: int) -> str:
    """A parameter count as people say it: 20.9B, 52.3M."""
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


# -- argparse types: a value out of range is argparse's one-line error, before anything is loaded -----------------


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _real(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def port(text: str) -> int:
    """A TCP port to listen on, 1 to 65535."""
    value = _integer(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (1 to 65535)")
    return value


def positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def context_length(text: str) -> int | str:
    """`--context`: tokens (1 or more), or "auto" for the longest that fits in memory."""
    if text.strip().lower() == "auto":
        return "auto"
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a context length (1 or more tokens, or auto)")
    return value


def non_negative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is below 0")
    return value


def number_from(low: float, high: float = math.inf, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type for a finite number in [low, high] ((low, high] with `low_open`)."""

    def parse(text: str) -> float:
        value = _real(text)
        if value < low or (low_open and value == low) or value > high:
            rule = f"{'above' if low_open else 'at least'} {low:g}" + (
                f" and at most {high:g}" if high < math.inf else ""
            )
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {rule}")
        return value

    return parse


def add_kv_bits_argument(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """`--kv-bits 8`, as the chat, the server, the bench and `models info` take it."""
    parser.add_argument(
        "--kv-bits",
        type=int,
        choices=KV_BITS,
        help=help
        or "8: store the KV cache as 8-bit integers with per-position scales, a quarter of the memory, so longer "
        "contexts fit; 16: as float16 on the CPU, half the memory and faster decoding at long contexts "
        "(default: float32 on the CPU, the model's type with MLX)",
    )
