"""Stop sequences: the answer ends just before the first one, and nothing of it is streamed meanwhile.

The filter runs on the server's event loop for every piece of every answer, so its work must grow with the
text, not with the text times the length of the stops: each stop keeps a KMP automaton state (the longest end
of the text so far that begins the stop), so every new character costs one step per stop, and only as many
characters are held back as could still turn into a stop.
"""

from __future__ import annotations


def _fallbacks(stop: str) -> list[int]:
    """KMP's table: for each prefix stop[:i + 1], the length of its longest proper prefix that is also its end."""
    table = [0] * len(stop)
    k = 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = table[k - 1]
        if stop[i] == stop[k]:
            k += 1
        table[i] = k
    return table


class StopFilter:
    """Ends the answer at the first stop sequence; holds back a possible beginning of one until it is decided."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._tables = [_fallbacks(s) for s in self.stops]
        self._matched = [0] * len(self.stops)  # per stop: how much of it the text so far ends with
        self.pending = ""  # held back: the longest end of the text that begins a stop
        self.stopped = False

    def feed(self, text: str) -> str:
        """What of `text` (with what was held back) can be shown now."""
        if self.stopped:
            return ""
        base = len(self.pending)
        self.pending += text
        first = None  # where the earliest stop found in this piece begins, in `pending`
        for k, (stop, table) in enumerate(zip(self.stops, self._tables, strict=True)):
            matched = self._matched[k]
            for i, c in enumerate(text):
                while matched and stop[matched] != c:
                    matched = table[matched - 1]
                if stop[matched] == c:
                    matched += 1
                if matched == len(stop):
                    start = base + i + 1 - matched
                    first = start if first is None else min(first, start)
                    break
            self._matched[k] = matched
        if first is not None:
            self.stopped = True
            out, self.pending = self.pending[:first], ""
            return out
        cut = len(self.pending) - max(self._matched, default=0)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        """The end of the answer: what was held back was no stop after all."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
