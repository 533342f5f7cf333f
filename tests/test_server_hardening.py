"""The server under attack and under a careless operator (issue 10's server findings, issue 9's readiness).

Every test runs a real server process on a loopback port and speaks HTTP to it, often through raw
sockets, because what is tested is what a socket sees: a deadline that closes a connection, a
Host header a browser would send after a DNS rebinding, a client that half-closes its side. The
expected scores come from a `Reranker` in this process on the same model folder.
"""

import json
import os
import shutil
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from test_server import (  # noqa: E402
    CF_LONG,
    CF_SHORT,
    TEXTS,
    Server,
    check_cloudflare,
    check_cohere,
    check_tei,
    cloudflare_error,
    cohere_error,
    get,
    post,
    tei_error,
)

from nprerank import Reranker  # noqa: E402
from nprerank.synthetic import make_model  # noqa: E402

STARTUP = 180  # seconds a server may take to load and warm up on a busy 2-core machine
# One request of each dialect, and how each dialect's error is checked: what a refusal must look like
DIALECTS = {
    "cloudflare": (CF_SHORT, lambda query, texts: {"query": query, "contexts": [{"text": t} for t in texts]}),
    "tei": ("/rerank", lambda query, texts: {"query": query, "texts": texts}),
    "cohere": ("/v1/rerank", lambda query, texts: {"query": query, "documents": texts}),
}


def refused(dialect: str, response, status: int, *words, cloudflare_code: int, tei_type: str):
    if dialect == "cloudflare":
        cloudflare_error(response, status, *words, code=cloudflare_code)
    elif dialect == "tei":
        tei_error(response, status, *words, error_type=tei_type)
    else:
        cohere_error(response, status, *words)


def answered(dialect: str, response, reranker, query, texts):
    {"cloudflare": check_cloudflare, "tei": check_tei, "cohere": check_cohere}[dialect](
        response, reranker, query, texts
    )


class Raw:
    """What a socket sees: the status line, the headers and the body of one HTTP/1.1 answer."""

    def __init__(self, data: bytes):
        head, _, self.body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status_code = int(lines[0].split()[1]) if lines[0] else 0
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        self.text = self.body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.body)


def request_bytes(path: str, body: bytes, host: str, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def read_all(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


@pytest.fixture(scope="module")
def reranker(tiny_model) -> Reranker:
    return Reranker.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """A server with the default flags: what `nprerank serve --model ...` runs."""
    running = Server(["--model", str(tiny_model)], tmp_path_factory.mktemp("hardening") / "log")
    running.wait(timeout=STARTUP)
    yield running
    running.stop()


# --- finding 1: bounded work and memory per request ----------------------------------------------


class PeakRss:
    """Samples a process's RSS in a thread; kills it past `limit` bytes so a failing test cannot
    take the machine down with it."""

    def __init__(self, pid: int, limit: int):
        self.process, self.limit = psutil.Process(pid), limit
        self.baseline = self.peak = self.process.memory_info().rss
        self.killed = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self):
        while not self._done.wait(0.02):
            try:
                rss = self.process.memory_info().rss
            except psutil.NoSuchProcess:
                return
            self.peak = max(self.peak, rss)
            if rss - self.baseline > self.limit:
                self.killed = True
                self.process.kill()
                return

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self.peak - self.baseline


HUGE_QUERY = "word " * 200000  # issue 10's body: 1 MB, a 200,000-word query against 1,000 one-word contexts
GROWTH_LIMIT = 400 * 2**20  # the tiny model's batches take a few MB; the old code grew by gigabytes


@pytest.mark.parametrize("long_documents", ["truncate", "chunk"])
def test_huge_bodies_cost_bounded_memory(tiny_model, reranker, tmp_path, long_documents):
    """Bodies of ~1 MB shaped to make the most work: each is answered, or refused cleanly, with bounded RSS."""
    server = Server(["--model", str(tiny_model), "--long-documents", long_documents], tmp_path / "log")
    try:
        server.wait(timeout=STARTUP)
        check_tei(post(server.url + "/rerank", json={"query": "warm", "texts": ["up"]}), reranker, "warm", ["up"])
        bodies = [
            ("cloudflare", CF_SHORT, {"query": HUGE_QUERY, "contexts": [{"text": "w"}] * 1000}),
            ("tei", "/rerank", {"query": HUGE_QUERY, "texts": ["w"] * 1000, "truncate": True}),
            ("tei", "/rerank", {"query": HUGE_QUERY, "texts": ["w"] * 1000, "truncate": False}),
            ("cohere", "/v1/rerank", {"query": "q", "documents": ["word " * 1000] * 200}),  # long documents
            ("cohere", "/v1/rerank", {"query": "q", "documents": [HUGE_QUERY]}),  # one 200,000-word document
        ]
        for dialect, path, body in bodies:
            watch = PeakRss(server.process.pid, GROWTH_LIMIT)
            try:
                response = post(server.url + path, json=body, timeout=300)
            except httpx.TransportError as error:
                response = error
            growth = watch.stop()
            assert not watch.killed, f"{dialect} {path}: RSS grew past {GROWTH_LIMIT >> 20} MB; killed"
            assert isinstance(response, httpx.Response), f"{dialect} {path}: no answer ({response!r})\n{server.log()}"
            print(
                f"{long_documents} {dialect} {path}: {response.status_code} in "
                f"{response.elapsed.total_seconds():.1f}s, RSS +{growth >> 20} MB"
            )
            if body.get("truncate") is False and long_documents == "truncate":
                tei_error(response, 413, "tokens")
            else:
                assert response.status_code == 200, response.text
        check_tei(post(server.url + "/rerank", json={"query": "q", "texts": TEXTS}), reranker, "q", TEXTS)
        assert "Traceback" not in server.log(), server.log()
    finally:
        server.stop()


# --- finding 5: the checkpoint changed under a running server -------------------------------------


def copy_model(source, folder):
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        shutil.copyfile(source / name, folder / name)
    return folder


def wait_for_health(server, *statuses, timeout=STARTUP):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = get(server.url + "/health").json()
        if body["status"] in statuses:
            return body
        time.sleep(0.05)
    raise AssertionError(f"/health never said {statuses}: {body}\n{server.log()}")


def overwrite_in_place(path, new):
    with open(path, "r+b") as f:  # same file, same size, other bytes: a mmap sees the new ones
        f.write(new.read_bytes())


def replace(path, new):
    shutil.copyfile(new, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


@pytest.mark.parametrize("change", [overwrite_in_place, replace])
def test_changed_checkpoint_is_reloaded(tiny_model, tmp_path, change):
    """A checkpoint changed under the server: it stops serving the old weights and serves the new ones."""
    other = make_model(seed=7)  # same shapes, other weights: the same file size
    assert (other / "model.safetensors").stat().st_size == (tiny_model / "model.safetensors").stat().st_size
    folder = copy_model(tiny_model, tmp_path / "model")
    server = Server(["--model", str(folder)], tmp_path / "log")
    try:
        server.wait(timeout=STARTUP)
        check_tei(
            post(server.url + "/rerank", json={"query": "q", "texts": TEXTS}),
            Reranker.from_pretrained(folder),
            "q",
            TEXTS,
        )
        change(folder / "model.safetensors", other / "model.safetensors")
        health = wait_for_health(server, "stale", "loading")
        assert str(tmp_path) not in json.dumps(health), health
        wait_for_health(server, "ready")
        check_tei(
            post(server.url + "/rerank", json={"query": "q", "texts": TEXTS}),
            Reranker.from_pretrained(other),
            "q",
            TEXTS,
        )
        assert "Traceback" not in server.log(), server.log()
    finally:
        server.stop()


def test_truncated_checkpoint_is_refused_until_mended(tiny_model, reranker, tmp_path):
    """Truncated under the server: health says stale (no path), every dialect answers 503, then a
    good file put back is served again."""
    folder = copy_model(tiny_model, tmp_path / "model")
    server = Server(["--model", str(folder)], tmp_path / "log")
    try:
        server.wait(timeout=STARTUP)
        weights = folder / "model.safetensors"
        os.truncate(weights, weights.stat().st_size // 2)
        health = wait_for_health(server, "stale")
        assert get(server.url + "/health").status_code == 503
        assert "model.safetensors" in health["error"] and str(tmp_path) not in json.dumps(health), health
        for dialect, (path, body) in DIALECTS.items():
            response = post(server.url + path, json=body("q", ["a"]))
            refused(dialect, response, 503, "model.safetensors", cloudflare_code=3040, tei_type="unhealthy")
            assert str(tmp_path) not in response.text
        replace(weights, tiny_model / "model.safetensors")
        wait_for_health(server, "ready")
        check_tei(post(server.url + "/rerank", json={"query": "q", "texts": TEXTS}), reranker, "q", TEXTS)
        assert server.process.poll() is None
    finally:
        server.stop()


# --- finding 6: slow clients ----------------------------------------------------------------------


def test_slow_clients_do_not_shut_others_out(tiny_model, reranker, tmp_path):
    """70 connections trickling bodies (more than --queue-size 64) and 40 trickling headers: a
    normal client is answered meanwhile; the slow bodies get 408 in their dialect's shape at the
    deadline, the half-sent headers are closed, and the file descriptors come back."""
    server = Server(["--model", str(tiny_model), "--header-timeout", "3", "--body-timeout", "4"], tmp_path / "log")
    try:
        server.wait(timeout=STARTUP)
        host = f"127.0.0.1:{server.port}"
        fds = psutil.Process(server.process.pid).num_fds()
        slow, started = [], time.monotonic()
        for i in range(70):
            dialect = list(DIALECTS)[i % 3]
            path, body = DIALECTS[dialect]
            data = request_bytes(path, json.dumps(body("q", ["a"])).encode(), host)
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(data[: data.index(b"\r\n\r\n") + 4] + data[data.index(b"\r\n\r\n") + 4 :][:3])
            slow.append(("body", dialect, s))
            if i < 40:  # 110 slow connections in all: under --max-connections (128)
                s = socket.create_connection(("127.0.0.1", server.port))
                s.sendall(data[:20])
                slow.append(("headers", dialect, s))
        for i in range(5):  # meanwhile, normal clients of every dialect are served
            for dialect, (path, body) in DIALECTS.items():
                query = f"normal {i}"
                answered(
                    dialect,
                    post(server.url + path, json=body(query, TEXTS[:4]), timeout=30),
                    reranker,
                    query,
                    TEXTS[:4],
                )
        for kind, dialect, s in slow:
            s.sendall(b" ")  # still trickling ...
        for kind, dialect, s in slow:
            data = read_all(s, timeout=15)
            s.close()
            if kind == "headers":
                assert data == b"" or Raw(data).status_code in (400, 408), data
            else:
                refused(dialect, Raw(data), 408, "body", cloudflare_code=3007, tei_type="timeout")
        elapsed = time.monotonic() - started
        # a socket the server kept open would time out read_all (15 s) above; this bounds them all at
        # once, loosely, because the normal clients in between may be slow on a busy machine
        assert elapsed < 60, f"the slow connections were held {elapsed:.1f}s; the deadlines are 3 s and 4 s"
        time.sleep(0.5)
        assert psutil.Process(server.process.pid).num_fds() <= fds + 2, "file descriptors were not given back"
        check_tei(post(server.url + "/rerank", json={"query": "q", "texts": TEXTS}), reranker, "q", TEXTS)
    finally:
        server.stop()


def test_a_client_that_reads_no_answer_is_cut_off(tiny_model, reranker, tmp_path):
    """A client that sends whole requests but never reads the answers held each socket (and its
    megabytes of buffered answer) for ever: --max-connections of them shut everyone out. A stalled
    answer now gets the body's deadline; then the socket is closed and its descriptor given back."""
    server = Server(
        [
            "--model",
            str(tiny_model),
            "--body-timeout",
            "3",
            "--max-contexts",
            "2000",
            "--max-body-bytes",
            str(10 * 2**20),
        ],
        tmp_path / "log",
    )
    try:
        server.wait(timeout=STARTUP)
        # 2,000 documents of 4,000 letters returned: an 8 MB answer, more than the kernel's socket buffers take
        body = json.dumps({"query": "q", "documents": ["a" * 4000] * 2000, "return_documents": True}).encode()
        readers = []
        for _ in range(2):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
            s.connect(("127.0.0.1", server.port))
            s.sendall(request_bytes("/v1/rerank", body, f"127.0.0.1:{server.port}"))
            readers.append(s)
        ports = {s.getsockname()[1] for s in readers}

        def held() -> int:  # the server's sockets to our non-reading clients
            return sum(
                1
                for c in psutil.Process(server.process.pid).net_connections("tcp")
                if c.raddr and c.raddr.port in ports
            )

        deadline = time.monotonic() + 30
        while held() < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert held() == 2, "the server did not take the connections"
        deadline = time.monotonic() + 90  # scoring 4,000 pairs on a busy machine, then the 3 s stall
        while held() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert held() == 0, "the sockets of clients that read nothing are held past --body-timeout"
        for s in readers:
            s.close()
        check_tei(post(server.url + "/rerank", json={"query": "q", "texts": TEXTS}), reranker, "q", TEXTS)
    finally:
        server.stop()


def test_connection_limit_answers_in_dialect_shape(tiny_model, reranker, tmp_path):
    """--max-connections bounds open sockets: past it a request gets 429 in its dialect's shape; once
    the idle connections time out, requests are served again."""
    server = Server(
        ["--model", str(tiny_model), "--max-connections", "8", "--header-timeout", "2"]
        + ["--allowed-origin", "https://app.example"],
        tmp_path / "log",
    )
    try:
        server.wait(timeout=STARTUP)
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(8)]
        for s in idle:
            s.sendall(b"POST /rerank HTTP/1.1\r\n")
        time.sleep(0.3)
        for dialect, (path, body) in DIALECTS.items():
            response = post(server.url + path, json=body("q", ["a"]))
            refused(dialect, response, 429, "--max-connections", cloudflare_code=3040, tei_type="overloaded")
        # a page of an allowed origin can read the refusal (and its Retry-After) to back off
        response = post(server.url + "/v1/rerank", json={"query": "q", "documents": ["a"]}, headers=ORIGIN)
        cohere_error(response, 429, "--max-connections")
        assert response.headers["access-control-allow-origin"] == ORIGIN["origin"]
        time.sleep(2.5)
        for s in idle:  # closed by the server at the header deadline
            assert read_all(s, timeout=5) == b""
            s.close()
        check_tei(post(server.url + "/rerank", json={"query": "q", "texts": ["a"]}), reranker, "q", ["a"])
    finally:
        server.stop()


# --- finding 8: hosts and origins -----------------------------------------------------------------


@pytest.fixture(scope="module")
def open_server(tiny_model, tmp_path_factory):
    """A server that allows one more host name and one browser origin."""
    running = Server(
        [
            "--model",
            str(tiny_model),
            "--allowed-host",
            "reranker.internal.example",
            "--allowed-origin",
            "https://app.example",
        ],
        tmp_path_factory.mktemp("open") / "log",
    )
    running.wait(timeout=STARTUP)
    yield running
    running.stop()


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:{port}", "127.0.0.1.nip.io:{port}", "localhost.evil.example"]
)
def test_foreign_host_is_refused(server, host):
    """DNS rebinding: a name that is not this server's gets 403 in every dialect's shape."""
    headers = {"host": host.format(port=server.port)}
    for dialect, (path, body) in DIALECTS.items():
        response = post(server.url + path, json=body("q", ["a"]), headers=headers)
        refused(dialect, response, 403, "Host", "--allowed-host", cloudflare_code=10000, tei_type="forbidden")
    assert get(server.url + "/health", headers=headers).status_code == 403


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:{port}",
        "localhost:{port}",
        "localhost",
        "LOCALHOST:{port}",
        "127.0.0.1",
        "api.localhost:{port}",
        "[::1]:{port}",
    ],
)
def test_local_host_names_are_served(server, reranker, host):
    response = post(
        server.url + "/rerank", json={"query": "q", "texts": ["a"]}, headers={"host": host.format(port=server.port)}
    )
    check_tei(response, reranker, "q", ["a"])


def test_allowed_host_flag(open_server, server, reranker):
    headers = {"host": f"reranker.internal.example:{open_server.port}"}
    check_tei(
        post(open_server.url + "/rerank", json={"query": "q", "texts": ["a"]}, headers=headers), reranker, "q", ["a"]
    )
    tei_error(
        post(server.url + "/rerank", json={"query": "q", "texts": ["a"]}, headers=headers),
        403,
        "Host",
        error_type="forbidden",
    )


def test_a_server_on_the_network_says_which_names_it_serves(tiny_model, reranker, tmp_path):
    """Bound to 0.0.0.0 (the container recipe), clients name the server by names it cannot know
    (a compose service, a Kubernetes Service): they get 403 until --allowed-host adds them, so the
    server says so when it starts, and stays quiet when names were given."""
    server = Server(["--model", str(tiny_model), "--host", "0.0.0.0"], tmp_path / "log")
    try:
        server.wait(timeout=STARTUP)
        assert "--allowed-host" in server.log() and "Host" in server.log(), server.log()
        tei_error(
            post(server.url + "/rerank", json={"query": "q", "texts": ["a"]}, headers={"host": "reranker:8080"}),
            403,
            "--allowed-host",
            error_type="forbidden",
        )
    finally:
        server.stop()
    named = Server(["--model", str(tiny_model), "--host", "0.0.0.0", "--allowed-host", "reranker"], tmp_path / "log2")
    try:
        named.wait(timeout=STARTUP)
        assert "--allowed-host NAME" not in named.log(), named.log()
        check_tei(
            post(named.url + "/rerank", json={"query": "q", "texts": ["a"]}, headers={"host": "reranker:8080"}),
            reranker,
            "q",
            ["a"],
        )
    finally:
        named.stop()


def test_any_host_with_wildcard(tiny_model, reranker, tmp_path):
    server = Server(["--model", str(tiny_model), "--allowed-host", "*"], tmp_path / "log")
    try:
        server.wait(timeout=STARTUP)
        check_tei(
            post(server.url + "/rerank", json={"query": "q", "texts": ["a"]}, headers={"host": "any.example"}),
            reranker,
            "q",
            ["a"],
        )
    finally:
        server.stop()


def test_cross_site_post_is_refused(server, reranker):
    """A web page's `fetch(..., {method: "POST", body})` sends text/plain with its Origin: refused, in shape."""
    body = json.dumps({"query": "q", "contexts": [{"text": "a"}]})
    for origin in ["https://evil.example", "null", "http://localhost:3000", f"http://evil.example:{server.port}"]:
        headers = {"origin": origin, "content-type": "text/plain;charset=UTF-8"}
        response = post(server.url + CF_LONG, content=body, headers=headers)
        cloudflare_error(response, 403, "Origin", "--allowed-origin", code=10000)
        assert "access-control-allow-origin" not in response.headers
    for dialect, (path, make) in DIALECTS.items():
        response = post(server.url + path, json=make("q", ["a"]), headers={"origin": "https://evil.example"})
        refused(dialect, response, 403, "Origin", cloudflare_code=10000, tei_type="forbidden")
    # the server's own origin is no other site
    response = post(server.url + CF_SHORT, content=body, headers={"origin": server.url})
    check_cloudflare(response, reranker, "q", ["a"])


ORIGIN = {"origin": "https://app.example"}


def test_allowed_origin_gets_cors(open_server, reranker):
    origin = ORIGIN
    preflight = httpx.options(
        open_server.url + "/v1/rerank",
        headers={
            **origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type,authorization",
        },
    )
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    response = post(open_server.url + "/v1/rerank", json={"query": "q", "documents": ["a", "b"]}, headers=origin)
    check_cohere(response, reranker, "q", ["a", "b"])
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    cohere_error(
        post(
            open_server.url + "/v1/rerank",
            json={"query": "q", "documents": ["a"]},
            headers={"origin": "https://other.example"},
        ),
        403,
        "Origin",
    )
    # the gate's refusals reach an allowed origin's page readable too
    response = post(
        open_server.url + "/v1/rerank",
        json={"query": "q", "documents": ["a"]},
        headers={**origin, "host": "evil.example"},
    )
    cohere_error(response, 403, "--allowed-host")
    assert response.headers["access-control-allow-origin"] == "https://app.example"


# --- finding 10: shutdown, paths, half-close, errors anywhere -------------------------------------

SLOW_SERVER = """
import sys, time, pathlib
from nprerank import reranker, server
gate = pathlib.Path(sys.argv[1])
run = reranker.Reranker.run
def slow_run(self, *args, **kwargs):  # a forward pass that lasts until the test opens the gate
    while gate.exists():
        time.sleep(0.02)
    return run(self, *args, **kwargs)
reranker.Reranker.run = slow_run
sys.exit(server.main(sys.argv[2:]))
"""


def test_shutdown_past_grace_answers_in_dialect_shape(tiny_model, tmp_path):
    gate = tmp_path / "gate"
    server = Server(
        [str(gate), "--model", str(tiny_model), "--shutdown-timeout", "1"], tmp_path / "log", script=SLOW_SERVER
    )
    try:
        server.wait(timeout=STARTUP)
        gate.touch()
        with ThreadPoolExecutor(3) as pool:
            calls = {
                dialect: pool.submit(post, server.url + path, json=body("q", ["a"]))
                for dialect, (path, body) in DIALECTS.items()
            }
            time.sleep(1.0)
            server.process.send_signal(signal.SIGTERM)
            for dialect, call in calls.items():
                refused(dialect, call.result(), 503, "shutting down", cloudflare_code=3040, tei_type="unhealthy")
        assert server.process.wait(timeout=20) == 0, server.log()
    finally:
        gate.unlink(missing_ok=True)
        server.stop()


def test_health_and_answers_name_no_path(server, tiny_model):
    health = get(server.url + "/health").json()
    assert health["model"] == tiny_model.name, health
    body = post(server.url + "/v1/rerank", json={"query": "q", "documents": ["a"]}).json()
    assert body["model"] == tiny_model.name, body
    for text in (json.dumps(health), json.dumps(body), get(server.url + "/openapi.json").text):
        assert str(tiny_model.parent) not in text


def test_half_closed_client_gets_its_answer(server, reranker):
    """curl --data ... with shutdown(SHUT_WR) after the request, as some clients and proxies do."""
    for dialect, (path, body) in DIALECTS.items():
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(request_bytes(path, json.dumps(body("half", TEXTS[:3])).encode(), f"127.0.0.1:{server.port}"))
            s.shutdown(socket.SHUT_WR)
            answer = Raw(read_all(s, timeout=30))
        answered(dialect, answer, reranker, "half", TEXTS[:3])


FAILING_SERVER = """
import sys
from nprerank import reranker, server, startup
def broken(*args, **kwargs):
    raise RuntimeError("injected failure")
warm_up = startup.warm_up
def warm_up_then_break(*args, **kwargs):  # the engine works for the warm-up, then fails
    seconds = warm_up(*args, **kwargs)
    setattr(reranker.Reranker, sys.argv[1], broken)
    return seconds
startup.warm_up = warm_up_then_break
sys.exit(server.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("broken", ["run", "encode"])
def test_uncaught_errors_answer_in_dialect_shape(tiny_model, tmp_path, broken):
    server = Server([broken, "--model", str(tiny_model)], tmp_path / "log", script=FAILING_SERVER)
    try:
        server.wait(timeout=STARTUP)
        for dialect, (path, body) in DIALECTS.items():
            response = post(server.url + path, json=body("q", ["a"]))
            assert response.headers["content-type"].startswith("application/json"), response.text
            refused(dialect, response, {"tei": 424}.get(dialect, 500), cloudflare_code=5000, tei_type="backend")
        assert get(server.url + "/health").status_code == 200
    finally:
        server.stop()


# --- issue 9: ready means warmed up ---------------------------------------------------------------

WARMING_SERVER = """
import sys, time, pathlib
from nprerank import startup, server
gate = pathlib.Path(sys.argv[1])
warm_up = startup.warm_up
def gated_warm_up(reranker, say=print):  # warming up lasts until the test opens the gate
    while not gate.exists():
        time.sleep(0.02)
    return warm_up(reranker, say=say)
startup.warm_up = gated_warm_up
sys.exit(server.main(sys.argv[2:]))
"""


def test_ready_only_after_warm_up(tiny_model, reranker, tmp_path):
    gate = tmp_path / "gate"
    server = Server([str(gate), "--model", str(tiny_model)], tmp_path / "log", script=WARMING_SERVER)
    try:
        server.wait(status=503, timeout=STARTUP)
        time.sleep(1.0)
        assert get(server.url + "/health").json()["status"] == "loading"
        gate.touch()
        server.wait(status=200, timeout=STARTUP)
        check_tei(post(server.url + "/rerank", json={"query": "q", "texts": ["a"]}), reranker, "q", ["a"])
    finally:
        server.stop()


# --- issue 10's load figure -----------------------------------------------------------------------


def test_load_script_counts_every_answer(server, tiny_model):
    from load_server import run_load

    report = run_load(server.url, tiny_model, clients=4, requests=6, seed=3)
    assert report["sent"] == 24 and report["answered"] == 24, report
    assert report["lost"] == 0 and report["wrong"] == 0, report
    assert report["max_score_difference"] < 2e-5, report
