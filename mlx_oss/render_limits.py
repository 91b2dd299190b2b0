"""What rendering a request's conversation may cost, checked before it is rendered.

openai-harmony tokenizes while holding the interpreter lock, in time that grows with the square of the longest
piece its tokenizer splits text into before merging (a run of letters, of punctuation or of spaces): 200,000
'a's took 15 s, 1,000,000 overflowed its stack (a PanicException, which is no Exception). The server renders on
a worker thread, but while the lock is held every other request waits. So a text with such a run is refused,
and a conversation with much text is counted in small pieces first (the lock is free between them): one far
longer than the context is refused without tokenizing it whole (16 MB took 2.9 s in one piece).
"""

from __future__ import annotations

import json
import re

from .api_fields import ApiError
from .harmony import Conversation, encode_text

MAX_LETTERS = 2000  # letters (and marks) in a row: 2000 'a's take 2 ms, 250 tokens
MAX_SYMBOLS = 256  # punctuation and symbols in a row ('-' * 2000 took as long for 31 tokens)
MAX_SPACES = 256  # whitespace in a row (1000 spaces: 1 ms for 9 tokens)
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
_ASCII_LONG = (b"a" * (MAX_LETTERS + 1), b"p" * (MAX_SYMBOLS + 1), b"s" * (MAX_SPACES + 1))
_SYMBOL = rf"(?:[^\w{_SPACE}]|_)"  # marks are no \w: they are here too
# Other text: Python's re has no \p{M}, so letters and marks are taken as any run without whitespace, a digit
# or common punctuation (ASCII, general, CJK and fullwidth: none of it letters or marks).
# Each run is tried from its first character only (the lookbehind), so the search is linear in the text.
_PUNCTUATION = (
    "!-/:-@\\[-`{-~\u2010-\u2027\u2030-\u205e\u3001-\u3004\u3008-\u3020"
    "\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65"
)
_LETTER = rf"[^\d{_SPACE}{_PUNCTUATION}]"
_LONG_RUN = re.compile(
    rf"(?<!{_LETTER}){_LETTER}{{{MAX_LETTERS + 1}}}|(?<!{_SYMBOL}){_SYMBOL}{{{MAX_SYMBOLS + 1}}}"
    rf"|(?<!\s)\s{{{MAX_SPACES + 1}}}|(?<![\r\n/])[\r\n/]{{{MAX_SPACES + 1}}}"
)


def _has_long_run(text: str) -> bool:
    if text.isascii():  # the common case, 10 times faster: a byte per character class, then plain searches
        data = text.encode("ascii")
        kinds = data.translate(_ASCII_KINDS)
        return any(run in kinds for run in _ASCII_LONG) or b"t" * (MAX_SPACES + 1) in data.translate(_ASCII_TAILS)
    return _LONG_RUN.search(text) is not None


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
    """Refuse (400) a conversation whose rendering would hold the lock long: a run the tokenizer takes
    quadratic time over, or far more text than the context holds. Texts are read PIECE characters at a time,
    so that this check itself never holds the lock long either."""
    found = texts(conversation)
    count = sum(map(len, found)) > COUNT_ABOVE
    counted = 0
    overlap = (
        max(MAX_LETTERS, MAX_SYMBOLS, MAX_SPACES) + 1
    )  # a run that crosses into the next piece is seen whole there
    for text in found:
        for start in range(0, len(text), PIECE):
            if _has_long_run(text[max(0, start - overlap) : start + PIECE]):
                raise ApiError(
                    400,
                    "the request has a long run of characters without a break, over which the tokenizer would take "
                    f"seconds: at most {MAX_LETTERS} letters, {MAX_SYMBOLS} symbols or {MAX_SPACES} spaces in a row "
                    "are taken",
                )
            if count:
                counted += len(encode_text(text[start : start + PIECE])) - CUT_SLACK
                if counted >= context_length:
                    raise ApiError(
                        400,
                        f"This model's context holds {context_length} tokens, but the conversation is longer "
                        f"(more than {counted} tokens); shorten it",
                        "messages",
                        "context_length_exceeded",
                    )
