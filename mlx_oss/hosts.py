"""Which `Host` a request names, and whether a server without an API key answers it.

A web page can make the browser send requests to 127.0.0.1 under a name the page's owner controls
(DNS rebinding: `evil.example` first resolves to the attacker's server, then to 127.0.0.1). The browser still
sends `Host: evil.example`, so a server without a key answers only names that cannot be rebound: `localhost`,
literal loopback addresses (127.x.y.z, ::1) and the names its user allowed. Anything that merely starts like
one (`127.0.0.1.evil.example`, `localhost.evil.example`) is another name.
"""

from __future__ import annotations

import ipaddress


def host_name(header: str) -> str | None:
    """The name in a `Host` header, lower case and without port or IPv6 brackets: `[::1]:8080` -> `::1`,
    `LocalHost:80` -> `localhost`. None if the header is not a host with an optional numeric port."""
    header = header.strip()
    if header.startswith("["):
        name, bracket, port = header[1:].partition("]")
        if not bracket or not _is_address(name, 6):
            return None
        if port and not (port.startswith(":") and _is_port(port[1:])):
            return None
    else:
        name, colon, port = header.partition(":")
        if colon and not _is_port(port):
            return None  # also an unbracketed IPv6 address, which RFC 9110 does not allow here
    if not name or any(c.isspace() or c in "/\\@?#[]" for c in name):
        return None
    return name.lower()


def is_loopback_name(name: str) -> bool:
    """`localhost` or a literal loopback address (any 127.x.y.z, ::1): names no DNS answer can redirect."""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 5


def _is_address(text: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False
