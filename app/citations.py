"""Browser citations in an answer (`【3†L10-L15】`: cursor 3, lines 10 to 15) as Markdown links to the cited page.

The model cites a page by the cursor the browser gave it when the page was opened; the tool's outputs say which
page each cursor is (`Citation`). A cursor no call of the conversation opened stays as the model wrote it.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from mlx_oss.tools import Citation

CITATION = re.compile(r"【(\d+)†([^】\n]{0,40})】")
LINKABLE = ("http", "https")


def linkable(url: str) -> bool:
    """Only web pages are opened from an answer (never a file: or javascript: link a page could smuggle in)."""
    return urlsplit(url).scheme.lower() in LINKABLE


def _escape(text: str) -> str:
    return re.sub(r"([\\[\]*_`<>])", r"\\\1", text)


def _url(url: str) -> str:
    return url.replace(" ", "%20").replace("(", "%28").replace(")", "%29").replace("<", "%3C").replace(">", "%3E")


def link_citations(markdown: str, citations: dict[int, Citation]) -> str:
    """`markdown` with each citation of a known page replaced by a link named after the page's site."""

    def link(match: re.Match) -> str:
        cited = citations.get(int(match.group(1)))
        if cited is None or not linkable(cited.url):
            return match.group(0)
        site = urlsplit(cited.url).hostname or cited.url
        where = f" {match.group(2)}" if match.group(2).startswith("L") else ""
        return f"[【{_escape(site)}{_escape(where)}】]({_url(cited.url)})"

    return CITATION.sub(link, markdown)
