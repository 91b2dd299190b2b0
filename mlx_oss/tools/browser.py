"""gpt-oss's `browser` tool: `browser.search`, `browser.open`, `browser.find`, with pages kept by cursor.

The model was trained on openai/gpt-oss's `SimpleBrowserTool`, so calls take its arguments (`search(query, topn)`,
`open(id, cursor, loc, num_lines, view_source)`, `find(pattern, cursor)`), and every result is its display: the
page's cursor, title and URL, `**viewing lines [a - b] of N**`, then `L{i}: ` lines, links `【id†text】`. Each call
shows a page and pushes it on the conversation's stack: its index is the cursor the model cites as
`【cursor†Lx-Ly】`; `ToolOutput.citations` says which URL that cursor is, so front ends can link it
(`pages.link_citations`). Errors (a bad cursor, a page that will not load, being offline) are the output the model
reads, in the reference's words, never an exception. Fetching and searching are in `search.py`, page text in
`pages.py`.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
from collections.abc import Callable

from ..cancel import CancelToken
from . import BROWSER, Citation, ToolOutput, ToolSettings
from .pages import (
    Page,
    ToolUsageError,
    check_loc,
    domain_of,
    find_in_page,
    html_to_page,
    maybe_truncate,
    render_view,
    search_results_page,
    text_to_page,
    title_of,
    view_end,
)
from .search import FetchError, FetchLimits, backend_problem, fetch, search_page_url, with_scheme
from .search import search as search_web

log = logging.getLogger("mlx_oss.tools.browser")

VIEW_TOKENS = 1024  # a view without num_lines shows about this many tokens, as the reference's view_tokens
MAX_SEARCH_RESULTS = 20
MAX_VIEW_LINES = 300  # num_lines beyond this shows this many (~6k tokens; the scrollbar line says where it ended)
VIEW_SOURCE_PREFIX = "view-source:"
FUNCTIONS = ("search", "open", "find")


@functools.cache
def _harmony_token_count() -> Callable[[str], int]:
    """The model's own tokenizer when it loads (it is loaded anyway when the model runs), else ~4 characters a
    token: only where a view ends depends on it."""
    try:
        from ..harmony import encode_text

        encode_text("warm up")
        return lambda text: len(encode_text(text))
    except Exception as e:  # no vocabulary here: the estimate is close enough for a viewport
        log.info("browser views count ~4 characters a token (%s)", e)
        return approximate_tokens


def approximate_tokens(text: str) -> int:
    return len(text) // 4 + 1


class BrowserTool:
    """One conversation's browser: its pages by cursor. `limits` bound every fetch (tests make them small)."""

    name = BROWSER

    def __init__(
        self,
        settings: ToolSettings,
        limits: FetchLimits | None = None,
        view_tokens: int = VIEW_TOKENS,
        count_tokens: Callable[[str], int] | None = None,
    ):
        self.settings = settings
        self.limits = limits or FetchLimits()
        self.view_tokens = view_tokens
        self._count_tokens = count_tokens
        self.pages: list[Page] = []  # by cursor
        self._by_url: dict[str, Page] = {}

    # -- the BuiltinTool contract -------------------------------------------------------------------------------------

    def unavailable(self) -> str | None:
        problem = backend_problem(self.settings.search_backend, self.settings.search_url)
        if problem:
            return problem
        try:
            import httpx  # noqa: F401
        except ImportError:
            return "the browser tool needs httpx: pip install httpx"
        return None

    def run(self, recipient: str, content: str, cancel: CancelToken) -> ToolOutput:
        namespace, _, function = recipient.partition(".")
        if namespace != BROWSER or function not in FUNCTIONS:
            return _error(json.dumps({"error": f"Unknown function: {function or recipient}"}))
        arguments = _arguments(content)
        if arguments is None:
            return _error(json.dumps({"error": "Invalid function arguments"}))
        if cancel.cancelled:
            return _error("cancelled")
        method = getattr(self, function)
        try:
            inspect.signature(method).bind(cancel=cancel, **arguments)
        except TypeError as e:  # an argument the function does not take, or none it needs
            return _error(f"Invalid arguments for `{function}`: {e}")
        try:
            return method(cancel=cancel, **arguments)
        except (ToolUsageError, FetchError) as e:
            return _error(str(e))

    def close(self) -> None:
        """Nothing runs between calls; the pages are dropped."""
        self.pages.clear()
        self._by_url.clear()

    def citations(self) -> tuple[Citation, ...]:
        """Every cursor of this conversation so far, for a front end that links a whole answer at once."""
        return tuple(_citation(cursor, page) for cursor, page in enumerate(self.pages))

    # -- the functions the model calls --------------------------------------------------------------------------------

    def search(self, query: str, topn: int = 10, top_n: int | None = None, source: str | None = None, *, cancel):
        """Search results as a page (links `【i†title†domain】`); `topn` results, at most 20."""
        wanted = _integer(top_n if top_n is not None else topn, "topn")
        wanted = max(1, min(wanted, MAX_SEARCH_RESULTS))
        settings = self.settings
        try:
            results = search_web(
                settings.search_backend,
                settings.search_url,
                str(query),
                wanted,
                self.limits,
                settings.allowed_hosts,
                cancel,
            )
        except FetchError as e:
            raise FetchError(f"Error during search for `{query}`: {maybe_truncate(str(e))}") from e
        page = search_results_page(str(query), results)
        page.source_url = search_page_url(settings.search_backend, settings.search_url, str(query))
        return self._show_new(page, loc=0, num_lines=-1)

    def open(
        self,
        id: int | str = -1,  # noqa: A002 (the model's name for it)
        cursor: int = -1,
        loc: int = -1,
        num_lines: int = -1,
        view_source: bool = False,
        source: str | None = None,
        *,
        cancel,
    ):
        """A URL (`id` a string), a link `id` of the page at `cursor`, or (no `id`) the page at `cursor` from `loc`."""
        if isinstance(id, str) and id.strip().lstrip("-").isdigit():
            id = int(id)  # noqa: A001 (a link id written as a string)
        loc, num_lines = _integer(loc, "loc"), _integer(num_lines, "num_lines")
        start_line: int | None = None
        if isinstance(id, str):
            url, direct = with_scheme(id), True
            stay = False
        else:
            id = _integer(id, "id")  # noqa: A001
            page = self._page(cursor)
            direct = False
            if id >= 0:
                url = page.links.get(id)
                if url is None:
                    raise ToolUsageError(f"Invalid link id `{id}`.")
                if page.line_of_link is not None:  # a find result: open the page at the match
                    start_line = page.line_of_link.get(id)
                stay = False
            else:
                url, stay = page.url, not view_source
        if view_source:
            url, stay, start_line = VIEW_SOURCE_PREFIX + url.removeprefix(VIEW_SOURCE_PREFIX), False, None
        new_page = self.pages[self._cursor(cursor)] if stay else self._load(url, direct, cancel)
        if loc < 0:
            loc = 0 if start_line is None else (start_line - 4 if start_line > 4 else start_line)
        return self._show_new(new_page, loc, num_lines)

    def find(self, pattern: str, cursor: int = -1, *, cancel):
        """The lines of the page at `cursor` containing `pattern` (case-insensitive), as a page of matches."""
        page = self._page(cursor)
        if page.is_find_result:
            raise ToolUsageError("Cannot run `find` on search results page or find results page")
        return self._show_new(find_in_page(str(pattern), page), loc=0, num_lines=-1)

    # -- pages --------------------------------------------------------------------------------------------------------

    def _cursor(self, cursor) -> int:
        """The reference's rules: -1 (or none) is the latest page; else an index into the stack."""
        if not self.pages:
            raise ToolUsageError("No pages to access!")
        if isinstance(cursor, bool) or not isinstance(cursor, int | float | str):
            raise ToolUsageError(f"`cursor` should be an integer, not `{type(cursor).__name__}`")
        cursor = _integer(cursor, "cursor")
        if cursor == -1:
            return len(self.pages) - 1
        if not 0 <= cursor < len(self.pages):
            raise ToolUsageError(
                f"Cursor `{cursor}` is out of range. Available cursor indices: [0 - {len(self.pages) - 1}]."
            )
        return cursor

    def _page(self, cursor) -> Page:
        return self.pages[self._cursor(cursor)]

    def _load(self, url: str, direct: bool, cancel: CancelToken) -> Page:
        """A page by URL: fetched, or (a link followed again) the one already read; a URL the model wrote is
        fetched afresh, as the reference treats it as a refresh."""
        if not direct and url in self._by_url:
            return self._by_url[url]
        view_source = url.startswith(VIEW_SOURCE_PREFIX)
        target = url.removeprefix(VIEW_SOURCE_PREFIX)
        try:
            fetched = fetch(target, self.limits, self.settings.allowed_hosts, cancel)
        except FetchError as e:
            message = f"Error fetching URL `{maybe_truncate(target)}`: {maybe_truncate(str(e))}"
            raise FetchError(message, refused=e.refused) from e
        if view_source:
            title = title_of(fetched.text) if fetched.html else None
            page = text_to_page(fetched.text, VIEW_SOURCE_PREFIX + fetched.url, title or domain_of(fetched.url))
        elif fetched.html:
            page = html_to_page(fetched.text, fetched.url)
        else:
            page = text_to_page(fetched.text, fetched.url)
        if fetched.cut:
            megabytes = self.limits.max_bytes / 1e6
            page.text += f"\n\n[The page is longer than {megabytes:g} MB; only its first {megabytes:g} MB were read.]"
            page._lines = None
        self._by_url[url] = self._by_url[page.url] = page
        return page

    def _show_new(self, page: Page, loc: int, num_lines: int) -> ToolOutput:
        """Pushes `page` as a new cursor and shows it from `loc`; a bad `loc` pops it again (the reference's
        `show_page_safely`)."""
        self.pages.append(page)
        cursor = len(self.pages) - 1
        try:
            check_loc(page, loc)
        except ToolUsageError:
            self.pages.pop()
            raise
        count = self._count_tokens or _harmony_token_count()
        wanted = min(num_lines, MAX_VIEW_LINES) if num_lines > 0 else -1
        end = view_end(page.lines, loc, wanted, self.view_tokens, count)
        text = render_view(page, cursor, loc, end)
        return ToolOutput(text=text, display=text, citations=(_citation(cursor, page),))


def _citation(cursor: int, page: Page) -> Citation:
    """What `【cursor†…】` links to: the page itself (a find result: the page searched; search results: the search)."""
    url = (page.source_url or page.url).removeprefix(VIEW_SOURCE_PREFIX)
    return Citation(cursor=cursor, url=url, title=page.title)


def _arguments(content: str) -> dict | None:
    """The call's JSON object (empty content is no arguments), or None when it is not one."""
    if not content.strip():
        return {}
    try:
        parsed = json.loads(content)
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _integer(value, name: str) -> int:
    """JSON numbers come as floats too (`"loc": 10.0`); anything but a whole number is the model's mistake."""
    if isinstance(value, bool):
        raise ToolUsageError(f"`{name}` should be an integer, not `bool`")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ToolUsageError(f"`{name}` should be an integer, not `{type(value).__name__}`")


def _error(text: str) -> ToolOutput:
    return ToolOutput(text=text, display=text, error=True)
