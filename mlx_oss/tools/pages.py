"""Web pages as gpt-oss's browser shows them: text in numbered lines, links written `【id†text】`, and the citations
`【cursor†Lx-Ly】` the model writes back, turned into links for the front ends.

gpt-oss was trained on openai/gpt-oss's `simple_browser` (lxml + html2text), so the formats here follow it: a page is
`\\nURL: {url}\\n` then markdown-ish text (`# ` headings, `  * ` list items, blank lines between paragraphs, tables a
row a line, images `[Image N: alt]`), wrapped at 80 columns; a link is `【id†text】` on the page's own site and
`【id†text†domain】` elsewhere. The HTML is read with the standard library's `html.parser`: it tolerates broken HTML,
costs no dependency, and html2text is GPL-licensed (mlx-oss is Apache-2.0). Everything here is pure: no I/O.
"""

from __future__ import annotations

import html
import itertools
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from urllib.parse import quote, unquote, urljoin, urlsplit

WRAP_WIDTH = 80
MAX_URL_CHARS = 1024  # the reference's `maybe_truncate`
FIND_MAX_RESULTS, FIND_SHOW_LINES = 50, 4

# The reference's patterns: a whole link, a link cut at the start or the end of a piece of text, a citation.
LINK_PATTERN = re.compile(r"【\d+†(?P<content>[^†】]+)(?:†[^†】]+)?】")
PARTIAL_INITIAL_LINK_PATTERN = re.compile(r"^[^【】]*】")
PARTIAL_FINAL_LINK_PATTERN = re.compile(r"【\d*(?:†(?P<content>[^†】]*)(?:†[^†】]*)?)?$")
CITATION_PATTERN = re.compile(r"【(?P<cursor>\d+)†(?P<content>[^†】]+)(?:†[^†】]+)?】")

# Page text that could pass for a link or a citation is changed to look-alikes, as the reference does.
_LOOKALIKES = str.maketrans({"【": "〖", "】": "〗", "◼": "◾", "\u200b": None})

_SKIPPED = {"script", "style", "noscript", "template", "svg", "math", "iframe", "object", "canvas", "select"}
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
_PARAGRAPHS = {
    "p", "div", "section", "article", "header", "footer", "main", "aside", "nav", "form", "fieldset", "figure",
    "figcaption", "address", "details", "summary", "dl", "table", "blockquote", "center", "hgroup",
}  # fmt: skip
_LINES = {"tr", "dt", "dd", "caption", "option", "label", "legend"}
_HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}


class ToolUsageError(Exception):
    """A call the model got wrong (a bad cursor, link id or line): its message is what the model reads."""


@dataclass
class Page:
    """One page in the browser's history. `links` maps the ids shown as `【id†…】` to URLs. A find result page also has
    `line_of_link` (where each match is, so opening it scrolls there) and `source_url`, the page it searched, which
    its citations point at."""

    url: str
    title: str
    text: str
    links: dict[int, str] = field(default_factory=dict)
    line_of_link: dict[int, int] | None = None
    source_url: str | None = None
    _lines: list[str] | None = field(default=None, repr=False)

    @property
    def lines(self) -> list[str]:
        """The text wrapped at 80 columns, computed once (a big page takes a while)."""
        if self._lines is None:
            self._lines = wrap_lines(self.text)
        return self._lines

    @property
    def is_find_result(self) -> bool:
        return self.line_of_link is not None


def domain_of(url: str) -> str:
    """The host[:port] of a URL, as the reference's `get_domain`."""
    if "http" not in url:
        url = "http://" + url
    try:
        return urlsplit(url).netloc
    except ValueError:
        return ""


def merge_whitespace(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def maybe_truncate(text: str, num_chars: int = MAX_URL_CHARS) -> str:
    return text if len(text) <= num_chars else text[: num_chars - 3] + "..."


class _PageText(HTMLParser):
    """HTML to the reference's text: blocks separated by blank lines, links replaced by `【id†text】`."""

    def __init__(self, url: str):
        super().__init__(convert_charrefs=True)
        self.base = url
        self.domain = domain_of(url) if url else ""
        self.out: list[str] = []
        self.links: dict[int, str] = {}
        self._link_ids: dict[str, int] = {}
        self.title: str | None = None
        self._in_title = False
        self._title_parts: list[str] = []
        self._skip_depth = 0
        self._pre = 0
        self._lists: list[list] = []  # [tag, count] per open list
        self._break = 0  # newlines owed before the next text
        self._space = False  # a space owed before the next text
        self._prefix = ""  # a heading's or list item's mark, written before the next text
        self._anchor: list | None = None  # [href, text parts, images inside]
        self._images = 0

    # Writing.
    def _block(self, newlines: int) -> None:
        self._break = max(self._break, newlines)
        self._space = False

    def _write(self, text: str, lead_space: bool = False, trail_space: bool = False) -> None:
        if self._anchor is not None:
            self._anchor[1].append((" " if lead_space else "") + text + (" " if trail_space else ""))
            return
        if not text:
            self._space = self._space or lead_space or trail_space
            return
        if self.out and self._break:
            self.out.append("\n" * self._break)
        elif self.out and (self._space or lead_space) and not self.out[-1].endswith(("\n", " ")):
            self.out.append(" ")
        self._break = 0
        if self._prefix:
            self.out.append(self._prefix)
            self._prefix = ""
        self.out.append(text)
        self._space = trail_space

    # Parsing.
    def handle_starttag(self, tag, attrs):
        if tag in _SKIPPED:
            self._skip_depth += 1
            return
        if tag == "title":
            self._in_title = True
            return
        if self._skip_depth:
            return
        attrs = dict(attrs)
        if tag == "base" and attrs.get("href"):
            self.base = urljoin(self.base, attrs["href"])
        elif tag == "a" and self._anchor is None:
            self._anchor = [attrs.get("href"), [], []]
        elif tag == "img":
            self._image(attrs)
        elif tag == "br":
            if self._anchor is not None:
                self._anchor[1].append(" ")
            else:
                self._block(1)
        elif tag == "hr":
            self._block(2)
            self._write("* * *")
            self._block(2)
        elif tag in _HEADINGS:
            self._block(2)
            self._prefix = "#" * _HEADINGS[tag] + " "
        elif tag in ("ul", "ol"):
            self._block(1 if self._lists else 2)
            self._lists.append([tag, 0])
        elif tag == "li":
            self._block(1)
            if self._lists:
                kind = self._lists[-1]
                kind[1] += 1
                mark = "* " if kind[0] == "ul" else f"{kind[1]}. "
            else:
                mark = "* "
            self._prefix = "  " * max(len(self._lists), 1) + mark
        elif tag == "pre":
            self._block(2)
            self._pre += 1
        elif tag in ("td", "th"):
            self._space = True
        elif tag in _PARAGRAPHS:
            self._block(2)
        elif tag in _LINES:
            self._block(1)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in _VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag):
        if tag in _SKIPPED:
            self._skip_depth = max(self._skip_depth - 1, 0)
            return
        if tag == "title":
            self._in_title = False
            return
        if self._skip_depth:
            return
        if tag == "a" and self._anchor is not None:
            self._end_anchor()
        elif tag in _HEADINGS or tag in _PARAGRAPHS:
            self._block(2)
        elif tag in ("ul", "ol"):
            if self._lists:
                self._lists.pop()
            self._block(1 if self._lists else 2)
        elif tag == "pre":
            self._pre = max(self._pre - 1, 0)
            self._block(2)
        elif tag in _LINES or tag == "li":
            self._block(1)
        elif tag in ("td", "th"):
            self._space = True

    def handle_data(self, data):
        if self._in_title:
            self._title_parts.append(data)
            return
        if self._skip_depth:
            return
        data = data.translate(_LOOKALIKES)
        if self._pre and self._anchor is None:
            for i, line in enumerate(data.split("\n")):
                if i:
                    self._block(1)
                self._write(line.rstrip())
            return
        merged = merge_whitespace(data)
        text = merged.strip()
        self._write(text, lead_space=merged[:1] == " ", trail_space=merged[-1:] == " ")

    def _image(self, attrs: dict) -> None:
        name = attrs.get("alt") or attrs.get("title")
        text = f"[Image {self._images}: {merge_whitespace(name).strip()}]" if name else f"[Image {self._images}]"
        self._images += 1
        if self._anchor is not None:
            self._anchor[2].append(text)
        else:
            self._write(text, lead_space=True, trail_space=True)

    def _end_anchor(self) -> None:
        href, parts, images = self._anchor
        self._anchor = None
        raw = "".join(parts)
        text = merge_whitespace(raw).strip().replace("†", "‡")
        lead, trail = raw[:1].isspace(), raw[-1:].isspace()
        if not text:  # an image-only link: the image stays, the link goes, as in the reference
            self._write(" ".join(images), lead_space=True, trail_space=True)
            return
        url = self._link_url(href)
        if url is None:
            self._write(text, lead, trail)
            return
        link_id = self._link_ids.get(url)
        if link_id is None:
            link_id = self._link_ids[url] = len(self.links)
            self.links[link_id] = url
        domain = domain_of(url)
        shown = f"【{link_id}†{text}】" if domain == self.domain else f"【{link_id}†{text}†{domain}】"
        self._write(shown, lead, trail)

    def _link_url(self, href: str | None) -> str | None:
        if not href or href.startswith(("mailto:", "javascript:", "#", "tel:", "data:")):
            return None
        try:
            url = urljoin(self.base, href.strip())
        except ValueError:
            return None
        return url if domain_of(url) and urlsplit(url).scheme in ("http", "https") else None

    def result(self) -> tuple[str, str | None]:
        if self._anchor is not None:
            self._end_anchor()
        text = "".join(self.out)
        text = "\n".join(line.rstrip() for line in text.split("\n"))
        text = re.sub(r"\n(\s*\n)+", "\n\n", text).strip("\n")
        title = merge_whitespace("".join(self._title_parts)).strip().translate(_LOOKALIKES)
        return text, title or None


def html_to_page(document: str, url: str, title: str | None = None) -> Page:
    """A fetched HTML page as the model reads it: `\\nURL: {url}\\n` and the page's text with its links numbered.
    The title is `title`, else the page's `<title>`, else its domain."""
    parser = _PageText(url)
    parser.feed(document)
    parser.close()
    text, page_title = parser.result()
    final_title = title or page_title or (domain_of(url) if url else "")
    return Page(url=url, title=final_title, text=f"\nURL: {url}\n" + text, links=parser.links)


def text_to_page(document: str, url: str, title: str | None = None) -> Page:
    """A plain-text page (or a page's source, for `view_source`): its lines as they are."""
    text = document.replace("\r\n", "\n").translate(_LOOKALIKES)
    return Page(url=url, title=title or domain_of(url), text=f"\nURL: {url}\n" + text)


def title_of(document: str) -> str | None:
    """An HTML page's `<title>` without parsing the whole page (for `view_source`)."""
    match = re.search(r"<title[^>]*>(.*?)</title", document[:100_000], re.IGNORECASE | re.DOTALL)
    return merge_whitespace(html.unescape(match.group(1))).strip().translate(_LOOKALIKES) or None if match else None


@dataclass(frozen=True)
class SearchResult:
    title: str
    url: str
    snippet: str = ""


def search_results_page(query: str, results: list[SearchResult]) -> Page:
    """Search results as the reference's backends show them: a small HTML list turned into a page titled with the
    query and with no URL (so every link shows its domain)."""
    items = "".join(
        f"<li><a href='{html.escape(r.url, quote=True)}'>{html.escape(r.title)}</a> {html.escape(r.snippet)}</li>"
        for r in results
    )
    document = f"<html><body>\n<h1>Search Results</h1>\n<ul>\n{items}\n</ul>\n</body></html>"
    return html_to_page(document, url="", title=query)


def wrap_lines(text: str, width: int = WRAP_WIDTH) -> list[str]:
    """The page's lines, long ones wrapped at `width` with their whitespace kept (the reference's `wrap_lines`)."""
    return list(
        itertools.chain.from_iterable(
            # a short line without tabs is what textwrap would return, at a tenth of its cost
            [line]
            if len(line) <= width and "\t" not in line
            else textwrap.wrap(line, width=width, replace_whitespace=False, drop_whitespace=False) or [""]
            for line in text.split("\n")
        )
    )


def strip_links(text: str) -> str:
    """Links back to their text, also those cut at either end of `text` (what `find` searches)."""
    text = PARTIAL_INITIAL_LINK_PATTERN.sub("", text)
    text = PARTIAL_FINAL_LINK_PATTERN.sub(lambda m: m.group("content") or "", text)
    return LINK_PATTERN.sub(lambda m: m.group("content"), text)


def find_in_page(pattern: str, page: Page) -> Page:
    """The reference's `find`: a page of the lines matching `pattern` (case-insensitive, links as their text), each
    match a link `# 【i†match at Ln】` to the page at that line, 4 lines shown, 50 matches at most."""
    pattern = pattern.lower()
    lines = strip_links("\n".join(page.lines)).split("\n")
    chunks, line_of_link = [], {}
    index = 0
    while index < len(lines):
        if pattern not in lines[index].lower():
            index += 1
            continue
        match = len(chunks)
        snippet = "\n".join(lines[index : index + FIND_SHOW_LINES])
        chunks.append(f"# 【{match}†match at L{index}】\n{snippet}")
        line_of_link[match] = index
        if len(chunks) == FIND_MAX_RESULTS:
            break
        index += FIND_SHOW_LINES
    text = "\n\n".join(chunks) if chunks else f"No `find` results for pattern: `{pattern}`"
    return Page(
        url=f"{page.url}/find?pattern={quote(pattern)}",
        title=f"Find results for text: `{pattern}` in `{page.title}`",
        text=text,
        links=dict.fromkeys(line_of_link, page.url),
        line_of_link=line_of_link,
        source_url=page.source_url or page.url,
    )


def view_end(lines: list[str], loc: int, num_lines: int, view_tokens: int, count_tokens: Callable[[str], int]) -> int:
    """Where a view starting at `loc` ends (exclusive): `num_lines` lines if given, else as many numbered lines as
    fit in `view_tokens` tokens (at least one), as the reference's `get_end_loc`."""
    if num_lines > 0:
        return min(loc + num_lines, len(lines))
    used, end = 0, loc
    while end < len(lines):
        used += count_tokens(f"L{end}: {lines[end]}\n")
        if used > view_tokens and end > loc:
            break
        end += 1
    return end


def render_view(page: Page, cursor: int, loc: int, end: int) -> str:
    """The reference's display of lines [loc, end) of a page:
    `[cursor] title (url)\\n**viewing lines [loc - end-1] of last**\\n\\nL{loc}: ...`."""
    lines = page.lines
    header = page.title
    if page.url:
        header += f" ({maybe_truncate(unquote(page.url))})"
    header += f"\n**viewing lines [{loc} - {end - 1}] of {len(lines) - 1}**\n\n"
    body = "\n".join(f"L{i}: {lines[i]}" for i in range(loc, end))
    return f"[{cursor}] {header}{body}"


def check_loc(page: Page, loc: int) -> None:
    if loc >= len(page.lines):
        raise ToolUsageError(
            f"Invalid location parameter: `{loc}`. Cannot exceed page maximum of {len(page.lines) - 1}."
        )


# Citations, for the front ends.


def link_citations(text: str, citations) -> list[tuple[str, str | None]]:
    """`text` (the model's answer) cut into spans for a front end: plain text as `(text, None)`, and each citation
    `【3†L10-L15】` whose cursor is among `citations` (the `Citation`s of the conversation's browser calls) as
    `(label, url)`, the label being the page's domain (the reference shows `([domain](url))`). A citation of an
    unknown cursor stays text. Adjacent text spans are merged; joining every span's text gives the shown answer."""
    by_cursor = {c.cursor: c for c in citations}
    spans: list[tuple[str, str | None]] = []

    def add(piece: str, url: str | None) -> None:
        if not piece:
            return
        if url is None and spans and spans[-1][1] is None:
            spans[-1] = (spans[-1][0] + piece, None)
        else:
            spans.append((piece, url))

    last = 0
    for match in CITATION_PATTERN.finditer(text):
        citation = by_cursor.get(int(match.group("cursor")))
        if citation is None or not citation.url:
            continue
        add(text[last : match.start()], None)
        add(domain_of(citation.url) or citation.url, citation.url)
        last = match.end()
    add(text[last:], None)
    return spans


def citations_as_markdown(text: str, citations) -> str:
    """The answer with each known citation as ` ([domain](url)) `, as the reference's `normalize_citations` writes
    it: for front ends that show markdown (the terminal, the server's plain text)."""
    return "".join(f" ([{piece}]({url})) " if url else piece for piece, url in link_citations(text, citations))


def unfinished_citation(text: str) -> int | None:
    """Where a citation still being written ends `text` (`…【3†L1`), so a streaming front end can hold it back until
    it is whole; None when the text ends in no unfinished one."""
    match = PARTIAL_FINAL_LINK_PATTERN.search(text)
    return match.start() if match else None
