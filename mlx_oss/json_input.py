"""JSON from outside (a checkpoint's headers and index, config.json, a request body), parsed so that no input
can raise anything but a clear error: invalid text, bad UTF-8 and nesting too deep for the parser all become
`JsonInputError`, which callers turn into their own error naming the file or request."""

from __future__ import annotations

import json
from typing import Any


class JsonInputError(ValueError):
    """Why a piece of JSON could not be read, in words fit for one line after the name of its source."""


def parse_json(data: bytes | str) -> Any:
    """`json.loads`, with every failure a `JsonInputError`.

    Nesting thousands of levels deep makes the parser recurse until Python refuses (RecursionError); a bare
    RecursionError would escape every `except ValueError` and end as a traceback or a 500. A number of more than
    4300 digits raises a plain ValueError, which callers catching only JsonInputError would miss.
    """
    try:
        if isinstance(data, bytes):
            data = data.decode("utf-8")
        return json.loads(data)
    except UnicodeDecodeError as e:
        raise JsonInputError(f"not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise JsonInputError(f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except RecursionError:
        raise JsonInputError("not valid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise JsonInputError(f"not valid JSON ({str(e).split(':')[0]})") from None  # without Python's advice
