"""The stop-sequence filter: the same pieces as the plain definition (find every stop, hold back every prefix of
one), in time that grows with the text and not with the stops' length squared."""

from __future__ import annotations

import random
import time

from mlx_oss.stops import StopFilter


class PlainStopFilter:
    """The definition, as the server had it: each piece checks every prefix of every stop."""

    def __init__(self, stops: list[str]):
        self.stops, self.pending, self.stopped = stops, "", False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        hold = max((n for s in self.stops for n in range(1, len(s)) if self.pending.endswith(s[:n])), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def word(rng: random.Random, letters: str, shortest: int, longest: int) -> str:
    return "".join(rng.choice(letters) for _ in range(rng.randint(shortest, longest)))


def test_every_piece_is_what_the_plain_definition_gives():
    rng = random.Random(7)
    for trial in range(5000):
        letters = "ab" if trial % 2 else "abc"  # few letters: many overlaps and near misses
        stops = [word(rng, letters, 1, 6) for _ in range(rng.randint(0, 4))]
        pieces = [word(rng, letters, 0, 5) for _ in range(rng.randint(0, 12))]
        plain, fast = PlainStopFilter(stops), StopFilter(stops)
        for piece in pieces:
            assert fast.feed(piece) == plain.feed(piece), (stops, pieces)
            assert fast.stopped == plain.stopped and fast.pending == plain.pending
        assert fast.flush() == plain.flush()


def test_a_long_stop_costs_each_piece_little():
    """A piece costs about the same whatever the stop's length: timed against a one-character stop in the same
    moment, so a busy machine slows both alike (the plain filter, trying every prefix, was hundreds of times
    slower with the long one)."""

    def feed_all(stop: str) -> tuple[StopFilter, str, float]:
        started = time.perf_counter()
        stops = StopFilter([stop])
        shown = "".join(stops.feed("a") for _ in range(20_000))
        return stops, shown, time.perf_counter() - started

    fast, shown, elapsed = feed_all("a" * 999 + "b")  # every piece could begin it again
    _, _, baseline = feed_all("b")
    assert len(shown) == 20_000 - 999 and fast.pending == "a" * 999  # holds back only what could begin the stop
    assert fast.feed("b") == "" and fast.stopped
    assert elapsed < 10 * baseline
