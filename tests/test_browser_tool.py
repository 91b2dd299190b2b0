"""The browser tool against a real HTTP server on 127.0.0.1: pages, a fake DuckDuckGo and a fake SearXNG.

Outputs are compared with openai/gpt-oss's simple_browser formats (the display header, `L{i}: ` lines, links
`【id†text】`, find results, error texts), since gpt-oss was trained on them. No test reaches the internet: names
that must resolve elsewhere go through a patched resolver.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from mlx_oss.cancel import CancelToken
from mlx_oss.tools import Citation, ToolSettings
from mlx_oss.tools import search as search_module
from mlx_oss.tools.browser import BrowserTool
from mlx_oss.tools.pages import citations_as_markdown, html_to_page, link_citations, unfinished_citation
from mlx_oss.tools.search import FetchLimits, address_allowed, parse_duckduckgo, with_scheme

ARTICLE = (
    """<!doctype html><html><head><title>The Otter Page</title><script>var hidden = 1;</script></head>
<body><h1>Otters</h1>
<p>Otters are <b>semiaquatic</b> mammals. See <a href="/second.html">the second page</a> or
<a href="https://en.wikipedia.org/wiki/Otter">Wikipedia</a>.</p>
<ul><li>Sea otter</li><li>River otter</li></ul>
"""
    + "".join(f"<p>Paragraph {i} about otter habits and rivers.</p>" for i in range(200))
    + """
<p>The secret word is Pangolin.</p></body></html>"""
)

SECOND = "<html><head><title>Second</title></head><body><p>The second page.</p></body></html>"

DDG = """<html><body><div class="results">
<div class="result results_links results_links_deep result--ad"><a class="result__a"
 href="https://duckduckgo.com/y.js?ad_domain=ads.example&u3=x">An ad</a></div>
<div class="result results_links results_links_deep web-result"><h2 class="result__title">
<a rel="nofollow" class="result__a" href="//duckduckgo.com/l/?uddg={u1}&amp;rut=abc">Otter &amp; friends</a></h2>
<a class="result__snippet" href="//duckduckgo.com/l/?uddg={u1}">Otters are <b>semiaquatic</b> mammals.</a></div>
<div class="result results_links results_links_deep web-result"><h2 class="result__title">
<a rel="nofollow" class="result__a" href="//duckduckgo.com/l/?uddg={u2}&amp;rut=def">Second page</a></h2>
<a class="result__snippet" href="//duckduckgo.com/l/?uddg={u2}">Another page.</a></div>
</div></body></html>"""


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send(self, status: int, body: bytes, content_type: str = "text/html; charset=utf-8", headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        base = f"http://127.0.0.1:{self.server.server_port}"
        self.server.requests.append(self.path)
        if parts.path == "/article.html":
            self.send(200, ARTICLE.encode())
        elif parts.path == "/second.html":
            self.send(200, SECOND.encode())
        elif parts.path == "/plain.txt":
            self.send(200, b"line one\nline two\n", "text/plain")
        elif parts.path == "/report.pdf":
            self.send(200, b"%PDF-1.4", "application/pdf")
        elif parts.path == "/big.html":
            self.send(200, b"<html><body><p>" + b"big text " * 200_000 + b"</p></body></html>")
        elif parts.path == "/slow.html":
            time.sleep(2.0)
            self.send(200, SECOND.encode())
        elif parts.path == "/drip.html":  # each byte within the read timeout, the whole past the total
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            try:
                for _ in range(40):
                    self.wfile.write(b"<p>drip</p>")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
        elif parts.path == "/redirect":
            self.send(302, b"", headers=[("Location", query["to"][0])])
        elif parts.path == "/missing.html":
            self.send(404, b"not here")
        elif parts.path == "/html/":  # DuckDuckGo's HTML endpoint
            self.server.queries.append(query["q"][0])
            body = DDG.format(u1=quote(base + "/article.html", safe=""), u2=quote(base + "/second.html", safe=""))
            self.send(200, body.encode())
        elif parts.path == "/search":  # SearXNG's JSON API
            self.server.queries.append((query["q"][0], query.get("format", [""])[0]))
            results = [
                {"title": "Otter article", "url": base + "/article.html", "content": "All about otters."},
                {"title": "Second", "url": base + "/second.html", "content": "More."},
            ]
            self.send(200, json.dumps({"query": query["q"][0], "results": results}).encode(), "application/json")
        else:
            self.send(404, b"no")


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.requests, httpd.queries = [], []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def base(server) -> str:
    return f"http://127.0.0.1:{server.server_port}"


LIMITS = FetchLimits(max_bytes=200_000, connect_s=2.0, read_s=0.5, total_s=3.0)


def make_tool(server, backend="duckduckgo", allowed=("127.0.0.1",), limits=LIMITS) -> BrowserTool:
    path = "/html/" if backend == "duckduckgo" else "/search"
    settings = ToolSettings(
        enabled=("browser",), search_backend=backend, search_url=base(server) + path, allowed_hosts=allowed
    )
    return BrowserTool(settings, limits=limits, count_tokens=lambda text: len(text) // 4 + 1)


def call(tool: BrowserTool, function: str, **arguments):
    return tool.run(f"browser.{function}", json.dumps(arguments), CancelToken())


def test_search_duckduckgo_format(server):
    tool = make_tool(server)
    assert tool.unavailable() is None
    out = call(tool, "search", query="otters", topn=5)
    assert not out.error
    assert server.queries[-1] == "otters"
    # the reference's search page: title is the query, no URL, links with their domain, the ad left out
    domain = f"127.0.0.1:{server.server_port}"
    assert out.text == (
        "[0] otters\n**viewing lines [0 - 5] of 5**\n\n"
        "L0: \nL1: URL: \nL2: # Search Results\nL3: \n"
        f"L4:   * 【0†Otter & friends†{domain}】 Otters are semiaquatic mammals.\n"
        f"L5:   * 【1†Second page†{domain}】 Another page."
    )
    assert out.citations == (Citation(cursor=0, url="https://duckduckgo.com/?q=otters", title="otters"),)


def test_search_searxng_then_open_result_and_scroll(server):
    tool = make_tool(server, backend="searxng")
    out = call(tool, "search", query="otter facts")
    assert server.queries[-1] == ("otter facts", "json")
    assert "【0†Otter article†" in out.text and "All about otters." in out.text
    assert out.citations[0].url == base(server) + "/search?q=otter+facts"

    page = call(tool, "open", id=0)  # a result of the latest page
    assert not page.error
    first = page.text.split("\n")
    assert first[0] == f"[1] The Otter Page ({base(server)}/article.html)"
    assert first[1].startswith("**viewing lines [0 - ") and first[2] == ""
    assert first[3:7] == ["L0: ", f"L1: URL: {base(server)}/article.html", "L2: # Otters", "L3: "]
    assert first[7:9] == [  # wrapped at 80 columns, as the reference wraps
        "L4: Otters are semiaquatic mammals. See 【0†the second page】 or ",
        "L5: 【1†Wikipedia†en.wikipedia.org】.",
    ]
    assert "hidden" not in page.text  # scripts are not text
    assert page.citations == (Citation(cursor=1, url=base(server) + "/article.html", title="The Otter Page"),)

    # the token budget ends the first view early; loc and num_lines scroll
    total = int(first[1].split(" of ")[1].rstrip("*"))
    assert total > 100
    scrolled = call(tool, "open", cursor=1, loc=10, num_lines=3)
    lines = scrolled.text.split("\n")
    assert lines[0].startswith("[2] The Otter Page")
    assert lines[1] == f"**viewing lines [10 - 12] of {total}**"
    assert [line.split(":")[0] for line in lines[3:]] == ["L10", "L11", "L12"]

    # a link on the page, by id on the page's cursor
    second = call(tool, "open", cursor=1, id=0)
    assert second.text.startswith(f"[3] Second ({base(server)}/second.html)\n**viewing lines [0 - 2] of 2**")

    too_far = call(tool, "open", cursor=1, loc=total + 1)
    assert too_far.error
    assert too_far.text == f"Invalid location parameter: `{total + 1}`. Cannot exceed page maximum of {total}."
    assert len(tool.pages) == 4  # the failed view was popped


def test_open_url_find_and_citations(server):
    tool = make_tool(server)
    out = call(tool, "open", id=base(server) + "/article.html")
    assert out.text.startswith(f"[0] The Otter Page ({base(server)}/article.html)")
    found = call(tool, "find", pattern="PANGOLIN")
    assert not found.error
    lines = found.text.split("\n")
    pattern_url = f"{base(server)}/article.html/find?pattern=pangolin"
    assert lines[0] == f"[1] Find results for text: `pangolin` in `The Otter Page` ({pattern_url})"
    assert lines[3].startswith("L0: # 【0†match at L") and "The secret word is Pangolin." in found.text
    match_line = int(lines[3].split("match at L")[1].rstrip("】"))
    assert found.citations[0].url == base(server) + "/article.html"  # the page searched, not the find page

    opened = call(tool, "open", id=0)  # the match: the page again, 4 lines above it
    assert f"**viewing lines [{match_line - 4} - " in opened.text
    assert f"L{match_line}: The secret word is Pangolin." in opened.text

    nothing = call(tool, "find", pattern="zebra", cursor=0)
    assert "No `find` results for pattern: `zebra`" in nothing.text
    assert call(tool, "find", pattern="x").text == "Cannot run `find` on search results page or find results page"

    answer = "Otters are mammals 【0†L4-L5】 and the word is Pangolin 【2†L70】; unknown 【9†L1】."
    citations = tool.citations()
    spans = link_citations(answer, citations)
    domain = f"127.0.0.1:{server.server_port}"
    assert spans == [
        ("Otters are mammals ", None),
        (domain, base(server) + "/article.html"),
        (" and the word is Pangolin ", None),
        (domain, base(server) + "/article.html"),
        ("; unknown 【9†L1】.", None),
    ]
    assert citations_as_markdown("a 【0†L4】", citations) == f"a  ([{domain}]({base(server)}/article.html)) "
    assert unfinished_citation("text 【3†L1") == 5 and unfinished_citation("done 【3†L1】") is None


def test_plain_text_and_view_source(server):
    tool = make_tool(server)
    out = call(tool, "open", id=base(server) + "/plain.txt")
    assert out.text.endswith("L0: \nL1: URL: " + base(server) + "/plain.txt\nL2: line one\nL3: line two\nL4: ")
    source = call(tool, "open", id=base(server) + "/second.html", view_source=True)
    assert source.text.startswith(f"[1] Second (view-source:{base(server)}/second.html)")
    assert "<title>Second</title>" in source.text
    assert source.citations[0].url == base(server) + "/second.html"


def test_unreadable_types_and_http_errors(server):
    tool = make_tool(server)
    pdf = call(tool, "open", id=base(server) + "/report.pdf")
    assert pdf.error and "Cannot read content of type `application/pdf`" in pdf.text
    assert pdf.text.startswith(f"Error fetching URL `{base(server)}/report.pdf`: ")
    missing = call(tool, "open", id=base(server) + "/missing.html")
    assert missing.error and "HTTP 404" in missing.text
    assert tool.pages == []


def test_size_limit_cuts_the_page(server):
    tool = make_tool(server)
    out = call(tool, "open", id=base(server) + "/big.html", loc=0, num_lines=2)
    assert not out.error
    page = tool.pages[-1]
    assert page.text.endswith("[The page is longer than 0.2 MB; only its first 0.2 MB were read.]")
    assert len(page.text) < 210_000


def test_slow_page_times_out(server):
    tool = make_tool(server)
    started = time.monotonic()
    out = call(tool, "open", id=base(server) + "/slow.html")
    assert time.monotonic() - started < 1.8
    assert out.error and "timed out" in out.text


def test_a_page_that_never_ends_meets_the_total_time_limit(server):
    tool = make_tool(server)
    started = time.monotonic()
    out = call(tool, "open", id=base(server) + "/drip.html")
    assert time.monotonic() - started < LIMITS.total_s + 1.0
    assert out.error and "timed out (the page took longer than 3 s)" in out.text


def test_cancel_stops_a_fetch(server):
    tool = make_tool(server)
    cancel = CancelToken()
    threading.Timer(0.5, cancel.cancel).start()
    out = tool.run("browser.open", json.dumps({"id": base(server) + "/drip.html"}), cancel)
    assert out.error and out.text.endswith(": cancelled")


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "data:text/html,<p>hi</p>",
        "ftp://example.com/file",
        "http://localhost:1/",
        "http://10.0.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:1/",
        "http://[::ffff:127.0.0.1]:1/",
        "http://100.64.0.1/",
        "http://0.0.0.0:1/",
        "localhost:1/page",
        "http://2130706433:1/",  # 127.0.0.1 as one number: resolved, then refused where it connects
        "http://127.1:1/",
    ],
)
def test_refused_urls(server, url):
    tool = make_tool(server, allowed=())
    out = call(tool, "open", id=url)
    assert out.error and ("Cannot open" in out.text or "Refused" in out.text), out.text


def test_loopback_needs_the_user_allowing_it(server):
    refused = call(make_tool(server, allowed=()), "open", id=base(server) + "/article.html")
    assert refused.error and "Refused: `127.0.0.1` is a local or private address" in refused.text


def test_redirects_are_checked_at_every_hop(server):
    tool = make_tool(server)  # 127.0.0.1 allowed, localhost and private addresses not
    hops = {
        f"http://localhost:{server.server_port}/second.html": "Refused: `localhost`",
        "http://192.168.1.1/": "Refused: `192.168.1.1`",
        "file:///etc/passwd": "Cannot open `file:` URLs",
    }
    for target, words in hops.items():
        out = call(tool, "open", id=f"{base(server)}/redirect?to={quote(target, safe='')}")
        assert out.error and words in out.text, out.text
    ok = call(tool, "open", id=f"{base(server)}/redirect?to=/second.html")
    assert ok.text.startswith(f"[0] Second ({base(server)}/second.html)")


def test_a_name_that_resolves_to_loopback_is_refused(server, monkeypatch):
    """DNS rebinding: the check is on the address connected to, not on the name."""
    real = socket.getaddrinfo

    def resolve(host, *args, **kwargs):
        if host == "rebind.example":
            return real("127.0.0.1", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(search_module.socket, "getaddrinfo", resolve)
    tool = make_tool(server)
    out = call(tool, "open", id=f"http://rebind.example:{server.server_port}/article.html")
    assert out.error and "Refused: `rebind.example` resolves to 127.0.0.1" in out.text
    allowed = make_tool(server, allowed=("rebind.example",))
    assert not call(allowed, "open", id=f"http://rebind.example:{server.server_port}/second.html").error


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """An HTTPS server on 127.0.0.1 with a self-signed certificate for `tls.example`."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "2",
         "-subj", "/CN=tls.example", "-addext", "subjectAltName=DNS:tls.example"],
        check=True, capture_output=True,
    )  # fmt: skip
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.requests, httpd.queries = [], []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd, cert
    httpd.shutdown()
    httpd.server_close()


def test_https_connects_to_the_checked_address_and_verifies_the_name(tls_server, monkeypatch):
    """The guard connects to the address it checked, while TLS still verifies the certificate against the name."""
    httpd, cert = tls_server
    real = socket.getaddrinfo
    monkeypatch.setattr(
        search_module.socket,
        "getaddrinfo",
        lambda host, *a, **k: real("127.0.0.1" if host.endswith(".example") else host, *a, **k),
    )
    monkeypatch.setattr(search_module, "address_allowed", lambda address: True)  # as if 127.0.0.1 were public
    monkeypatch.setattr(search_module, "_ssl_context", lambda: ssl.create_default_context(cafile=str(cert)))
    tool = make_tool(httpd, allowed=())
    ok = call(tool, "open", id=f"https://tls.example:{httpd.server_port}/second.html")
    assert ok.text.startswith(f"[0] Second (https://tls.example:{httpd.server_port}/second.html)"), ok.text
    wrong = call(tool, "open", id=f"https://other.example:{httpd.server_port}/second.html")
    assert wrong.error and "CERTIFICATE_VERIFY_FAILED" in wrong.text, wrong.text


def test_offline_is_unavailable_not_an_exception(server, monkeypatch):
    def offline(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(search_module.socket, "getaddrinfo", offline)
    settings = ToolSettings(enabled=("browser",))  # DuckDuckGo, the default
    tool = BrowserTool(settings, limits=LIMITS)
    assert tool.unavailable() is None
    out = call(tool, "search", query="otters")
    assert out.error and out.text.startswith("Error during search for `otters`: unavailable (ConnectError")
    page = call(tool, "open", id="https://example.com/")
    assert page.error and page.text.startswith("Error fetching URL `https://example.com/`: unavailable")


def test_closed_port_is_unavailable(server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = call(make_tool(server), "open", id=f"http://127.0.0.1:{port}/")
    assert out.error and "unavailable (ConnectError" in out.text


def test_bad_calls_read_as_the_reference_says(server):
    tool = make_tool(server)
    assert call(tool, "open", id=1).text == "No pages to access!"
    assert tool.run("browser.open", "{not json", CancelToken()).text == '{"error": "Invalid function arguments"}'
    assert tool.run("browser.click", "{}", CancelToken()).text == '{"error": "Unknown function: click"}'
    assert "Invalid arguments for `search`" in tool.run("browser.search", "{}", CancelToken()).text
    call(tool, "open", id=base(server) + "/second.html")
    assert call(tool, "open", cursor=5).text == "Cursor `5` is out of range. Available cursor indices: [0 - 0]."
    assert call(tool, "open", id=7).text == "Invalid link id `7`."
    assert not call(tool, "open", loc=1.0, num_lines=2).error  # JSON numbers may come as floats


def test_duckduckgo_without_results_list_says_so(server):
    tool = make_tool(server)
    tool.settings.search_url = base(server) + "/second.html"  # a page with no results list, as a captcha would be
    out = call(tool, "search", query="otters")
    assert out.error and "DuckDuckGo answered without a results list" in out.text


def test_page_text_follows_html2text_layout():
    document = (
        "<h2>Title</h2><p>Text<br>next line</p><ol><li>first</li><li>second<ul><li>inner</li></ul></li></ol>"
        "<table><tr><th>k</th><td>v</td></tr><tr><td>k2</td><td>v2</td></tr></table>"
        "<a href='/x'><img src='i.png' alt='logo'></a><hr><pre>a\n  b</pre>"
    )
    page = html_to_page(document, "https://site.org/")
    assert page.title == "site.org"  # no <title>: the domain
    assert page.text.split("\n") == [
        "", "URL: https://site.org/", "## Title", "", "Text", "next line", "",
        "  1. first", "  2. second", "    * inner", "", "k v", "k2 v2", "", "[Image 0: logo]", "",
        "* * *", "", "a", "  b",
    ]  # fmt: skip


def test_settings_that_cannot_search():
    assert "search_url" in BrowserTool(ToolSettings(search_backend="searxng")).unavailable()
    assert "unknown search backend `bing`" in BrowserTool(ToolSettings(search_backend="bing")).unavailable()


def test_pure_helpers():
    assert not address_allowed("127.0.0.1") and not address_allowed("fe80::1") and not address_allowed("::")
    assert not address_allowed("172.16.0.1") and not address_allowed("224.0.0.1")
    assert address_allowed("93.184.216.34") and address_allowed("2606:4700::1111")
    page = html_to_page("<title>T</title><p>a 【0†fake】 link</p>", "https://x.org/")
    assert "〖0†fake〗" in page.text and page.links == {}
    assert with_scheme("example.com/a") == "https://example.com/a"
    assert with_scheme("localhost:8080/") == "https://localhost:8080/"
    assert with_scheme("file:/etc/passwd") == "file:/etc/passwd" and with_scheme("http://x/") == "http://x/"
    assert parse_duckduckgo("<a class='result__a' href='https://direct.example/'>Direct</a>")[0].url == (
        "https://direct.example/"
    )
