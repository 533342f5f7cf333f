"""Running the server: the `serve` flags, `serve()` (uvicorn until Ctrl-C or SIGTERM), `main()`,
and the connection-level guards uvicorn does not have.

Uvicorn (0.29 to at least 0.54) reads a request's headers without any deadline: a client that
connects and sends nothing, or half its headers, holds a socket and a file descriptor until it
leaves, and --limit-concurrency answers with a text/plain 503 once every place is held that way.
`guarded_protocol` is uvicorn's own h11 protocol with four changes: the headers of each request must
arrive within --header-timeout of connecting (or of the previous answer) or the socket is closed; a
client that stops reading its answer for --body-timeout is cut off; a connection opened while
--max-connections are open gets its request refused in the dialect's shape (by app.py) and is
closed; and a client that half-closes its side after sending its request (shutdown(SHUT_WR), as some
clients and proxies do) still gets its answer. The body's deadline (--body-timeout) is app.py's,
because it answers in the dialect's shape.

Read next: app.py (what is served).
"""

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
import threading

from ..arguments import positive_int
from ..config import ModelError
from ..hub import check_without_network
from ..precisions import DEFAULT as PRECISION_DEFAULT
from ..precisions import HELP as PRECISION_HELP
from ..precisions import NAMES as PRECISION_NAMES
from pathlib import Path

from .access import Access
from .app import OVER_CAPACITY, build_app, require
from .limits import Limits
from .protocol import DEFAULT_MODEL

API_KEY_ENV = "NPRERANK_API_KEY"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
log = logging.getLogger("uvicorn.error")  # uvicorn's logger, so our lines share its format


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `serve` flags; `nprerank serve` and `python -m nprerank.server` share them."""
    default = Limits()
    parser.add_argument(
        "--model",
        "-m",
        default=os.environ.get("NPRERANK_MODEL") or DEFAULT_MODEL,
        help=f"model folder or Hugging Face repo id (default $NPRERANK_MODEL or {DEFAULT_MODEL})",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument(
        "--port", metavar="PORT", type=positive_int, default=8080, help="port to listen on (default 8080)"
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on every route but /health (or set ${API_KEY_ENV})",
    )
    parser.add_argument(
        "--max-body-bytes",
        metavar="BYTES",
        type=positive_int,
        default=default.max_body_bytes,
        help=f"largest request body; larger is refused with 413 (default {default.max_body_bytes})",
    )
    parser.add_argument(
        "--max-contexts",
        metavar="N",
        type=positive_int,
        default=default.max_contexts,
        help=f"most contexts/texts/documents in one request (default {default.max_contexts})",
    )
    parser.add_argument(
        "--queue-size",
        metavar="N",
        type=positive_int,
        default=default.queue_size,
        help=f"requests read whole and waiting or being scored; more get 429 (default {default.queue_size})",
    )
    parser.add_argument(
        "--max-connections",
        metavar="N",
        type=positive_int,
        default=default.max_connections,
        help=f"open connections; a request on one more gets 429 and is closed (default {default.max_connections})",
    )
    for name, meaning in (
        ("header_timeout", "a request's headers must arrive within this, else the connection is closed"),
        (
            "body_timeout",
            "a request's body must arrive within this after its headers, else 408; a client that "
            "reads nothing of its answer this long is cut off",
        ),
        ("shutdown_timeout", "on Ctrl-C or SIGTERM, requests in progress get this long, then 503"),
    ):
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            metavar="SECONDS",
            type=seconds,
            default=getattr(default, name),
            help=f"{meaning} (default {getattr(default, name):g})",
        )
    parser.add_argument(
        "--allowed-host",
        metavar="NAME",
        action="append",
        default=[],
        help="also answer requests whose Host header names NAME (repeat for more; '*' for any). "
        "Served by default: the --host address, any IP address, localhost, *.localhost "
        "and this machine's name",
    )
    parser.add_argument(
        "--allowed-origin",
        metavar="ORIGIN",
        action="append",
        default=[],
        help="let web pages of ORIGIN (e.g. https://app.example.com) call the server from a browser, "
        "with CORS headers (repeat for more; '*' for any). Default: none",
    )
    parser.add_argument(
        "--batch-tokens",
        metavar="N",
        type=positive_int,
        default=default.batch_tokens,
        help=f"tokens of waiting requests scored in one forward call (default {default.batch_tokens})",
    )
    parser.add_argument(
        "--auto-truncate",
        action=argparse.BooleanOptionalAction,
        default=default.auto_truncate,
        help="TEI routes: cut an over-long pair when a request leaves out `truncate`, as TEI does "
        "since 1.9 (default); --no-auto-truncate refuses it with 413, as older TEI did",
    )
    parser.add_argument(
        "--truncation",
        choices=("only_second", "longest_first"),
        default=None,
        help="how every route cuts a pair too long for the model: only the passage (only_second), "
        "or the longer side first (longest_first); default: TEI routes longest_first as TEI "
        "does, the others only_second as FlagEmbedding does",
    )
    parser.add_argument(
        "--threads",
        metavar="N",
        type=positive_int,
        default=None,
        help="CPU threads for the model (default: the CPUs this process may use, from its affinity and CPU quota)",
    )
    parser.add_argument(
        "--long-documents",
        choices=("truncate", "chunk"),
        default="truncate",
        help="a passage longer than the model takes: cut it (default), or score its best window",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISION_NAMES,
        default=PRECISION_DEFAULT,
        help=PRECISION_HELP,
    )
    parser.add_argument(
        "--workers",
        metavar="N",
        type=positive_int,
        default=1,
        help="server processes sharing the port and one memory-mapped copy of the weights "
        "(default 1; see docs/scale.md)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="uvicorn's log level (default info)",
    )


def seconds(text: str) -> float:
    """argparse type: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def serve_from_args(args: argparse.Namespace) -> None:
    limits = {name: getattr(args, name) for name in Limits.__dataclass_fields__}
    options = dict(
        model=args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        threads=args.threads,
        long_documents=args.long_documents,
        precision=args.precision,
        log_level=args.log_level,
        allowed_hosts=args.allowed_host,
        allowed_origins=args.allowed_origin,
        **limits,
    )
    if args.workers > 1:
        from .replicas import serve_replicas

        check_without_network(args.model)  # in this process: one line, before any worker starts
        return serve_replicas(args.workers, options)
    serve(**options)


def model_options(serve_options: dict) -> dict:
    """serve()'s options that are Reranker.from_pretrained's (None or absent: the Reranker's default)."""
    names = ("long_documents", "threads", "precision")
    return {name: serve_options[name] for name in names if serve_options.get(name) is not None}


def public_name(model: str) -> str:
    """What /health and the answers call the model: a repo id as given, a folder by its own name
    (never the path, which tells a client about the server's disk)."""
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else str(model)


def guarded_protocol(limits: Limits):
    """Uvicorn's h11 protocol with header and answer deadlines, a connection bound and half-close support."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedProtocol(H11Protocol):
        def connection_made(self, transport):
            over_capacity = len(self.connections) >= limits.max_connections  # before this one counts
            super().connection_made(transport)
            if over_capacity:  # app.py answers its request 429 in the dialect's shape, and closes
                self.app_state = {**self.app_state, OVER_CAPACITY: True}
            self.header_timer = self.write_timer = None
            self.await_headers()

        def await_headers(self):
            """From now, the next request's headers have --header-timeout to arrive whole."""
            self.cancel_header_timer()
            self.header_timer = self.loop.call_later(limits.header_timeout, self.headers_late)

        def cancel_header_timer(self):
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def headers_late(self):
            self.header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()  # no request yet: nothing to answer, no dialect known

        def data_received(self, data):
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the headers are in
                self.cancel_header_timer()

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self.await_headers()

        def pause_writing(self):
            # the client stopped reading its answer: the socket and its buffered answer are held
            # for as long as it likes, so a stall gets the body's deadline too, then the socket goes
            super().pause_writing()
            if self.write_timer is None:
                self.write_timer = self.loop.call_later(limits.body_timeout, self.reader_late)

        def resume_writing(self):
            self.cancel_write_timer()
            super().resume_writing()

        def cancel_write_timer(self):
            if self.write_timer is not None:
                self.write_timer.cancel()
                self.write_timer = None

        def reader_late(self):
            self.write_timer = None
            if not self.transport.is_closing():
                log.info("closing a connection whose client read nothing of its answer for %g s", limits.body_timeout)
            self.transport.abort()  # close() would wait for the buffer to drain, which is what never happens

        def connection_lost(self, exc):
            self.cancel_header_timer()
            self.cancel_write_timer()
            super().connection_lost(exc)

        def eof_received(self):
            # the client finished sending (a half-close): if its request is whole, keep our side
            # open to answer it, then close; otherwise (uvicorn's behaviour) close now
            if self.cycle is not None and not self.cycle.response_complete and self.conn.their_state is h11.DONE:
                self.cycle.keep_alive = False
                return True
            return None

    return GuardedProtocol


def serve(
    model: str = DEFAULT_MODEL,
    host: str = "127.0.0.1",
    port: int = 8080,
    api_key: str | None = None,
    threads: int | None = None,
    long_documents: str = "truncate",
    precision: str = "fp32",
    log_level: str = "info",
    allowed_hosts=(),
    allowed_origins=(),
    sockets=None,
    preload: bool = False,
    **limits,
) -> None:
    """Serve `model` until Ctrl-C or SIGTERM, then return. Raises ModelError if the model fails to load,
    ValueError for a bad option (precision: "fp32", "int8" or "bf16", as Reranker's).
    sockets: listening sockets to accept on instead of binding host:port (replicas.py's workers).
    preload: load the model before accepting any connection (a worker sharing a port with others
    must not take a request it would answer 503)."""
    uvicorn = require("uvicorn")
    from ..reranker import Reranker
    from .replicas import bind

    if sockets is None:  # tried before the model loads: a busy port is one line (OSError), as with
        bind(host, port).close()  # --workers, not uvicorn's log and exit 3 after a wasted load
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    limits = Limits(**limits)

    def load():
        options = model_options(dict(long_documents=long_documents, threads=threads, precision=precision))
        if limits.truncation:  # the server's --truncation, for routes whose Query leaves it to the server
            options["truncation"] = limits.truncation
        return Reranker.from_pretrained(model, **options)

    check_without_network(model)  # a model that cannot load fails here, not after the port is served
    loader = load
    if preload:  # loaded now, before the port is served; later reloads (a changed checkpoint) load afresh
        loaded = [load()]
        loader = lambda: loaded.pop() if loaded else load()  # noqa: E731
    access = Access(host, allowed_hosts, allowed_origins)
    app = build_app(
        loader, api_key=api_key, model_name=public_name(model), access=access, model_source=str(model), **vars(limits)
    )
    if api_key is None and host not in LOOPBACK:
        log.warning("listening on %s without --api-key: anyone who can reach this port can use it", host)
    if host not in LOOPBACK and not allowed_hosts:  # clients on the network name the server: access.py refuses names
        log.warning(
            "listening on %s: only requests whose Host is an IP address, localhost or this machine's name "
            "(%s) are served; add the names clients use (a DNS or service name) with --allowed-host NAME, "
            "or --allowed-host '*' behind a load balancer",
            host,
            socket.gethostname(),
        )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        http=guarded_protocol(limits),
        timeout_graceful_shutdown=limits.shutdown_timeout,
    )
    server = uvicorn.Server(config)
    app.state.batcher.on_load_failure = lambda: setattr(server, "should_exit", True)
    # a worker sharing the port must not accept before it can score: the warm-up (Numba's kernels
    # loaded or compiled) runs in the model thread after the load, so wait for it too
    app.state.batcher.serve_when_settled = preload
    with _signals_end_quietly():
        server.run(sockets=sockets)
    if app.state.batcher.state == "failed":
        raise ModelError(f"the model {model} could not be loaded (the error is above)")  # as replicas.py says


@contextlib.contextmanager
def _signals_end_quietly():
    """Uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to whatever
    handler was there before; make that handler a no-op so a requested stop exits 0, not -15."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nprerank.server",
        description="Serve bge-reranker-base over HTTP (Cloudflare, TEI and Cohere/Jina APIs).",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        serve_from_args(args)
    except (ValueError, OSError) as e:  # ModelError is a ValueError
        print(f"nprerank serve: {e}", file=sys.stderr)
        return 1
    return 0
