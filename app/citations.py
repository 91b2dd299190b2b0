"""Browser citations in an answer (`【3†L10-L15】`: cursor 3, lines 10 to 15) as Markdown links to the cited page.

Where the citations are is the tools' rule (`pages.link_citations`, shared with the terminal and the server); what
is here is the app's side: Markdown a label can show safely, and only web pages made links. A cursor no call of the
conversation opened stays as the model wrote it.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from mlx_oss.tools import Citation
from mlx_oss.tools.pages import link_citations as citation_spans

LINKABLE = ("http", "https")


def linkable(url: str) -> bool:
    """Only web pages are opened from an answer (never a file: or javascript: link a page could smuggle in)."""
    return urlsplit(url).scheme.lower() in LINKABLE


def _escape(text: str) -> str:
    return re.sub(r"([\\[\]*_`<>])", r"\\\1", text)


def _url(url: str) -> str:
    return url.replace(" ", "%20").replace("(", "%28").replace(")", "%29").replace("<", "%3C").replace(">", "%3E")


def link_citations(markdown: str, citations: dict[int, Citation]) -> str:
    """`markdown` with each citation of a known web page replaced by ` ([site](url)) `, as the reference does."""
    pages = [c for c in citations.values() if linkable(c.url)]
    parts = []
    for piece, url in citation_spans(markdown, pages):
        if url is None:
            parts.append(piece)
        else:  # no space left before the punctuation that follows a citation
            parts.append(f" ([{_escape(piece)}]({_url(url)}))")
            parts.append(" ")
    text = "".join(parts)
    return re.sub(r"\)\) +([.,;:!?)])", r"))\1", text)
