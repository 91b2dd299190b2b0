"""What rendering a request's conversation may cost, checked before it is rendered.

openai-harmony tokenizes while holding the interpreter lock, in time that grows with the square of the longest
piece its tokenizer splits text into before merging (a run of letters, of punctuation or of spaces), and a run
of a million overflows its stack (a PanicException, which is no Exception). The server renders on a worker
thread, but while the lock is held every other request waits. So a text with such a run is refused, and a
conversation with much text is counted in small pieces first (the lock is free between them): one far longer
than the context is refused without tokenizing it whole, which alone would hold the lock for seconds.
"""

from __future__ import annotations

import functools
import json
import re

from .api.fields import ApiError, context_exceeded
from .harmony import Conversation, encode_text

SHORTEST_COSTLY_RUN = 256  # characters in a row below which a run costs the tokenizer microseconds
MAX_RUN = 20_000  # characters of one run (its time goes with the square of its length, whatever its characters)
RUN_BUDGET = 2 * 10**9  # squared lengths of a request's costly runs, summed: five runs of MAX_RUN
COUNT_ABOVE = 2**16  # characters in all above which the conversation is counted before it is rendered
PIECE = 2**14  # characters counted in one call to the tokenizer
CUT_SLACK = 16  # tokens a cut between two pieces may save or cost

# The tokenizer splits text into pieces before it merges them: runs of letters and marks, runs of anything but
# whitespace, letters and numbers, runs of whitespace, each with a character before and a few after. Each class
# below holds at least the tokenizer's, so that no run it would take whole is split here.
_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"  # Unicode White_Space:
# the tokenizer's \s (Python's also takes \x1c-\x1f, which the tokenizer joins to punctuation)
_ASCII_KINDS = bytes(
    ord("a")
    if chr(b).isalpha()
    else ord("d")
    if chr(b).isdigit()
    else ord("s")
    if chr(b) in "\t\n\x0b\x0c\r "
    else ord("p")
    for b in range(128)
).ljust(256, b"p")
_ASCII_TAILS = bytes(ord("t") if chr(b) in "\r\n/" else ord(".") for b in range(256))  # what may end a symbol run
_SYMBOL = rf"(?:[^\w{_SPACE}]|_)"  # marks are no \w: they are here too
# Other text: Python's re has no \p{M}, so letters and marks are taken as any run without whitespace, a digit
# or common punctuation (ASCII, general, CJK and fullwidth: none of it letters or marks).
_PUNCTUATION = (
    "!-/:-@\\[-`{-~\u2010-\u2027\u2030-\u205e\u3001-\u3004\u3008-\u3020"
    "\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65"
)
_LETTER = rf"[^\d{_SPACE}{_PUNCTUATION}]"


@functools.cache
def _runs(shortest: int) -> tuple[re.Pattern, re.Pattern, re.Pattern]:
    """Runs of at least `shortest` characters of one kind: in ASCII text translated to one byte a kind (and to
    the characters that may end a symbol run), and in other text."""
    return (
        re.compile(rb"a{%d,}|p{%d,}|s{%d,}" % (shortest, shortest, shortest)),
        re.compile(rb"t{%d,}" % shortest),
        re.compile(rf"{_LETTER}{{{shortest},}}|{_SYMBOL}{{{shortest},}}|\s{{{shortest},}}|[\r\n/]{{{shortest},}}"),
    )


def costly_runs(text: str, shortest: int = SHORTEST_COSTLY_RUN) -> list[tuple[int, int]]:
    """(start, end) of each run of `shortest` or more letters, symbols or spaces in `text`: the pieces the
    tokenizer takes whole, in time that grows with the square of their length. Linear in the text."""
    kinds, tails, other = _runs(shortest)
    if text.isascii():  # the common case: a byte per character class, then plain searches (no Unicode classes)
        data = text.encode("ascii")
        found = [m.span() for m in kinds.finditer(data.translate(_ASCII_KINDS))]
        return found + [m.span() for m in tails.finditer(data.translate(_ASCII_TAILS))]
    return [m.span() for m in other.finditer(text)]


def longest_run(text: str) -> int:
    """The length of the longest costly run in `text` (0 if it has none)."""
    return max((end - start for start, end in costly_runs(text)), default=0)


def texts(conversation: Conversation) -> list[str]:
    """Every text of the conversation the tokenizer will read."""
    found = [m.content for m in conversation.messages]
    if conversation.instructions:
        found.append(conversation.instructions)
    for tool in conversation.tools:
        found.append(tool.description)
        if tool.parameters:
            found.append(json.dumps(tool.parameters, ensure_ascii=False))
    return found


def check_render_cost(conversation: Conversation, context_length: int) -> None:
    """Refuse (400) a conversation whose rendering would hold the lock long: runs the tokenizer takes quadratic
    time over (one over MAX_RUN, or so many long ones that their squares pass RUN_BUDGET), or far more text than
    the context holds. Texts are read PIECE characters at a time, so that this check itself never holds the lock
    long either; a run that reaches the end of a piece is continued by one that starts the next."""
    found = texts(conversation)
    count = sum(map(len, found)) > COUNT_ABOVE
    counted = cost = 0
    for text in found:
        carried = 0  # length of the run that reached the end of the last piece
        for start in range(0, len(text), PIECE):
            piece = text[start : start + PIECE]
            reaching_end = 0
            for begin, end in sorted(costly_runs(piece)):
                before = carried if begin == 0 else 0
                length = end - begin + before
                cost += length**2 - before**2
                if length > MAX_RUN or cost > RUN_BUDGET:
                    raise ApiError(
                        400,
                        "the request has long runs of characters without a break, over which the tokenizer would "
                        f"take seconds: at most {MAX_RUN} letters, symbols or spaces in a row are taken, and only a "
                        "few runs of thousands; break them up",
                    )
                if end == len(piece):
                    reaching_end = max(reaching_end, length)
            carried = reaching_end
            if count:
                counted += len(encode_text(piece)) - CUT_SLACK
                if counted >= context_length:
                    raise context_exceeded(context_length, f"longer (more than {counted} tokens)")
