"""What rendering a request's conversation may cost, checked before it is rendered.

openai-harmony tokenizes while holding the interpreter lock, in time that grows with the square of the longest
piece its tokenizer splits text into before merging (a run of letters, of punctuation or of spaces): 200,000
'a's took 15 s, 1,000,000 overflowed its stack (a PanicException, which is no Exception). The server renders on
a worker thread, but while the lock is held every other request waits. So a text with such a run is refused,
and a conversation with much text is counted in small pieces first (the lock is free between them): one far
longer than the context is refused without tokenizing it whole (16 MB took 2.9 s in one piece).
"""

from __future__ import annotations

import functools
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
_SYMBOL = rf"(?:[^\w{_SPACE}]|_)"  # marks are no \w: they are here too
# Other text: Python's re has no \p{M}, so letters and marks are taken as any run without whitespace, a digit
# or common punctuation (ASCII, general, CJK and fullwidth: none of it letters or marks).
_PUNCTUATION = (
    "!-/:-@\\[-`{-~\u2010-\u2027\u2030-\u205e\u3001-\u3004\u3008-\u3020"
    "\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65"
)
_LETTER = rf"[^\d{_SPACE}{_PUNCTUATION}]"


@functools.cache
def _long_run(letters: int, symbols: int, spaces: int) -> re.Pattern:
    """Where a text has a run longer than allowed. Each run is tried from its first character only (the
    lookbehind), so the search is linear in the text."""
    return re.compile(
        rf"(?<!{_LETTER}){_LETTER}{{{letters + 1}}}|(?<!{_SYMBOL}){_SYMBOL}{{{symbols + 1}}}"
        rf"|(?<!\s)\s{{{spaces + 1}}}|(?<![\r\n/])[\r\n/]{{{spaces + 1}}}"
    )


def has_long_run(text: str, letters: int = MAX_LETTERS, symbols: int = MAX_SYMBOLS, spaces: int = MAX_SPACES) -> bool:
    """Whether `text` has more than `letters` letters, `symbols` symbols or `spaces` spaces in a row (more than
    the tokenizer should take as one piece)."""
    if text.isascii():  # the common case, 10 times faster: a byte per character class, then plain searches
        data = text.encode("ascii")
        kinds = data.translate(_ASCII_KINDS)
        if any(kind * (limit + 1) in kinds for kind, limit in ((b"a", letters), (b"p", symbols), (b"s", spaces))):
            return True
        return b"t" * (spaces + 1) in data.translate(_ASCII_TAILS)
    return _long_run(letters, symbols, spaces).search(text) is not None


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
            if has_long_run(text[max(0, start - overlap) : start + PIECE]):
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
