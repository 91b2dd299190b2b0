"""The browser's reach into the web: fetching a page within limits, and the search backends.

A model-chosen URL is untrusted: a page (or a prompt injected into one) can send the browser to the user's router,
a cloud metadata address or a service on 127.0.0.1. So every hop is checked, redirects included (they are followed
here, one at a time): only http and https; and the address actually connected to must be public, unless the user
named the host in `allowed_hosts`. The check runs where the socket is opened (a guarded httpcore network backend),
on the addresses the name resolved to, so a name that resolves to a private address, or resolves differently the
second time (DNS rebinding), is refused too. Proxies from the environment are not used: they would connect for us.

Backends: `duckduckgo` (its HTML endpoint, no key) and `searxng` (a self-hosted SearXNG's JSON API at
`search_url`). The host of a configured `search_url` is allowed for searching, since the user chose it.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
import socket
import time
from dataclasses import dataclass
from html.parser import HTMLParser
from urllib.parse import parse_qs, urlencode, urlsplit

from ..cancel import CancelToken
from .pages import SearchResult, merge_whitespace

DUCKDUCKGO_URL = "https://html.duckduckgo.com/html/"
BACKENDS = ("duckduckgo", "searxng")
USER_AGENT = "Mozilla/5.0 (compatible; mlx-oss browser)"
HTML_TYPES = ("text/html", "application/xhtml+xml")
TEXT_TYPES = ("text/plain",)


@dataclass(frozen=True)
class FetchLimits:
    """How much a fetch may take: bytes kept (the rest is cut), seconds to connect, between reads, and in all."""

    max_bytes: int = 5_000_000
    connect_s: float = 10.0
    read_s: float = 15.0
    total_s: float = 30.0
    max_redirects: int = 5


class FetchError(Exception):
    """Why a page could not be had, in words for the model. `refused`: the URL is not allowed (scheme, address);
    otherwise the page is unavailable (offline, timeout, HTTP error) or unreadable (its type)."""

    def __init__(self, message: str, refused: bool = False):
        super().__init__(message)
        self.refused = refused


class _Refused(Exception):
    """Raised inside the connection when an address is not allowed (not an httpcore error, so httpx passes it)."""


@dataclass(frozen=True)
class Fetched:
    url: str  # after redirects
    html: bool  # HTML, else plain text
    text: str
    cut: bool  # longer than `max_bytes`, cut there


def address_allowed(address: str) -> bool:
    """Only public addresses: not loopback, private, link-local, shared (CGNAT), multicast, reserved or unspecified;
    an IPv4 address written as IPv6 (`::ffff:127.0.0.1`) is judged as IPv4."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def host_allowed_by_user(host: str, allowed_hosts) -> bool:
    host = host.lower().strip("[]").rstrip(".")
    return any(host == h.lower().strip("[]").rstrip(".") for h in allowed_hosts)


def with_scheme(url: str) -> str:
    """`example.com/page` (or `localhost:8080`) as `https://…`: models often leave the scheme out. A URL with a
    scheme keeps it, to be judged by `check_url`."""
    url = url.strip()
    if "://" in url or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:(?!\d)", url):
        return url
    return "https://" + url


def check_url(url: str, allowed_hosts=()) -> str:
    """The URL if it may be fetched as far as its text tells (scheme, a literal address or `localhost`); the
    addresses a name resolves to are checked when connecting. Raises FetchError(refused=True)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 (a bad port raises here)
    except ValueError as e:
        raise FetchError(f"Invalid URL `{url}`: {e}", refused=True) from e
    if not parts.scheme:
        raise FetchError(f"Invalid URL `{url}`", refused=True)
    if parts.scheme not in ("http", "https"):
        raise FetchError(f"Cannot open `{parts.scheme}:` URLs; only http and https", refused=True)
    if not host:
        raise FetchError(f"Invalid URL `{url}`: no host", refused=True)
    if host_allowed_by_user(host, allowed_hosts):
        return url
    if host == "localhost" or host.endswith(".localhost"):
        raise FetchError(f"Refused: `{host}` is this computer and not among the allowed hosts", refused=True)
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return url  # a name: checked where it connects
    if not address_allowed(host):
        raise FetchError(f"Refused: `{host}` is a local or private address not among the allowed hosts", refused=True)
    return url


@functools.cache
def _ssl_context():
    """One verifying TLS context for every fetch: building one reads the CA bundle (about 50 ms)."""
    import httpx

    return httpx.create_ssl_context(trust_env=False)


def _guarded_client(limits: FetchLimits, allowed_hosts):
    """An httpx client whose every connection goes to a checked address (imported here: httpx is not light)."""
    import httpcore
    import httpx

    class GuardedBackend(httpcore.SyncBackend):
        def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
            if host_allowed_by_user(host, allowed_hosts):
                return super().connect_tcp(host, port, timeout, local_address, socket_options)
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as e:
                raise httpcore.ConnectError(f"cannot resolve `{host}`: {e}") from e
            addresses = list(dict.fromkeys(info[4][0] for info in infos))
            refused = [a for a in addresses if not address_allowed(a)]
            if refused:
                raise _Refused(f"Refused: `{host}` resolves to {refused[0]}, a local or private address")
            error: Exception | None = None
            for address in addresses:  # connect to the checked address itself, not to the name again
                try:
                    return super().connect_tcp(address, port, timeout, local_address, socket_options)
                except httpcore.ConnectError as e:
                    error = e
            raise error or httpcore.ConnectError(f"`{host}` has no address")

    class GuardedTransport(httpx.HTTPTransport):
        def __init__(self):
            super().__init__(verify=_ssl_context(), trust_env=False)
            # httpx builds its pool without a way to pass a network backend; this is its pool with ours.
            self._pool = httpcore.ConnectionPool(ssl_context=_ssl_context(), network_backend=GuardedBackend())

    timeout = httpx.Timeout(limits.read_s, connect=limits.connect_s)
    return httpx.Client(
        transport=GuardedTransport(),
        timeout=timeout,
        follow_redirects=False,
        trust_env=False,
        # identity: a compressed body could unpack to far more than the size limit before it is counted
        headers={
            "User-Agent": USER_AGENT,
            "Accept": "text/html,application/xhtml+xml,text/plain;q=0.9",
            "Accept-Encoding": "identity",
        },
    )


def fetch(
    url: str,
    limits: FetchLimits,
    allowed_hosts=(),
    cancel: CancelToken | None = None,
    *,
    params: dict | None = None,
    accept_json: bool = False,
) -> Fetched:
    """GET `url` within `limits`, following redirects hop by hop through `check_url` and the guarded connection.
    Keeps HTML and plain text (JSON too with `accept_json`); cuts the body at `max_bytes`. Raises FetchError."""
    import httpx

    deadline = time.monotonic() + limits.total_s
    if params:
        url = url + ("&" if "?" in url else "?") + urlencode(params)
    with _guarded_client(limits, allowed_hosts) as client:
        for _hop in range(limits.max_redirects + 1):
            check_url(url, allowed_hosts)
            try:
                with client.stream("GET", url) as response:
                    if response.is_redirect and "location" in response.headers:
                        url = str(response.url.join(response.headers["location"]))
                        continue
                    if response.status_code >= 400:
                        raise FetchError(f"HTTP {response.status_code} {response.reason_phrase}")
                    kind = _content_kind(response.headers.get("content-type", ""), accept_json)
                    body, cut = _read_body(response, limits, deadline, cancel)
                    text = _decode(body, response.headers.get("content-type", ""), kind == "html")
                    if kind is None:
                        kind = _sniff(text)
                    return Fetched(url=str(response.url), html=kind == "html", text=text, cut=cut)
            except _Refused as e:
                raise FetchError(str(e), refused=True) from e
            except httpx.TimeoutException as e:
                raise FetchError(f"timed out ({type(e).__name__})") from e
            except httpx.HTTPError as e:
                raise FetchError(f"unavailable ({type(e).__name__}: {e})") from e
    raise FetchError(f"too many redirects (more than {limits.max_redirects})")


def _content_kind(content_type: str, accept_json: bool) -> str | None:
    """`html`, `text`, or None to sniff (no type given); FetchError for a type the browser cannot read."""
    mime = content_type.split(";", 1)[0].strip().lower()
    if not mime:
        return None
    if mime in HTML_TYPES:
        return "html"
    if mime in TEXT_TYPES or (accept_json and mime.endswith("json")):
        return "text"
    raise FetchError(f"Cannot read content of type `{mime}`; only HTML and plain text pages can be opened")


def _sniff(text: str) -> str:
    return "html" if re.match(r"\s*<(!doctype|html|head|body|\?xml)", text[:512], re.IGNORECASE) else "text"


def _read_body(response, limits: FetchLimits, deadline: float, cancel: CancelToken | None) -> tuple[bytes, bool]:
    """The body streamed up to `max_bytes` (the rest is not read), within the total time, stopping when cancelled."""
    chunks, size = [], 0
    for chunk in response.iter_bytes():  # as it arrives, so a page sent byte by byte meets the total time
        if cancel is not None and cancel.cancelled:
            raise FetchError("cancelled")
        if time.monotonic() > deadline:
            raise FetchError(f"timed out (the page took longer than {limits.total_s:g} s)")
        chunks.append(chunk)
        size += len(chunk)
        if size >= limits.max_bytes:
            return b"".join(chunks)[: limits.max_bytes], True
    return b"".join(chunks), False


def _decode(body: bytes, content_type: str, html: bool) -> str:
    """The header's charset, else a `<meta charset>` near the top of an HTML page, else UTF-8 (bad bytes replaced)."""
    charset = re.search(r"charset=[\"']?([\w.:-]+)", content_type, re.IGNORECASE)
    if charset is None and html:
        charset = re.search(rb"<meta[^>]+charset=[\"']?([\w.:-]+)", body[:4096], re.IGNORECASE)
    name = charset.group(1) if charset else "utf-8"
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    try:
        return body.decode(name, errors="replace")
    except LookupError:
        return body.decode("utf-8", errors="replace")


# Search backends.


class _DuckDuckGoResults(HTMLParser):
    """DuckDuckGo's HTML results: `a.result__a` (title, a redirect whose `uddg` holds the URL), then
    `.result__snippet`; ads (`result--ad`) are left out."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.results: list[list] = []  # [title parts, url, snippet parts]
        self._into: list | None = None
        self._depth = 0
        self._ad_depth = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if self._into is not None:
            self._depth += 1
            return
        if tag == "a" and "result__a" in classes:
            url = _duckduckgo_target(attrs.get("href") or "")
            if url:
                self.results.append([[], url, []])
                self._into, self._depth = self.results[-1][0], 1
        elif "result__snippet" in classes and self.results and not self.results[-1][2]:
            self._into, self._depth = self.results[-1][2], 1

    def handle_endtag(self, tag):
        if self._into is not None:
            self._depth -= 1
            if self._depth <= 0:
                self._into = None

    def handle_data(self, data):
        if self._into is not None:
            self._into.append(data)


def _duckduckgo_target(href: str) -> str | None:
    """The result's own URL: DuckDuckGo links through `//duckduckgo.com/l/?uddg=URL`; ads go through `y.js`."""
    if href.startswith("//"):
        href = "https:" + href
    parts = urlsplit(href)
    if parts.netloc.endswith("duckduckgo.com") or not parts.netloc:
        if parts.path.endswith("/y.js"):
            return None
        target = parse_qs(parts.query).get("uddg", [None])[0]
        return target if target and target.startswith(("http://", "https://")) else None
    return href if parts.scheme in ("http", "https") else None


def parse_duckduckgo(document: str) -> list[SearchResult]:
    parser = _DuckDuckGoResults()
    parser.feed(document)
    parser.close()
    results, seen = [], set()
    for title, url, snippet in parser.results:
        if url in seen:
            continue
        seen.add(url)
        results.append(
            SearchResult(merge_whitespace("".join(title)).strip(), url, merge_whitespace("".join(snippet)).strip())
        )
    return results


def parse_searxng(document: str) -> list[SearchResult]:
    """SearXNG's `format=json`: `results` of `title`, `url`, `content`."""
    try:
        data = json.loads(document)
    except json.JSONDecodeError as e:
        raise FetchError(f"the search service sent something other than JSON ({e})") from e
    results = []
    for item in data.get("results", []) if isinstance(data, dict) else []:
        if isinstance(item, dict) and isinstance(item.get("url"), str):
            results.append(
                SearchResult(
                    merge_whitespace(str(item.get("title") or item["url"])).strip(),
                    item["url"],
                    merge_whitespace(str(item.get("content") or "")).strip(),
                )
            )
    return results


def backend_problem(backend: str, search_url: str | None) -> str | None:
    """Why these settings cannot search, or None."""
    if backend not in BACKENDS:
        return f"unknown search backend `{backend}` (known: {', '.join(BACKENDS)})"
    if backend == "searxng" and not search_url:
        return "the searxng backend needs the address of a SearXNG server (search_url)"
    return None


def search(
    backend: str,
    search_url: str | None,
    query: str,
    topn: int,
    limits: FetchLimits,
    allowed_hosts=(),
    cancel: CancelToken | None = None,
) -> list[SearchResult]:
    """Up to `topn` results for `query` from the chosen backend. Raises FetchError."""
    problem = backend_problem(backend, search_url)
    if problem:
        raise FetchError(problem)
    url = search_url or DUCKDUCKGO_URL
    allowed = (*allowed_hosts, urlsplit(url).hostname or "") if search_url else tuple(allowed_hosts)
    if backend == "searxng":
        fetched = fetch(url, limits, allowed, cancel, params={"q": query, "format": "json"}, accept_json=True)
        results = parse_searxng(fetched.text)
    else:
        fetched = fetch(url, limits, allowed, cancel, params={"q": query})
        results = parse_duckduckgo(fetched.text)
        if not results and "no-results" not in fetched.text:
            raise FetchError(
                "DuckDuckGo answered without a results list (it may be asking for a captcha); "
                "try again later, or set up a SearXNG server"
            )
    return results[:topn]


def search_page_url(backend: str, search_url: str | None, query: str) -> str:
    """Where a person would see these results (what a citation of the results page links to)."""
    if backend == "searxng" and search_url:
        return search_url + ("&" if "?" in search_url else "?") + urlencode({"q": query})
    return "https://duckduckgo.com/?" + urlencode({"q": query})
