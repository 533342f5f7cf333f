"""Who may drive the server from a browser: the Host names it answers to, the web origins it serves.

A server on 127.0.0.1 is reachable by every web page open in a browser on the same machine, in two
ways, and both are closed here by default:

- DNS rebinding: a page on evil.example makes its own name resolve to 127.0.0.1, then sends
  requests to http://evil.example:8080/ that the browser treats as same-origin (it may read the
  answers). They arrive with `Host: evil.example:8080`, which the page cannot change. So only our
  own names are served: the bound address, `localhost` and `*.localhost` (RFC 6761: they always
  mean loopback), this machine's host name, any IP address (an address is not a name that
  anyone can rebind), and the names given with --allowed-host ("*": any).
- cross-site requests: a page's `fetch()` may POST a `text/plain` body to http://127.0.0.1:8080/
  without asking first (a CORS "simple request"); the browser hides the answer, but the work is
  done. Browsers send an `Origin` header on every cross-origin request and on every POST, so a
  request whose Origin is neither this server's own nor one given with --allowed-origin ("*": any)
  is refused. curl and the client SDKs send no Origin and are not concerned.

Ollama closed the same two holes the same way (its allowed-hosts middleware, OLLAMA_ORIGINS);
Jupyter, the MCP servers and others check the Host header too. Read next: app.py (where the
checks answer 403 in each dialect's shape).
"""

import ipaddress
import socket

ANY = "*"


def host_name(authority: str) -> str | None:
    """`Host` header -> the name or address in it, lowercase, without port or brackets; None if malformed."""
    authority = authority.strip().lower()
    if authority.startswith("["):  # [v6 address]:port
        name, bracket, rest = authority[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
    else:
        name, colon, port = authority.partition(":")
        if colon and not port.isdigit():
            return None
    name = name.rstrip(".")  # "localhost." is "localhost"
    return name or None


def is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def origin_of(url: str) -> str:
    """An origin as browsers send it: scheme://host[:port], lowercase, no path or trailing slash."""
    return url.strip().rstrip("/").lower()


class Access:
    """The Host and Origin rules of one server; see the module docstring for why each rule exists."""

    def __init__(self, bound_host: str = "127.0.0.1", allowed_hosts=(), allowed_origins=()):
        self.any_host = ANY in allowed_hosts
        self.names = {"localhost", socket.gethostname().lower(), *(h.lower().rstrip(".") for h in allowed_hosts)}
        bound = host_name(bound_host) or bound_host
        if not is_address(bound):
            self.names.add(bound)
        self.any_origin = ANY in allowed_origins
        self.origins = {origin_of(origin) for origin in allowed_origins if origin != ANY}

    def host_allowed(self, host: str | None) -> bool:
        if self.any_host:
            return True
        name = host_name(host or "")
        if name is None:  # HTTP/1.1 requires a Host header
            return False
        return is_address(name) or name in self.names or name.endswith(".localhost")

    def origin_allowed(self, origin: str | None, host: str | None) -> bool:
        """No Origin (curl, SDKs), this server's own origin, or one allowed by a flag."""
        if origin is None or self.any_origin:
            return True
        origin = origin_of(origin)
        return origin in self.origins or origin in (f"http://{(host or '').lower()}", f"https://{(host or '').lower()}")
